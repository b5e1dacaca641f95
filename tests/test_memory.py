"""The memory that is a run's own: the peak above what the process held before the model was built, and its account
from the model and optimizer (weights by dtype, gradients, optimizer state), checked against bytes computed by hand."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from benchmarks.arithmetic import strategy_bytes, t5_parameters
from conftest import TINY_ARCHITECTURE, TOKENIZER_DIR, make_strategy
from flan_squad.models.base import BaseModel
from flan_squad.runs.cost import CostMonitor, PeakMemory, memory_account


@pytest.mark.parametrize("size, published", [("small", 76_961_152), ("base", 247_577_856), ("large", 783_150_080)])
def test_the_arithmetic_gives_the_published_flan_t5_sizes(size, published, tmp_path):
    from omegaconf import OmegaConf

    from flan_squad.utils.config import CONFIG_DIR

    architecture = OmegaConf.load(CONFIG_DIR / "model" / f"flan_t5_{size}.yaml").architecture
    base = BaseModel(name=size, name_or_path="", init="random", architecture=dict(architecture))
    assert t5_parameters(base.config())["total"] == published


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
    # computed by hand from the architecture alone (benchmarks/arithmetic.py), read from the tensors by the account
    assert memory_account(model, [optimizer]) == strategy_bytes(tiny_base.config(), name)


@pytest.mark.parametrize("quantize_wo", [False, True])
def test_quantize_wo_decides_whether_t5s_feed_forward_outputs_are_4bit(quantize_wo, tiny_base, cpu):
    model = make_strategy("qlora", quantize_wo=quantize_wo).build(tiny_base, cpu)
    config = tiny_base.config()
    wo_params = (config.num_layers + config.num_decoder_layers) * config.d_ff * config.d_model
    wo_modules = [m for name, m in model.named_modules() if name.endswith(".wo")]
    assert len(wo_modules) == config.num_layers + config.num_decoder_layers
    account = memory_account(torch.nn.ModuleList(wo_modules))["weights"]
    # by hand: 4 bytes a value in fp32; else NF4's half a byte a value, a uint8 absmax per 64 values and, per layer,
    # the 16-value fp32 code, fp32 offset, one fp32 nested absmax (under 256 blocks) and the 256-value nested code
    blocks = config.d_ff * config.d_model // 64
    per_layer_4bit = config.d_ff * config.d_model // 2 + blocks + 16 * 4 + 4 + 4 + 256 * 4
    expected = ({"4bit": (config.num_layers + config.num_decoder_layers) * per_layer_4bit} if quantize_wo
                else {"fp32": 4 * wo_params})
    assert account == expected
    assert memory_account(model) == {**strategy_bytes(config, "qlora", quantize_wo=quantize_wo), "optimizer_state": 0}


def test_the_benchmarks_components_add_up_to_the_account(tiny_base, cpu):
    from benchmarks.qlora_memory import account_by_component

    model = make_strategy("qlora").build(tiny_base, cpu)
    components = account_by_component(model)
    assert {name: set(kinds) for name, kinds in components.items()} == {
        "embedding": {"fp32"}, "lm_head": {"fp32"}, "wo": {"4bit"}, "other linear layers": {"4bit"},
        "layer norms, relative attention bias": {"fp32"}, "LoRA adapters": {"fp32"}}
    config = tiny_base.config()
    assert components["lm_head"] == {"fp32": 4 * config.vocab_size * config.d_model}
    total = sum(n for kinds in components.values() for n in kinds.values())
    assert total == sum(memory_account(model)["weights"].values())


def test_qlora_keeps_no_view_of_the_checkpoint_file(tmp_path, cpu):
    # its own checkpoint, which nothing else in this process maps
    base = BaseModel(name="t5-tiny", name_or_path=None, init="random", tokenizer=str(TOKENIZER_DIR),
                     architecture=TINY_ARCHITECTURE, cache_dir=str(tmp_path))
    checkpoint = Path(base.weights_path()) / "model.safetensors"
    model = make_strategy("qlora").build(base, cpu)
    gc.collect()
    assert memory_account(model)["weights"]["4bit"] > 0
    # a mapping left behind keeps every page that quantisation read resident: the whole fp32 checkpoint
    assert str(checkpoint) not in Path("/proc/self/maps").read_text()


def test_optimizer_state_is_read_from_the_optimizer_not_assumed(tiny_base, cpu):
    model = make_strategy("full").build(tiny_base, cpu)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # one fp32 buffer per parameter
    assert memory_account(model, [optimizer])["optimizer_state"] == 0  # none before the first step
    _one_step(model, optimizer)
    assert memory_account(model, [optimizer])["optimizer_state"] == 4 * t5_parameters(tiny_base.config())["total"]


class _Strategy:
    root_device = torch.device("cpu")

    def reduce(self, tensor, reduce_op):
        return tensor


class _Trainer:
    """What CostMonitor uses of a Lightning Trainer."""

    def __init__(self, optimizers):
        self.strategy, self.sanity_checking, self.optimizers = _Strategy(), False, optimizers

    def save_checkpoint(self, filepath, weights_only=False) -> None:  # timed by CostMonitor
        pass


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
