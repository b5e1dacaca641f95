"""The Lightning Trainer of a run (the `_target_` of `conf/trainer/`): Lightning's batch size finder on request,
and the FSDP strategy for T5 (`trainer=fsdp`)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateMonitor

from flan_squad.utils.precision import check_precision
from flan_squad.utils.errors import ConfigError


def make_trainer(auto_batch_size: bool = False, auto_batch_size_max: int = 128, callbacks: list | None = None,
                 **trainer_kwargs: Any) -> L.Trainer:
    """A `lightning.Trainer` (the `_target_` of `conf/trainer/`), plus Lightning's batch size finder on request.

    With `auto_batch_size=true`, `BatchSizeFinder` doubles `datamodule.batch_size` from 2 at the start of fit
    (3 steps per trial) until memory runs out or the next size would reach `auto_batch_size_max`, which is
    then kept untried (on CPU nothing runs out of memory, so the ceiling decides). Training goes on with the
    size it keeps; `metrics.json` records it as `batch_size`, with `auto_batch_size: true`.
    """
    check_precision(trainer_kwargs.get("precision"))
    max_epochs = trainer_kwargs.get("max_epochs")
    if max_epochs is not None and max_epochs < 1 and trainer_kwargs.get("max_steps", -1) in (-1, None):
        raise ConfigError(f"trainer.max_epochs={max_epochs}: must be >= 1 (or set trainer.max_steps)")
    callbacks = list(callbacks or [])
    if not trainer_kwargs.get("logger"):  # logger=none: the learning rate has nowhere to go (Lightning would refuse)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if auto_batch_size:
        if auto_batch_size_max < 2:
            raise ConfigError(f"trainer.auto_batch_size_max={auto_batch_size_max}: must be at least 2 "
                              f"(the finder starts at 2)")
        callbacks.append(TrainingBatchSizeFinder(mode="power", init_val=2, max_val=auto_batch_size_max))
    return L.Trainer(callbacks=callbacks, **trainer_kwargs)


class TrainingBatchSizeFinder(BatchSizeFinder):
    """Lightning's finder, for training only: `trainer.validate()` after fit would otherwise search again
    (on `batch_size`, which validation does not use) and restore the trainer to its pre-search state."""

    def on_validation_start(self, trainer, pl_module) -> None:
        pass

    def on_test_start(self, trainer, pl_module) -> None:
        pass

    def on_predict_start(self, trainer, pl_module) -> None:
        pass


def uses_batch_size_finder(trainer: L.Trainer) -> bool:
    return any(isinstance(c, BatchSizeFinder) for c in trainer.callbacks)


def t5_fsdp_strategy(sharding_strategy: str = "FULL_SHARD", **kwargs):
    """Lightning's FSDP strategy wrapping each T5 block (an auto-wrap policy is a set of classes: no YAML form)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.t5.modeling_t5 import T5Block

    return FSDPStrategy(auto_wrap_policy={T5Block}, sharding_strategy=sharding_strategy, **kwargs)
