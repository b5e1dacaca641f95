"""Callbacks that tests add to a run through Hydra (`+callbacks.name._target_=fault_injection.X`)."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch


class SlowSteps(L.Callback):
    """Sleeps before each step and records the step about to run, so a test can kill the run mid-epoch.

    When step k starts, the checkpoint written at the end of step k-1 is complete on disk.
    """

    def __init__(self, marker: str, seconds: float = 0.3):
        self.marker, self.seconds = Path(marker), seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.marker.write_text(str(trainer.global_step))
        time.sleep(self.seconds)


class PoisonWeightsAtStep(L.Callback):
    """Fills the trainable weights with NaN before step `step`: the loss of that step is not finite."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    if p.requires_grad:
                        p.fill_(math.nan)


class SignalAtStep(L.Callback):
    """Sends this process `signum` when step `step` starts, as a scheduler or Ctrl-C would."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def KillAtStep(step: int) -> SignalAtStep:
    """SIGKILL as step `step` starts: no chance to clean up, as with `kill -9` or the OOM killer. The rolling
    checkpoint written before it stays on disk; the steps trained since are lost."""
    return SignalAtStep(int(signal.SIGKILL), step)


class CrashAtStep(L.Callback):
    """Raises as step `step` starts, as a crash would (in this process, cheaper than a killed subprocess): the
    rolling checkpoint written before it stays on disk."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise InjectedCrash(f"crash injected at step {self.step}")


class InjectedCrash(RuntimeError):
    pass
