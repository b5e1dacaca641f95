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

from benchmarks.summary import summarise, table
from flan_squad.utils.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = sorted(p.stem for p in (CONFIG_DIR / "strategy").glob("*.yaml"))  # every conf/strategy option


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    """The CPU (and its vector extensions: bf16 is native only with AVX512-BF16 or AMX), its load, the software."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    info = {"cpu": cpu, "simd": sorted(f for f in flags if f.startswith(("avx", "amx"))), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_train(spec, in_process: bool, log_dir: Path) -> dict:
    """One training configuration, in its own process unless `in_process`."""
    from benchmarks import runs  # noqa: PLC0415  (heavy: only the workers need the whole stack)

    name = (f"{spec.model}-{spec.strategy}-gc{int(spec.gradient_checkpointing)}-{spec.pipeline}-{spec.precision}"
            + ("-compiled" if spec.compile else ""))
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
    from flan_squad.utils.precision import auto_precision, bf16_is_native

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
    from flan_squad.utils.files import write_json_atomic

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
        spec = replace(spec, steps=min(spec.steps, BF16_SAMPLE["steps"]),
                       epochs=min(spec.epochs, BF16_SAMPLE["repeats"]),
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
    return {"precision": precision, "lightning_precision": LIGHTNING_PRECISION[precision],
            "hf_bf16": HF_BF16[precision], "sample": sample, "peak_matmul": peak, "train": train,
            "eval": evaluations["random"], "eval_trained": evaluations.get("trained")}


if __name__ == "__main__":
    main()
