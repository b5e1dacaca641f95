"""One writer per run dir: a lock that a second train, evaluate or export into the same dir finds taken.

`fcntl.flock` on `.<dir name>.lock` beside the dir, holding the holder's pid and command line: the second
process is refused at once, naming the first. The kernel drops the lock when its process dies, so a killed
run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from flan_squad.utils.errors import RunDirError


def check_directory(directory: str | Path, option: str) -> Path:
    """`directory`, absolute, if it is a dir or can become one: not a regular file, nor under one.

    Raises:
        RunDirError: naming `option` (e.g. hydra.run.dir) and the regular file.
    """
    directory = Path(directory).absolute()
    for path in (directory, *directory.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a regular file" if path == directory else f"is under a regular file, {path}"
                raise RunDirError(f"{option}={directory}: {where}: choose a directory")
            return directory
    return directory


@contextlib.contextmanager
def hold(directory: str | Path) -> Iterator[None]:
    """Hold `directory` for this process.

    Raises:
        RunDirError: at once, naming the holder, if another process (or this one, elsewhere) holds it.
    """
    directory = check_directory(directory, "directory")
    lock = directory.parent / f".{directory.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(f"{directory} is in use by process {holder}: one run writes into a dir at a time; "
                              f"wait for it to end, or choose another directory") from None
        # The lock file is removed on release: if that happened between open and flock, lock the new one instead.
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    # The holder's name only helps a refusal: on a full disk the run goes on, to fail where it writes, naming the file.
    with contextlib.suppress(OSError):
        os.write(fd, f"{os.getpid()} ({' '.join(sys.argv)[:300]})\n".encode())
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # before the lock is released: nobody can take the unlinked file's lock
        os.close(fd)
