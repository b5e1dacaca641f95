"""Errors a user can act on. The entry points print their message in one line instead of a traceback."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class FlanSquadError(Exception):
    """Base class: bad input, a bad option, or a run that cannot go on; the message says which and what to do."""


class ConfigError(FlanSquadError, ValueError):
    """An option with an invalid value; the message names the option (e.g. strategy.rank)."""


class RunDirError(FlanSquadError, FileExistsError):
    """A run dir that already holds results (or nothing to resume from)."""


class TrainingError(FlanSquadError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """Around a Hydra entry point's work: a `FlanSquadError` ends the run with `error: <message>` on stderr
    (once, stdout untouched) and exit status 2. Also one raised inside `hydra.utils.instantiate`, which wraps
    it. In a multirun it is raised as it is: the sweep records the job as failed (`jobs.JobStatus` logs
    it) and goes on."""
    try:
        yield
    except Exception as e:
        error = user_error(e)
        if error is None or _in_multirun():
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def user_error(e: BaseException) -> FlanSquadError | None:
    """The `FlanSquadError` that `e` is or wraps (`hydra.utils.instantiate` wraps errors), if any."""
    error: BaseException | None = e
    while error is not None and not isinstance(error, FlanSquadError):
        error = error.__cause__
    return error


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
