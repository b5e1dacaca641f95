"""Errors a user can act on. The entry points print their message (first line first) instead of a traceback."""


class FlanSquadError(Exception):
    """Base class: bad input, a bad option, or a run that cannot go on; the message says which and what to do."""


class ConfigError(FlanSquadError, ValueError):
    """An option with an invalid value; the message names the option (e.g. strategy.rank)."""


class RunDirError(FlanSquadError, FileExistsError):
    """A run dir that already holds results (or nothing to resume from)."""


class TrainingError(FlanSquadError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""
