"""A run's life in its dir, in order: one object that each entry point writing a run dir (train, evaluate) owns.

    with Run(cfg) as run:       # 1. hold the dir: one writer at a time (runs/lock.py)
        checkpoint = run.start(resume, ckpt_path, overwrite)
                                # 2. check the dir against what was asked (runs/resume.py, runs/previous.py); set
                                #    the previous run's files aside; write config.yaml and .hydra/; open (or
                                #    continue) the run's MLflow run (runs/tracking.py)
        ...                     #    train or evaluate (signals: runs/signals.py raises RunInterrupted)
        run.complete(metrics, predictions, na_probs, summary)
                                # 3. results (metrics.json last), status.json "completed", the previous run's files
                                #    deleted, the MLflow run FINISHED with the results (a W&B run: metrics.json
                                #    in its summary, runs/wandb_logger.py)
                                # 4. anything raised inside `with`: a refusal (before `start` has passed its checks)
                                #    records nothing; an interruption records status.json "interrupted" and keeps
                                #    the previous run's files aside (the run can be resumed); a failure puts them
                                #    back, or else records status.json "failed"; the MLflow run ends KILLED/FAILED

Only rank 0 holds the dir and writes into it; the other ranks (Lightning's DDP processes, the tasks of a SLURM
job) run the same code and get the same checkpoint from `start`. A job of a sweep goes through the same steps:
its status.json also says its overrides and job number, and its MLflow run is a child of the sweep's.

`RunDirCheck` (a Hydra callback, conf/hydra/default.yaml) refuses a run dir before Hydra creates it: a path under
a regular file, or a dir that a live process holds. See docs/run_lifecycle.md.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from flan_squad.runs import status
from flan_squad.runs.lock import check_directory, hold
from flan_squad.runs.previous import RUN_FILES, SetAside, refuse_results
from flan_squad.runs.results import write_results
from flan_squad.runs.resume import (
    LAST_CHECKPOINT,
    can_resume,
    checkpoint_to_resume,
    describe_changes,
    resume_mode,
    resumed_config_changes,
    sweep_job_state,
)
from flan_squad.runs.tracking import MLflowRun, store_of
from flan_squad.runs.wandb_logger import log_results, settings_of
from flan_squad.utils.errors import ConfigError, DiskFull, RunDirError, first_line, full_disk_error, print_error
from flan_squad.utils.files import read_json, remove_unfinished_writes, write_file_atomic
from flan_squad.utils.process import in_multirun, is_rank_zero

log = logging.getLogger(__name__)


class Run:
    """The life of the run that writes `cfg.paths.output_dir`; see the module's docstring.

    Args:
        cfg: the run's composed config (its `paths.output_dir`; its `logger` group says whether MLflow tracks it).
        files: what this kind of run writes into its dir: the previous run's are set aside together.
        resumable: a training run, which `resume=true` continues (a full disk says so); an evaluation starts again.
    """

    def __init__(self, cfg: DictConfig, files: tuple[str, ...] = RUN_FILES, resumable: bool = True):
        self.cfg = cfg
        self.resumable = resumable
        self.output_dir = Path(cfg.paths.output_dir).absolute()
        self.is_rank_zero = is_rank_zero()
        self.previous = SetAside(self.output_dir, files)
        store = store_of(cfg) if self.is_rank_zero else None
        self.mlflow = MLflowRun(store, self.output_dir) if store else None
        self.wandb = settings_of(cfg) if self.is_rank_zero else None  # logger=wandb: its settings
        self.started = False  # the dir is this run's: its checks passed
        self.completed = False
        self.kept = False  # a sweep's finished job, kept as it is (`finished_sweep_job`)
        self.record: dict[str, Any] = {}  # how the run ended: status.json's content, and what MLflow is told
        # resume=force: what this run changed in its config since it started, [{key, old, new}] (every attempt's)
        self.config_changes: list[dict[str, Any]] = []
        self._held = contextlib.ExitStack()

    # --- 1. hold ------------------------------------------------------------------------------------------------

    def __enter__(self) -> Run:
        _free_memory()  # the basic launcher runs a sweep's jobs one after another in this process
        if self.is_rank_zero:
            self._held.enter_context(hold(self.output_dir))
        return self

    # --- 2. start -----------------------------------------------------------------------------------------------

    def start(self, resume: bool | str = False, ckpt_path: str | None = None, overwrite: bool = False) -> str | None:
        """Make the dir this run's; return the checkpoint to resume from, if any.

        Args:
            resume: true: continue from this dir's `checkpoints/last.ckpt` (refused if the run already finished, or
                if this config changes what the run computes; a run stopped before its first checkpoint starts
                again); "force": continue even with such a change, recorded in `config_changes`.
            ckpt_path: continue from this (local) checkpoint.
            overwrite: a new run may replace the results in the dir; they are kept until it has finished.

        Raises:
            RunDirError: the dir holds results (and not overwrite), or there is nothing to resume.
            ConfigError: resume=true with a config that changes what the run computes (naming each key).
        """
        mode = resume_mode(resume)
        if mode and not ckpt_path and in_multirun():
            mode, overwrite = self._sweep_job_mode(mode, overwrite)
        checkpoint = prepare_run_dir(self.output_dir, bool(mode), ckpt_path, overwrite, self.previous)
        if checkpoint and mode:  # config.yaml is still the run's own: compare before it is rewritten
            changes = resumed_config_changes(self.output_dir, self.cfg, force=mode == "force")
            earlier = (read_json(self.output_dir / status.STATUS_FILE) or {}).get("config_changes") or []
            self.config_changes = [*earlier, *changes]
            if changes:
                log.warning("resume=force: continuing with what changes the run (recorded in status.json and "
                            "metrics.json): %s", describe_changes(changes))
        if not self.is_rank_zero:
            return checkpoint  # rank 0 has set the dir up
        if mode and not checkpoint:
            log.warning("resume=true: the run in %s stopped before its first checkpoint: starting it from the "
                        "beginning", self.output_dir)
        self.started = True
        for directory in (self.output_dir, self.output_dir / Path(LAST_CHECKPOINT).parent):
            remove_unfinished_writes(directory)  # an earlier attempt's, killed while writing
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _save_yaml(self.cfg, self.output_dir / "config.yaml", resolve=True)
        _write_hydra_record(self.output_dir, self.cfg)
        if self.mlflow:
            self.mlflow.open(resume=bool(checkpoint and mode))
        return checkpoint

    def finished_sweep_job(self, resume: bool | str) -> dict[str, Any] | None:
        """A sweep run again with resume=true keeps the jobs that finished: this job's metrics.json when it finished
        with this config (then nothing is trained or written), else None.

        Raises:
            ConfigError: the job finished with another config (the sweep's grid or its other overrides changed).
        """
        if not (resume_mode(resume) and in_multirun() and sweep_job_state(self.output_dir) == "finished"):
            return None
        changes = resumed_config_changes(self.output_dir, self.cfg, force=True)
        if changes:
            raise ConfigError(f"resume=true: the job in {self.output_dir} finished with another config "
                              f"({describe_changes(changes)}): resume a sweep with its own overrides, or run the new "
                              f"sweep in another hydra.sweep.dir")
        log.info("resume=true: the job in %s has finished: its results are kept", self.output_dir)
        self.completed = self.kept = True
        return read_json(self.output_dir / "metrics.json")

    def _sweep_job_mode(self, mode: str, overwrite: bool) -> tuple[str | None, bool]:
        """resume=true for one job of a sweep run again: a job the sweep never reached starts; a failed job runs
        again with the same config (its files set aside until it finishes, as with overwrite=true); an interrupted
        one continues."""
        state = sweep_job_state(self.output_dir)
        if state == "new":
            log.info("resume=true: the sweep had not reached the job in %s: starting it", self.output_dir)
            return None, overwrite
        if state == "failed":
            changes = resumed_config_changes(self.output_dir, self.cfg, force=mode == "force")
            self.config_changes = changes
            log.warning("resume=true: the job in %s failed: running it again", self.output_dir)
            return None, True
        return mode, overwrite

    # --- 3. complete --------------------------------------------------------------------------------------------

    def complete(self, metrics: dict[str, Any], predictions: dict[str, str], na_probs: dict[str, float] | None,
                 summary: str) -> None:
        """The run has its results: write them (metrics.json last) and status.json "completed", delete the previous
        run's files, print `summary`. The MLflow run ends, with them, when the `with` block is left."""
        if self.is_rank_zero:
            write_results(self.output_dir, predictions, na_probs, metrics)
            self.record = self._record(status.completed())
            try:
                status.write_status(self.output_dir, self.record)
            except BaseException:
                # not finished until its status says so: without metrics.json, resume=true continues it
                (self.output_dir / "metrics.json").unlink(missing_ok=True)
                raise
            self.previous.discard()
            print(summary, flush=True)
        self.completed = True

    # --- 4. end ---------------------------------------------------------------------------------------------------

    def __exit__(self, kind, error: BaseException | None, tb) -> bool:
        full = self._disk_full(error)
        try:
            if self.is_rank_zero:
                if error is None and not self.completed and self.started:
                    error = RuntimeError(f"{self.output_dir}: the run ended without its results (Run.complete)")
                    self._ended(error)
                    raise error
                self._ended(full or error)
        finally:
            self._held.close()
        if full is not None:
            raise full from error
        return False  # what was raised goes on: the entry point turns it into one line and an exit status

    def _disk_full(self, error: BaseException | None) -> DiskFull | None:
        """A failure for want of space, wherever it struck (a checkpoint, model/, the results, a logger), as one
        `DiskFull` naming what could not be written and how to go on once space is freed."""
        cause = full_disk_error(error)
        if cause is None:
            return None
        path = cause.path if isinstance(cause, DiskFull) else getattr(cause, "filename", None) or self.output_dir
        # a failure puts the previous run's files back (overwrite=true): then the run starts again
        if self.resumable and not self.previous.moved and can_resume(self.output_dir):
            full = DiskFull(path, f"free space, then rerun the same command with resume=true in hydra.run.dir="
                                  f"{self.output_dir}")
        else:
            full = DiskFull(path, "free space, then run the same command again")
        full.__cause__ = error  # status.json's traceback shows where it struck
        return full

    def _ended(self, error: BaseException | None) -> None:
        if error is not None:
            if not self.started and not self.previous.moved:
                return  # refused: the dir is still the previous run's (or nobody's); nothing of this run was written
            self.record = self._record(status.ended_by(error))
            self._record_failure(self.record)
        if self.mlflow and self.mlflow.run_id:
            self.mlflow.end(self.record)
        if self.wandb is not None and not self.kept:
            try:  # tracking must not turn a finished run into a failed one: its files are there
                job = HydraConfig.get().job.name if HydraConfig.initialized() else "train"
                log_results(self.output_dir, self.wandb, self.record.get("status") == "completed", job_type=job)
            except Exception as e:
                log.error("could not log %s to W&B: %s", self.output_dir, first_line(e))

    def _record_failure(self, record: dict[str, Any]) -> None:
        # What is recorded must not hide why the run ended (e.g. a full disk fails these writes too): logged only.
        try:
            if record["status"] == "interrupted":  # resumable: the previous run's files wait where they are
                if self.previous.moved:
                    log.warning("the previous run's files are kept in %s", self.previous.aside)
                status.write_status(self.output_dir, record)
            elif self.previous.moved:
                self.previous.put_back()
                log.warning("this run failed: the previous run's files are back in %s", self.output_dir)
            else:
                status.write_status(self.output_dir, record)
        except OSError as e:
            log.error("could not record how the run in %s ended (%s): %s", self.output_dir, record["status"],
                      first_line(e))

    def _record(self, outcome: dict[str, Any]) -> dict[str, Any]:
        """`outcome` with what Hydra says about the job: its overrides, and its number in a sweep."""
        hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
        return {**outcome, "overrides": list(hydra_cfg.overrides.task) if hydra_cfg else [],
                "job_num": hydra_cfg.job.num if hydra_cfg and in_multirun(hydra_cfg) else None,
                **({"config_changes": self.config_changes} if self.config_changes else {})}


def prepare_run_dir(output_dir: Path, resume: bool, ckpt_path: str | None, overwrite: bool,
                    previous: SetAside | None = None) -> str | None:
    """Check the run dir against what was asked; return the checkpoint to resume from, if any.

    - resume=true: continue from `checkpoints/last.ckpt` of this dir (or, when the dir's run stopped before its
      first checkpoint, start it again); ckpt_path=...: from that checkpoint.
    - otherwise the dir must not hold results, unless overwrite=true.
    A run that starts sets the previous run's files aside into `previous` (kept until this run has finished,
    `Run`), or deletes them at once without it. On rank 0 only: the other ranks check, and find the dir as rank 0
    left it.
    """
    output_dir = Path(output_dir)
    if resume or ckpt_path:
        checkpoint = checkpoint_to_resume(output_dir, ckpt_path, overwrite)
        if checkpoint:
            return checkpoint
    else:
        refuse_results(output_dir, overwrite)
    if is_rank_zero():
        aside = previous or SetAside(output_dir)
        aside.set_aside()
        if previous is None:
            aside.discard()
    return None


def _write_hydra_record(output_dir: Path, cfg: DictConfig) -> None:
    """What Hydra would have written into `.hydra/` (conf/hydra/default.yaml turns that off), now that this run
    holds the dir: its config, Hydra's, and the overrides that reports show. Only for a run that Hydra started."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.instance().cfg
    if OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir") != str(output_dir):
        return  # a config composed outside a Hydra job (a test, a benchmark calling train() itself)
    record = output_dir / ".hydra"
    record.mkdir(exist_ok=True)
    _save_yaml(cfg, record / "config.yaml")
    _save_yaml(hydra_cfg, record / "hydra.yaml")
    _save_yaml(hydra_cfg.hydra.overrides.task, record / "overrides.yaml")


def _save_yaml(config: Any, path: Path, resolve: bool = False) -> None:
    """`OmegaConf.save`, whole or not at all: a resumed run rewrites config.yaml, which the next resume compares."""
    write_file_atomic(path, lambda f: f.write(OmegaConf.to_yaml(config, resolve=resolve).encode("utf-8")))


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class RunDirCheck(Callback):
    """Hydra callback (conf/hydra/default.yaml), before Hydra creates the run dir: a dir under a regular file, or
    one that a live process holds, ends in one line (exit status 2), and the dir is left as it was."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir", probe=is_rank_zero())  # DDP children run in the dir rank 0 holds

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir", probe=False)  # each job holds its own dir

    @staticmethod
    def _check(config: DictConfig, key: str, probe: bool) -> None:
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in the dir's name (Hydra sets it again)
        try:
            directory = check_directory(OmegaConf.select(config, key), key)
            if probe:
                with hold(directory):  # the run holds it again, for its whole life (`Run`)
                    pass
        except RunDirError as e:
            print_error(e)
            sys.exit(2)
