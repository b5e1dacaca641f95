"""Files written all or nothing: through a temporary file or dir and a rename.

A crash (or a kill) mid-write leaves the old version or the new one whole, never half of one, and so does a full
disk (`DiskFull`, naming the file; the temporary file or dir is removed, so freeing space is enough). No torch
here: `flan_squad.score` and the job status callback write through this too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from flan_squad.utils.errors import DiskFull, full_disk_error


def _readable_by_others(path: str | Path, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)  # mkstemp's 0600 and mkdtemp's 0700 would hide results from other users


# What a write cut short by a kill leaves beside its target (the target itself is the old version or the new one):
# `.<name>.<random>.tmp` (a file), `.<name>.staging-<random>` and `.<name>.old-<pid>` (a dir).
UNFINISHED_WRITES = (".*.tmp", ".*.staging-*", ".*.old-*")


def write_dir_atomic(directory: str | Path, write: Callable[[Path], None]) -> None:
    """Fill a directory through a staging dir and renames: `write(staging)` fills it, then it replaces `directory`.

    Raises:
        DiskFull: no space left for it, naming `directory` (kept as it was; the staging dir is removed).
    """
    directory = Path(directory)
    with _named_when_full(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.staging-"))
        try:
            write(staging)
            _readable_by_others(staging, 0o777)
            if directory.exists():
                retired = directory.with_name(f".{directory.name}.old-{os.getpid()}")
                os.replace(directory, retired)
                os.replace(staging, directory)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def write_file_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through a temporary file beside it (the same filesystem), synced, and a rename: a crash or a
    kill leaves the old file or the new one, whole.

    Raises:
        DiskFull: no space left for it, naming `path` (the old file is kept; the temporary file is removed).
    """
    path = Path(path)
    with _named_when_full(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            _readable_by_others(tmp, 0o666)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def _named_when_full(path: Path) -> Iterator[None]:
    """A write into `path` that fails for want of space raises `DiskFull` naming `path` (the writer's own error,
    torch's or safetensors' say, names no file)."""
    try:
        yield
    except Exception as e:
        if full_disk_error(e) is None:
            raise
        raise DiskFull(path) from e


def remove_unfinished_writes(directory: str | Path) -> None:
    """Delete what the writes above left in `directory` when a kill cut them short (`UNFINISHED_WRITES`). Only for a
    dir that no other process writes into (a run dir its run holds)."""
    for pattern in UNFINISHED_WRITES:
        for path in Path(directory).glob(pattern):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename: a crash leaves the old file or the new one."""
    write_file_atomic(path, lambda f: f.write(json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8")))


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A run's JSON record (metrics.json, status.json, ...), or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
