"""The job log that Hydra writes into a run dir (`<job>.log`, conf/hydra/default.yaml)."""

from __future__ import annotations

import logging
import sys

from flan_squad.utils.errors import full_disk_error


class RunLogFile(logging.FileHandler):
    """Hydra's file handler, except that a full disk costs log lines instead of printing a traceback for each: the
    run's own error, one line naming the file it could not write, stays what it prints last (the console has every
    line)."""

    def handleError(self, record: logging.LogRecord) -> None:
        if full_disk_error(sys.exc_info()[1]) is None:
            super().handleError(record)
