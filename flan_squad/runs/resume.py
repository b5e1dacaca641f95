"""What a training run continues from: the checkpoint that resume=true, ckpt_path=... or a SLURM requeue names,
checked before anything is loaded (only local files that are whole checkpoints; never a finished run), and the
config it continues with (`resumed_config_changes`: nothing that changes what the run computes, unless
resume=force)."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flan_squad.utils.errors import ConfigError, RunDirError
from flan_squad.utils.files import read_json

LAST_CHECKPOINT = "checkpoints/last.ckpt"  # the rolling checkpoint (conf/callbacks: last_checkpoint)
CONFIG_FILE = "config.yaml"  # the run's resolved config, written as it starts (runs/lifecycle.py)

# What a resumed run may change in its config without changing what it computes: a key is one of these or lies
# under one. Anything else that differs from the run's config.yaml is refused, naming it (resume=force continues
# anyway and records the change). docs/run_lifecycle.md gives the reasons.
RESUMABLE_CHANGES = (
    "resume", "ckpt_path", "overwrite",  # how this attempt starts
    "trainer.max_epochs", "trainer.max_steps", "trainer.max_time",  # train longer: how far, not how
    "logger", "callbacks.progress_bar", "callbacks.lr_monitor", "trainer.log_every_n_steps",
    "trainer.enable_progress_bar", "trainer.enable_model_summary",  # what watches the run
    "callbacks.last_checkpoint.every_n_train_steps",  # how often last.ckpt is written
    "paths", "model.cache_dir",  # where things are (the data and tokenizer files a run reads are compared)
    "dataset.num_workers",  # how batches are loaded, not which
    "optimized_metric",  # which metrics.json value a sweeper reads
)
ABSENT = "(absent)"  # a key that only one of the two configs has

log = logging.getLogger(__name__)


def resume_mode(value: Any) -> str | None:
    """`resume=`'s meaning: None (a new run), "true" (continue, the same config) or "force" (continue with a
    changed config, recorded).

    Raises:
        ConfigError: any other value.
    """
    if value in (False, None, "false"):
        return None
    if value is True or value in ("true", "force"):
        return "force" if value == "force" else "true"
    raise ConfigError(f"resume={value}: must be true, false or force")


def checkpoint_to_resume(output_dir: Path, ckpt_path: str | None, overwrite: bool) -> str | None:
    """The checkpoint a resumed run starts from: `ckpt_path`, or else this dir's `checkpoints/last.ckpt`; None when
    the dir's run stopped before its first checkpoint (its config.yaml is there, no results): it starts again.

    Raises:
        RunDirError: no checkpoint and no trace of a run, one that is not readable, or a run that already
            finished (unless overwrite=true).
    """
    path = check_checkpoint(ckpt_path, "ckpt_path") if ckpt_path else output_dir / LAST_CHECKPOINT
    finished = (output_dir / "metrics.json").exists()
    if finished and not overwrite:
        raise RunDirError(f"{output_dir} holds a finished run (metrics.json): nothing to resume; "
                          f"pass overwrite=true to train again from the checkpoint")
    if not path.is_file():
        if not ckpt_path and not finished and (output_dir / CONFIG_FILE).is_file():
            return None
        raise RunDirError(f"nothing to resume: no checkpoint at {path}"
                          + ("" if ckpt_path else " (resume=true continues a run in its own hydra.run.dir)"))
    if not ckpt_path:
        check_checkpoint(str(path), "resume=true")
    return str(path)


def can_resume(output_dir: Path) -> bool:
    """Whether `resume=true` would continue the run in `output_dir` (`checkpoint_to_resume`): it has not finished
    (no metrics.json) and left its last.ckpt, or at least its config.yaml (then it starts again)."""
    return sweep_job_state(output_dir) in ("failed", "interrupted")


def sweep_job_state(output_dir: Path) -> str:
    """What a multirun's job dir holds when the sweep is run again with resume=true: "finished" (its metrics.json:
    kept), "failed" (status.json says so: run again), "new" (no trace of the job: the sweep never reached it) or
    "interrupted" (continued from its checkpoint, or started again when it stopped before the first one)."""
    output_dir = Path(output_dir)
    if (output_dir / "metrics.json").is_file():
        return "finished"
    if not (output_dir / CONFIG_FILE).is_file() and not (output_dir / LAST_CHECKPOINT).is_file():
        return "new"
    status = read_json(output_dir / "status.json") or {}
    return "failed" if status.get("status") == "failed" else "interrupted"


def resumed_config_changes(output_dir: Path, config: DictConfig, force: bool) -> list[dict[str, Any]]:
    """What a resumed run changes in its config.yaml that changes what it computes: [{key, old, new}].

    Raises:
        ConfigError: such a change, unless `force`: one line naming each key with its old and new value.
    """
    saved_file = Path(output_dir) / CONFIG_FILE
    if not saved_file.is_file():
        return []  # nothing to compare with (a checkpoint from elsewhere, passed as ckpt_path)
    saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=False)
    every_change = config_changes(saved, OmegaConf.to_container(config, resolve=True))
    changes = [change for change in every_change if not resumable(change["key"])]
    extended = [change for change in every_change if resumable(change["key"]) and change["key"] != "resume"]
    if extended:
        log.info("resuming with changes that do not change what the run computes: %s", describe_changes(extended))
    if changes and not force:
        raise ConfigError(f"resume=true: this command changes what the run in {output_dir} computes "
                          f"({describe_changes(changes)}): resume with the run's own config ({saved_file}), "
                          f"pass resume=force to continue anyway (recorded in status.json and metrics.json), or "
                          f"start a new run in another hydra.run.dir")
    return changes


def config_changes(saved: dict, config: dict) -> list[dict[str, Any]]:
    """Every value that differs between two config trees, by dotted key (lists compared whole), in key order."""
    old, new = _flatten(saved), _flatten(config)
    return [{"key": key, "old": old.get(key, ABSENT), "new": new.get(key, ABSENT)}
            for key in sorted(old.keys() | new.keys()) if old.get(key, ABSENT) != new.get(key, ABSENT)]


def resumable(key: str) -> bool:
    """A change of `key` only extends or observes the run (RESUMABLE_CHANGES)."""
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_CHANGES)


def describe_changes(changes: list[dict[str, Any]]) -> str:
    return ", ".join(f"{c['key']}: {c['old']} -> {c['new']}" for c in changes)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def check_checkpoint(path: str, option: str) -> Path:
    """A local file that `torch.load` can read (a zip archive): a URL, a text file or a truncated file is refused."""
    if "://" in str(path):
        # Lightning unpickles remote checkpoints in full (weights_only=False): code could run.
        raise RunDirError(f"{option}={path}: remote checkpoints are not loaded (unpickling one can run code); "
                          f"download it and pass the local path")
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):
        what = "resume=true: " if option == "resume=true" else f"{option}="
        raise RunDirError(f"{what}{path} is not a readable checkpoint (truncated, e.g. written when the run was "
                          f"killed, or not a .ckpt file)"
                          + ("; resume from an earlier one with ckpt_path=<run dir>/checkpoints/<file>.ckpt"
                             if option == "resume=true" else ""))
    return path


def requeued(output_dir: Path) -> bool:
    """A SLURM job that was requeued (preempted, or Lightning's auto-requeue) and left an unfinished run here (its
    checkpoint, or only its config.yaml when stopped before the first checkpoint: it then starts again)."""
    return (int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0 and not (output_dir / "metrics.json").exists()
            and ((output_dir / LAST_CHECKPOINT).is_file() or (output_dir / CONFIG_FILE).is_file()))
