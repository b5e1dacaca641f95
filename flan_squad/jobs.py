"""What one job of a sweep needs beyond `train()`: a status record, a clean slate, an automatic batch size.

- `JobStatus` is a Hydra callback (`conf/hydra/default.yaml`): after every job, completed or failed, it
  writes `<run dir>/status.json`, so a failed job of a multirun leaves a machine-readable record that
  `flan_squad.report` shows as a failed row. Hydra's basic launcher catches a job's exception, runs the
  remaining jobs, and then re-raises the first failure: the sweep still ends with a non-zero exit.
- `make_trainer` builds the Lightning Trainer and turns `trainer.auto_batch_size=true` into Lightning's
  `BatchSizeFinder` callback.
"""

from __future__ import annotations

import gc
import logging
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus as HydraJobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from flan_squad.errors import ConfigError
from flan_squad.files import write_json_atomic  # torch-free: the report imports this module

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


class JobStatus(Callback):
    """Record each job's outcome in its run dir, and free what it held before the next job starts."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        _free_memory()  # the basic launcher runs jobs one after another in this process

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        failed = job_return.status == HydraJobStatus.FAILED
        error = job_return._return_value if failed else None  # .return_value would re-raise it
        record = {
            "status": "failed" if failed else "completed",
            "overrides": list(job_return.overrides or []),
            "job_num": OmegaConf.select(config, "hydra.job.num"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if failed:
            cause = error
            while cause.__cause__ is not None:  # e.g. Hydra's InstantiationException around a ValueError
                cause = cause.__cause__
            record["error"] = f"{type(cause).__name__}: {cause}".splitlines()[0][:500]
            record["traceback"] = "".join(traceback.format_exception(error))[-5000:]
            log.error("job %s failed (%s); the sweep goes on and reports it at the end", record["job_num"],
                      record["error"])
        output_dir = Path(config.hydra.runtime.output_dir)
        write_json_atomic(output_dir / STATUS_FILE, record)
        _free_memory()


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_trainer(auto_batch_size: bool = False, auto_batch_size_max: int = 128, callbacks: list | None = None,
                 **trainer_kwargs: Any):
    """A `lightning.Trainer` (the `_target_` of `conf/trainer/`), plus Lightning's batch size finder on request.

    With `auto_batch_size=true`, `BatchSizeFinder` doubles `datamodule.batch_size` from 2 at the start of fit
    (3 steps per trial) until memory runs out or the next size would reach `auto_batch_size_max`, which is
    then kept untried (on CPU nothing runs out of memory, so the ceiling decides). Training goes on with the
    size it keeps; `metrics.json` records it as `batch_size`, with `auto_batch_size: true`.
    """
    import lightning as L

    precision = str(trainer_kwargs.get("precision"))
    if precision.startswith("16"):
        raise ConfigError(f"trainer.precision={precision}: T5's activations overflow fp16 (FLAN-T5 was trained in bf16); "
                          f"use bf16-mixed or 32-true")
    callbacks = list(callbacks or [])
    if auto_batch_size:
        if auto_batch_size_max < 2:
            raise ConfigError(f"trainer.auto_batch_size_max={auto_batch_size_max}: must be at least 2 "
                              f"(the finder starts at 2)")
        callbacks.append(_training_batch_size_finder()(mode="power", init_val=2, max_val=auto_batch_size_max))
    return L.Trainer(callbacks=callbacks, **trainer_kwargs)


def _training_batch_size_finder() -> type:
    from lightning.pytorch.callbacks import BatchSizeFinder

    class TrainingBatchSizeFinder(BatchSizeFinder):
        """Lightning's finder, for training only: `trainer.validate()` after fit would otherwise search again
        (on `batch_size`, which validation does not use) and restore the trainer to its pre-search state."""

        def on_validation_start(self, trainer, pl_module) -> None:
            pass

        def on_test_start(self, trainer, pl_module) -> None:
            pass

        def on_predict_start(self, trainer, pl_module) -> None:
            pass

    return TrainingBatchSizeFinder


def uses_batch_size_finder(trainer) -> bool:
    from lightning.pytorch.callbacks import BatchSizeFinder

    return any(isinstance(c, BatchSizeFinder) for c in trainer.callbacks)
