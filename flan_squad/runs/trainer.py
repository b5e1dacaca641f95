"""The Lightning Trainer of a run (the `_target_` of `conf/trainer/`): Lightning's batch size finder on request,
and the FSDP strategy for T5 (`trainer=fsdp`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy

from flan_squad.utils.errors import ConfigError
from flan_squad.utils.files import write_file_atomic
from flan_squad.utils.precision import check_precision


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
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        # callbacks=none means no checkpoints: Lightning would add its own ModelCheckpoint (and reload from it)
        trainer_kwargs.setdefault("enable_checkpointing", False)
    if not trainer_kwargs.get("logger"):  # logger=none: the learning rate has nowhere to go (Lightning would refuse)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if auto_batch_size:
        if auto_batch_size_max < 2:
            raise ConfigError(f"trainer.auto_batch_size_max={auto_batch_size_max}: must be at least 2 "
                              f"(the finder starts at 2)")
        callbacks.append(TrainingBatchSizeFinder(mode="power", init_val=2, max_val=auto_batch_size_max))
    trainer_kwargs.setdefault("plugins", [AtomicCheckpointIO()])
    return L.Trainer(callbacks=callbacks, **trainer_kwargs)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all on any filesystem. Lightning's own save moves a temporary file from the
    system's temp dir into place: a copy onto the checkpoint itself when the run dir is on another filesystem, which a
    kill cuts short (a truncated last.ckpt). Here the bytes go to a file beside it, synced, then renamed."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_file_atomic(path, lambda f: torch.save(checkpoint, f))


class TrainingBatchSizeFinder(BatchSizeFinder):
    """Lightning's finder, for training only: `trainer.validate()` after fit would otherwise search again
    (on `batch_size`, which validation does not use) and restore the trainer to its pre-search state."""

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        # configure_optimizers ran in strategy.setup, before this hook: its schedule has as many steps as the configured
        # batch size makes. Build optimizer and schedule again for the size found (the finder runs on one device only;
        # the trials' updates are undone, so nothing is lost; a resumed run loads their states after this hook).
        trainer.strategy.setup_optimizers(trainer)

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
    from transformers.models.t5.modeling_t5 import T5Block

    return FSDPStrategy(auto_wrap_policy={T5Block}, sharding_strategy=sharding_strategy, **kwargs)


@contextmanager
def full_model_on_rank_zero(trainer: L.Trainer) -> Iterator[None]:
    """Entered by every process: under FSDP, rank 0's model holds its full weights inside (each process holds only its
    shard otherwise, and gathering them is a collective that every rank must join); elsewhere, nothing to do."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        yield
        return
    root = trainer.strategy.model
    # Gathered into CPU memory from GPUs (a model that needs FSDP may not fit one whole). Not when unsharded (NO_SHARD,
    # which torch makes of any sharding on one device): torch refuses to offload it; nor from the CPU: that segfaults.
    offload = trainer.strategy.root_device.type != "cpu" and root.sharding_strategy != ShardingStrategy.NO_SHARD
    with FSDP.summon_full_params(root, writeback=False, rank0_only=True, offload_to_cpu=offload):
        yield


def refuse_what_fsdp_cannot_train(trainer: L.Trainer, strategy, compile: bool = False) -> None:
    """Under FSDP, before training starts: a strategy whose weights FSDP cannot shard (4-bit: integer tensors; it says
    so with `shardable = False`) is refused, and so is one that keeps weights frozen (`freezes_base = True`) when FSDP
    would not shard (one device, or NO_SHARD): torch's FSDP then turns the frozen weights into plain tensors in the
    backward pass (no post-backward hook runs for them, and an unsharded model counts as resharded), and its next
    forward pass fails ("as_params=True type(prim_param)=<class 'torch.Tensor'>"). So is `model.compile`."""
    from torch.distributed.fsdp import ShardingStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return
    if compile:
        raise ConfigError("model.compile=true with trainer=fsdp: not supported (the module compiles the model that "
                          "FSDP then wraps); use model.compile=false, or trainer=ddp")
    if not strategy.shardable:
        raise ConfigError(f"strategy={strategy.name} with trainer=fsdp: FSDP cannot shard its 4-bit (integer) weights; "
                          f"use trainer=ddp (or trainer=gpu), or strategy=lora to shard")
    unsharded = (trainer.num_nodes * trainer.num_devices == 1
                 or trainer.strategy.sharding_strategy == ShardingStrategy.NO_SHARD)
    if strategy.freezes_base and unsharded:
        raise ConfigError(f"strategy={strategy.name} with trainer=fsdp on one device (or sharding_strategy=NO_SHARD): "
                          f"torch's FSDP cannot train frozen weights unsharded; use trainer=gpu on one device, or "
                          f"trainer.devices=2 or more (FULL_SHARD)")


def rebuild_before_reload(trainer: L.Trainer, module: L.LightningModule) -> None:
    """Under FSDP, fit leaves the weights sharded in FSDP wrappers, and Lightning loads a checkpoint (validate's best)
    into the module before wrapping it: "size mismatch ... torch.Size([0])". Dropping the model makes
    `configure_model` build it afresh, to be loaded and then wrapped again. The fit's optimizer (its state: twice the
    trainable parameters) and wrapper are let go first, or the state would stay on the device through validation."""
    if isinstance(trainer.strategy, FSDPStrategy):
        module.model = None
        trainer.strategy.model = module
        trainer.strategy.optimizers = []  # validation steps no optimizer
        trainer.strategy.lr_scheduler_configs = []
        gc.collect()  # FSDP's wrappers hold reference cycles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
