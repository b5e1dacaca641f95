"""Model FLOPs from the T5 architecture and token counts, and the machine's measured matmul peak.

Model FLOPs count the useful work only (real tokens, no padding, no recomputation by gradient
checkpointing), so model FLOP utilisation (MFU) shows what padding and recomputation waste.
"""

from __future__ import annotations

import statistics
import time

import torch


def forward_flops(config, source_len: int, target_len: int) -> float:
    """Matmul FLOPs of one T5 forward pass over one example (2 FLOPs per multiply-add)."""
    d, inner, d_ff, vocab = config.d_model, config.num_heads * config.d_kv, config.d_ff, config.vocab_size
    ff_mats = 3 if getattr(config, "is_gated_act", False) else 2  # gated-gelu: wi_0, wi_1, wo
    L, T = source_len, target_len
    encoder_layer = 2 * (4 * d * inner * L + 2 * L * L * inner + ff_mats * d * d_ff * L)
    decoder_layer = 2 * (
        4 * d * inner * T + 2 * T * T * inner  # self-attention
        + 2 * d * inner * T + 2 * d * inner * L + 2 * T * L * inner  # cross-attention (q, o on T; k, v on L)
        + ff_mats * d * d_ff * T
    )
    return config.num_layers * encoder_layer + config.num_decoder_layers * decoder_layer + 2 * d * vocab * T


def train_flops(config, lengths: list[tuple[int, int]], frozen_base: bool) -> float:
    """Model FLOPs of one training pass over examples given as (source, target) lengths.

    Backward costs two forwards where weights get gradients (full fine-tuning) and one where the base is
    frozen (LoRA/QLoRA: input gradients only; the adapters' own FLOPs are negligible).
    """
    factor = 2.0 if frozen_base else 3.0
    return factor * sum(forward_flops(config, s, t) for s, t in lengths)


def peak_matmul_flops(device: torch.device, dtype: torch.dtype | None = None, size: int | None = None,
                      repeats: int = 5) -> dict:
    """Measured FLOP/s of a square product through `F.linear`, the op `nn.Linear` runs (on a CPU without
    native bf16, `torch.mm` in bf16 takes a path ~10x slower than `F.linear`'s). Default dtype: fp32 on CPU,
    bf16 on CUDA."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = size or (8192 if device.type == "cuda" else 2048 if dtype == torch.float32 else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    rates = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.nn.functional.linear(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first one warms up
            rates.append(2 * n**3 / (time.perf_counter() - start))
    return {"peak_flops": statistics.median(rates), "dtype": str(dtype).removeprefix("torch."), "size": n}
