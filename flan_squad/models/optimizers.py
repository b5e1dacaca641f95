"""What the optimizer of `conf/optimizer` holds: its name and the memory of its state.

The optimizers themselves are library classes that conf/optimizer names (torch's fused AdamW, bitsandbytes' AdamW8bit
and PagedAdamW8bit, transformers' Adafactor); the LightningModule completes their partials with the trainable
parameters (`SquadQAModule.configure_optimizers`).
"""

from __future__ import annotations

import torch

from flan_squad.utils.storage import storage_bytes


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in `optimizer.state` (moments, 8-bit quantisation maps and scales, factored second
    moments, step counters), each storage counted once: bitsandbytes shares one quantisation map between parameters.
    Under DDP or FSDP, this process's share."""
    return storage_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, object]:
    """What metrics.json records: the optimizer's class (what ran, e.g. `AdamW8bit`), its base learning rate, and the
    MB its state holds."""
    return {"optimizer": type(optimizer).__name__, "lr": optimizer.defaults.get("lr"),
            "optimizer_state_mb": round(optimizer_state_bytes(optimizer) / 2**20, 1)}
