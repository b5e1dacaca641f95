"""Errors a user can act on. The entry points print their message in one line instead of a traceback."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

from flan_squad.utils.process import in_multirun

ERROR_LINE_CHARS = 500  # an error as status.json and MLflow record it: one line, cut here


class FlanSquadError(Exception):
    """Base class: bad input, a bad option, or a run that cannot go on; the message says which and what to do."""

    exit_code = 2


class ConfigError(FlanSquadError, ValueError):
    """An option with an invalid value; the message names the option (e.g. strategy.rank)."""


class RunDirError(FlanSquadError, FileExistsError):
    """A run dir that already holds results (or nothing to resume from)."""


class TrainingError(FlanSquadError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class RunInterrupted(FlanSquadError):
    """Training stopped by SIGTERM or SIGINT (`flan_squad.runs.signals`); it exits as a shell does: 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = int(signum), step, checkpoint
        self.exit_code = 128 + self.signum
        then = "continue with resume=true" if checkpoint else "no checkpoint to resume from"
        super().__init__(f"interrupted by {signal.Signals(self.signum).name} at step {step}: {then}")

    def record(self) -> dict:
        """What `status.json` says about it."""
        return {"signal": signal.Signals(self.signum).name, "step": self.step, "checkpoint": self.checkpoint,
                "exit_code": self.exit_code, "error": str(self)}


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """Around a Hydra entry point's work: a `FlanSquadError` ends the run with `error: <message>` on stderr
    (once, stdout untouched) and exit status 2 (`RunInterrupted`: 143 / 130). Also one raised inside
    `hydra.utils.instantiate`, which wraps it. In a multirun a failure is raised as it is: Hydra's launcher counts
    the job as failed, runs the others and ends non-zero. An interruption ends the whole sweep with its status:
    the signal was meant for it too (and a SLURM job must not end as a success)."""
    try:
        yield
    except Exception as e:
        error = user_error(e)
        if error is None or (in_multirun() and not isinstance(error, RunInterrupted)):
            raise
        print_error(error)
        sys.exit(error.exit_code)


def print_error(error: BaseException | str) -> None:
    """How every entry point shows a user error: `error: <message>`, one line on stderr, stdout untouched."""
    print(f"error: {error}", file=sys.stderr, flush=True)


def cause_chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then what it was raised from (`raise ... from cause`), and so on: e.g. hydra's
    InstantiationException, then the ConfigError inside it."""
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__


def user_error(e: BaseException) -> FlanSquadError | None:
    """The `FlanSquadError` that `e` is or wraps (`hydra.utils.instantiate` wraps errors), if any."""
    return next((error for error in cause_chain(e) if isinstance(error, FlanSquadError)), None)


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def error_line(error: BaseException) -> str:
    """`<type>: <first line>` of what the user was told (the `FlanSquadError` inside), else of the root cause."""
    told = user_error(error) or list(cause_chain(error))[-1]
    name = type(told).__name__
    return (f"{name}: {first_line(told)}" if str(told).strip() else name)[:ERROR_LINE_CHARS]
