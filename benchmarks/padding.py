"""Padding that batching costs: source tokens run per real source token, for random batches, the
project's length-grouped batches, and padding to max_source_length, over N SQuAD training questions.

    python -m benchmarks.padding [--questions 4000] [--batch-size 8] [--dataset squad_v1]

Tokenisation only (no model): seconds on a CPU.
"""

from __future__ import annotations

import argparse
import random
import statistics

from hydra.utils import instantiate

from flan_squad.data.sampler import LengthGroupedSampler
from flan_squad.utils.config import compose


def padded_over_real(lengths: list[int], batches: list[list[int]]) -> float:
    return sum(max(lengths[i] for i in b) * len(b) for b in batches) / sum(lengths)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-source-length", type=int, default=512)
    p.add_argument("--dataset", default="squad_v1")
    p.add_argument("--seeds", type=int, default=20, help="random orders averaged for the random batches")
    args = p.parse_args(argv)
    cfg = compose("train", [f"dataset={args.dataset}", f"dataset.limit_train={args.questions}",
                                                        f"dataset.max_source_length={args.max_source_length}",
                                                        "model.tokenizer=${paths.tokenizer_dir}"])
    base = instantiate(cfg.model, _convert_="all")
    datamodule = instantiate(cfg.dataset, tokenizer=base.load_tokenizer(), seed=cfg.seed, limit_val=1,
                             **base.question_format)
    datamodule.setup("fit")
    lengths = [len(ids) for ids in datamodule.encoded_train.input_ids]
    size = args.batch_size
    randoms = []
    for seed in range(args.seeds):
        order = list(range(len(lengths)))
        random.Random(seed).shuffle(order)
        randoms.append(padded_over_real(lengths, [order[i : i + size] for i in range(0, len(order), size)]))
    grouped = padded_over_real(lengths, LengthGroupedSampler(lengths, size, cfg.seed).batches())
    print(f"{len(lengths)} {args.dataset} training questions, batch {size}, mean source length "
          f"{statistics.mean(lengths):.1f} tokens (max {max(lengths)}); source tokens run per real token:")
    print(f"  random batches (mean of {args.seeds} orders)  {statistics.mean(randoms):.2f}")
    print(f"  length-grouped batches                {grouped:.2f}")
    padded = args.max_source_length * len(lengths) / sum(lengths)
    print(f"  padded to {args.max_source_length:<4}                         {padded:.2f}")


if __name__ == "__main__":
    main()
