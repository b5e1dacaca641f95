"""Where one training step's time goes, in fp32 and in bf16-mixed: a torch.profiler profile of full fine-tuning.

One step of batch 8 (inputs of `--source-length` tokens, targets of 8) on an architecture from conf/model with random
weights, after a warm-up step, in each precision: 32-true, then bf16 autocast as Lightning's bf16-mixed runs it. It
prints each precision's step time and its self CPU time by kind of operator (matrix multiplies, dtype conversions,
the optimizer, the rest), the operators that took most, and whether oneDNN ran the matrix multiplies (its verbose
log, from a child process: on CPUs without AVX512-BF16 or AMX, torch multiplies bf16 matrices without it). Writes
benchmarks/results/profile_step.json.

    python -m benchmarks.profile_step [--model flan_t5_small] [--source-length 256] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from flan_squad.utils.files import write_json_atomic

# Operator names (self time) by kind; the rest is elementwise work, norms, softmax, embedding, loss.
KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn", "mkldnn::", "aten::mkldnn"),
    "dtype conversion": ("aten::_to_copy", "aten::copy_", "aten::to", "aten::_autocast_to"),
    "optimizer": ("aten::_fused_adamw", "aten::_foreach_", "aten::lerp", "aten::addcdiv", "aten::addcmul"),
}


def kind_of(name: str) -> str:
    return next((k for k, prefixes in KINDS.items() if name.startswith(prefixes)), "other")


def build(model_name: str):
    from flan_squad.utils.config import compose

    cfg = compose("train", [f"model={model_name}", "model.init=random", "strategy=full"])
    from hydra.utils import instantiate

    base = instantiate(cfg.model)
    model = base.load()
    model.train()
    return model, base.label


def one_step(model, optimizer, batch, precision: str) -> None:
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    with autocast:
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def profile(model, batch, precision: str, top: int) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    one_step(model, optimizer, batch, precision)  # warm-up: optimizer state, allocator, oneDNN primitives
    started = time.perf_counter()
    one_step(model, optimizer, batch, precision)
    step_seconds = time.perf_counter() - started
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        one_step(model, optimizer, batch, precision)
    ops = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in ops)
    by_kind: dict[str, float] = {}
    for e in ops:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + e.self_cpu_time_total
    ops.sort(key=lambda e: -e.self_cpu_time_total)
    del optimizer
    return {
        "precision": precision,
        "step_seconds": round(step_seconds, 3),
        "profiled_self_cpu_seconds": round(total / 1e6, 3),
        "share_by_kind": {k: round(v / total, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": e.key, "calls": e.count, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3),
                     "share": round(e.self_cpu_time_total / total, 4)} for e in ops[:top]],
    }


ONEDNN_PROBE = """
import torch
a = torch.randn(256, 256)
for dtype in (torch.float32, torch.bfloat16):
    print("probe", dtype, flush=True)
    (a.to(dtype) @ a.to(dtype)).sum()
    torch.nn.functional.linear(a.to(dtype), a.to(dtype)).sum()
"""


def onednn_use() -> dict:
    """Which instruction set oneDNN found, and whether it ran fp32 and bf16 matrix multiplies (ONEDNN_VERBOSE)."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", ONEDNN_PROBE], capture_output=True, text=True, env=env).stdout
    isa = next((line.split("isa:", 1)[1].strip() for line in out.splitlines() if "isa:" in line), None)
    used: dict[str, bool] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("probe"):
            current = "bf16" if "bfloat16" in line else "fp32"
            used[current] = False
        elif current and ",exec," in line and ("matmul" in line or "inner_product" in line or "gemm" in line):
            used[current] = True
    return {"isa": isa, "matmul_by_onednn": used, "mkldnn_available": torch.backends.mkldnn.is_available()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="flan_t5_small", help="conf/model option (random init)")
    p.add_argument("--source-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--precisions", default="32-true,bf16-mixed")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/profile_step.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, label = build(args.model)
    batch = {"input_ids": torch.randint(2, 32000, (args.batch_size, args.source_length)),
             "labels": torch.randint(2, 32000, (args.batch_size, 8))}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    from benchmarks.bench import machine

    result = {"note": f"{label}: random weights, cost only", "machine": machine("cpu"),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "onednn": onednn_use(), "steps": []}
    for precision in args.precisions.split(","):
        step = profile(model, batch, precision, args.top)
        result["steps"].append(step)
        print(f"== {precision}: one step {step['step_seconds']:.2f} s (profiled self CPU "
              f"{step['profiled_self_cpu_seconds']:.2f} s) ==")
        print("  by kind: " + ", ".join(f"{k} {v * 100:.1f}%" for k, v in step["share_by_kind"].items()))
        for op in step["top_ops"]:
            print(f"  {op['op']:<32}{op['calls']:>6} calls {op['self_cpu_s']:>8.3f} s {op['share'] * 100:>6.1f}%")
    fp32, bf16 = (next((s for s in result["steps"] if s["precision"] == p), None) for p in ("32-true", "bf16-mixed"))
    if fp32 and bf16:
        result["bf16_step_over_fp32"] = round(bf16["step_seconds"] / fp32["step_seconds"], 2)
        print(f"bf16-mixed step / fp32 step: {result['bf16_step_over_fp32']}")
    print(f"oneDNN: isa {result['onednn']['isa']}; ran the matmuls: {result['onednn']['matmul_by_onednn']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
