"""Training strategies: how a base model becomes the model that trains, and how its result is saved.

Each strategy has one job: `build` a trainable model from a `BaseModel` on a device, `save` what it
trained (the full model, or an adapter) with the tokenizer, and `load` that back. Adding a strategy
means one class here and one YAML file in `conf/strategy/`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from flan_squad.errors import ConfigError
from flan_squad.base import BaseModel

log = logging.getLogger(__name__)

_NON_REENTRANT = {"use_reentrant": False}  # reentrant checkpointing needs inputs that require grad


class FullFineTuning:
    """Every parameter trains."""

    name = "full"

    def __init__(self, lr: float = 5e-5, gradient_checkpointing: bool = False):
        if not lr > 0:
            raise ConfigError(f"strategy.lr={lr}: must be > 0")
        self.lr, self.gradient_checkpointing = lr, gradient_checkpointing

    def load_base(self, base: BaseModel, device: torch.device) -> nn.Module:
        model = base.load().to(device)
        self._enable_checkpointing(model)
        return model

    def build(self, base: BaseModel, device: torch.device) -> nn.Module:
        return self.load_base(base, device)

    def _enable_checkpointing(self, model: nn.Module) -> None:
        if self.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=_NON_REENTRANT)
            model.config.use_cache = False  # the cache is useless while training and warns under checkpointing

    def save(self, model: nn.Module, tokenizer, directory: str | Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    def load(self, directory: str | Path, base: BaseModel, device: torch.device) -> nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM.from_pretrained(directory).to(device)


class LoRA(FullFineTuning):
    """PEFT LoRA adapters on a frozen base; only the adapters are saved."""

    name = "lora"

    def __init__(self, lr: float = 1e-3, rank: int = 16, alpha: int = 32, dropout: float = 0.05,
                 target_modules: str | Sequence[str] = ("q", "v"), gradient_checkpointing: bool = False):
        super().__init__(lr, gradient_checkpointing)
        if not (isinstance(rank, int) and rank > 0):
            raise ConfigError(f"strategy.rank={rank}: must be a whole number > 0")
        if not alpha > 0:
            raise ConfigError(f"strategy.alpha={alpha}: must be > 0")
        if not 0 <= dropout < 1:
            raise ConfigError(f"strategy.dropout={dropout}: must be in [0, 1)")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        # "all-linear" is PEFT's own shorthand: every linear layer except the output head.
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)

    def lora_config(self):
        from peft import LoraConfig, TaskType

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type=TaskType.SEQ_2_SEQ_LM)

    def build(self, base: BaseModel, device: torch.device) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(self.load_base(base, device), self.lora_config())

    def load(self, directory: str | Path, base: BaseModel, device: torch.device) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(self.load_base(base, device), directory)


class QLoRA(LoRA):
    """LoRA on a base quantised to 4-bit NF4 with double quantisation, with gradient checkpointing.

    T5 keeps `wo` (feed-forward output), embeddings and `lm_head` unquantised (transformers'
    `_keep_in_fp32_modules`); `count_parameters` reports how many parameters really are 4-bit.
    """

    name = "qlora"

    def __init__(self, lr: float = 1e-3, rank: int = 16, alpha: int = 32, dropout: float = 0.05,
                 target_modules: str | Sequence[str] = ("q", "v"), gradient_checkpointing: bool = True,
                 quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "auto"):
        super().__init__(lr, rank, alpha, dropout, target_modules, gradient_checkpointing)
        if quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"strategy.quant_type={quant_type!r}: expected 'nf4' or 'fp4'")
        self.quant_type, self.double_quant, self.compute_dtype = quant_type, double_quant, compute_dtype

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        if self.compute_dtype == "auto":  # bf16 where it is fast; fp32 on CPU, where bf16 is 8-25x slower
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.compute_dtype)

    def load_base(self, base: BaseModel, device: torch.device) -> nn.Module:
        try:
            import bitsandbytes.nn
        except ImportError:
            raise ConfigError("strategy=qlora needs bitsandbytes (pip install bitsandbytes), or use strategy=lora") from None
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.quant_type, bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self._compute_dtype(device),
        )
        try:
            model = base.load(quantization_config=quantization, device_map={"": device})
        except (RuntimeError, ValueError, NotImplementedError, ImportError) as e:
            raise ConfigError(
                f"strategy=qlora: bitsandbytes cannot load 4-bit weights on device {device} ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); use strategy=lora or another device"
            ) from e
        # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bf16 inference kernel the first time
        # the layer runs in eval mode without grad (validation, say). That kernel has no backward (training after
        # it gets no gradient through the 4-bit layers), computes in bf16 whatever compute_dtype says, and its
        # inverse is lossy (absmax goes through bf16). Never repacking keeps one behaviour on every CPU.
        for module in model.modules():
            if isinstance(module, bitsandbytes.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=self.gradient_checkpointing,
            gradient_checkpointing_kwargs=_NON_REENTRANT,
        )
