"""Hydra/OmegaConf glue: the resolvers that `conf/` uses, and composing a config outside `@hydra.main`."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "conf"


def auto_precision(accelerator: str) -> str:
    """bf16-mixed on a GPU that has bf16, else fp32. Never fp16: T5's activations overflow it."""
    wants_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if wants_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"  # on CPU bf16 autocast is 8-25x slower than fp32


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
    OmegaConf.register_new_resolver("auto_precision", auto_precision, replace=True)


register_resolvers()
