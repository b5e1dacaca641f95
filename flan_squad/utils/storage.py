"""Bytes that tensors hold, counted by the storage behind them."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def storage_bytes(tensors: Iterable[torch.Tensor], seen: set[tuple[str, int]] | None = None) -> int:
    """Bytes of the storages behind `tensors`, each counted once (also across calls that share `seen`): views, tied
    weights and the code tables bitsandbytes shares between layers or parameters are one storage."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if storage.nbytes() and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
