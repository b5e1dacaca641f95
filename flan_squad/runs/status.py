"""What one job of a sweep needs beyond `train()`: a status record and a clean slate.

- `JobStatus` is a Hydra callback (`conf/hydra/default.yaml`): after every job, completed or failed, it
  writes `<run dir>/status.json`, so a failed job of a multirun leaves a machine-readable record that
  `flan_squad.report` shows as a failed row. Hydra's basic launcher catches a job's exception, runs the
  remaining jobs, and then re-raises the first failure: the sweep still ends with a non-zero exit.
  A job stopped by SIGTERM / SIGINT (`errors.RunInterrupted`) is recorded as "interrupted", and the sweep
  stops there with 143 / 130: the signal was meant for it too (and a SLURM job must not end as a success).
"""

from __future__ import annotations

import gc
import logging
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.core.utils import JobStatus as HydraJobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from flan_squad.utils.errors import RunInterrupted
from flan_squad.utils.files import write_json_atomic  # torch-free: the report imports this module
from flan_squad.utils.ranks import is_rank_zero

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


class JobStatus(Callback):
    """Record each job's outcome in its run dir, and free what it held before the next job starts."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        _free_memory()  # the basic launcher runs jobs one after another in this process

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        failed = job_return.status == HydraJobStatus.FAILED
        error = job_return._return_value if failed else None  # .return_value would re-raise it
        cause = error
        while cause is not None and cause.__cause__ is not None:  # e.g. InstantiationException around a ValueError
            cause = cause.__cause__
        interrupted = isinstance(cause, RunInterrupted)
        record = {
            "status": "interrupted" if interrupted else "failed" if failed else "completed",
            "overrides": list(job_return.overrides or []),
            "job_num": OmegaConf.select(config, "hydra.job.num"),
            "finished_at": _now(),
        }
        output_dir = Path(config.hydra.runtime.output_dir)
        writes = is_rank_zero()  # every task of a multi-task SLURM job runs this: the record is rank 0's
        if interrupted:
            if writes:
                write_json_atomic(output_dir / STATUS_FILE, {**record, **cause.record()})
            log.error("job %s %s", record["job_num"], cause)
            raise SystemExit(cause.exit_code)
        if failed:
            record["error"] = f"{type(cause).__name__}: {cause}".splitlines()[0][:500]
            record["traceback"] = "".join(traceback.format_exception(error))[-5000:]
            log.error("job %s failed (%s); the sweep goes on and reports it at the end", record["job_num"],
                      record["error"])
        if writes:
            write_json_atomic(output_dir / STATUS_FILE, record)
        _free_memory()


def write_status(output_dir: Path, status: str, **fields: Any) -> None:
    """`<run dir>/status.json` of a run outside a sweep (a sweep job's is `JobStatus`'s, with its overrides)."""
    write_json_atomic(Path(output_dir) / STATUS_FILE, {"status": status, "finished_at": _now(), **fields})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
