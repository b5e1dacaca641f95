"""The GPU path in one go, for the first GPU machine: `make gpu-check` (or `python scripts/gpu_check.py`).

No hub and no pretrained weights needed: random-init models and the files in ../shared (FLAN_SQUAD_SHARED). Runs,
each in its own process, a few steps of:
  1. every strategy in the automatic precision (flan-t5-small's architecture on a GPU; t5-tiny on a CPU);
  2. experiment=compare (flan-t5-base, full/LoRA/QLoRA as a multirun), cut to a few steps, on the local files;
  3. trainer=ddp trainer.devices=1: the NCCL all-reduce at the end of training;
  4. trainer=fsdp trainer.devices=1 with full fine-tuning: gradient clipping, reloading the best checkpoint, saving;
  5. QLoRA's training peak memory against full fine-tuning's, on flan-t5-base's architecture;
  6. the benchmarks, as `make bench ARGS="--device cuda --quick"`.
Prints one table (step, status, seconds, key figure) and exits 1 if any step failed. Without CUDA the GPU-only steps
(3-6) say "skipped: no CUDA" and the rest runs on the CPU. Every score here is from random weights: it measures that
the path runs and what it costs, never accuracy. Each step's output is in --out/<step>/ (its log: <step>.log).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = sorted(p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml"))


@dataclass
class Step:
    name: str
    gpu_only: bool
    commands: list[list[str]]  # run in order; all must succeed
    figure: Callable[[Path], str]  # the key figure, read from the step's output dir


def _metrics(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def _run_figure(run_dir: Path) -> str:
    m = _metrics(run_dir)
    return (f"{m['optimizer_steps']} steps, {m['train_examples_per_s']:.1f} ex/s, f1 {m['f1']:.1f}, peak "
            f"{m['peak_memory_mb']:.0f}/{m['peak_val_memory_mb']:.0f} MB train/val, {m['precision']} on {m['device']}")


def _compare_figure(sweep_dir: Path) -> str:
    runs = [_metrics(d) for d in sorted(sweep_dir.iterdir()) if (d / "metrics.json").exists()]
    if len(runs) != 3:
        raise RuntimeError(f"{len(runs)} of 3 jobs wrote metrics.json")
    return ", ".join(f"{m['strategy']} {m['train_examples_per_s']:.1f} ex/s {m['peak_memory_mb']:.0f} MB" for m in runs)


def _fsdp_figure(run_dir: Path) -> str:
    from transformers import AutoModelForSeq2SeqLM

    params = sum(p.numel() for p in AutoModelForSeq2SeqLM.from_pretrained(run_dir / "model").parameters())
    return f"{_run_figure(run_dir)}; model/ holds {params:,} parameters"


def _memory_figure(out: Path) -> str:
    full, qlora = _metrics(out / "full"), _metrics(out / "qlora")
    return (f"training peak: qlora {qlora['peak_memory_mb']:.0f} MB / full {full['peak_memory_mb']:.0f} MB = "
            f"{qlora['peak_memory_mb'] / full['peak_memory_mb']:.2f}")


def _bench_figure(out: Path) -> str:
    results = json.loads((out / "bench.json").read_text())
    return f"qlora_gc_peak_over_full_base {results.get('qlora_gc_peak_over_full_base')}"


def steps(out: Path, cuda: bool, shared: Path) -> list[Step]:
    train = [sys.executable, "-m", "flan_squad.train"]
    # No hub on the machine: the SQuAD files of ../shared, random-init weights (the FLAN-T5 tokenizer is in shared).
    local = [f"dataset.train_file={shared}/data/squad/v1.1/train-v1.1.reconstructed.json",
             f"dataset.validation_file={shared}/data/squad/v1.1/dev-v1.1.json", "model.init=random",
             f"paths.cache_dir={out}/cache"]
    few = ["dataset.limit_train=32", "dataset.limit_val=16", "dataset.batch_size=8", "dataset.eval_batch_size=16",
           "trainer.max_epochs=1", "eval.max_new_tokens=8", "trainer.log_every_n_steps=1"]
    device = ["model=flan_t5_small", "trainer=gpu"] if cuda else ["model=t5_tiny", "trainer=cpu",
                                                                  "dataset.max_source_length=256"]

    def run(name: str, *overrides: str) -> list[str]:
        return [*train, *local, *few, *overrides, f"hydra.run.dir={out / name}"]

    result = [Step(f"strategy={s}", False, [run(f"strategy_{s}", *device, f"strategy={s}")],
                   lambda o, s=s: _run_figure(o / f"strategy_{s}")) for s in STRATEGIES]
    compare = [*train, "experiment=compare", *local, *few, *([] if cuda else device),
               f"hydra.sweep.dir={out / 'compare'}"]
    result.append(Step("experiment=compare", False, [compare], lambda o: _compare_figure(o / "compare")))
    result.append(Step("trainer=ddp devices=1 (nccl)", True,
                       [run("ddp", "model=flan_t5_small", "strategy=lora", "trainer=ddp", "trainer.accelerator=gpu",
                            "trainer.devices=1")], lambda o: _run_figure(o / "ddp")))
    result.append(Step("trainer=fsdp devices=1 full", True,
                       [run("fsdp", "model=flan_t5_small", "strategy=full", "trainer=fsdp", "trainer.devices=1")],
                       lambda o: _fsdp_figure(o / "fsdp")))
    memory = ["model=flan_t5_base", "trainer=gpu", "callbacks=none", "logger=none"]
    result.append(Step("qlora vs full memory (base)", True,
                       [run("memory/full", *memory, "strategy=full"), run("memory/qlora", *memory, "strategy=qlora")],
                       lambda o: _memory_figure(o / "memory")))
    result.append(Step("bench --device cuda --quick", True,
                       [[sys.executable, "-m", "benchmarks.bench", "--device", "cuda", "--quick",
                         "--out", str(out / "bench" / "bench.json")]], lambda o: _bench_figure(o / "bench")))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu_check" / time.strftime("%Y-%m-%d_%H-%M-%S")))
    parser.add_argument("--only", default="", help="comma-separated step names (prefixes) to run; default all")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per command")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shared = Path(os.environ.get("FLAN_SQUAD_SHARED", ROOT.parent / "shared")).resolve()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLAN_SQUAD_SHARED": str(shared), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    rows, failed = [], False
    for step in steps(out, cuda, shared):
        if wanted and not any(step.name.startswith(w) for w in wanted):
            continue
        if step.gpu_only and not cuda:
            rows.append((step.name, "skipped: no CUDA", "", ""))
            continue
        started, status, figure = time.perf_counter(), "ok", ""
        log = out / (step.name.split()[0].replace("=", "_") + ".log")
        with log.open("w") as sink:
            for command in step.commands:
                try:
                    code = subprocess.run(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                          check=False, timeout=args.timeout).returncode
                except subprocess.TimeoutExpired:
                    code = f"timed out after {args.timeout} s"
                if code != 0:
                    status, figure = "FAILED", f"exit {code}: see {log}"
                    break
        if status == "ok":
            try:
                figure = step.figure(out)
            except Exception as e:  # noqa: BLE001 (a step that ran but left no readable result failed too)
                status, figure = "FAILED", f"{type(e).__name__}: {e}"
        failed |= status == "FAILED"
        rows.append((step.name, status, f"{time.perf_counter() - started:.0f}", figure))
        print(f"{step.name}: {status} ({rows[-1][2]} s)", flush=True)
    widths = [max(len(r[i]) for r in [("step", "status", "s", "key figure"), *rows]) for i in range(3)]
    print(f"\nGPU check ({'CUDA: ' + torch.cuda.get_device_name() if cuda else 'no CUDA: CPU'}; random-init weights), "
          f"outputs in {out}")
    for row in [("step", "status", "s", "key figure"), *rows]:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
