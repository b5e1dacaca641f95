"""Learning parity: does `flan_squad.train` learn SQuAD v2 (unanswerable questions included) as well as the
pipeline a user would otherwise write, on the same task, architecture, budget and seeds?

    python -m benchmarks.parity                       # both sides, seeds 0-5 (`make parity`)
    python -m benchmarks.parity --sides project --project-model-prompt flan           # the project in FLAN's format
    python -m benchmarks.parity --sides peer --seeds 0,1 --peer-target unanswerable   # one ablation
    python -m benchmarks.parity --peer-init config --project-init config              # both from the same tied T5
    python -m benchmarks.parity --task-seed 1 --seeds 6,7,8,9,10,11                     # another task, other seeds

Everything trains from random weights (t5-mini: d_model 128, d_kv 32, 3+3 layers, 4 heads, d_ff 384, dropout 0,
FLAN-T5's vocabulary): the numbers say how well each pipeline learns, never how well FLAN-T5 does.
- The task (`flan_squad.data.planted.build_decoy`): real SQuAD v1.1 dev contexts of up to 400 characters with a fact
  "The <kind> code is <word>." planted at a random sentence boundary, the question "What is the <kind> code?";
  in a third of the questions the fact is of another kind (unanswerable, though the context holds a code).
  2,000 training and 200 dev questions, seeded.
- `project`: `python -m flan_squad.train model=t5_tiny strategy=full dataset=squad_v2` on those files, fp32, from
  t5_tiny's own random init (FLAN-T5's untied lm_head, std d_model**-0.5) in its default format (`model.prompt=t5`;
  `--project-model-prompt flan`: FLAN's). Its ablations are options of the entry point (`model.no_answer`,
  `dataset.group_batches`), so an ablated run is a run a user can make.
- `peer`: `Seq2SeqTrainer` as transformers' `examples/pytorch/question-answering/run_seq2seq_qa.py` sets it up:
  "question: ... context: ..." inputs, the first answer or "" as the target, `DataCollatorForSeq2Seq` (dynamic
  padding), the Trainer's random sampler and default AdamW, linear schedule with 10% warm-up, greedy decoding, on
  the model a user builds, `T5ForConditionalGeneration(T5Config(...))` (`--peer-init config`, default: lm_head tied
  to the std-1 embedding; `--peer-init checkpoint`: the project's random checkpoint instead).
Both: batch 16, lr 1e-3, 3 epochs (375 steps), max_source_length 256, clipping at 1.0, one validation after the
last epoch (the project's default validates every epoch and keeps the best epoch's weights: a pick on the dev set
the peer does not get), and by default a different random init per seed, the same for both sides at one seed
(`--init per-seed`; `--init shared`: init 0 for every seed, as `model.init_seed: 0` gives a seed sweep;
`--project-init config` trains the project from the peer's tied model), scored by
`flan_squad.evaluation.metrics` (the official v2.0 rules). Each run is its own process, kept as JSON under --runs-dir
and reused when asked again (same side, seed and switches); the table goes to stdout, everything to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = {"d_model": 128, "d_kv": 32, "num_layers": 3, "num_decoder_layers": 3, "num_heads": 4, "d_ff": 384,
                "dropout_rate": 0.0}
SIDES = ("project", "peer")
# The ablation switches of each side, at their defaults; a row's label names the ones set otherwise.
PROJECT_DEFAULTS = {"model_prompt": "t5", "project_target": "format", "project_group_batches": 50,
                    "project_init": "checkpoint"}
PEER_DEFAULTS = {"peer_target": "empty", "peer_prompt": "qa", "peer_sampler": "random", "peer_init": "config"}
# How the project's switches read as flan_squad.train overrides, in labels
PROJECT_OVERRIDES = {"model_prompt": "model.prompt", "project_target": "model.no_answer",
                     "project_group_batches": "dataset.group_batches", "project_init": "init"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3,4,5", help="comma-separated run seeds")
    p.add_argument("--sides", default="project,peer", help="project, peer or both")
    p.add_argument("--init", choices=("per-seed", "shared"), default="per-seed",
                   help="per-seed: seed S starts from random init S on both sides; shared: init 0 for every seed")
    p.add_argument("--train", type=int, default=2000, help="training questions")
    p.add_argument("--dev", type=int, default=200, help="dev questions")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the generated task")
    p.add_argument("--disjoint-contexts", action="store_true", help="dev contexts unseen in training (harder)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy decoding length (answers are 1-4 tokens)")
    # ablation switches, one difference at a time
    p.add_argument("--project-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for the project side (repeatable), e.g. dataset.sampler=grouped")
    p.add_argument("--project-group-batches", type=int, default=PROJECT_DEFAULTS["project_group_batches"],
                   help="ablation: the project's dataset.group_batches, batches per length-sorted group of its "
                        "training order (1: random batches)")
    p.add_argument("--project-model-prompt", choices=("t5", "flan"), default=PROJECT_DEFAULTS["model_prompt"],
                   help="the project's model.prompt: t5 (t5_tiny's default) or flan (FLAN-T5's)")
    p.add_argument("--project-target", choices=("format", "empty", "unanswerable"),
                   default=PROJECT_DEFAULTS["project_target"],
                   help="ablation: the project's model.no_answer, its target for an unanswerable question (format: "
                        "model.prompt's own; empty: the peer's; unanswerable: FLAN's), e.g. FLAN's template with the "
                        "empty target: --project-model-prompt flan --project-target empty")
    p.add_argument("--peer-target", choices=("empty", "unanswerable"), default=PEER_DEFAULTS["peer_target"],
                   help="the peer's target for an unanswerable question")
    p.add_argument("--peer-prompt", choices=("qa", "project"), default=PEER_DEFAULTS["peer_prompt"],
                   help="qa: 'question: ... context: ...'; "
                        "project: the project's flan format (flan_squad.data.encoding.encode)")
    p.add_argument("--peer-sampler", choices=("random", "grouped"), default=PEER_DEFAULTS["peer_sampler"],
                   help="grouped: the project's LengthGroupedSampler instead of the Trainer's random sampler")
    p.add_argument("--peer-init", choices=("checkpoint", "config"), default=PEER_DEFAULTS["peer_init"],
                   help="checkpoint: the project's random checkpoint for the init seed (untied lm_head, std "
                        "d_model**-0.5); config: T5ForConditionalGeneration(T5Config(...)), as a user builds it")
    p.add_argument("--project-init", choices=("checkpoint", "config"), default=PROJECT_DEFAULTS["project_init"],
                   help="config: the project trains from the --peer-init config model, saved as a pretrained dir")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each with its own process, one thread)")
    p.add_argument("--fresh", action="store_true", help="rerun even when a run's JSON is already in --runs-dir")
    p.add_argument("--runs-dir", default=str(ROOT / "outputs" / "parity"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "parity.json"))
    p.add_argument("--run", nargs=2, metavar=("SPEC_JSON", "OUT_JSON"), help=argparse.SUPPRESS)  # one run, internal
    args = p.parse_args(argv)
    if args.run:
        return args
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.sides = [s.strip() for s in args.sides.split(",")]
    if set(args.sides) - set(SIDES):
        p.error(f"--sides: expected some of {','.join(SIDES)}")
    return args


# --- the task ------------------------------------------------------------------------------------------


def task_files(args, shared_dir: str) -> Path:
    from flan_squad.data.planted import build_decoy

    name = f"decoy-{args.train}-{args.dev}-seed{args.task_seed}{'-disjoint' if args.disjoint_contexts else ''}"
    directory = Path(args.runs_dir) / "task" / name
    if not (directory / "dev.json").exists():
        build_decoy(directory, shared_dir, args.train, args.dev, args.task_seed, args.disjoint_contexts)
    return directory


# --- one run (its own process) -------------------------------------------------------------------------


def _base_overrides(spec: dict) -> list[str]:
    return ["model=t5_tiny", *(f"++model.architecture.{k}={v}" for k, v in ARCHITECTURE.items()),
            f"model.init_seed={spec['init_seed']}", "strategy=full", f"strategy.lr={spec['lr']}", "dataset=squad_v2",
            f"dataset.train_file={spec['task']}/train.json", f"dataset.validation_file={spec['task']}/dev.json",
            "dataset.max_source_length=256", f"dataset.batch_size={spec['batch_size']}", "dataset.eval_batch_size=50",
            f"trainer.max_epochs={spec['epochs']}", "trainer=cpu", "trainer.precision=32-true",
            # validate once, after the last epoch, as the peer does (no best-epoch pick on dev; and cheaper)
            f"++trainer.check_val_every_n_epoch={spec['epochs']}",
            f"eval.max_new_tokens={spec['max_new_tokens']}", f"seed={spec['seed']}",
            f"paths.cache_dir={spec['cache_dir']}"]


def config_built_model(init_seed: int):
    """A random T5 as a user builds one, `T5ForConditionalGeneration(T5Config(...))`: transformers ties lm_head to the
    embedding (std 1.0) and, `tie_word_embeddings` not being passed False, scales the decoder output by d_model**-0.5.
    Fewer parameters than the project's random FLAN-T5 stand-in (untied lm_head, std d_model**-0.5, no scaling)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from flan_squad.models.base import FLAN_T5_ARCHITECTURE

    config = {k: v for k, v in {**FLAN_T5_ARCHITECTURE, **ARCHITECTURE}.items() if k != "tie_word_embeddings"}
    torch.manual_seed(init_seed)
    return T5ForConditionalGeneration(T5Config(**config))


