"""The precision policy: bf16-mixed where the device computes bf16 natively, fp32 elsewhere, never fp16."""

from __future__ import annotations

import torch

from flan_squad.utils.errors import ConfigError


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


def precision_dtype(precision: str) -> torch.dtype | None:
    """The dtype a Lightning precision computes in (bf16-mixed: bfloat16, 32-true: float32); None if not one."""
    return _PRECISION_DTYPES.get(str(precision))


_PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "bf16": torch.bfloat16,
                     "32-true": torch.float32, "32": torch.float32}


def check_precision(precision: str, option: str = "trainer.precision") -> str:
    """`precision` if T5 can run in it; fp16 is refused in one line (its activations overflow)."""
    if str(precision).startswith("16"):
        raise ConfigError(f"{option}={precision}: T5's activations overflow fp16 (FLAN-T5 was trained in bf16); "
                          f"use bf16-mixed or 32-true")
    return str(precision)
