"""QLoRA's memory on T5, by bytes: what full fine-tuning, LoRA and QLoRA (with `wo` in full precision, as
transformers' 4-bit loading leaves it, and in 4-bit, `strategy.quantize_wo`) hold in weights per component, gradients
and optimizer state at a FLAN-T5 size, and QLoRA's share of full fine-tuning's.

    python -m benchmarks.qlora_memory                          # flan-t5-base architecture
    python -m benchmarks.qlora_memory --model flan_t5_large

Each model is built as `python -m flan_squad.train` builds it (conf/train.yaml composed with model=<model>
model.init=random strategy=<name>), takes one AdamW step on a 16-token example so that the optimizer's state exists,
and is read by `flan_squad.runs.cost.memory_account` (weights from the tensors, optimizer state from the optimizer).
Random-init weights: bytes do not depend on their values, nor on the machine's load. Activations, workspace and
allocator slack are not here: a run's own peak (benchmarks/strategy_cost.py, `make bench`) measures them. Writes
benchmarks/results/qlora_memory.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
# (label, strategy, overrides)
VARIANTS = (("full", "full", []), ("lora", "lora", []),
            ("qlora, wo in full precision", "qlora", ["strategy.quantize_wo=false"]),
            ("qlora (default: wo in 4-bit)", "qlora", ["strategy.quantize_wo=true"]))
COMPONENTS = ("embedding", "lm_head", "wo", "other linear layers", "layer norms, relative attention bias",
              "LoRA adapters")


def component(module_name: str) -> str:
    """Which of COMPONENTS a leaf module of a T5 (under PEFT or not) is, by its name."""
    if "lora_" in module_name:
        return "LoRA adapters"
    if module_name.endswith(("shared", "embed_tokens")):
        return "embedding"
    if module_name.endswith("lm_head"):
        return "lm_head"
    if module_name.endswith((".wo", ".wo.base_layer")):
        return "wo"
    if module_name.endswith(("layer_norm", "relative_attention_bias")):
        return "layer norms, relative attention bias"
    return "other linear layers"  # q, k, v, o, wi_0, wi_1


def account_by_component(model: nn.Module) -> dict[str, dict[str, int]]:
    """memory_account's weights (bytes by storage dtype) of each component's modules."""
    from flan_squad.runs.cost import memory_account

    groups: dict[str, list[nn.Module]] = {name: [] for name in COMPONENTS}
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            groups[component(name)].append(module)
    return {name: memory_account(nn.ModuleList(modules))["weights"] for name, modules in groups.items()}


def resident_mb() -> dict[str, float]:
    """This process's resident memory now, anonymous and file-backed (mapped files: a memory-mapped checkpoint)."""
    from flan_squad.runs.cost import PeakMemory

    PeakMemory(torch.device("cpu")).current_mb()  # returns freed heap to the system first
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {kind: int(fields[f"Rss{kind.title()}"].split()[0]) / 1024 for kind in ("anon", "file")}


def measure(model_name: str, strategy: str, overrides: list[str]) -> dict:
    """One variant: the model as a run builds it, one AdamW step, its account by component, and the resident memory
    the build added (before any step: what a run holds before training touches the weights)."""
    from hydra.utils import instantiate

    from flan_squad.runs.cost import memory_account
    from flan_squad.utils.config import compose

    cfg = compose("train", [f"model={model_name}", "model.init=random", f"strategy={strategy}", *overrides])
    base, chosen = instantiate(cfg.model, _convert_="all"), instantiate(cfg.strategy, _convert_="all")
    base.weights_path()  # the random-init checkpoint is written once, before anything is measured
    gc.collect()  # the previous variant's model
    before = resident_mb()
    model = chosen.build(base, torch.device("cpu"))
    built = {kind: round(mb - before[kind], 1) for kind, mb in resident_mb().items()}
    optimizer = instantiate(cfg.optimizer)([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(2, 1000, (1, 16))
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids[:, :4].contiguous()).loss.backward()
    optimizer.step()
    account, components = memory_account(model, [optimizer]), account_by_component(model)
    weights_total = sum(sum(kinds.values()) for kinds in components.values())
    assert weights_total == sum(account["weights"].values()), "components must add up to the model's weights"
    return {"strategy": strategy, "overrides": overrides, "compute_dtype": str(getattr(chosen, "compute_dtype", None)),
            "optimizer": type(optimizer).__name__, "weights_by_component": components, "weights": account["weights"],
            "trainable_params": account["trainable_params"], "gradients": account["gradients"],
            "optimizer_state": account["optimizer_state"], "resident_after_build_mb": built,
            "total": weights_total + account["gradients"] + account["optimizer_state"]}


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def table(results: dict) -> str:
    """The markdown table: one row per component, one column per variant, MB (2**20 bytes) with the storage dtype."""
    variants = results["variants"]
    full_total = variants["full"]["total"]
    lines = [f"| {results['model']} (random init), MB | " + " | ".join(variants) + " |",
             "|---|" + "---:|" * len(variants)]
    for name in COMPONENTS:
        cells = [" + ".join(f"{_mb(n)} {kind}" for kind, n in sorted(v["weights_by_component"][name].items())) or "-"
                 for v in variants.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rows = (("weights", lambda v: _mb(sum(v["weights"].values()))), ("gradients", lambda v: _mb(v["gradients"])),
            ("optimizer state", lambda v: _mb(v["optimizer_state"])),
            ("**weights + gradients + optimizer state**", lambda v: f"**{_mb(v['total'])}**"),
            ("share of full fine-tuning's", lambda v: f"{v['total'] / full_total:.3f}"))
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(v) for v in variants.values()) + " |")
    built = [v["resident_after_build_mb"] for v in variants.values()]
    lines.append("| resident memory the build added (RSS: anonymous + file-backed) | "
                 + " | ".join(f"{b['anon']:,.0f} + {b['file']:,.0f}" for b in built) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="flan_t5_base", help="a conf/model option (built with random weights)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qlora_memory.json"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    from benchmarks.bench import machine
    from flan_squad.utils.files import write_json_atomic

    results = {"note": "random-init weights; bytes read from the tensors (flan_squad.runs.cost.memory_account); "
                       "activations, workspace and allocator slack not included (a run's own peak measures them)",
               "command": " ".join(["python -m benchmarks.qlora_memory", *(sys.argv[1:] if argv is None else argv)]),
               "model": args.model, "machine": machine("cpu"), "variants": {}}
    for label, strategy, overrides in VARIANTS:
        results["variants"][label] = measure(args.model, strategy, overrides)
        print(f"  {label}: {_mb(results['variants'][label]['total'])} MB", file=sys.stderr, flush=True)
    full = results["variants"]["full"]["total"]
    results["qlora_over_full"] = {label: round(v["total"] / full, 4) for label, v in results["variants"].items()
                                  if v["strategy"] == "qlora"}
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(Path(args.out), results)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
