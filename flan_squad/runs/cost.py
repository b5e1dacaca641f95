"""What a run costs: training time (validation excluded), throughput, and peak memory of training and validation."""

from __future__ import annotations

import ctypes
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


class PeakMemory:
    """Peak memory of this process since `reset()`: max allocated on CUDA, peak resident set on CPU.

    On Linux the RSS high-water mark can be reset (`/proc/self/clear_refs`), so consecutive jobs of a
    Hydra multirun each get their own peak; elsewhere it is the process's lifetime peak.
    """

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _release_free_heap()  # else the RSS of memory freed since (validation's, say) would count in the next peak
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def read_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _release_free_heap() -> None:
    # glibc keeps freed memory mapped (resident) until asked to return it.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CostMonitor(L.Callback):
    """Times the training loop (validation and checkpoint writing excluded), counts what it processed, and reads peak
    memory: training's and validation's apart (validation generates with another batch size, and would hide what
    training needs)."""

    def __init__(self):
        self.train_time_s = self.checkpoint_time_s = 0.0
        self.examples = self.tokens = 0
        self._started = self._val_started = 0.0
        self._val_time_s = 0.0
        self.peak: PeakMemory | None = None
        self.peak_memory_mb = self.peak_val_memory_mb = 0.0

    def _peak_since_reset(self, trainer) -> float:
        self.peak = self.peak or PeakMemory(trainer.strategy.root_device)
        peak = self.peak.read_mb()
        self.peak.reset()
        return peak

    def on_train_start(self, trainer, pl_module) -> None:
        self._peak_since_reset(trainer)
        self._val_time_s = self.checkpoint_time_s = 0.0
        # Checkpoints (ModelCheckpoint's, the interruption's) are written through trainer.save_checkpoint: its time
        # is the checkpoint's size, not training's speed (a full fine-tuning's is the whole model's).
        if not hasattr(trainer.save_checkpoint, "timed_by"):
            trainer.save_checkpoint = _timed(trainer.save_checkpoint, self)
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.examples += len(batch["ids"])
        self.tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())

    def on_validation_start(self, trainer, pl_module) -> None:
        peak = self._peak_since_reset(trainer)
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.peak_memory_mb = max(self.peak_memory_mb, peak)  # training's, up to here
        self._val_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.peak_val_memory_mb = max(self.peak_val_memory_mb, self._peak_since_reset(trainer))
        if trainer.state.fn == "fit":  # not the final trainer.validate()
            self._val_time_s += time.perf_counter() - self._val_started

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_time_s = time.perf_counter() - self._started - self._val_time_s - self.checkpoint_time_s
        # this process's peaks (one device's, under DDP)
        self.peak_memory_mb = max(self.peak_memory_mb, self._peak_since_reset(trainer))
        # Under DDP every process trains on its own share: throughput counts them all.
        # On the root device: NCCL all-reduces CUDA tensors only (gloo takes CPU ones, so CPU DDP cannot tell).
        counts = torch.tensor([self.examples, self.tokens], dtype=torch.long, device=trainer.strategy.root_device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        self.examples, self.tokens = (int(c) for c in counts.tolist())

    def as_dict(self) -> dict[str, Any]:
        seconds = max(self.train_time_s, 1e-9)
        return {
            "train_time_s": round(self.train_time_s, 3),
            "checkpoint_time_s": round(self.checkpoint_time_s, 3),  # writing checkpoints in fit: not in train_time_s
            "train_examples_per_s": round(self.examples / seconds, 3),
            "train_tokens_per_s": round(self.tokens / seconds, 1),
            "train_examples_seen": self.examples,
            "peak_memory_mb": round(self.peak_memory_mb, 1),  # training's
            "peak_val_memory_mb": round(self.peak_val_memory_mb, 1),  # validation's (generation)
            "peak_memory_kind": self.peak.kind if self.peak else None,
        }


def _timed(save_checkpoint, monitor: CostMonitor):
    """`trainer.save_checkpoint`, adding the seconds it takes to `monitor.checkpoint_time_s`."""

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return save_checkpoint(*args, **kwargs)
        finally:
            monitor.checkpoint_time_s += time.perf_counter() - started

    timed.timed_by = monitor
    return timed
