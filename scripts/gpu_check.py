"""The GPU path in one go, for a first GPU machine: `make gpu-check` (or `python scripts/gpu_check.py`).

No hub and no pretrained weights: random-init models and the SQuAD files of FLAN_SQUAD_SHARED (../shared), or of a
GPU bundle (`--bundle gpu-bundle`, from `make gpu-bundle`: the wheels this Python lacks are installed first, with
`pip install --no-index --no-deps --target <out>/site`; docs/gpu.md). Prints the versions it runs on, then runs,
most important first, a few steps of:
  strategies  every strategy in the automatic precision, one multirun (flan-t5-small's architecture on a GPU; t5-tiny
              on a CPU);
  fsdp        trainer=fsdp trainer.devices=1 with full fine-tuning: reloading the best checkpoint, saving model/,
              the parameter counts (GPU only: Lightning's FSDP; adapters under FSDP need 2 devices, one is refused);
  ddp         trainer=ddp trainer.devices=1: the all-reduce at the end of training (NCCL; gloo on a CPU);
  compare     experiment=compare (flan-t5-base: full/LoRA/QLoRA as a multirun) on the local files, and QLoRA's
              training peak memory against full fine-tuning's;
  bench       the benchmarks, quick and in-process (`python -m benchmarks.bench --quick --in-process ...`).
Writes one table (step, status, seconds, key figure) to stdout and, after every step, to --report (gpu_check.txt,
gpu_check.json, and logs.tar.gz with every step's log and metrics), and exits 1 if any step failed. --budget stops
starting steps once that many seconds have passed, so that the table is written before a caller's time limit. Every
score here is from random weights: it measures that the path runs and what it costs, never accuracy.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = sorted(p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml"))
# What the check runs on, printed first (the GPU image's peft version, for one, is not known in advance).
PACKAGES = ("torch", "transformers", "lightning", "peft", "accelerate", "torchmetrics", "bitsandbytes", "hydra-core",
            "omegaconf", "datasets", "tokenizers", "safetensors", "huggingface_hub")
REQUIRED = ("torch", "transformers", "lightning", "peft", "accelerate", "torchmetrics", "hydra-core", "omegaconf",
            "sentencepiece", "tensorboard")


@dataclass
class Step:
    name: str
    gpu_only: bool
    timeout_s: int  # per command: a hung command (a collective that never returns) fails its step, not the check
    commands: list[list[str]]  # run in order, each whatever the one before did; all must succeed
    rows: Callable[[Path], list[tuple[str, str]]]  # (label, key figure) rows, read from the outputs


# --- the bundle ------------------------------------------------------------------------------------------------


def _wheel_distribution(wheel: Path) -> str:
    return wheel.name.split("-")[0].replace("_", "-").lower()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_bundle(bundle: Path, site: Path) -> list[str]:
    """The bundle's wheels whose distributions this Python lacks, installed into `site`; the others are left to this
    Python. Returns one line per wheel."""
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit(f"error: --bundle {bundle}: no wheels/*.whl there: build it with `make gpu-bundle`")
    notes, wanted = [], []
    for wheel in wheels:
        present = _version(_wheel_distribution(wheel))
        notes.append(f"{wheel.name}: {'not installed: this Python has ' + present if present else 'installed'}")
        if not present:
            wanted.append(wheel)
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    if wanted:
        has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
        if has_pip:
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                            "--disable-pip-version-check", "--target", str(site), *map(str, wanted)], check=True)
        else:  # a venv made without pip: a wheel is a zip of what goes into site-packages
            notes.append("(no pip in this Python: wheels unpacked into site/)")
            for wheel in wanted:
                zipfile.ZipFile(wheel).extractall(site)
    return notes


# --- key figures ---------------------------------------------------------------------------------------------


def _metrics(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def _run_figure(run_dir: Path) -> str:
    m = _metrics(run_dir)
    return (f"{m['optimizer_steps']} steps, {m['train_examples_per_s']:.1f} ex/s, f1 {m['f1']:.1f}, peak "
            f"{m['peak_memory_mb']:.0f}/{m['peak_val_memory_mb']:.0f} MB train/val, {m['precision']} on "
            f"{m['device']}, {m['trainable_params']:,}/{m['total_params']:,} params trainable")


def _sweep_rows(sweep_dir: Path, jobs: int) -> list[tuple[str, str]]:
    """One row per job of a multirun: its strategy and key figure, or FAILED and its error (from status.json)."""
    rows = []
    for job in range(jobs):
        run_dir = sweep_dir / str(job)
        if (run_dir / "metrics.json").exists():
            rows.append((f"  {_metrics(run_dir)['strategy']}", _run_figure(run_dir)))
            continue
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
        rows.append((f"  job {job}", f"FAILED: {status.get('error') or 'no metrics.json'}"))
    return rows


def _compare_rows(sweep_dir: Path) -> list[tuple[str, str]]:
    rows = _sweep_rows(sweep_dir, 3)
    peaks = {m["strategy"]: m["peak_memory_mb"] for m in (_metrics(sweep_dir / str(j)) for j in range(3)
                                                          if (sweep_dir / str(j) / "metrics.json").exists())}
    if not {"full", "qlora"} <= set(peaks):
        return rows
    return rows + [("  memory", f"training peak qlora/full: {peaks['qlora']:.0f}/{peaks['full']:.0f} MB = "
                                f"{peaks['qlora'] / peaks['full']:.2f}")]


def _fsdp_rows(out: Path) -> list[tuple[str, str]]:
    """Full fine-tuning: model/ holds as many parameters as metrics.json counts. A run that wrote no metrics.json is a
    FAILED row."""
    from transformers import AutoModelForSeq2SeqLM

    run_dir = out / "full"
    if not (run_dir / "metrics.json").exists():
        return [("  full", "FAILED: no metrics.json")]
    m = _metrics(run_dir)
    saved = sum(p.numel() for p in AutoModelForSeq2SeqLM.from_pretrained(run_dir / "model").parameters())
    if saved != m["total_params"]:
        return [("  full", f"FAILED: metrics.json counts {m['total_params']:,} parameters, model/ holds {saved:,}")]
    return [("  full", f"{_run_figure(run_dir)}; model/ holds {saved:,} parameters")]


def _bench_rows(out: Path) -> list[tuple[str, str]]:
    rows = []
    for precision, t in json.loads((out / "bench.json").read_text())["tables"].items():
        failed = [r["error"] for r in t["train"] if "error" in r]
        if failed:
            raise RuntimeError(f"{len(failed)} bench runs failed: {failed[0]}")
        mfu = [r["mfu"] for r in t["train"]]
        speedup = ", ".join(f"{s} {x:.2f}x" for s, x in t["train_speedup_vs_hf"].items() if x is not None)
        rows.append((f"  {precision}", f"matmul peak {t['peak_matmul']['peak_flops'] / 1e12:.1f} TFLOP/s; train vs "
                                       f"Seq2SeqTrainer {speedup}; MFU {min(mfu):.1%}-{max(mfu):.1%}; eval vs "
                                       f"predict {t['eval_speedup_vs_hf'] or 0:.2f}x"))
    return rows


# --- the steps -----------------------------------------------------------------------------------------------


def steps(out: Path, cuda: bool, shared: Path) -> list[Step]:
    train = [sys.executable, "-m", "flan_squad.train"]
    # No hub on the machine: local SQuAD files, random-init weights (the FLAN-T5 tokenizer is in shared).
    local = [f"dataset.train_file={shared}/data/squad/v1.1/train-v1.1.reconstructed.json",
             f"dataset.validation_file={shared}/data/squad/v1.1/dev-v1.1.json", "model.init=random",
             f"paths.cache_dir={out}/cache"]
    few = ["dataset.limit_train=32", "dataset.limit_val=16", "dataset.batch_size=8", "dataset.eval_batch_size=16",
           "trainer.max_epochs=1", "eval.max_new_tokens=8", "trainer.log_every_n_steps=1"]
    small = ["model=flan_t5_small", "trainer=gpu"] if cuda else ["model=t5_tiny", "trainer=cpu",
                                                                 "dataset.max_source_length=256"]

    def run(name: str, *overrides: str) -> list[str]:
        return [*train, *local, *few, *overrides, f"hydra.run.dir={out / name}"]

    def sweep(name: str, *overrides: str) -> list[str]:
        return [*train, "--multirun", *local, *few, *overrides, f"hydra.sweep.dir={out / name}"]

    fsdp = ["model=flan_t5_small", "trainer=fsdp", "trainer.devices=1"]
    bench = ["--device", "cuda", "--precision", "bf16"] if cuda else ["--device", "cpu", "--model", "t5_tiny",
                                                                      "--precision", "fp32"]
    return [
        Step("strategies", False, 150, [sweep("strategies", *small, f"strategy={','.join(STRATEGIES)}")],
             lambda o: _sweep_rows(o / "strategies", len(STRATEGIES))),
        Step("fsdp", True, 120, [run("fsdp/full", *fsdp, "strategy=full")], lambda o: _fsdp_rows(o / "fsdp")),
        Step("ddp", False, 90, [run("ddp", *small, "strategy=lora", "trainer=ddp", "trainer.devices=1",
                                     f"trainer.accelerator={'gpu' if cuda else 'cpu'}")],
             lambda o: [("  lora", _run_figure(o / "ddp"))]),
        Step("compare", False, 150, [[*train, "experiment=compare", "hparams_search=strategies", *local, *few,
                                      *([] if cuda else small), f"hydra.sweep.dir={out / 'compare'}"]],
             lambda o: _compare_rows(o / "compare")),
        Step("bench", False, 150, [[sys.executable, "-m", "benchmarks.bench", *bench, "--quick", "--in-process",
                                    "--no-pad-baseline", "--memory-model", "", "--trained-model", "",
                                    "--shared-dir", str(shared), "--out", str(out / "bench" / "bench.json")]],
             lambda o: _bench_rows(o / "bench")),
    ]


# --- the report ------------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import torch

    found = {"python": sys.version.split()[0], "executable": sys.executable}
    found.update({name: _version(name) or "missing" for name in PACKAGES})
    found["cuda"] = f"{torch.version.cuda}: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "none"
    return found


def render(found: dict[str, str], rows: list[tuple[str, str, str, str]], out: Path) -> str:
    header = ("step", "status", "s", "key figure")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [f"GPU check on {found['cuda']} (random-init weights; outputs in {out})",
             "versions: " + ", ".join(f"{k} {v}" for k, v in found.items() if k not in ("executable", "cuda"))]
    lines += [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in [header, *rows]]
    return "\n".join(lines)


def write_report(report: Path, text: str, record: dict, out: Path) -> None:
    """The table, its JSON, and the steps' logs and metrics (small: no checkpoints or weights) into `report`."""
    report.mkdir(parents=True, exist_ok=True)
    (report / "gpu_check.txt").write_text(text + "\n")
    (report / "gpu_check.json").write_text(json.dumps(record, indent=1))
    with tarfile.open(report / "logs.tar.gz", "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if path.is_file() and (path.suffix == ".log" or path.name in ("metrics.json", "status.json", "bench.json")):
                tar.add(path, arcname=str(path.relative_to(out)))


def _missing_packages() -> list[str]:
    return [name for name in REQUIRED if _version(name) is None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu_check" / time.strftime("%Y-%m-%d_%H-%M-%S")),
                        help="where the steps' runs go (checkpoints and weights: large)")
    parser.add_argument("--report", default=None, help="where the table, its JSON and the logs go (default: --out)")
    parser.add_argument("--bundle", default=None, help="a GPU bundle (make gpu-bundle): its wheels and data")
    parser.add_argument("--only", default="", help="comma-separated steps to run: strategies,fsdp,ddp,compare,bench")
    parser.add_argument("--budget", type=float, default=None, help="start no step after this many seconds")
    parser.add_argument("--timeout-factor", type=float, default=1.0,
                        help="multiplies the steps' time limits, set for one GPU (a CPU rehearsal needs far more)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    python_path = [str(ROOT)]
    out = Path(args.out).resolve()
    if args.bundle:  # installed outside the bundle, which stays as it travels
        bundle = Path(args.bundle).resolve()
        print("\n".join(install_bundle(bundle, out / "site")), flush=True)
        sys.path.insert(0, str(out / "site"))
        python_path.append(str(out / "site"))
        env["FLAN_SQUAD_SHARED"] = str(bundle / "shared")
    missing = _missing_packages()
    if missing:
        raise SystemExit(f"error: this Python ({sys.executable}) lacks {', '.join(missing)}: `pip install -e .` "
                         f"(it keeps your torch), or pass --bundle with a GPU bundle (make gpu-bundle)")
    env["PYTHONPATH"] = os.pathsep.join(python_path + [p for p in [os.environ.get("PYTHONPATH")] if p])
    import torch

    cuda = torch.cuda.is_available()
    found = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    report = Path(args.report).resolve() if args.report else out
    out.mkdir(parents=True, exist_ok=True)
    shared = Path(env.get("FLAN_SQUAD_SHARED", ROOT.parent / "shared")).resolve()
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    every = steps(out, cuda, shared)
    unknown = set(wanted) - {s.name for s in every}
    if unknown:
        parser.error(f"--only: unknown step(s) {sorted(unknown)}; expected some of {','.join(s.name for s in every)}")
    rows, record, failed = [], {"versions": found, "steps": {}}, False
    for step in every:
        if wanted and step.name not in wanted:
            continue
        if step.gpu_only and not cuda:
            rows.append((step.name, "skipped: no CUDA", "", ""))
            continue
        if args.budget is not None and time.perf_counter() - started > args.budget:
            rows.append((step.name, "skipped: --budget", "", f"{args.budget:.0f} s spent"))
            continue
        step_started, status, figure, details = time.perf_counter(), "ok", "", []
        log = out / f"{step.name}.log"
        with log.open("w") as sink:
            for command in step.commands:
                sink.write(f"$ {' '.join(command)}\n")
                sink.flush()
                timeout = step.timeout_s * args.timeout_factor
                try:
                    code = subprocess.run(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                          check=False, timeout=timeout).returncode
                except subprocess.TimeoutExpired:
                    code = f"timed out after {timeout:.0f} s"
                if code != 0 and status == "ok":
                    status, figure = "FAILED", f"exit {code}: see {log.relative_to(out)}"
        try:  # what the step left, also after a failure (which jobs of a multirun finished)
            details = step.rows(out)
        except Exception as e:  # noqa: BLE001 (a step that left no readable result failed too)
            status = "FAILED"
            figure = figure or f"{type(e).__name__}: {e}"
        if any(text.startswith("FAILED") for _, text in details):
            status = "FAILED"
        failed |= status == "FAILED"
        seconds = f"{time.perf_counter() - step_started:.0f}"
        rows += [(step.name, status, seconds, figure)] + [(label, "", "", text) for label, text in details]
        record["steps"][step.name] = {"status": status, "seconds": float(seconds), "figure": figure, "rows": details}
        print(f"{step.name}: {status} ({seconds} s)", flush=True)
        write_report(report, render(found, rows, out), record, out)
    record["total_s"] = round(time.perf_counter() - started, 1)
    text = render(found, rows, out) + f"\ntotal {record['total_s']:.0f} s"
    write_report(report, text, record, out)
    print("\n" + text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
