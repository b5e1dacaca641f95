"""Benchmarks: the project's training and evaluation paths against the Hugging Face Trainer pipeline.

    python -m benchmarks.bench              # everything, side by side (`make bench`)
    python -m benchmarks.bench --quick      # fewer steps, repeats and questions: a first look
    python -m benchmarks.bench --device cuda
    python -m benchmarks.bench --trained-model outputs/runs/<run>   # time evaluation on that model

Random-init weights (no pretrained FLAN-T5 here), so the numbers measure cost, never accuracy:
1. training throughput of each strategy, with and without gradient checkpointing, as `flan_squad.train`
   runs it, against `Seq2SeqTrainer` (run_seq2seq_qa.py's setup) and against inputs padded to max_source_length;
2. evaluation as `flan_squad.evaluate` (and training's validation) runs it, against
   `Seq2SeqTrainer.predict(predict_with_generate=True)`: on random weights, whose answers never end, and on a
   trained model, whose answers stop after a token or two (`--trained-model`; by default one trained here in
   a minute or two on facts planted in SQuAD contexts);
3. peak memory of each configuration (its own process: peak RSS on CPU, max allocated on CUDA);
4. the machine's matmul peak and each run's model FLOP utilisation.
1 and 2 run in fp32 against fp32 and in bf16 against bf16 (Lightning's bf16-mixed, the Trainer's bf16=True),
one table each (`--precision`), plus "what you get": the project in its automatic precision against the
baseline in fp32. Prints the tables and writes benchmarks/results/latest.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from flan_squad.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = sorted(p.stem for p in (CONFIG_DIR / "strategy").glob("*.yaml"))  # every conf/strategy option


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default="flan_t5_small", help="conf/model option for throughput (random init)")
    p.add_argument("--memory-model", default="flan_t5_base", help="conf/model option for the extra memory runs")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per epoch (steps x batch questions)")
    p.add_argument("--repeats", type=int, default=3, help="epochs per training run; the median is reported")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-source-length", type=int, default=512)
    p.add_argument("--eval-questions", type=int, default=256)
    p.add_argument("--eval-repeats", type=int, default=3)
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--no-pad-baseline", action="store_true", help="skip the pad-to-max_source_length runs")
    p.add_argument("--dataset", default="squad_v1")
    p.add_argument("--shared-dir", default=None, help="data + tokenizer dir (default: the config's)")
    p.add_argument("--in-process", action="store_true",
                   help="run everything in this process (fast; peak memory then is not per configuration)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "both"), default="auto",
                   help="fp32: both pipelines in fp32; bf16: bf16-mixed against bf16=True; both; auto (default): both "
                        "where bf16 is native, else fp32 and a short bf16 sample (emulated bf16 is ~10x slower)")
    p.add_argument("--trained-model", default="planted",
                   help="a model whose answers stop early, for the evaluation: 'planted' (default) trains --model from "
                        "random weights on planted facts for --trained-steps steps; or a flan_squad.train run dir or a "
                        "Hugging Face model dir (e.g. a full fine-tuning run's model/); '' skips it")
    p.add_argument("--trained-steps", type=int, default=24, help="optimizer steps of the planted training")
    p.add_argument("--quick", action="store_true", help="steps 2, repeats 2, 64 eval questions, 1 eval repeat")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latest.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.eval_questions, args.eval_repeats = 2, 2, 64, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch here")
    args.strategies = [s.strip() for s in args.strategies.split(",")]
    unknown = set(args.strategies) - set(STRATEGIES)
    if unknown:
        p.error(f"--strategies: unknown {sorted(unknown)}; expected some of {','.join(STRATEGIES)}")
    if args.trained_model not in ("planted", "") and not Path(args.trained_model).is_dir():
        p.error(f"--trained-model {args.trained_model}: no such directory")
    return args


def machine(device: str) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_train(spec, in_process: bool, log_dir: Path) -> dict:
    """One training configuration, in its own process unless `in_process`."""
    from benchmarks import runs  # noqa: PLC0415  (heavy: only the workers need the whole stack)

    name = f"{spec.model}-{spec.strategy}-gc{int(spec.gradient_checkpointing)}-{spec.pipeline}-{spec.precision}"
    started = time.perf_counter()
    if in_process:
        result = runs.train_run(spec)
    else:
        out, log = log_dir / f"{name}.json", log_dir / f"{name}.log"
        out.unlink(missing_ok=True)
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.runs", json.dumps(asdict(spec)), str(out)],
                                  cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not out.exists():
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            print(f"  {name}: FAILED (exit {proc.returncode}): {tail[0]}  [log: {log}]", file=sys.stderr)
            return {"spec": asdict(spec), "error": f"exit {proc.returncode}: {tail[0]}", "log": str(log)}
        result = json.loads(out.read_text())
    print(f"  {name}: {result['examples_per_s']:.2f} ex/s, peak {result['peak_memory_mb']:.0f} MB "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return result


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# Where bf16 is emulated (CPUs without AVX512-BF16 or AMX) a bf16-mixed training step of flan-t5-small took ~11x
# an fp32 one here (145 s against 13 s, batch 8 x 512, one thread): the bf16 table is then a short sample, the
# first strategy without checkpointing or padded baseline, one step (its warm-up is a small share of such a step).
BF16_SAMPLE = {"steps": 1, "repeats": 1, "eval_questions": 16, "eval_repeats": 1}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def precision_plan(choice: str, bf16_native: bool) -> list[tuple[str, bool]]:
    """The tables to measure: (precision, whether only a short sample)."""
    if choice == "auto":
        return [("fp32", False), ("bf16", not bf16_native)]
    return [(p, False) for p in (("fp32", "bf16") if choice == "both" else (choice,))]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from benchmarks.runs import Spec
    from flan_squad.config import auto_precision, bf16_is_native

    out = Path(args.out)
    log_dir = out.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = machine(args.device)
    native = bf16_is_native(args.device)
    auto = "bf16" if auto_precision("gpu" if args.device == "cuda" else "cpu") == "bf16-mixed" else "fp32"
    print(f"machine: {info['cpu']}, {info['cores']} cores; bf16 {'native' if native else 'emulated'}, "
          f"the project's automatic precision: {auto}", file=sys.stderr)
    base = Spec(model=args.model, steps=args.steps, epochs=args.repeats, batch_size=args.batch_size,
                max_source_length=args.max_source_length, eval_questions=args.eval_questions,
                device=args.device, dataset=args.dataset, shared_dir=args.shared_dir)

    # 1, 2 and 4 (small architecture), once per precision; the trained model is made once for all of them.
    with tempfile.TemporaryDirectory(prefix="bench-trained-") as scratch:
        trained = trained_model(args, base, scratch)
        tables = {precision: measure_table(args, base, precision, sample, trained, log_dir)
                  for precision, sample in precision_plan(args.precision, native)}

    # 3 (larger architecture): a couple of steps per configuration, the project's path in its automatic precision.
    memory: list[dict] = []
    if args.memory_model:
        for strategy in args.strategies:
            for gc in (False, True):
                spec = replace(base, model=args.memory_model, strategy=strategy, gradient_checkpointing=gc,
                               steps=args.memory_steps, epochs=1, eval_questions=8, precision=auto)
                memory.append(run_train(spec, args.in_process, log_dir))

    results = summarise(args, info, native, auto, tables, memory, time.perf_counter() - started)
    from flan_squad.files import write_json_atomic

    write_json_atomic(out, results)
    print(table(results))
    print(f"\nwrote {out}")
    return results


def trained_model(args, base, scratch: str) -> str | None:
    """The model whose answers stop early: --trained-model's dir, or one trained here on planted facts."""
    if args.trained_model != "planted":
        return str(Path(args.trained_model).resolve()) if args.trained_model else None
    from benchmarks.evaluation import train_planted

    started = time.perf_counter()
    run_dir = train_planted(base, args.trained_steps, Path(scratch) / "planted")
    print(f"  planted training of {args.model}: {args.trained_steps} steps ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr, flush=True)
    return str(run_dir)


def measure_table(args, base, precision: str, sample: bool, trained: str | None, log_dir: Path) -> dict:
    """One precision, both pipelines alike: every training configuration, then the evaluation comparison
    on random weights and on the trained model."""
    from benchmarks.evaluation import eval_run
    from benchmarks.flops import peak_matmul_flops
    from benchmarks.runs import HF_BF16, LIGHTNING_PRECISION

    spec = replace(base, precision=precision)
    strategies, checkpointing, eval_repeats = args.strategies, (False, True), args.eval_repeats
    pad = not args.no_pad_baseline
    if sample:
        spec = replace(spec, steps=min(spec.steps, BF16_SAMPLE["steps"]), epochs=min(spec.epochs, BF16_SAMPLE["repeats"]),
                       eval_questions=min(spec.eval_questions, BF16_SAMPLE["eval_questions"]))
        strategies, checkpointing, pad = strategies[:1], (False,), False
        eval_repeats = min(eval_repeats, BF16_SAMPLE["eval_repeats"])
    peak = peak_matmul_flops(torch.device(args.device), DTYPES[precision])
    print(f"{precision}{' (emulated: a short sample)' if sample else ''}: matmul peak "
          f"{peak['peak_flops'] / 1e9:.1f} GFLOP/s ({peak['dtype']})", file=sys.stderr, flush=True)

    train: list[dict] = []
    for strategy in strategies:
        for gc in checkpointing:
            for pipeline in ["project", "hf"] + (["hf_pad"] if pad and not gc else []):
                train.append(run_train(replace(spec, strategy=strategy, gradient_checkpointing=gc, pipeline=pipeline),
                                       args.in_process, log_dir))

    # Both pipelines alternating in this process, each on its own copy of the same weights.
    evaluations = {"random": eval_run(spec, eval_repeats)}
    if trained:
        evaluations["trained"] = eval_run(spec, eval_repeats, trained)
        if args.trained_model == "planted":  # its temporary dir is gone after the bench
            evaluations["trained"]["model"] = f"{args.model} trained on planted facts, {args.trained_steps} steps"
    for name, e in evaluations.items():
        print(f"  eval ({name} weights): {', '.join(f'{k} {v:.2f}' for k, v in e['examples_per_s'].items())} "
              f"questions/s", file=sys.stderr, flush=True)
    return {"precision": precision, "lightning_precision": LIGHTNING_PRECISION[precision], "hf_bf16": HF_BF16[precision],
            "sample": sample, "peak_matmul": peak, "train": train, "eval": evaluations["random"],
            "eval_trained": evaluations.get("trained")}


def _find(runs: list[dict], strategy: str, gc: bool, pipeline: str = "project") -> dict:
    for r in runs:
        s = r["spec"]
        if (s["strategy"], s["gradient_checkpointing"], s["pipeline"]) == (strategy, gc, pipeline) and "error" not in r:
            return r
    return {}


def _train_ratios(mine: list[dict], baseline: list[dict], key: str = "examples_per_s", against: str = "hf") -> dict:
    """{strategy: {"gc_off", "gc_on"}: project's `key` over the baseline's}, for the project's runs in `mine`."""
    out: dict[str, dict[str, float | None]] = {}
    for r in mine:
        s = r["spec"]
        if s["pipeline"] == "project":
            gc = s["gradient_checkpointing"]
            out.setdefault(s["strategy"], {})["gc_on" if gc else "gc_off"] = ratio(
                _find(mine, s["strategy"], gc).get(key), _find(baseline, s["strategy"], gc, against).get(key))
    return out


def _lower(by_gc: dict) -> dict:
    """Per strategy, the lower of its checkpointing settings."""
    return {s: min((v for v in d.values() if v is not None), default=None) for s, d in by_gc.items()}


def _eval_ratio(mine: dict | None, baseline: dict | None) -> float | None:
    if not mine or not baseline or mine["questions"] != baseline["questions"]:
        return None
    return ratio(mine["examples_per_s"]["project"], baseline["examples_per_s"]["hf"])


def summarise_table(t: dict) -> dict:
    """A table's ratios, project over baseline, both in the table's precision."""
    for r in t["train"]:
        if "error" not in r:
            r["mfu"] = round(r["model_flops_per_s"] / t["peak_matmul"]["peak_flops"], 4)
    by_gc = _train_ratios(t["train"], t["train"])
    trained = t["eval_trained"] or {}
    t.update({
        # The lower of the two checkpointing settings, per strategy (the detail is in _by_gc).
        "train_speedup_vs_hf": _lower(by_gc),
        "train_speedup_vs_hf_by_gc": by_gc,
        "train_speedup_vs_pad_to_max": {s: d.get("gc_off") for s, d in _train_ratios(t["train"], t["train"], against="hf_pad").items()},
        "peak_memory_over_hf": _train_ratios(t["train"], t["train"], "peak_memory_mb"),
        "eval_speedup_vs_hf": _eval_ratio(t["eval"], t["eval"]),
        "eval_answer_agreement": t["eval"]["answer_agreement"],
        "eval_speedup_vs_hf_trained": _eval_ratio(trained, trained),
        "eval_trained_answer_tokens_mean": trained.get("answer_tokens_mean"),
    })
    return t


HEADLINE = ("train_speedup_vs_hf", "train_speedup_vs_hf_by_gc", "train_speedup_vs_pad_to_max", "eval_speedup_vs_hf",
            "eval_answer_agreement", "eval_speedup_vs_hf_trained", "eval_trained_answer_tokens_mean", "peak_memory_over_hf")


def summarise(args, info, native, auto, tables, memory, seconds) -> dict:
    from benchmarks.runs import LIGHTNING_PRECISION

    for t in tables.values():
        summarise_table(t)
    # The headline figures: like for like, in the precision the project runs in by default (when measured in full).
    headline = auto if auto in tables and not tables[auto]["sample"] else next(iter(tables))
    h = tables[headline]
    # What a user gets: the project in its automatic precision against a Seq2SeqTrainer left in fp32.
    mine, fp32 = tables.get(auto), tables.get("fp32")
    what_you_get = None
    if mine and fp32:
        by_gc = _train_ratios(mine["train"], fp32["train"])
        what_you_get = {"project_precision": LIGHTNING_PRECISION[auto], "baseline_precision": "fp32",
                        "train_speedup_vs_hf": _lower(by_gc), "train_speedup_vs_hf_by_gc": by_gc,
                        "eval_speedup_vs_hf": _eval_ratio(mine["eval"], fp32["eval"]),
                        "eval_speedup_vs_hf_trained": _eval_ratio(mine["eval_trained"], fp32["eval_trained"])}
    # A 4-bit base with checkpointing (QLoRA) against training every weight without it (full fine-tuning).
    ok = [r for r in memory if "error" not in r]
    full_base = next((r for r in ok if r["trainable_params"] == r["total_params"]
                      and not r["spec"]["gradient_checkpointing"]), {})
    qlora_gc_base = min((r for r in ok if r["params_4bit"] and r["spec"]["gradient_checkpointing"]),
                        key=lambda r: r["peak_memory_mb"], default={})
    for r in memory:
        if "error" not in r:
            r["mfu"] = round(r["model_flops_per_s"] / tables[headline]["peak_matmul"]["peak_flops"], 4)
    per_strategy, eval_speedup = h["train_speedup_vs_hf"], h["eval_speedup_vs_hf"]
    qlora_over_full = ratio(qlora_gc_base.get("peak_memory_mb"), full_base.get("peak_memory_mb"))
    return {
        "note": "random-init weights (no pretrained FLAN-T5 here): cost only, never accuracy",
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "precision": headline,  # of the figures below; every table has its own in `tables`
        "auto_precision": LIGHTNING_PRECISION[auto],
        "bf16_native": native,
        "peak_matmul": h["peak_matmul"],
        **{k: h[k] for k in HEADLINE},
        "what_you_get": what_you_get,
        "qlora_gc_peak_over_full_base": qlora_over_full,
        "targets_met": {
            "train_1.5x_vs_hf": all(v is not None and v >= 1.5 for v in per_strategy.values()),
            "eval_2x_vs_hf": bool(eval_speedup and eval_speedup >= 2.0),
            "eval_answers_identical": h["eval_answer_agreement"] == 1.0,
            "peak_memory_le_hf": all(v is not None and v <= 1.0 for d in h["peak_memory_over_hf"].values()
                                     for v in d.values()),
            "qlora_gc_le_35pct_of_full_base": None if qlora_over_full is None else qlora_over_full <= 0.35,
        },
        "tables": tables,
        "memory": memory,
        "bench_seconds": round(seconds, 1),
    }


def _fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def table(res: dict) -> str:
    s, m = res["settings"], res["machine"]
    lines = [
        f"flan-squad benchmarks · {' + '.join(filter(None, (s['model'], s['memory_model'])))} architectures, "
        f"RANDOM INIT · {s['dataset']} · device {s['device']}",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, torch {m['torch']} "
        f"({m['torch_threads']} threads), load at start {m['load_average_at_start']}; bf16 "
        f"{'native' if res['bf16_native'] else 'EMULATED (no AVX512-BF16/AMX: slow)'}, so the project runs in "
        f"{res['auto_precision']} by default",
    ]
    for t in res["tables"].values():
        lines += ["", *_precision_table(s, t)]
    w = res["what_you_get"]
    if w:
        train = ", ".join(f"{k} {_fmt(v)}" for k, v in w["train_speedup_vs_hf"].items())
        lines += ["", f"what you get: the project in its automatic precision ({w['project_precision']} here) against "
                      f"Seq2SeqTrainer in fp32: training x HF {train} (lower of gc off/on); evaluation "
                      f"x{_fmt(w['eval_speedup_vs_hf'])} (random init), x{_fmt(w['eval_speedup_vs_hf_trained'])} (trained)"]
    if res["memory"]:
        lines += ["", f"peak memory, {s['memory_model']} architecture, {s['memory_steps']} steps (project path, "
                      f"{res['auto_precision']}):"]
        for r in res["memory"]:
            sp = r["spec"]
            value = "FAILED" if "error" in r else f"{r['peak_memory_mb']:.0f} MB ({r['peak_memory_kind']})"
            lines.append(f"  {sp['strategy']:<7} gc {'on ' if sp['gradient_checkpointing'] else 'off'}  {value}")
        lines.append(f"  qlora+gc / full: {_fmt(res['qlora_gc_peak_over_full_base'])}")
    verdict = {True: "yes", False: "NO", None: "not measured"}
    lines += ["", f"targets ({res['precision']} table): "
              + ", ".join(f"{k} {verdict[v]}" for k, v in res["targets_met"].items()),
              f"({res['bench_seconds']:.0f} s in all)"]
    return "\n".join(lines)


def _precision_table(s: dict, t: dict) -> list[str]:
    pk = t["peak_matmul"]
    title = {"fp32": "fp32: the project in 32-true against Seq2SeqTrainer in fp32",
             "bf16": "bf16: the project in bf16-mixed against Seq2SeqTrainer with bf16=True"}[t["precision"]]
    first = t["train"][0]["spec"] if t["train"] else {"steps": s["steps"], "epochs": s["repeats"]}
    lines = [
        f"== {title}{' · EMULATED bf16: a short sample' if t['sample'] else ''} · matmul peak "
        f"{pk['peak_flops'] / 1e9:.1f} GFLOP/s {pk['dtype']} ==",
        f"training: batch {s['batch_size']}, max_source_length {s['max_source_length']}, {first['steps']} steps x "
        f"{first['epochs']} epochs (median of epochs), same questions in every run",
        f"{'strategy':<9}{'gc':<5}{'ex/s':>8}{'tok/s':>8}{'MFU':>7}{'pad':>6}{'peak MB':>9} |{'HF ex/s':>9}{'pad':>6}"
        f"{'HF MB':>8}{'pad ex/s':>10} |{'x HF':>6}{'x pad':>7}{'mem/HF':>8}",
    ]
    for r in t["train"]:
        sp = r["spec"]
        if sp["pipeline"] != "project":
            continue
        strategy, gc = sp["strategy"], sp["gradient_checkpointing"]
        if "error" in r:
            lines.append(f"{strategy:<9}{'on' if gc else 'off':<5} FAILED: {r['error']}")
            continue
        hf, pad = _find(t["train"], strategy, gc, "hf"), _find(t["train"], strategy, gc, "hf_pad")
        key = "gc_on" if gc else "gc_off"
        lines.append(
            f"{strategy:<9}{'on' if gc else 'off':<5}{r['examples_per_s']:>8.2f}{r['tokens_per_s']:>8.0f}"
            f"{r['mfu'] * 100:>6.1f}%{_fmt(r.get('padded_over_real_source_tokens')):>6}{r['peak_memory_mb']:>9.0f} |"
            f"{_fmt(hf.get('examples_per_s')):>9}{_fmt(hf.get('padded_over_real_source_tokens')):>6}"
            f"{_fmt(hf.get('peak_memory_mb'), '.0f'):>8}{_fmt(pad.get('examples_per_s')):>10} |"
            f"{_fmt(t['train_speedup_vs_hf_by_gc'][strategy][key]):>6}"
            f"{_fmt(t['train_speedup_vs_pad_to_max'][strategy] if not gc else None):>7}"
            f"{_fmt(t['peak_memory_over_hf'][strategy][key]):>8}"
        )
    ev = t["eval"]
    lines += [
        "",
        f"evaluation: flan_squad.evaluate's path (Trainer.validate: every window, best window, snapping, scoring) "
        f"against Seq2SeqTrainer.predict(predict_with_generate=True), batch {s['batch_size']}, questions/s "
        f"(median of {len(ev['seconds']['project'])})",
        f"{'weights':<22}{'questions':>10}{'inputs':>10}{'tok/answer':>11} |{'project':>9}{'HF':>8} |{'x HF':>6} |"
        f"{'same answer':>17}{'same pred':>11}",
    ]
    trained = "planted" if s["trained_model"] == "planted" else Path(s["trained_model"]).name
    for label, e in (("random init", ev), (f"trained ({trained})", t["eval_trained"])):
        if not e:
            continue
        inputs = f"{e['model_inputs']['project']}/{e['model_inputs']['hf']}"
        same = (f"{e['answer_agreement'] * 100:.1f}% of {e['single_window_questions']}"
                if e["answer_agreement"] is not None else "-")
        lines.append(
            f"{label:<22}{e['questions']:>10}{inputs:>10}{e['answer_tokens_mean']:>11.1f} |"
            f"{e['examples_per_s']['project']:>9.2f}{e['examples_per_s']['hf']:>8.2f} |"
            f"{_fmt(_eval_ratio(e, e)):>6} |{same:>17}{e['prediction_agreement'] * 100:>10.1f}%"
        )
    lines.append("  inputs: model inputs, project/HF (long contexts: several windows); same answer: on questions "
                 "answered from one window, the project's greedy answer before snapping; same pred: final predictions")
    return lines


if __name__ == "__main__":
    main()
