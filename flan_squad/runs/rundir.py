"""A run dir: one writer at a time, results replaced only by results, and a checkpoint to resume from.

- `hold(directory)`: a lock (`fcntl.flock` on `.<dir name>.lock` beside the dir) that a second train, evaluate or
  export into the same dir finds taken: it is refused at once, naming the process. The kernel drops the lock when
  its process dies, so a killed run never blocks the next one.
- `owns_run_dir`, around an entry point's work (`train`, `evaluate`): holds the lock, and gives
  `prepare_run_dir` a place to set the previous run's files aside (`.previous-<pid>/` in the dir) until the
  new run has finished: they are deleted when it succeeds and put back when it fails. A run that fails with
  exit status 2 writes `status.json` (a sweep job's is written by `runs.status.JobStatus`).
- `RunDirCheck` (a Hydra callback) does the checks that must come before Hydra creates the dir and writes its
  `.hydra/` there, and keeps the previous `.hydra/` to be put back with the previous run.
- `check_checkpoint`: only local files that are whole checkpoints are resumed from.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from flan_squad.utils.errors import RunDirError, _in_multirun, print_error, user_error
from flan_squad.utils.ranks import is_rank_zero

log = logging.getLogger(__name__)

# What a finished or interrupted run leaves in its dir; a new run must not silently replace it.
RESULTS = ("metrics.json", "predictions.json", "model", "checkpoints")
# Everything a run writes into its dir: set aside together, so that no file of an old run survives beside a
# new one's (na_probs.json of a v2 run beside v1 results, say). Hydra writes .hydra/ itself (see RunDirCheck) and
# appends to <job>.log.
RUN_FILES = (*RESULTS, "na_probs.json", "status.json", "config.yaml", "tensorboard", "csv")
LAST_CHECKPOINT = "checkpoints/last.ckpt"


# --- one writer ------------------------------------------------------------------------------------------


def _lock_file(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.lock"


def check_directory(directory: str | Path, option: str) -> Path:
    """`directory` if it is a dir or can become one: not a regular file, nor under one."""
    directory = Path(directory).absolute()
    for path in (directory, *directory.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a regular file" if path == directory else f"is under a regular file, {path}"
                raise RunDirError(f"{option}={directory}: {where}: choose a directory")
            return directory
    return directory


class RunDirCheck(Callback):
    """Hydra callback (conf/hydra/default.yaml), before Hydra creates the run dir and writes its .hydra/ there:
    a dir under a regular file, or one that a live process holds, ends in one line (exit status 2)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir", probe=is_rank_zero())  # DDP children run in the dir rank 0 holds

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir", probe=False)  # each job holds its own dir

    @staticmethod
    def _check(config: DictConfig, key: str, probe: bool) -> None:
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in the dir's name (Hydra sets it again)
        try:
            directory = check_directory(OmegaConf.select(config, key), key)
            if probe:
                with hold(directory):  # the entry point holds it again for the whole run (`owns_run_dir`)
                    pass
                # Hydra is about to replace .hydra/ (the overrides that reports show): kept to be put back if
                # this run is refused or fails and the previous run's files are put back.
                _hydra_files[directory] = {p: p.read_bytes() for p in (directory / ".hydra").glob("*.yaml")}
        except RunDirError as e:
            print_error(e)
            sys.exit(2)


@contextlib.contextmanager
def hold(directory: str | Path) -> Iterator[None]:
    """Hold `directory` for this process; refuse at once (RunDirError naming the holder) if another one does."""
    directory = check_directory(directory, "directory")
    lock = _lock_file(directory)
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
    os.write(fd, f"{os.getpid()} ({' '.join(sys.argv)[:300]})\n".encode())
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # before the lock is released: nobody can take the unlinked file's lock
        os.close(fd)


# --- results replaced only by results ------------------------------------------------------------------------


class _Replacement:
    """The previous run's files, moved aside into `.previous-<pid>/` until the new run has finished."""

    def __init__(self, directory: Path):
        self.directory, self.aside = directory, directory / f".previous-{os.getpid()}"
        self.moved: list[str] = []

    def set_aside(self, names: list[str]) -> None:
        for name in names:
            self.aside.mkdir(exist_ok=True)
            os.replace(self.directory / name, self.aside / name)
            self.moved.append(name)

    def finish(self) -> None:
        shutil.rmtree(self.aside, ignore_errors=True)

    def restore(self) -> None:
        """Put the previous run back in place of whatever this run wrote."""
        for name in RUN_FILES:
            _remove(self.directory / name)
        for name in self.moved:
            os.replace(self.aside / name, self.directory / name)
        shutil.rmtree(self.aside, ignore_errors=True)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


