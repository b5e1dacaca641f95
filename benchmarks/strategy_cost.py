"""What each strategy costs at a FLAN-T5 size: the run's own peak memory and examples/s of full fine-tuning, LoRA and
QLoRA, with and without gradient checkpointing, beside the bytes arithmetic says each needs.

    python -m benchmarks.strategy_cost                                  # flan-t5-base architecture (`make compare-cpu`)
    python -m benchmarks.strategy_cost --models flan_t5_base,flan_t5_large --steps 2

Random-init weights (no pretrained FLAN-T5 here): cost only, never accuracy. Each configuration is a real run of
`python -m flan_squad.train` in its own process (the same code path as any run: strategy, LightningModule, Trainer,
CostMonitor) on a few steps of real SQuAD v1.1 questions at the reference sizes (batch 8, inputs up to 512 tokens),
then one small validation; its metrics.json gives the run's own peak (above what the process held before the model
was built), the account read from its tensors, and the training throughput. Strategies run one after another in one
command, so their time ratios hold on a shared machine; the machine's load is recorded beside each. Writes
benchmarks/results/strategy_cost.json and a markdown table (`--markdown`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.arithmetic import strategy_bytes

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("full", "lora", "qlora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="flan_t5_base", help="conf/model options, comma-separated (random init)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-source-length", type=int, default=512)
    p.add_argument("--dataset", default="squad_v1")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "strategy_cost.json"))
    p.add_argument("--markdown", default=None, help="also write the table here (e.g. docs/compare_cpu/cost.md)")
    p.add_argument("--overrides", nargs="*", default=[], help="more flan_squad.train overrides for every run")
    p.add_argument("--saved-activations", nargs=2, metavar=("STRATEGY", "CHECKPOINTING"),
                   help=argparse.SUPPRESS)  # internal: one measurement, in a process of its own
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    args.strategies = args.strategies.split(",")
    return args


def run_one(args, model: str, strategy: str, checkpointing: bool, scratch: Path) -> dict:
    """One configuration through the real entry point, in its own process; its metrics.json, or the error."""
    run_dir = scratch / f"{model}-{strategy}-gc{int(checkpointing)}"
    command = [sys.executable, "-m", "flan_squad.train", f"model={model}", "model.init=random",
               f"strategy={strategy}", f"strategy.gradient_checkpointing={checkpointing}", f"dataset={args.dataset}",
               f"dataset.batch_size={args.batch_size}", f"dataset.max_source_length={args.max_source_length}",
               f"dataset.limit_train={args.steps * args.batch_size}", "dataset.limit_val=8", "eval.max_new_tokens=4",
               "trainer.max_epochs=1", "++trainer.enable_checkpointing=false", "logger=none", "callbacks=none",
               f"hydra.run.dir={run_dir}", *args.overrides]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    record = {"model": model, "strategy": strategy, "gradient_checkpointing": checkpointing,
              "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
              "wall_s": round(time.perf_counter() - started, 1)}
    metrics_file = run_dir / "metrics.json"
    if proc.returncode != 0 or not metrics_file.exists():
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**record, "error": f"exit {proc.returncode}: {tail}"}
    metrics = json.loads(metrics_file.read_text())
    keys = ("train_examples_per_s", "train_time_s", "train_examples_seen", "peak_memory_mb", "memory_before_model_mb",
            "own_peak_memory_mb", "memory_account", "trainable_params", "total_params", "params_4bit", "precision",
            "device", "init")
    return {**record, **{k: metrics.get(k) for k in keys}}


def saved_activations_mb(args, model: str, strategy: str, checkpointing: bool) -> float | None:
    """MB of activations autograd keeps for the backward pass of the run's first training batch (the longest: the
    sampler puts it first), the strategy's model built as the run builds it; weights it keeps are not counted.
    Measured in a process of its own, as each run is, so that no measurement holds memory for the next."""
    command = [sys.executable, "-m", "benchmarks.strategy_cost", "--models", model, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--max-source-length", str(args.max_source_length),
               "--dataset", args.dataset, "--saved-activations", strategy, str(int(checkpointing))]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"  saved activations of {model} {strategy} gc={checkpointing} not measured: exit {proc.returncode}",
              file=sys.stderr)
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def _saved_activations_here(args, model: str, strategy: str, checkpointing: bool) -> float:
    import torch

    from benchmarks.runs import Spec, _Setup

    spec = Spec(model=model, strategy=strategy, gradient_checkpointing=checkpointing, steps=args.steps, epochs=1,
                batch_size=args.batch_size, max_source_length=args.max_source_length, dataset=args.dataset)
    with tempfile.TemporaryDirectory(prefix="strategy-cost-saved-") as output_dir:
        s = _Setup(spec, output_dir)
        s.datamodule.setup("fit")
        batch = next(iter(s.datamodule.train_dataloader()))
        model = s.strategy.build(s.base, s.device).train()
        weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        saved: dict[int, int] = {}

        def keep(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        torch.manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return round(sum(saved.values()) / 2**20, 1)


def arithmetic(model: str, strategy: str) -> dict:
    """strategy_bytes for the conf/model option's architecture, in MB."""
    from omegaconf import OmegaConf

    from flan_squad.models.base import BaseModel
    from flan_squad.utils.config import CONFIG_DIR

    architecture = dict(OmegaConf.load(CONFIG_DIR / "model" / f"{model}.yaml").architecture)
    counted = strategy_bytes(BaseModel(name=model, name_or_path="", init="random", architecture=architecture).config(),
                             strategy)
    mb = lambda n: round(n / 2**20, 1)  # noqa: E731
    return {"weights_mb": {k: mb(v) for k, v in counted["weights"].items()}, "gradients_mb": mb(counted["gradients"]),
            "optimizer_state_mb": mb(counted["optimizer_state"]), "trainable_params": counted["trainable_params"],
            "total_mb": mb(sum(counted["weights"].values()) + counted["gradients"] + counted["optimizer_state"])}


