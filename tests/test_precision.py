"""Precision: bf16 where it is native, never fp16, and bf16-mixed training with clipping and the fused optimizer."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import compose_config
from flan_squad.models.qa_module import SquadQAModule
from flan_squad.models.strategies import QLoRA
from flan_squad.runs.trainer import make_trainer
from flan_squad.train import train
from flan_squad.utils.errors import ConfigError
from flan_squad.utils.precision import auto_precision


def _device(monkeypatch, cuda: bool, cuda_bf16: bool, cpu_bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: cuda_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


@pytest.mark.parametrize("accelerator, cuda, cuda_bf16, cpu_bf16, expected", [
    ("cpu", False, False, False, "32-true"),      # AVX2-only CPU: bf16 is emulated, 8-25x slower
    ("cpu", False, False, True, "bf16-mixed"),    # AVX512-BF16 / AMX CPU
    ("cpu", True, True, False, "32-true"),        # the CPU was asked for: the GPU does not matter
    ("auto", True, True, False, "bf16-mixed"),    # a bf16 GPU
    ("gpu", True, True, False, "bf16-mixed"),
    ("auto", True, False, True, "32-true"),       # a GPU without bf16 (V100): fp32, whatever the CPU does
    ("auto", False, False, True, "bf16-mixed"),   # no GPU: the CPU decides
])
def test_auto_precision_follows_what_the_device_does_natively(accelerator, cuda, cuda_bf16, cpu_bf16, expected,
                                                              monkeypatch):
    _device(monkeypatch, cuda, cuda_bf16, cpu_bf16)
    assert auto_precision(accelerator) == expected


@pytest.mark.parametrize("cpu_bf16, expected", [(False, torch.float32), (True, torch.bfloat16)])
def test_qlora_compute_dtype_auto_follows_the_cpu(cpu_bf16, expected, monkeypatch):
    _device(monkeypatch, cuda=False, cuda_bf16=False, cpu_bf16=cpu_bf16)
    assert QLoRA()._compute_dtype(torch.device("cpu")) == expected
    assert QLoRA(compute_dtype="float32")._compute_dtype(torch.device("cpu")) == torch.float32  # overridable


@pytest.mark.parametrize("precision", ["16-mixed", "16-true", "16"])
def test_fp16_is_refused_in_one_line(precision):
    with pytest.raises(ConfigError, match=f"trainer.precision={precision}: T5's activations overflow fp16"):
        make_trainer(precision=precision, accelerator="cpu", logger=False)


def test_bf16_mixed_clips_gradients_of_the_fused_optimizer(tiny_base, tokenizer):
    trainer = L.Trainer(precision="bf16-mixed", accelerator="cpu", gradient_clip_val=0.5, logger=False)
    module = SquadQAModule(tiny_base, None, tokenizer, "v1", model=torch.nn.Linear(8, 8))
    module.trainer = trainer
    optimizer = torch.optim.AdamW(module.model.parameters(), fused=True)
    for p in module.model.parameters():
        p.grad = torch.full_like(p, 10.0)
    module.configure_gradient_clipping(optimizer, 0.5, "norm")  # Lightning itself raises here
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.model.parameters()]))
    assert norm == pytest.approx(0.5, rel=1e-3)


@pytest.mark.slow
def test_bf16_mixed_run_with_clipping_trains_through_the_entry_point(tmp_path, cache_dir):
    cfg = compose_config(["experiment=smoke", "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0",
                          "dataset.limit_train=16", "dataset.limit_val=4", "trainer.max_epochs=1",
                          "eval.max_new_tokens=4", "callbacks=none", "logger=none"],
                         output_dir=tmp_path, cache=cache_dir)
    metrics = train(cfg)
    assert metrics["precision"] == "bf16-mixed" and metrics["optimizer_steps"] == 2