_replacements: dict[Path, _Replacement] = {}  # the run dirs this process writes into now, by `owns_run_dir`
_hydra_files: dict[Path, dict[Path, bytes]] = {}  # a run dir's .hydra/ as it was before this run (`RunDirCheck`)


def owns_run_dir(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Decorate an entry point's `run(cfg)` that writes into `cfg.paths.output_dir` (see the module's docstring).
    DDP child processes (rank > 0) re-run it in the dir that rank 0 holds: they take no lock."""

    @functools.wraps(run)
    def wrapper(cfg):
        if not is_rank_zero():
            return run(cfg)
        directory = Path(cfg.paths.output_dir).absolute()
        with hold(directory):
            replacement = _replacements[directory] = _Replacement(directory)
            try:
                result = run(cfg)
            except BaseException as e:
                if _after_failure(replacement, e):
                    _put_back_hydra_files(directory)
                raise
            finally:
                del _replacements[directory]
                _hydra_files.pop(directory, None)
            replacement.finish()
            return result

    return wrapper


def _put_back_hydra_files(directory: Path) -> None:
    if directory not in _hydra_files:
        return  # not run by Hydra's run mode (a sweep job, a test calling the function itself)
    before = _hydra_files[directory]
    for path in (directory / ".hydra").glob("*.yaml"):
        if path not in before:
            path.unlink()
    for path, content in before.items():
        path.write_bytes(content)


def _after_failure(replacement: _Replacement, e: BaseException) -> bool:
    """Put the previous run back (or write status.json); whether the dir is the previous run's again."""
    error = user_error(e)
    if isinstance(error, RunDirError):
        return True  # refused: the dir is another run's (its status.json too)
    # An interruption (a signal, Ctrl-C: exit status other than 2) leaves the new run resumable; the previous
    # run's files wait in .previous-<pid>/. A failure puts them back.
    if isinstance(e, (KeyboardInterrupt, SystemExit)) or getattr(error, "exit_code", 2) != 2:
        if replacement.moved:
            log.warning("the previous run's files are kept in %s", replacement.aside)
        return False
    if replacement.moved:
        replacement.restore()
        log.warning("this run failed: the previous run's files are back in %s", replacement.directory)
        return True
    if error is not None and not _in_multirun():  # a sweep job's status.json is runs.status.JobStatus's
        from flan_squad.runs.status import write_status

        write_status(replacement.directory, "failed", error=f"{type(error).__name__}: {error}"[:500])
    return False


# --- what a training run starts from ---------------------------------------------------------------------


def prepare_run_dir(output_dir: Path, resume: bool, ckpt_path: str | None, overwrite: bool) -> str | None:
    """Check the run dir against what was asked; return the checkpoint to resume from, if any.

    - resume=true: continue from `checkpoints/last.ckpt` of this dir (refused if the run already finished).
    - ckpt_path=...: continue from that (local) checkpoint.
    - otherwise the dir must not hold results, unless overwrite=true: the previous run's files are then set
      aside until this run has finished (under `owns_run_dir`; deleted at once without it).
    """
    output_dir = Path(output_dir)
    replacement = _replacements.get(output_dir.absolute())
    if resume or ckpt_path:
        path = check_checkpoint(ckpt_path, "ckpt_path") if ckpt_path else output_dir / LAST_CHECKPOINT
        if not path.is_file():
            raise RunDirError(f"nothing to resume: no checkpoint at {path}"
                              + ("" if ckpt_path else " (resume=true continues a run in its own hydra.run.dir)"))
        if (output_dir / "metrics.json").exists() and not overwrite:
            raise RunDirError(f"{output_dir} holds a finished run (metrics.json): nothing to resume; "
                              f"pass overwrite=true to train again from the checkpoint")
        if not ckpt_path:
            check_checkpoint(str(path), "resume=true")
        return str(path)
    existing = [name for name in RESULTS if (output_dir / name).exists()]
    if existing and not overwrite:
        raise RunDirError(f"{output_dir} already holds results ({', '.join(existing)}): pass overwrite=true to "
                          f"replace them, resume=true to continue an interrupted run, or choose another hydra.run.dir")
    if not is_rank_zero():
        return None  # a DDP child process: rank 0 has set the dir up
    previous = [name for name in RUN_FILES if (output_dir / name).exists() or (output_dir / name).is_symlink()]
    if replacement:
        replacement.set_aside(previous)
    else:
        for name in previous:
            _remove(output_dir / name)
    return None


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
