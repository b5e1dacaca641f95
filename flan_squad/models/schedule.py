"""The learning-rate schedule of `conf/module` (a partial the LightningModule completes with its optimizer and
number of optimizer steps)."""

from __future__ import annotations

import torch

from flan_squad.utils.errors import ConfigError


def linear_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.1):
    """Linear warm-up over `warmup_ratio` of the steps, then linear decay to 0 (the reference setup's schedule)."""
    from transformers import get_linear_schedule_with_warmup

    if not 0 <= warmup_ratio < 1:
        raise ConfigError(f"module.scheduler.warmup_ratio={warmup_ratio}: must be in [0, 1)")
    return get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
