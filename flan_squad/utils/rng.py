"""The random state a checkpoint carries, so that a resumed run draws the same dropout masks as an uninterrupted
one: torch (CPU and CUDA) and Python's."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch


def capture_rng_states() -> dict:
    # Tensors and tuples only, so that checkpoints load with torch.load(weights_only=True).
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextlib.contextmanager
def forked_rng() -> Iterator[None]:
    """Whatever runs inside leaves the random state as it found it (validation must not change training)."""
    states = capture_rng_states()
    try:
        yield
    finally:
        restore_rng_states(states)
