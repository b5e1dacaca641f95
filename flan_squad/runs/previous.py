"""The previous run's files in a run dir: replaced only when asked (overwrite=true), and only by results.

A new run that may replace them sets them aside into `.previous-<pid>/` in the dir until it has finished: they
are deleted when it succeeds (once resumed, if it was interrupted), put back (in place of whatever it wrote) when it
fails, and kept there when it is interrupted (it can be resumed; the previous run is not lost).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flan_squad.utils.errors import RunDirError

# What a finished or interrupted training run leaves in its dir; a new run must not silently replace it.
RESULTS = ("metrics.json", "predictions.json", "model", "checkpoints")
# Everything a training run writes into its dir: set aside together, so that no file of an old run survives beside
# a new one's (na_probs.json of a v2 run beside v1 results, say). Hydra's job log (<job>.log) is appended to.
RUN_FILES = (*RESULTS, "na_probs.json", "status.json", "config.yaml", "tensorboard", "csv", ".hydra",
             "mlflow_run.json")
# What an evaluation writes: a new evaluation replaces these and leaves anything else in its dir alone.
EVALUATION_FILES = ("metrics.json", "predictions.json", "na_probs.json", "status.json", "config.yaml", ".hydra",
                    "mlflow_run.json")


def refuse_results(directory: Path, overwrite: bool) -> None:
    """Refuse a new run into a dir that holds results, unless overwrite=true.

    Raises:
        RunDirError: naming the results and the options that go on.
    """
    existing = [name for name in RESULTS if (directory / name).exists()]
    if existing and not overwrite:
        raise RunDirError(f"{directory} already holds results ({', '.join(existing)}): pass overwrite=true to "
                          f"replace them, resume=true to continue an interrupted run, or choose another hydra.run.dir")


class SetAside:
    """The previous run's files (`names` that exist in `directory`), moved into `.previous-<pid>/` until the new
    run has finished."""

    def __init__(self, directory: Path, names: tuple[str, ...] = RUN_FILES):
        self.directory, self.names = Path(directory), names
        self.aside = self.directory / f".previous-{os.getpid()}"
        self.moved: list[str] = []

    def set_aside(self) -> None:
        for name in self.names:
            if (self.directory / name).exists() or (self.directory / name).is_symlink():
                self.aside.mkdir(exist_ok=True)
                os.replace(self.directory / name, self.aside / name)
                self.moved.append(name)

    def discard(self) -> None:
        """The new run has finished: the previous run's files go, also those that an attempt of it, interrupted, had
        set aside into its own `.previous-<pid>/`."""
        for aside in self.directory.glob(".previous-*"):
            shutil.rmtree(aside, ignore_errors=True)

    def put_back(self) -> None:
        """The new run failed: the previous run's files replace whatever it wrote."""
        for name in self.names:
            _remove(self.directory / name)
        for name in self.moved:
            os.replace(self.aside / name, self.directory / name)
        shutil.rmtree(self.aside, ignore_errors=True)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
