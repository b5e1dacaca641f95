"""Experiment tracking in Weights & Biases (`logger=wandb`; the `tracking` extra), offline by default.

- `WandbLogger` (conf/logger/wandb.yaml): Lightning's `WandbLogger` for one run dir. Its run's config is the composed
  config (config.yaml); Lightning logs the curves into its history per step (train/loss, val/exact, val/f1, lr). Its
  files go to `<run dir>/wandb/`; its id is kept in `<run dir>/wandb_run.json` (`resume=true` continues that id).
- `log_results`, called by the run's lifecycle (`runs.lifecycle.Run`) as the run ends: the one place where the final
  results go in: every value of the run dir's `metrics.json` into the run's summary, then the run ends (exit code 0,
  or 1 for a run that did not complete). A run that failed before training started, and any `flan_squad.evaluate`,
  get their W&B run here.

`mode: offline` (the default) needs no account and no network: `wandb sync <run dir>/wandb/offline-run-*` uploads a
run later. `logger.wandb.mode=online` logs as the run goes (after `wandb login`).
"""

from __future__ import annotations

import logging
import secrets
import string
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from omegaconf import DictConfig, OmegaConf

from flan_squad.utils.errors import ConfigError, user_error
from flan_squad.utils.files import read_json, write_json_atomic
from flan_squad.utils.process import is_rank_zero

log = logging.getLogger(__name__)

TARGET = f"{__name__}.WandbLogger"  # how `settings_of` finds the settings in the `logger` group
RUN_FILE = "wandb_run.json"  # in the run dir: which W&B run it is (resume=true continues it)
MODES = ("offline", "online", "disabled")


def _require_wandb() -> None:
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("logger=wandb needs wandb: pip install -e '.[tracking]' (or make tracking)")


def _init_settings(output_dir: Path, project: str, entity: str | None, mode: str, run_id: str,
                   job_type: str) -> dict[str, Any]:
    """`wandb.init` arguments of the run of `output_dir`: its config is the run's config.yaml."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if mode not in MODES:
        raise ConfigError(f"logger.wandb.mode={mode}: expected one of {', '.join(MODES)}")
    config_file = output_dir / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True) if config_file.is_file() else {}
    sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return dict(project=project, entity=entity, mode=mode, id=run_id, resume="allow", dir=str(output_dir),
                name=f"{output_dir.parent.name}/{output_dir.name}" if sweep else output_dir.name,
                group=output_dir.parent.name if sweep else None, job_type=job_type, config=config)


def _new_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B makes them


class WandbLogger(LightningWandbLogger):
    """Lightning's `WandbLogger` for one run dir (`output_dir`): see the module's docstring."""

    def __init__(self, output_dir: str, project: str = "flan-squad", entity: str | None = None,
                 mode: str = "offline", resume: bool = False):
        _require_wandb()
        self.output_dir = Path(output_dir)
        record = read_json(self.output_dir / RUN_FILE) if resume else None
        run_id = (record or {}).get("run_id") or _new_id()  # resume=true continues the recorded run
        # Lightning's own `offline=True` would set WANDB_MODE for the whole process: `mode` goes to this run only.
        settings = _init_settings(self.output_dir, project, entity, mode, run_id, "train")
        super().__init__(save_dir=settings.pop("dir"), **settings)  # Lightning's name for wandb.init's `dir`
        if is_rank_zero():
            write_json_atomic(self.output_dir / RUN_FILE, {"run_id": run_id, "project": project, "mode": mode})

    def log_hyperparams(self, params: Any) -> None:
        pass  # the run's config is the composed config already (the module's hyperparameters are part of it)

    def finalize(self, status: str = "success") -> None:
        super().finalize(status)
        if status in ("success", "finished") or self._experiment is None:
            return  # a finished fit is not a finished run: `log_results` ends it, with its results
        error = user_error(sys.exc_info()[1]) if sys.exc_info()[1] else None  # Lightning calls this in its `except`
        self._experiment.finish(exit_code=error.exit_code if error else 1)  # the exit code the process will have
        _flush()


def settings_of(config: DictConfig) -> dict[str, Any] | None:
    """The W&B settings of a composed config (its `logger` group), or None when it does not log there."""
    for entry in (OmegaConf.select(config, "logger") or {}).values():
        if isinstance(entry, DictConfig) and entry.get("_target_") == TARGET:
            return {k: v for k, v in OmegaConf.to_container(entry, resolve=True).items() if k != "_target_"}
    return None


def log_results(output_dir: Path, settings: dict[str, Any], completed: bool, job_type: str = "train") -> None:
    """End the run of `output_dir`: metrics.json into its summary, then finish. A run training never started (an
    evaluation, a job that failed first) is started now."""
    import wandb

    record = read_json(output_dir / RUN_FILE) or {}
    run = wandb.run if wandb.run is not None and wandb.run.id == record.get("run_id") else None
    if run is None:
        if record and not completed:
            return  # the logger's run, which `WandbLogger.finalize` ended with the error
        _require_wandb()
        run_id, mode = record.get("run_id") or _new_id(), settings.get("mode", "offline")
        run = wandb.init(**_init_settings(output_dir, settings.get("project", "flan-squad"), settings.get("entity"),
                                          mode, run_id, job_type))
        write_json_atomic(output_dir / RUN_FILE, {"run_id": run_id, "project": run.project, "mode": mode})
    metrics = read_json(output_dir / "metrics.json") if completed else None
    if metrics:
        run.summary.update(metrics)
    run.finish(exit_code=0 if metrics else 1)
    _flush()


def _flush() -> None:
    """Wait until W&B's service has written (offline) or sent (online) everything: `finish` returns before that."""
    import wandb

    wandb.teardown()
