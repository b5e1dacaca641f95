"""Callbacks that tests add to a run through Hydra (`+callbacks.name._target_=fault_injection.X`, or for a Hydra
callback `+hydra.callbacks.name._target_=fault_injection.X`): faults, delays, and records of what each process did.

A fault strikes the run's first attempt only: a resumed attempt (Lightning's `trainer.ckpt_path` set) runs without
it, so a test resumes with the same command line plus `resume=true`, as a user does (a resume with another config
is refused, flan_squad/runs/resume.py). `InterruptAt` strikes whichever attempt its environment variable tells it
to, the config staying the same."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import io
import json
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback


class SlowSteps(L.Callback):
    """Sleeps before each step and records the step about to run, so a test can kill the run mid-epoch.

    When step k starts, the checkpoint written at the end of step k-1 is complete on disk.
    """

    def __init__(self, marker: str, seconds: float = 0.3):
        self.marker, self.seconds = Path(marker), seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.marker.write_text(str(trainer.global_step))
        time.sleep(self.seconds)


class PoisonWeightsAtStep(L.Callback):
    """Fills the trainable weights with NaN before step `step`: the loss of that step is not finite."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not trainer.ckpt_path:
            with torch.no_grad():
                for p in pl_module.parameters():
                    if p.requires_grad:
                        p.fill_(math.nan)


class SignalAtStep(L.Callback):
    """Sends this process `signum` when step `step` starts, as a scheduler or Ctrl-C would (in a multirun: in job
    `job` only; under DDP: in the process of global rank `rank` only, if given)."""

    def __init__(self, signum: int, step: int, job: int | None = None, rank: int | None = None):
        self.signum, self.step, self.job, self.rank = signum, step, job, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.global_step == self.step and not trainer.ckpt_path and _in_job(self.job)
                and self.rank in (None, trainer.global_rank)):
            os.kill(os.getpid(), self.signum)


class CrashInJobOnce(L.Callback):
    """Raises as job `job` of a multirun starts training, the first time only (`marker` records it): a failure that
    the sweep run again does not meet (a lost node, say)."""

    def __init__(self, job: int, marker: str):
        self.job, self.marker = job, Path(marker)

    def on_train_start(self, trainer, pl_module) -> None:
        if _in_job(self.job) and not self.marker.exists():
            self.marker.touch()
            raise InjectedCrash(f"crash injected in job {self.job}")


def _in_job(job: int | None) -> bool:
    return job is None or HydraConfig.get().job.num == job


def KillAtStep(step: int) -> SignalAtStep:
    """SIGKILL as step `step` starts: no chance to clean up, as with `kill -9` or the OOM killer. The rolling
    checkpoint written before it stays on disk; the steps trained since are lost."""
    return SignalAtStep(int(signal.SIGKILL), step)


