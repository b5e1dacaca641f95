"""torch.compile against eager, compile time counted: the project's training steps, and greedy decoding.

Training: the project's path (`benchmarks.runs.train_run`: `python -m flan_squad.train`'s module, data and fit loop,
each configuration in its own process) with `model.compile=false` and `true`, the same questions, steps and epochs.
Every epoch's seconds are reported: the first compiles (dynamic shapes: one graph for every batch length), the later
ones run compiled. Decoding: Hugging Face `generate` (what validation and evaluation call), greedy, on random
weights (every answer runs all `--new-tokens` steps), with its dynamic cache (the project's), with a static cache,
and with a static cache and the decoder step compiled (transformers' `compile_config`, which it applies by itself on
CUDA only). Prints a table and writes benchmarks/results/compile.json.

    python -m benchmarks.compile [--model flan_t5_small] [--strategies full] [--steps 4] [--epochs 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench import machine, run_train
from benchmarks.runs import Spec
from flan_squad.utils.files import write_json_atomic

DECODING = ("dynamic cache (the project's)", "static cache", "static cache, compiled")


def decode_run(model_name: str, batch_size: int, source_length: int, new_tokens: int, calls: int,
               device: str = "cpu") -> list[dict]:
    """Seconds of each `generate` call, per decoding setting: the first call pays for any compiling."""
    from transformers.generation.configuration_utils import CompileConfig

    from benchmarks.profile_step import build

    model, _ = build(model_name)
    model.to(device).eval()
    torch.manual_seed(0)
    inputs = torch.randint(2, 32000, (batch_size, source_length)).to(device)
    results = []
    for setting in DECODING:
        kwargs: dict = {}
        if setting != DECODING[0]:
            kwargs["cache_implementation"] = "static"
        if setting == DECODING[2]:
            config = CompileConfig(dynamic=None, mode="default")  # "reduce-overhead" is CUDA graphs
            config._compile_all_devices = True  # transformers compiles by itself on CUDA only
            kwargs["compile_config"] = config
        seconds, answers = [], None
        for _ in range(calls):
            started = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            answers = out.tolist()  # on a GPU, waits for the work to finish
            seconds.append(round(time.perf_counter() - started, 3))
        results.append({"setting": setting, "call_seconds": seconds, "answers": answers})
    reference = results[0]["answers"]
    for r in results:
        r["same_answers_as_dynamic_cache"] = r.pop("answers") == reference
        r["later_calls_questions_per_s"] = round(batch_size / statistics.median(r["call_seconds"][1:]), 3)
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="flan_t5_small", help="conf/model option (random init)")
    p.add_argument("--strategies", default="full")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per epoch (batch 8)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-source-length", type=int, default=512)
    p.add_argument("--decode-source-length", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--decode-calls", type=int, default=3)
    p.add_argument("--skip-decoding", action="store_true")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shared-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/compile.json")
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = machine(args.device)
    train = []
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as log_dir:
        for strategy in args.strategies.split(","):
            for compiled in (False, True):
                spec = Spec(model=args.model, strategy=strategy, steps=args.steps, epochs=args.epochs,
                            max_source_length=args.max_source_length, shared_dir=args.shared_dir, compile=compiled,
                            device=args.device)
                train.append(run_train(spec, in_process=False, log_dir=Path(log_dir)))
    print(f"training: {args.model} (random init), batch 8, max_source_length {args.max_source_length}, "
          f"{args.steps} steps x {args.epochs} epochs, fp32, {args.device}")
    print(f"{'strategy':<9}{'compile':<9}{'epoch seconds':<28}{'later ex/s':>11}{'x eager':>9}")
    eager_rate: dict[str, float] = {}
    for r in train:
        sp = r["spec"]
        if "error" in r:
            print(f"{sp['strategy']:<9}{str(sp['compile']):<9}FAILED: {r['error']}")
            continue
        later = r["epoch_seconds"][1:] or r["epoch_seconds"]
        r["later_epochs_examples_per_s"] = round(r["examples_per_epoch"] / statistics.median(later), 3)
        if not sp["compile"]:
            eager_rate[sp["strategy"]] = r["later_epochs_examples_per_s"]
        r["later_over_eager"] = (round(r["later_epochs_examples_per_s"] / eager_rate[sp["strategy"]], 3)
                                 if sp["strategy"] in eager_rate else None)
        print(f"{sp['strategy']:<9}{str(sp['compile']):<9}{str(r['epoch_seconds']):<28}"
              f"{r['later_epochs_examples_per_s']:>11.2f}{r['later_over_eager'] or float('nan'):>9.2f}")
    decoding = []
    if not args.skip_decoding:
        decoding = decode_run(args.model, 8, args.decode_source_length, args.new_tokens, args.decode_calls,
                              args.device)
        print(f"decoding: generate, greedy, batch 8, inputs of {args.decode_source_length} tokens, "
              f"{args.new_tokens} new tokens each (random init)")
        for d in decoding:
            print(f"  {d['setting']:<32} calls {d['call_seconds']} s; later calls "
                  f"{d['later_calls_questions_per_s']:.2f} questions/s; "
                  f"same answers: {d['same_answers_as_dynamic_cache']}")
    result = {"note": f"{args.model} with random weights: cost only", "machine": info,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "train": train, "decoding": decoding,
              "seconds": round(time.perf_counter() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
