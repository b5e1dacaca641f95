"""Errors a user can act on. The entry points print their message in one line instead of a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from flan_squad.utils.process import in_multirun

ERROR_LINE_CHARS = 500  # an error as status.json and MLflow record it: one line, cut here
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device, or the user's quota spent


class FlanSquadError(Exception):
    """Base class: bad input, a bad option, or a run that cannot go on; the message says which and what to do."""

    exit_code = 2


class ConfigError(FlanSquadError, ValueError):
    """An option with an invalid value; the message names the option (e.g. strategy.rank)."""


class RunDirError(FlanSquadError, FileExistsError):
    """A run dir that already holds results (or nothing to resume from)."""


class TrainingError(FlanSquadError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class DiskFull(FlanSquadError, OSError):
    """A write that found no space left on its filesystem (or the quota spent); the file it would have replaced is
    kept whole (`flan_squad.utils.files`). `then`: what to do once space is freed (a run's lifecycle says)."""

    def __init__(self, path: str | Path, then: str | None = None):
        self.path, self.then = str(path), then
        super().__init__(f"{path}: no space left on its device (disk full or quota exceeded)"
                         + (f": {then}" if then else ""))


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


def cause_chain(error: BaseException | None, context: bool = False) -> Iterator[BaseException]:
    """`error`, then what it was raised from (`raise ... from cause`), and so on: e.g. hydra's
    InstantiationException, then the ConfigError inside it. `context`: also what it was raised while handling."""
    chain: list[BaseException] = []
    seen = error
    while seen is not None and all(seen is not other for other in chain):
        chain.append(seen)
        yield seen
        seen = seen.__cause__ or (seen.__context__ if context else None)


def full_disk_error(error: BaseException | None) -> BaseException | None:
    """The error in `error`'s chain (what it was raised from, or while handling) that says a disk is full: a
    `DiskFull` (it names the file) first, else an `OSError` with ENOSPC / EDQUOT, else an error carrying the system's
    message for them (all that torch's, safetensors' and tokenizers' writers keep); None for any other error."""
    chain = list(cause_chain(error, context=True))
    messages = tuple(os.strerror(code) for code in FULL_DISK_ERRNOS)
    return next((e for e in chain if isinstance(e, DiskFull)), None) or next(
        (e for e in chain if isinstance(e, OSError) and e.errno in FULL_DISK_ERRNOS
         or any(message in str(e) for message in messages)), None)


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
