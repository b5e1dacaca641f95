"""Hydra/OmegaConf glue: the resolvers that `conf/` uses, and composing a config outside `@hydra.main`."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from flan_squad.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "conf"


def bf16_is_native(device_type: str) -> bool:
    """Whether this device computes bf16 natively: a GPU with bf16, or a CPU with AVX512-BF16 or AMX.

    Elsewhere bf16 is emulated: on an AVX2-only CPU bf16 autocast ran 8-25x slower than fp32; on an AMD EPYC
    with AVX512-BF16, bf16-mixed trained the flan-t5-small shape 1.5x faster than fp32.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and _cuda_bf16_is_native()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up defensively
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def _cuda_bf16_is_native() -> bool:
    # The default (including_emulation=True) also says yes on pre-Ampere GPUs (V100, T4), which only emulate bf16.
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument: its answer was compute capability >= 8, i.e. native
        return torch.cuda.is_bf16_supported()


def auto_precision(accelerator: str) -> str:
    """bf16-mixed where bf16 is native (FLAN-T5 was trained in bf16), else fp32. Never fp16: T5 overflows it."""
    wants_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if bf16_is_native("cuda" if wants_gpu else "cpu") else "32-true"


def check_precision(precision: str, option: str = "trainer.precision") -> str:
    """`precision` if T5 can run in it; fp16 is refused in one line (its activations overflow)."""
    if str(precision).startswith("16"):
        raise ConfigError(f"{option}={precision}: T5's activations overflow fp16 (FLAN-T5 was trained in bf16); "
                          f"use bf16-mixed or 32-true")
    return str(precision)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
    OmegaConf.register_new_resolver("auto_precision", auto_precision, replace=True)
    OmegaConf.register_new_resolver("planted_squad", _planted_file, replace=True)


def _planted_file(version: str, split: str, cache_dir: str, shared_dir: str) -> str:
    from flan_squad.planted import planted_file  # generates the files on first use

    return planted_file(version, split, cache_dir, shared_dir)


register_resolvers()
