"""Validation is part of what a resume must redo: a run interrupted between an epoch's last training step and the
end of its validation ends, once resumed, with the best checkpoint, model/ and scores of an uninterrupted run.

A run interrupted during an epoch's validation resumes from the `last.ckpt` written before it, and Lightning then goes
on to the next epoch without validating (the best checkpoint is then chosen among the other epochs only).
`OwedValidation` writes `last.ckpt` after the last step of every epoch that validates (Lightning's rolling one comes
every N steps, and a checkpoint written during the validation, on SIGTERM, would resume as if it had run), records in
each checkpoint whether the epoch's validation was still to come, and runs it first when a run resumes from such a
checkpoint; the epoch after it then starts as a new epoch, as in an uninterrupted run. It also keeps validation from
touching training (its data loader draws from the global random state, so how often a run validates would change its
dropout masks), and forgets a best checkpoint that the resumed-from `last.ckpt` names but that is no longer on disk (a
validation the interruption cut short had replaced it), saying so in one line.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from flan_squad.runs.signals import save_last_checkpoints
from flan_squad.utils.rng import forked_rng

log = logging.getLogger(__name__)

OWED = "owed_validation"  # the checkpoint's key: {"epoch", "step"} of the validation still to come, or None


class OwedValidation(L.Callback):
    """Records the validation a checkpoint was written before, and runs it first on a resume; see the module."""

    def __init__(self):
        self.validated_step = -1  # the step after which this fit last validated
        self.owed: dict[str, int] | None = None  # restored from the checkpoint a run resumes from

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        loop = trainer.fit_loop.epoch_loop.val_loop
        if not getattr(loop, "_random_state_forked", False):
            run = loop.run

            def run_with_own_random_state():
                with forked_rng():
                    return run()

            loop.run, loop._random_state_forked = run_with_own_random_state, True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.validated_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._validation_to_come(trainer):  # the epoch's last step: a checkpoint to resume from before validating
            save_last_checkpoints(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[OWED] = ({"epoch": trainer.current_epoch, "step": trainer.global_step}
                            if self._validation_to_come(trainer) else None)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.owed = checkpoint.get(OWED)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _next_epoch_starts_anew(trainer.fit_loop)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
                _forget_a_missing_best(callback)
        owed, self.owed = self.owed, None
        if owed is None or owed["step"] != trainer.global_step:
            return
        log.info("resuming before the validation of epoch %d (step %d): validating it first", owed["epoch"],
                 owed["step"])
        progress = trainer.fit_loop.epoch_progress.current
        completed = progress.completed
        progress.completed = owed["epoch"]  # the epoch the validation belongs to (checkpoint names, logs)
        try:
            trainer.validating = True
            trainer.fit_loop.epoch_loop.val_loop.restarting = False
            trainer.fit_loop.epoch_loop.val_loop.run()
            trainer.training = True
            for callback in trainer.callbacks:  # those that save or check at the epoch's end (after its validation)
                if isinstance(callback, (ModelCheckpoint, EarlyStopping)):
                    callback.on_train_epoch_end(trainer, pl_module)
        finally:
            trainer.training = True
            progress.completed = completed

    def _validation_to_come(self, trainer: L.Trainer) -> bool:
        """The checkpoint is written after an epoch's last training step and before that epoch's validation."""
        if trainer.state.fn != "fit" or trainer.validating or self.validated_step == trainer.global_step:
            return False
        epoch = trainer.fit_loop.epoch_progress.current
        if epoch.processed == epoch.started:  # between epochs, or training over: the epoch's validation has run
            return False
        every = trainer.check_val_every_n_epoch
        return bool(trainer.enable_validation and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
                    and (every is None or (trainer.current_epoch + 1) % every == 0))


def _next_epoch_starts_anew(fit_loop) -> None:
    """Resuming from a checkpoint written after an epoch's last step, Lightning's fit loop completes that epoch as it
    restarts, then runs the next one as the resumed epoch: not counted as started and without on_train_epoch_start. A
    checkpoint written in it then resumes as an epoch that never began, and that run skips the epoch's validation."""
    if (fit_loop.restarted_mid_epoch and fit_loop.epoch_loop.restarted_on_train_batch_end
            and fit_loop.epoch_loop.batch_progress.is_last_batch):
        fit_loop.reset_restart_stage()  # the restart is over: the resumed epoch is complete


def _forget_a_missing_best(callback: ModelCheckpoint) -> None:
    missing = [path for path in (callback.best_model_path, *callback.best_k_models) if not Path(path).is_file()]
    if not missing:
        return
    log.warning("the best checkpoint %s that this run's last.ckpt names is gone (a validation cut short by the "
                "interruption had replaced it): the best is chosen again from the validations from here on",
                missing[0])
    callback.best_k_models, callback.best_model_path, callback.best_model_score = {}, "", None
    callback.kth_best_model_path = ""
    callback.kth_value = torch.tensor(math.inf if callback.mode == "min" else -math.inf)
