"""Benchmarks: the project's training and evaluation paths against the Hugging Face Trainer pipeline.

    python -m benchmarks.bench              # everything, side by side (`make bench`)
    python -m benchmarks.bench --quick      # fewer steps, repeats and questions: a first look
    python -m benchmarks.bench --device cuda

All on random-init weights (no pretrained FLAN-T5 here): the numbers measure cost, never accuracy.
1. training throughput of each strategy, with and without gradient checkpointing, against
   `Seq2SeqTrainer` (run_seq2seq_qa.py's setup) and against inputs padded to max_source_length;
2. greedy answer generation against `Seq2SeqTrainer.predict(predict_with_generate=True)`;
3. peak memory of each configuration (its own process: peak RSS on CPU, max allocated on CUDA);
4. the machine's matmul peak and each run's model FLOP utilisation.
Prints a table and writes benchmarks/results/latest.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
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

    name = f"{spec.model}-{spec.strategy}-gc{int(spec.gradient_checkpointing)}-{spec.pipeline}"
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from benchmarks.flops import peak_matmul_flops
    from benchmarks.runs import Spec

    out = Path(args.out)
    log_dir = out.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = machine(args.device)
    peak = peak_matmul_flops(torch.device(args.device))
    print(f"machine: {info['cpu']}, {info['cores']} cores; matmul peak {peak['peak_flops'] / 1e9:.1f} GFLOP/s "
          f"({peak['dtype']})", file=sys.stderr)
    base = Spec(model=args.model, steps=args.steps, epochs=args.repeats, batch_size=args.batch_size,
                max_source_length=args.max_source_length, eval_questions=args.eval_questions,
                device=args.device, dataset=args.dataset, shared_dir=args.shared_dir)

    # 1 + 3 (small architecture) + 4: every configuration side by side, one process each.
    train: list[dict] = []
    for strategy in args.strategies:
        for gc in (False, True):
            pipelines = ["project", "hf"] + ([] if args.no_pad_baseline or gc else ["hf_pad"])
            for pipeline in pipelines:
                spec = replace(base, strategy=strategy, gradient_checkpointing=gc, pipeline=pipeline)
                train.append(run_train(spec, args.in_process, log_dir))

    # 2: evaluation, both pipelines alternating in one process on the same model.
    from benchmarks.runs import eval_run

    evaluation = eval_run(base, args.eval_repeats)
    print(f"  eval: {evaluation['examples_per_s']}", file=sys.stderr)

    # 3 (larger architecture): a couple of steps per configuration, the project's path.
    memory: list[dict] = []
    if args.memory_model:
        for strategy in args.strategies:
            for gc in (False, True):
                spec = replace(base, model=args.memory_model, strategy=strategy, gradient_checkpointing=gc,
                               steps=args.memory_steps, epochs=1, eval_questions=8)
                memory.append(run_train(spec, args.in_process, log_dir))

    results = summarise(args, info, peak, train, evaluation, memory, time.perf_counter() - started)
    from flan_squad.files import write_json_atomic

    write_json_atomic(out, results)
    print(table(results))
    print(f"\nwrote {out}")
    return results


def _find(runs: list[dict], strategy: str, gc: bool, pipeline: str = "project") -> dict:
    for r in runs:
        s = r["spec"]
        if (s["strategy"], s["gradient_checkpointing"], s["pipeline"]) == (strategy, gc, pipeline) and "error" not in r:
            return r
    return {}


def summarise(args, info, peak, train, evaluation, memory, seconds) -> dict:
    for r in train + memory:
        if "error" not in r:
            r["mfu"] = round(r["model_flops_per_s"] / peak["peak_flops"], 4)
    speedup: dict[str, dict[str, float | None]] = {}
    vs_pad: dict[str, float | None] = {}
    memory_vs_hf: dict[str, dict[str, float | None]] = {}
    for strategy in args.strategies:
        speedup[strategy], memory_vs_hf[strategy] = {}, {}
        for gc in (False, True):
            key = "gc_on" if gc else "gc_off"
            mine, hf = _find(train, strategy, gc), _find(train, strategy, gc, "hf")
            speedup[strategy][key] = ratio(mine.get("examples_per_s"), hf.get("examples_per_s"))
            memory_vs_hf[strategy][key] = ratio(mine.get("peak_memory_mb"), hf.get("peak_memory_mb"))
        pad = _find(train, strategy, False, "hf_pad")
        vs_pad[strategy] = ratio(_find(train, strategy, False).get("examples_per_s"), pad.get("examples_per_s"))
    # A 4-bit base with checkpointing (QLoRA) against training every weight without it (full fine-tuning).
    ok = [r for r in memory if "error" not in r]
    full_base = next((r for r in ok if r["trainable_params"] == r["total_params"]
                      and not r["spec"]["gradient_checkpointing"]), {})
    qlora_gc_base = min((r for r in ok if r["params_4bit"] and r["spec"]["gradient_checkpointing"]),
                        key=lambda r: r["peak_memory_mb"], default={})
    per_strategy = {s: min((v for v in d.values() if v is not None), default=None) for s, d in speedup.items()}
    eval_speedup = ratio(evaluation["examples_per_s"]["project"], evaluation["examples_per_s"]["hf"])
    qlora_over_full = ratio(qlora_gc_base.get("peak_memory_mb"), full_base.get("peak_memory_mb"))
    return {
        "note": "random-init weights (no pretrained FLAN-T5 here): cost only, never accuracy",
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "peak_matmul": peak,
        # The lower of the two checkpointing settings, per strategy (the detail is in _by_gc).
        "train_speedup_vs_hf": per_strategy,
        "train_speedup_vs_hf_by_gc": speedup,
        "train_speedup_vs_pad_to_max": vs_pad,
        "eval_speedup_vs_hf": eval_speedup,
        "eval_answer_agreement": evaluation["answer_agreement"],
        "peak_memory_over_hf": memory_vs_hf,
        "qlora_gc_peak_over_full_base": qlora_over_full,
        "targets_met": {
            "train_1.5x_vs_hf": all(v is not None and v >= 1.5 for v in per_strategy.values()),
            "eval_2x_vs_hf": bool(eval_speedup and eval_speedup >= 2.0),
            "eval_answers_identical": evaluation["answer_agreement"] == 1.0,
            "peak_memory_le_hf": all(v is not None and v <= 1.0 for d in memory_vs_hf.values() for v in d.values()),
            "qlora_gc_le_35pct_of_full_base": None if qlora_over_full is None else qlora_over_full <= 0.35,
        },
        "train": train,
        "eval": evaluation,
        "memory": memory,
        "bench_seconds": round(seconds, 1),
    }


def _fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def table(res: dict) -> str:
    s, m, pk = res["settings"], res["machine"], res["peak_matmul"]
    lines = [
        f"flan-squad benchmarks · {s['model']} + {s['memory_model']} architectures, RANDOM INIT · {s['dataset']} · "
        f"device {s['device']}",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, torch {m['torch']} "
        f"({m['torch_threads']} threads), load at start {m['load_average_at_start']}; "
        f"matmul peak {pk['peak_flops'] / 1e9:.1f} GFLOP/s {pk['dtype']}",
        "",
        f"training: batch {s['batch_size']}, max_source_length {s['max_source_length']}, {s['steps']} steps x "
        f"{s['repeats']} epochs (median of epochs), same questions in every run",
        f"{'strategy':<9}{'gc':<5}{'ex/s':>8}{'tok/s':>8}{'MFU':>7}{'pad':>6}{'peak MB':>9} |{'HF ex/s':>9}{'pad':>6}"
        f"{'HF MB':>8}{'pad ex/s':>10} |{'x HF':>6}{'x pad':>7}{'mem/HF':>8}",
    ]
    for r in res["train"]:
        sp = r["spec"]
        if sp["pipeline"] != "project":
            continue
        strategy, gc = sp["strategy"], sp["gradient_checkpointing"]
        if "error" in r:
            lines.append(f"{strategy:<9}{'on' if gc else 'off':<5} FAILED: {r['error']}")
            continue
        hf, pad = _find(res["train"], strategy, gc, "hf"), _find(res["train"], strategy, gc, "hf_pad")
        key = "gc_on" if gc else "gc_off"
        lines.append(
            f"{strategy:<9}{'on' if gc else 'off':<5}{r['examples_per_s']:>8.2f}{r['tokens_per_s']:>8.0f}"
            f"{r['mfu'] * 100:>6.1f}%{_fmt(r.get('padded_over_real_source_tokens')):>6}{r['peak_memory_mb']:>9.0f} |"
            f"{_fmt(hf.get('examples_per_s')):>9}{_fmt(hf.get('padded_over_real_source_tokens')):>6}"
            f"{_fmt(hf.get('peak_memory_mb'), '.0f'):>8}{_fmt(pad.get('examples_per_s')):>10} |"
            f"{_fmt(res['train_speedup_vs_hf_by_gc'][strategy][key]):>6}"
            f"{_fmt(res['train_speedup_vs_pad_to_max'][strategy] if not gc else None):>7}"
            f"{_fmt(res['peak_memory_over_hf'][strategy][key]):>8}"
        )
    ev = res["eval"]
    lines += [
        "",
        f"evaluation: greedy answers to {ev['questions']} dev questions, batch {s['batch_size']}: project "
        f"{ev['examples_per_s']['project']:.2f} ex/s, Seq2SeqTrainer.predict {ev['examples_per_s']['hf']:.2f} ex/s "
        f"-> x{_fmt(res['eval_speedup_vs_hf'])}; answers identical for {ev['answer_agreement'] * 100:.1f}%",
    ]
    if res["memory"]:
        lines += ["", f"peak memory, {s['memory_model']} architecture, {s['memory_steps']} steps (project path):"]
        for r in res["memory"]:
            sp = r["spec"]
            value = "FAILED" if "error" in r else f"{r['peak_memory_mb']:.0f} MB ({r['peak_memory_kind']})"
            lines.append(f"  {sp['strategy']:<7} gc {'on ' if sp['gradient_checkpointing'] else 'off'}  {value}")
        lines.append(f"  qlora+gc / full: {_fmt(res['qlora_gc_peak_over_full_base'])}")
    verdict = {True: "yes", False: "NO", None: "not measured"}
    lines += ["", "targets: " + ", ".join(f"{k} {verdict[v]}" for k, v in res["targets_met"].items()),
              f"({res['bench_seconds']:.0f} s in all)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