def run_project(spec: dict) -> dict:
    """`python -m flan_squad.train` itself, as a user runs it; its metrics.json."""
    with tempfile.TemporaryDirectory(prefix="parity-") as out:
        argv = [*_base_overrides(spec), "logger=csv", f"hydra.run.dir={out}", *spec["project_set"],
                f"model.prompt={spec['model_prompt']}", f"model.no_answer={spec['project_target']}",
                f"dataset.group_batches={spec['project_group_batches']}"]
        if spec["project_init"] == "config":  # the peer's tied model, loaded as a pretrained checkpoint
            config_built_model(spec["init_seed"]).save_pretrained(Path(out) / "init")
            argv += ["model.init=pretrained", f"model.name_or_path={out}/init"]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "flan_squad.train", *argv], cwd=ROOT, capture_output=True,
                              text=True, check=False)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"flan_squad.train {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    return {**{k: metrics[k] for k in ("f1", "exact", "HasAns_f1", "NoAns_f1")}, "seconds": round(seconds, 1),
            "train_seconds": metrics.get("train_time_s")}


def run_peer(spec: dict) -> dict:
    """Seq2SeqTrainer as run_seq2seq_qa.py sets it up, on the same model, data and budget."""
    import torch
    from hydra.utils import instantiate
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from flan_squad.data.encoding import encode
    from flan_squad.data.prompts import answer_to_prediction
    from flan_squad.data.sampler import LengthGroupedSampler
    from flan_squad.data.squad import read_squad_file
    from flan_squad.evaluation.metrics import score
    from flan_squad.utils.config import compose

    cfg = compose("train", [*_base_overrides(spec), "paths.output_dir=unused"])
    base = instantiate(cfg.model, _convert_="all")
    tokenizer = base.load_tokenizer()
    _, train_q = read_squad_file(cfg.dataset.train_file)
    _, dev_q = read_squad_file(cfg.dataset.validation_file)

    def features(questions) -> list[dict]:
        if spec["peer_prompt"] == "project":  # the project's prompt and its "unanswerable" target
            enc = encode(questions, tokenizer, "v2", 256, 32)
            return [{"input_ids": x, "attention_mask": [1] * len(x), "labels": y}
                    for x, y in zip(enc.input_ids, enc.labels)]
        # run_seq2seq_qa.py's preprocess_squad_batch + preprocess_function
        inputs = [f"question: {q.question.lstrip()} context: {q.context.lstrip()}" for q in questions]
        empty = "unanswerable" if spec["peer_target"] == "unanswerable" else ""
        targets = [q.answers[0] if q.answers else empty for q in questions]
        enc = tokenizer(inputs, max_length=256, truncation=True)
        labels = tokenizer(text_target=targets, max_length=30, truncation=True).input_ids
        return [{"input_ids": x, "attention_mask": m, "labels": y}
                for x, m, y in zip(enc.input_ids, enc.attention_mask, labels)]

    train_features, dev_features = features(train_q), features(dev_q)
    torch.manual_seed(spec["seed"])
    model = config_built_model(spec["init_seed"]) if spec["peer_init"] == "config" else base.load()
    with tempfile.TemporaryDirectory(prefix="parity-peer-") as out:
        args = Seq2SeqTrainingArguments(
            output_dir=out, per_device_train_batch_size=spec["batch_size"], per_device_eval_batch_size=50,
            num_train_epochs=spec["epochs"], learning_rate=spec["lr"], warmup_steps=0.1, lr_scheduler_type="linear",
            max_grad_norm=1.0, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
            disable_tqdm=True, use_cpu=True, seed=spec["seed"], dataloader_num_workers=0, predict_with_generate=True,
        )
        trainer_class = Seq2SeqTrainer
        if spec["peer_sampler"] == "grouped":
            lengths = [len(f["input_ids"]) for f in train_features]

            class GroupedTrainer(Seq2SeqTrainer):  # the project's batches, the Trainer's everything else
                def _get_train_sampler(self, *a, **k):
                    sampler = LengthGroupedSampler(lengths, spec["batch_size"], spec["seed"])
                    self._grouped_sampler = sampler
                    return sampler

            trainer_class = GroupedTrainer
        trainer = trainer_class(model=model, args=args, train_dataset=train_features,
                                data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        output = trainer.predict(dev_features, max_new_tokens=spec["max_new_tokens"], num_beams=1, do_sample=False)
    tokens = output.predictions
    tokens[tokens == -100] = tokenizer.pad_token_id
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    predictions = {q.id: answer_to_prediction(t) for q, t in zip(dev_q, texts)}
    scores = score("v2", dev_q, predictions, None)
    return {**{k: scores[k] for k in ("f1", "exact", "HasAns_f1", "NoAns_f1")}, "train_seconds": round(seconds, 1)}


# --- the table -----------------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| pipeline | seeds | F1 (mean ± sd) | HasAns F1 | NoAns F1 | per-seed F1 | per-seed NoAns F1 | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    def per(runs: list[dict], key: str) -> str:
        return " ".join(f"{r[key]:.1f}" for r in runs)

    for row in rows:
        runs = row["runs"]
        lines.append(f"| {row['label']} | {','.join(str(r['seed']) for r in runs)} | "
                     f"{_mean_sd([r['f1'] for r in runs])} | {_mean_sd([r['HasAns_f1'] for r in runs])} | "
                     f"**{_mean_sd([r['NoAns_f1'] for r in runs])}** | {per(runs, 'f1')} | {per(runs, 'NoAns_f1')} | "
                     f"{statistics.median(r['train_seconds'] or 0 for r in runs):.0f} |")
    return "\n".join(lines)


def _variant(args, side: str) -> dict:
    """The switches a side's runs depend on: with the seed, what names a kept run."""
    if side == "project":
        return {"project_set": sorted(args.project_set), "model_prompt": args.project_model_prompt,
                "project_group_batches": args.project_group_batches, "project_target": args.project_target,
                "project_init": args.project_init}
    return {"peer_target": args.peer_target, "peer_prompt": args.peer_prompt, "peer_sampler": args.peer_sampler,
            "peer_init": args.peer_init}


def _label(side: str, variant: dict, init: str) -> str:
    """The table's name for a row: the entry point and each switch away from its default."""
    if side == "project":
        switches = variant["project_set"] + [f"{PROJECT_OVERRIDES[k]}={v}" for k, v in variant.items()
                                             if k in PROJECT_DEFAULTS and v != PROJECT_DEFAULTS[k]]
    else:
        switches = [f"{k.removeprefix('peer_')}={v}" for k, v in variant.items() if v != PEER_DEFAULTS[k]]
    extra = " ".join(switches)
    name = "flan_squad.train" if side == "project" else "Seq2SeqTrainer"
    return f"{name}{' ' + extra if extra else ''}{' (init 0 for all seeds)' if init == 'shared' else ''}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.run:
        spec = json.loads(args.run[0])
        result = (run_project if spec["side"] == "project" else run_peer)(spec)
        Path(args.run[1]).write_text(json.dumps({**spec, **result}, indent=1))
        return

    from flan_squad.utils.files import write_json_atomic

    shared = os.environ.get("FLAN_SQUAD_SHARED", str(ROOT.parent / "shared"))
    task = task_files(args, shared)
    common = {"task": str(task), "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
              "max_new_tokens": args.max_new_tokens, "cache_dir": str(Path(args.runs_dir) / "cache")}
    todo, rows = [], []
    for side in args.sides:
        variant = _variant(args, side)
        row = {"label": _label(side, variant, args.init), "side": side, "variant": variant, "init": args.init,
               "runs": []}
        for seed in args.seeds:
            spec = {"side": side, "seed": seed, "init_seed": seed if args.init == "per-seed" else 0,
                    **common, **variant}
            key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
            path = Path(args.runs_dir) / "runs" / f"{side}-seed{seed}-{key}.json"
            row["runs"].append(path)
            if args.fresh or not path.exists():
                todo.append((spec, path))
        rows.append(row)

    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.jobs > 1 else dict(os.environ)

    def run_one(item) -> None:
        spec, path = item
        path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.parity", "--run", json.dumps(spec), str(path)],
                              cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{spec['side']} seed {spec['seed']} failed:\n{proc.stderr[-3000:]}")
        print(f"done: {spec['side']} seed {spec['seed']}: {json.loads(path.read_text())['f1']:.1f}", flush=True)

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(run_one, todo))
    for row in rows:
        row["runs"] = [json.loads(p.read_text()) for p in row["runs"]]
    print("Random init, trained here from random weights (not FLAN-T5); decoy v2 task, "
          f"{args.train} train / {args.dev} dev questions, {args.epochs} epochs")
    print(table(rows))
    write_json_atomic(args.out, {"args": {k: v for k, v in vars(args).items() if k != "run"}, "rows": rows})


if __name__ == "__main__":
    main()