class CrashAtStep(L.Callback):
    """Raises as step `step` starts, as a crash would (in this process, cheaper than a killed subprocess): the
    rolling checkpoint written before it stays on disk."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not trainer.ckpt_path:
            raise InjectedCrash(f"crash injected at step {self.step}")


class CrashInValidation(L.Callback):
    """Raises in the validation of epoch `epoch` during fit: as its first batch starts (`at="start"`), or at its end,
    once the checkpoint callbacks before this one have saved (and replaced) the best checkpoint (`at="end"`). The
    rolling checkpoint written after the epoch's last step, before the validation, stays on disk."""

    def __init__(self, epoch: int, at: str = "start"):
        self.epoch, self.at = epoch, at

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.at == "start" and batch_idx == 0:
            self._crash(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.at == "end":
            self._crash(trainer)

    def _crash(self, trainer) -> None:
        if trainer.state.fn == "fit" and trainer.current_epoch == self.epoch and not trainer.ckpt_path:
            raise InjectedCrash(f"crash injected in the validation of epoch {self.epoch} ({self.at})")


class InjectedCrash(RuntimeError):
    pass


MOMENTS_FILE = "FLAN_SQUAD_TEST_MOMENTS"  # where a run appends the name of each moment it passes
INTERRUPT_AT = "FLAN_SQUAD_TEST_INTERRUPT"  # "<SIGNAL> <n> <timeline file>": see InterruptAt
INTERRUPTED_BY = "interrupted here by "  # the line InterruptAt appends to the moments file when it signals


class InterruptAt(L.Callback):
    """Signals this process at a chosen moment of the run, in any attempt of it, and records the moments it passes.

    A moment is named as the run sees it: `train step 4` (after its backward pass, before the update), `validation
    of epoch 0, batch 1, at step 5`, `write checkpoints/last.ckpt at step 4` (with half of its bytes written), `end of
    training at step 15`, `final validation, batch 0` (the best checkpoint's), `write model` / `write
    predictions.json` / ... (about to be renamed into place). The moments of the uninterrupted run, in order, are the
    run's timeline; an attempt resumed from a checkpoint passes through the rest of it. Set by the environment, so
    that every attempt runs the same config (as a resume requires):
    - `$FLAN_SQUAD_TEST_MOMENTS`: a file that each moment's name is appended to as the run passes it;
    - `$FLAN_SQUAD_TEST_INTERRUPT`: `<SIGNAL> <n> <timeline file>`: send SIGNAL (SIGKILL, SIGTERM, SIGINT) to this
      process at the first moment that is the timeline's n-th (from 0) or a later one, once.
    Neither set: it does nothing.
    """

    def __init__(self):
        self.moments_file = os.environ.get(MOMENTS_FILE)
        self.signum, self.timeline = None, {}
        if os.environ.get(INTERRUPT_AT):
            name, n, timeline_file = os.environ[INTERRUPT_AT].split(" ", 2)
            self.signum, self.at = signal.Signals[name], int(n)
            self.timeline = {moment: i for i, moment in enumerate(Path(timeline_file).read_text().splitlines())}
        self.run_dir: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        global _recorder
        self.run_dir = Path(trainer.default_root_dir).absolute()
        if _recorder is None:
            sys.addaudithook(_on_audit_event)  # the final writes (model/, results) come after training, in no hook
        _recorder = self
        checkpoint_io = trainer.strategy.checkpoint_io
        if getattr(checkpoint_io, "_interrupt_at", None) is self:
            return
        save = checkpoint_io.save_checkpoint

        def save_checkpoint(checkpoint, path, storage_options=None):
            moment = f"write {os.path.relpath(path, self.run_dir)} at step {checkpoint['global_step']}"
            if checkpoint.get("owed_validation"):
                moment += ", before its epoch's validation"  # (the same step's last.ckpt is written again after it)
            with _halfway_through_torch_save(lambda: self._passing(moment)):
                save(checkpoint, path, storage_options)

        checkpoint_io.save_checkpoint, checkpoint_io._interrupt_at = save_checkpoint, self

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._passing(f"train step {trainer.global_step}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._passing(f"end of training at step {trainer.global_step}")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn != "fit":
            self._passing(f"final validation, batch {batch_idx}")
            return
        self._passing(f"validation of epoch {trainer.current_epoch}, batch {batch_idx}, at step {trainer.global_step}")

    def _passing(self, moment: str) -> None:
        if self.moments_file:
            with open(self.moments_file, "a") as f:
                f.write(moment + "\n")
        if self.signum is not None and self.timeline.get(moment, -1) >= self.at:
            signum, self.signum = self.signum, None
            if self.moments_file:
                with open(self.moments_file, "a") as f:
                    f.write(f"{INTERRUPTED_BY}{signum.name}\n")
            os.kill(os.getpid(), signum)


_recorder: InterruptAt | None = None  # the run this process trained last (an audit hook cannot be removed)


def _on_audit_event(event: str, args: tuple) -> None:
    # a file or dir of the run's results about to be renamed into place, its bytes written (utils/files.py)
    if event == "os.rename" and _recorder is not None:
        destination = Path(os.path.abspath(args[1]))
        if destination.parent == _recorder.run_dir and not destination.name.startswith("."):
            _recorder._passing(f"write {destination.name}")


@contextlib.contextmanager
def _halfway_through_torch_save(halfway):
    """torch.save, with `halfway()` called when half of the bytes are in the file."""
    original = torch.save

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        data = buffer.getbuffer()
        f.write(data[: len(data) // 2])
        f.flush()
        halfway()
        f.write(data[len(data) // 2:])

    torch.save = save
    try:
        yield
    finally:
        torch.save = original


class RecordRank(L.Callback):
    """Writes `<folder>/rank<global rank>.json` once the processes have joined: the ranks and world size Lightning
    took, from which cluster environment, this process's host and the rendezvous address, beside SLURM's variables."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {
            "global_rank": trainer.global_rank, "node_rank": trainer.node_rank, "local_rank": trainer.local_rank,
            "world_size": trainer.world_size, "environment": type(trainer.strategy.cluster_environment).__name__,
            "hostname": socket.gethostname(), "master_addr": os.environ.get("MASTER_ADDR"),
            **{name: os.environ.get(name) for name in ("SLURM_PROCID", "SLURM_NODEID", "SLURM_LOCALID",
                                                       "SLURM_JOB_NODELIST", "SLURM_NTASKS")},
        }
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class RecordWrites(Callback):
    """A Hydra callback: from the start of the job, appends to `<folder>/<SLURM_PROCID>.writes` every file or dir
    that this process creates, opens for writing, renames into place or removes under the job's run dir (an audit
    hook: Python-level file operations, which every results, status, checkpoint and model write goes through)."""

    EVENTS = ("open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree")
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_job_start(self, config, **kwargs) -> None:
        run_dir = os.path.abspath(config.hydra.runtime.output_dir) + os.sep
        self.folder.mkdir(parents=True, exist_ok=True)
        log = os.open(self.folder / f"{os.environ.get('SLURM_PROCID', '0')}.writes",
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

        def hook(event: str, args: tuple) -> None:
            if event not in self.EVENTS:
                return
            if event == "open":
                path, mode, flags = args
                if not (isinstance(mode, str) and set(mode) & set("wax+") or (flags or 0) & self.WRITE_FLAGS):
                    return
            else:
                path = args[1] if event == "os.rename" else args[0]
            if isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(run_dir):
                os.write(log, f"{event} {os.path.abspath(path)[len(run_dir):]}\n".encode())

        sys.addaudithook(hook)



class FillDiskAtWrite(Callback):
    """A Hydra callback: `fill_disk_at_write` for the job's run dir, from the start of the job."""

    def __init__(self, pattern: str, filler: str, nth: int = 1):
        self.pattern, self.filler, self.nth = pattern, filler, nth

    def on_job_start(self, config, **kwargs) -> None:
        fill_disk_at_write(config.hydra.runtime.output_dir, self.pattern, self.filler, self.nth)


def fill_disk_at_write(run_dir: str | Path, pattern: str, filler: str | Path, nth: int = 1) -> None:
    """The `nth` time this process is about to create a file or dir under `run_dir` whose path there matches
    `pattern` (fnmatch, e.g. `checkpoints/.last.ckpt.*`: the temporary file beside last.ckpt), fill the filesystem
    first with `filler` (a file outside `run_dir`), so that this write fails with ENOSPC, as on a full disk. Once
    struck, the hook (which the process keeps) does nothing; deleting `filler` frees the space."""
    run_dir = os.path.abspath(run_dir) + os.sep
    seen = 0

    def hook(event: str, args: tuple) -> None:
        nonlocal seen
        if event not in ("open", "os.mkdir") or seen >= nth or not isinstance(args[0], (str, os.PathLike)):
            return
        if event == "open" and not (isinstance(args[1], str) and set(args[1]) & set("wax+")
                                    or (args[2] or 0) & RecordWrites.WRITE_FLAGS):
            return
        path = os.path.abspath(args[0])
        if path.startswith(run_dir) and fnmatch.fnmatch(path[len(run_dir):], pattern):
            seen += 1
            if seen == nth:
                fill(Path(filler))

    sys.addaudithook(hook)


def fill(filler: Path) -> None:
    """Write zeros into `filler` until its filesystem has no space left."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for block in (1 << 20, 4096):
            try:
                while True:
                    os.write(fd, bytes(block))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
