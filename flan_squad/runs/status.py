"""`<run dir>/status.json`: how a run ended, for reports, requeue scripts and people.

    {"status": "completed" | "failed" | "interrupted", "finished_at": ..., "overrides": [...], "job_num": ...,
     "error": ..., "traceback": ... (failed), "signal", "step", "checkpoint", "exit_code" (interrupted)}

One writer: the run's lifecycle (`runs.lifecycle.Run`), on rank 0. Torch-free: the report reads `STATUS_FILE`.
"""

from __future__ import annotations

import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flan_squad.utils.errors import RunInterrupted, error_line, user_error
from flan_squad.utils.files import write_json_atomic

STATUS_FILE = "status.json"
TRACEBACK_CHARS = 20_000  # the end of a failed run's traceback, as status.json and MLflow's error.txt keep it


def completed() -> dict[str, Any]:
    return {"status": "completed", "finished_at": _now()}


def ended_by(error: BaseException) -> dict[str, Any]:
    """How a run that raised `error` ended: interrupted (a signal, Ctrl-C, an exit), or failed with its error."""
    interruption = user_error(error)
    if isinstance(interruption, RunInterrupted):
        return {"status": "interrupted", "finished_at": _now(), **interruption.record()}
    if isinstance(error, KeyboardInterrupt):
        return {"status": "interrupted", "finished_at": _now(), "signal": "SIGINT", "exit_code": 130,
                "error": "stopped at once by Ctrl-C"}
    if isinstance(error, SystemExit):  # e.g. Lightning's exit(1) after a Ctrl-C it caught itself
        return {"status": "interrupted", "finished_at": _now(), "exit_code": error.code,
                "error": f"exited with status {error.code}"}
    return {"status": "failed", "finished_at": _now(), "error": error_line(error),
            "traceback": "".join(traceback.format_exception(error))[-TRACEBACK_CHARS:]}


def write_status(output_dir: Path, record: dict[str, Any]) -> None:
    """Write `record` as `<output_dir>/status.json`, whole or not at all."""
    write_json_atomic(Path(output_dir) / STATUS_FILE, record)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