def table(results: dict) -> str:
    """The markdown table: measured beside arithmetic, one row per configuration."""
    m = results["machine"]
    settings, load = results["settings"], " / ".join(f"{x:.1f}" for x in m["load_average_at_start"])  # 1, 5, 15 min
    lines = [f"Random-init weights (cost only, never accuracy); {settings['steps']} steps of batch "
             f"{settings['batch_size']} real SQuAD v1.1 questions (inputs up to {settings['max_source_length']} "
             f"tokens) per configuration through `python -m flan_squad.train`; machine: {m['cpu']}, {m['cores']} "
             f"cores ({' '.join(m['simd'])}), load average {load} at the start. Memory in MB; examples/s measured "
             f"side by side in one command (on a loaded machine: upper bounds of time, ratios hold).", "",
             "| model | strategy | gradient ckpt | examples/s | run's own peak | raw peak | weights (measured) | "
             "gradients | optimizer state | rest | activations saved for backward, first batch | arithmetic: "
             "weights + gradients + optimizer | own peak / arithmetic | precision | load (before, after) |",
             "|" + " --- |" * 15]
    for r in results["runs"]:
        head = f"| {r['model']} | {r['strategy']} | {'yes' if r['gradient_checkpointing'] else 'no'} |"
        if "error" in r:
            lines.append(head + f" FAILED: {r['error']} |" + " |" * 11)
            continue
        a, calc = r["memory_account"], r["arithmetic"]
        weights = " + ".join(f"{v:.0f} {k}" for k, v in a["weights_mb"].items())
        calc_weights = " + ".join(f"{v:.0f} {k}" for k, v in calc["weights_mb"].items())
        lines.append(head + f" {r['train_examples_per_s']:.2f} | {r['own_peak_memory_mb']:.0f} | "
                     f"{r['peak_memory_mb']:.0f} | {weights} | {a['gradients_mb']:.0f} | "
                     f"{a['optimizer_state_mb']:.0f} | {a['rest_mb']:.0f} | "
                     f"{'–' if r.get('saved_activations_mb') is None else round(r['saved_activations_mb'])} | "
                     f"({calc_weights}) + "
                     f"{calc['gradients_mb']:.0f} + {calc['optimizer_state_mb']:.0f} = {calc['total_mb']:.0f} | "
                     f"{r['own_peak_memory_mb'] / calc['total_mb']:.2f} | {r['precision']} | "
                     f"{r['load_average_before']:.1f}, {r['load_average_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.saved_activations:
        strategy, checkpointing = args.saved_activations
        print(_saved_activations_here(args, args.models[0], strategy, checkpointing == "1"))
        return {}
    started = time.perf_counter()
    from benchmarks.bench import machine
    from flan_squad.utils.files import write_json_atomic

    results = {"note": "random-init weights: cost only, never accuracy", "machine": machine("cpu"),
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "markdown")}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="strategy-cost-") as scratch:
        for model in args.models:
            for strategy in args.strategies:
                for checkpointing in (False, True):
                    record = run_one(args, model, strategy, checkpointing, Path(scratch))
                    if "error" not in record:
                        record["arithmetic"] = arithmetic(model, strategy)
                        record["saved_activations_mb"] = saved_activations_mb(args, model, strategy, checkpointing)
                    results["runs"].append(record)
                    write_json_atomic(Path(args.out), results)  # each configuration takes minutes: keep what is done
                    print(f"  {model} {strategy} gc={checkpointing}: " + (record.get("error") or (
                        f"{record['train_examples_per_s']:.2f} ex/s, own peak {record['own_peak_memory_mb']:.0f} MB "
                        f"({record['wall_s']:.0f} s)")), file=sys.stderr, flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(Path(args.out), results)
    text = table(results)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text, encoding="utf-8")
    print(text)
    return results


if __name__ == "__main__":
    main()
