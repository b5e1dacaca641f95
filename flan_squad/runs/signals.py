"""A run stopped by SIGTERM or SIGINT (a scheduler's time limit or preemption, Ctrl-C) stops so it can be resumed.

Lightning does the signal handling: its signal connector turns SIGTERM into `trainer.received_sigterm`, the loops
then stop at the next step boundary with `SIGTERMException`, and under SLURM its `SLURMEnvironment` requeues the job
on the requeue signal (SIGUSR1: `#SBATCH --signal=USR1@90`). What Lightning leaves to the run:
- `Interruption` writes the rolling `checkpoints/last.ckpt` (the `last_checkpoint` callback's) at that step;
- `interruptible()` lets Ctrl-C take the same path (Lightning's own SIGINT handling is a KeyboardInterrupt wherever
  it lands, even mid optimizer step, and exit 1), and turns the stop into `RunInterrupted`, which the run's
  lifecycle records (`status.json` "interrupted" with the step) and the entry point exits with: 128 + signal (143
  SIGTERM, 130 SIGINT), never 0 (`SIGTERMException` is a `SystemExit` without a code, so a plain Lightning run
  preempted this way exits 0). A SLURM job requeued after it continues from its `last.ckpt` (`resume.requeued`);
- a signal that comes after Lightning last looks for one (the last epoch's end, the last validation batch) stops the
  run all the same (`Interruption.on_fit_end`, the end of `interruptible`): Lightning would go on and exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from flan_squad.runs.resume import LAST_CHECKPOINT
from flan_squad.utils.errors import RunInterrupted

log = logging.getLogger(__name__)


class Interruption(L.Callback):
    """Writes `last.ckpt` where training stops: when Lightning stops it on SIGTERM (or SIGINT, see `interruptible`),
    and at its end.

    On a signal: at the end of the step during which it came (where the rolling checkpoint is written anyway, so a
    resume from it is exactly a resume from an ordinary `last.ckpt`), or else where Lightning raised the stop.
    Under DDP the processes may see the signal at different steps and saving is collective: at the end of each step
    they agree (one all-reduce of a flag) whether any of them received it, and then all save that step's checkpoint
    together and stop. A stop that Lightning raises elsewhere on one process (in validation, say) keeps the last
    checkpoint on disk there instead of risking a hang.
    At the end of training, every process writes it again: Lightning writes last.ckpt there only if the process wrote
    none before, so a run's last.ckpt would be the end of training or an earlier step depending on whether (and
    where) it was resumed.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size == 1:
            if trainer.received_sigterm:
                save_last_checkpoints(trainer)
        elif trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):
            save_last_checkpoints(trainer)
            raise SIGTERMException  # every process, at this step: the stop the run records (`interruptible`)

    def on_train_end(self, trainer, pl_module) -> None:
        save_last_checkpoints(trainer, again=True)  # the one at this step preceded its validation

    def on_fit_end(self, trainer, pl_module) -> None:
        # came after the loops last looked (the last epoch's end): stop all the same (one process: under DDP the
        # processes may not all have seen it)
        if trainer.received_sigterm and trainer.world_size == 1:
            raise SIGTERMException

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and trainer.world_size == 1:
            save_last_checkpoints(trainer)
            # Lightning's requeue handler saved hpc_ckpt_<n>.ckpt from inside the signal handler (mid-step, maybe)
            # and would restore it over any later run in this dir under SLURM: last.ckpt supersedes it.
            for stale in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"):
                stale.unlink()



def save_last_checkpoints(trainer: L.Trainer, again: bool = False) -> None:
    """Each checkpoint callback that keeps a `last.ckpt` writes it for this step (`save_last_checkpoint`)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last:
            save_last_checkpoint(callback, trainer, again)


def save_last_checkpoint(callback: ModelCheckpoint, trainer: L.Trainer, again: bool = False) -> None:
    """`callback`'s last.ckpt for this step, unless it holds it already (or `again`): ModelCheckpoint's own save, as
    its `on_train_end` does it. Lightning has no public call for it; this is the one place that uses its private
    `_last_global_step_saved`, `_monitor_candidates` and `_save_last_checkpoint` (tests/test_run_lifecycle.py
    fails if Lightning changes them)."""
    if again or callback._last_global_step_saved != trainer.global_step:
        callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


@contextlib.contextmanager
def interruptible(trainer: L.Trainer, output_dir: Path) -> Iterator[None]:
    """Around `trainer.fit` / `trainer.validate`: a SIGTERM or first Ctrl-C stops at a step boundary with
    `RunInterrupted`; a second Ctrl-C stops at once."""
    received: list[int] = []

    def on_sigint(signum, frame) -> None:
        sigterm_handler = signal.getsignal(signal.SIGTERM)
        if received or not callable(sigterm_handler):  # impatient, or Lightning is not listening: stop now
            raise KeyboardInterrupt
        received.append(signum)
        log.warning("Received SIGINT: stopping after this step with a checkpoint (Ctrl-C again to stop now)")
        sigterm_handler(signal.SIGTERM, frame)  # Lightning's: sets received_sigterm, tells DDP processes

    main = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        yield
        if trainer.received_sigterm and trainer.world_size == 1:  # came during the last validation batch or after
            raise SIGTERMException
    except SIGTERMException:
        signum = received[0] if received else signal.SIGTERM
        checkpoint = output_dir / LAST_CHECKPOINT
        raise RunInterrupted(signum, trainer.global_step, str(checkpoint) if checkpoint.is_file() else None) from None
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
