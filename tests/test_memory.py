"""The memory that is a run's own: the peak above what the process held before the model was built, and its account
from the model and optimizer (weights by dtype, gradients, optimizer state), checked against bytes computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_ARCHITECTURE, make_strategy

from flan_squad.runs.cost import CostMonitor, PeakMemory, memory_account

VOCAB, BUCKETS = 32128, 32


def _t5_shapes(d_model: int, d_kv: int, num_heads: int, d_ff: int, num_layers: int, num_decoder_layers: int) -> dict:
    """Parameter counts of a gated-gelu T5 with an untied lm_head, from its published layout."""
    inner = d_kv * num_heads
    attention = 4 * d_model * inner  # q, k, v, o
    feed_forward = 3 * d_model * d_ff  # wi_0, wi_1, wo
    encoder_layer = attention + feed_forward + 2 * d_model  # + 2 layer norms
    decoder_layer = 2 * attention + feed_forward + 3 * d_model  # self- and cross-attention, 3 layer norms
    total = (2 * VOCAB * d_model  # shared embedding, lm_head
             + num_layers * encoder_layer + num_decoder_layers * decoder_layer
             + 2 * (BUCKETS * num_heads + d_model))  # relative attention bias and final layer norm, each stack
    attention_blocks = num_layers + 2 * num_decoder_layers
    return {
        "total": total,
        # tensors: shared, lm_head; per encoder layer 4 + 3 linear, 2 norms; per decoder layer 8 + 3, 3; bias, norm x 2
        "tensors": 2 + 9 * num_layers + 14 * num_decoder_layers + 4,
        "lora_qv": lambda rank: attention_blocks * 2 * rank * (d_model + inner),  # A (rank x in) + B (out x rank)
        "lora_tensors": attention_blocks * 2 * 2,
        # (IA)^3 on k, v (one number per output channel) and wo (one per input channel)
        "ia3": num_layers * (2 * inner + d_ff) + num_decoder_layers * (4 * inner + d_ff),
        "ia3_tensors": 3 * num_layers + 5 * num_decoder_layers,
        # 4-bit: every linear layer of the stacks but wo (T5 keeps it in fp32), by size
        "quantised": [d_model * inner] * (4 * num_layers + 8 * num_decoder_layers)
                     + [d_model * d_ff] * (2 * num_layers + 2 * num_decoder_layers),
    }


def _nf4_bytes(n: int) -> int:
    """One NF4 weight of n values with double quantisation (bitsandbytes, blocks of 64): two values a byte, a uint8
    absmax per block, its 16-value fp32 code and offset; the absmax's own fp32 absmax per 256 blocks and code."""
    blocks = math.ceil(n / 64)
    return n // 2 + blocks + 16 * 4 + 4 + 4 * math.ceil(blocks / 256) + 256 * 4


def _one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.randint(2, 100, (2, 8))
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids[:, :3].contiguous()).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("name", ["full", "lora", "qlora", "ia3"])
def test_the_account_is_the_bytes_computed_by_hand(name, tiny_base, cpu):
    model = make_strategy(name).build(tiny_base, cpu)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, fused=True)  # conf/module/default.yaml's
    _one_step(model, optimizer)
    account = memory_account(model, [optimizer])

    shapes = _t5_shapes(**TINY_ARCHITECTURE)
    trained, tensors = {"full": (shapes["total"], shapes["tensors"]), "ia3": (shapes["ia3"], shapes["ia3_tensors"]),
                        "lora": (shapes["lora_qv"](16), shapes["lora_tensors"]),
                        "qlora": (shapes["lora_qv"](16), shapes["lora_tensors"])}[name]
    frozen_4bit = shapes["quantised"] if name == "qlora" else []
    fp32_params = shapes["total"] + (trained if name != "full" else 0) - sum(frozen_4bit)
    expected_weights = {"fp32": 4 * fp32_params, **({"4bit": sum(map(_nf4_bytes, frozen_4bit))} if frozen_4bit else {})}
    assert account == {
        "weights": expected_weights,
        "trainable_params": trained,
        "gradients": 4 * trained,
        "optimizer_state": 8 * trained + 4 * tensors,  # AdamW: two fp32 moments, and a step count per tensor
    }


def test_optimizer_state_is_read_from_the_optimizer_not_assumed(tiny_base, cpu):
    model = make_strategy("full").build(tiny_base, cpu)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # one fp32 buffer per parameter
    assert memory_account(model, [optimizer])["optimizer_state"] == 0  # none before the first step
    _one_step(model, optimizer)
    assert memory_account(model, [optimizer])["optimizer_state"] == 4 * _t5_shapes(**TINY_ARCHITECTURE)["total"]


class _Strategy:
    root_device = torch.device("cpu")

    def reduce(self, tensor, reduce_op):
        return tensor


class _Trainer:
    def __init__(self, optimizers):
        self.strategy, self.sanity_checking, self.optimizers = _Strategy(), False, optimizers


def _touch(megabytes: int) -> torch.Tensor:
    return torch.ones(megabytes * 2**20 // 4)  # written, so resident


def test_the_runs_own_peak_is_taken_above_what_the_process_held_before_the_model():
    held_before = _touch(200)  # the interpreter, torch, the data: not the run's
    model = torch.nn.Linear(1024, 1024)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer, monitor = _Trainer([optimizer]), CostMonitor()
    monitor.setup(trainer, model, "fit")
    weights = _touch(150)  # the model, built after setup (configure_model)
    monitor.on_train_start(trainer, model)
    activations = _touch(100)
    del activations
    model(torch.ones(4, 1024)).sum().backward()
    optimizer.step()
    monitor.on_train_end(trainer, model)
    result = monitor.as_dict()
    assert result["peak_memory_mb"] > result["memory_before_model_mb"] + 240 > 440  # the raw peak holds everything
    assert 240 < result["own_peak_memory_mb"] < 300  # 150 + 100 MB (+ the 4 MB layer, allocator slack)
    account = result["memory_account"]
    assert account["weights_mb"] == {"fp32": round((1024 * 1024 + 1024) * 4 / 2**20, 1)}
    assert account["gradients_mb"] == 4.0 and account["optimizer_state_mb"] == 8.0
    assert account["rest_mb"] == pytest.approx(result["own_peak_memory_mb"] - 16.0, abs=0.2)
    del held_before, weights


def test_current_memory_is_below_the_peak_after_freeing():
    peak = PeakMemory(torch.device("cpu"))
    peak.reset()
    block = _touch(100)
    del block
    assert peak.read_mb() > peak.current_mb() + 90
