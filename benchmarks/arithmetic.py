"""Bytes each strategy needs by arithmetic, from a T5 architecture alone: weights, gradients and AdamW state.

What `flan_squad.runs.cost.memory_account` reads from the tensors of a real run should equal this (tests/test_memory.py
checks it on a tiny model); what a run's own peak holds beyond it is activations, workspace and allocator slack.
"""

from __future__ import annotations

import math
from typing import Any

NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes' blocks: values per absmax, absmaxes per nested absmax


def t5_parameters(config) -> dict[str, Any]:
    """Parameter counts of a gated-gelu T5 with an untied lm_head (FLAN-T5), from its layout.

    `linear_4bit`: the sizes of the stacks' linear layers that transformers' 4-bit loading quantises (every one but
    `wo`, which it keeps in full precision, as it does `lm_head` and the embedding); `wo`: the sizes of the
    feed-forward output layers; `attention_blocks`: encoder self-, decoder self- and cross-attention modules, each
    with q, k, v, o."""
    d, inner, d_ff, heads = config.d_model, config.num_heads * config.d_kv, config.d_ff, config.num_heads
    enc, dec, vocab = config.num_layers, config.num_decoder_layers, config.vocab_size
    buckets = config.relative_attention_num_buckets
    attention, feed_forward = 4 * d * inner, 3 * d * d_ff  # q, k, v, o; wi_0, wi_1, wo
    return {
        "total": (2 * vocab * d  # shared embedding, lm_head
                  + enc * (attention + feed_forward + 2 * d) + dec * (2 * attention + feed_forward + 3 * d)
                  + 2 * (buckets * heads + d)),  # relative attention bias and final layer norm of each stack
        "tensors": 2 + 9 * enc + 14 * dec + 4,
        "linear_4bit": [d * inner] * (4 * enc + 8 * dec) + [d * d_ff] * (2 * enc + 2 * dec),
        "wo": [d_ff * d] * (enc + dec),
        "attention_blocks": enc + 2 * dec,
        "d_model": d, "inner": inner, "d_ff": d_ff, "enc": enc, "dec": dec,
    }


def nf4_bytes(n: int) -> int:
    """One NF4 weight of n values, double quantisation (bitsandbytes): two values a byte, a uint8 absmax per block
    of 64 with its 16-value fp32 code and fp32 offset, and the absmaxes' own fp32 absmax per 256 blocks and code."""
    blocks = math.ceil(n / NF4_BLOCK)
    return n // 2 + blocks + 16 * 4 + 4 + 4 * math.ceil(blocks / NESTED_BLOCK) + 256 * 4


def lora_parameters(shapes: dict, rank: int, targets: int = 2) -> int:
    """LoRA on `targets` projections (q, v) of every attention module: A (rank x d_model) + B (inner x rank)."""
    return shapes["attention_blocks"] * targets * rank * (shapes["d_model"] + shapes["inner"])


def ia3_parameters(shapes: dict) -> int:
    """(IA)^3 on k, v (one number per output channel) and wo (one per input channel) of every layer."""
    inner, d_ff = shapes["inner"], shapes["d_ff"]
    return shapes["enc"] * (2 * inner + d_ff) + shapes["dec"] * (4 * inner + d_ff)


def strategy_bytes(config, strategy: str, rank: int = 16, quantize_wo: bool = True) -> dict[str, Any]:
    """Weights by dtype, gradients and AdamW state (two fp32 moments per trainable parameter and a step count per
    trainable tensor) that `strategy` holds for this architecture in fp32, with 4-bit NF4 for qlora (`wo` included
    unless `quantize_wo` is false: conf/strategy/qlora.yaml's option)."""
    shapes = t5_parameters(config)
    trained, tensors = {
        "full": (shapes["total"], shapes["tensors"]),
        "lora": (lora_parameters(shapes, rank), shapes["attention_blocks"] * 2 * 2),
        "qlora": (lora_parameters(shapes, rank), shapes["attention_blocks"] * 2 * 2),
        "ia3": (ia3_parameters(shapes), 3 * shapes["enc"] + 5 * shapes["dec"]),
    }[strategy]
    quantised = shapes["linear_4bit"] + (shapes["wo"] if quantize_wo else []) if strategy == "qlora" else []
    weights = {"fp32": 4 * (shapes["total"] + (0 if strategy == "full" else trained) - sum(quantised))}
    if quantised:
        weights["4bit"] = sum(map(nf4_bytes, quantised))
    return {"weights": weights, "trainable_params": trained, "gradients": 4 * trained,
            "optimizer_state": 8 * trained + 4 * tensors}
