"""What a run costs: training time (validation excluded), throughput, peak memory of training and validation, and
the memory that is the run's own, with an account of it from the model and optimizer themselves."""

from __future__ import annotations

import ctypes
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from flan_squad.models.optimizers import optimizer_state_bytes
from flan_squad.utils.storage import storage_bytes


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
        """The peak since `reset()`."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _proc_status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux

    def current_mb(self) -> float | None:
        """What this process holds now (after returning freed heap to the system), or None where it cannot be read:
        before the model is built, what a peak must be taken above to be the run's own."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        _release_free_heap()
        return _proc_status_mb("VmRSS")


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    # glibc keeps freed memory mapped (resident) until asked to return it.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- what the model and the optimizer hold ----------------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
                torch.int8: "int8", torch.uint8: "uint8"}


def _quant_state_tensors(quant_state) -> list[torch.Tensor]:
    # bitsandbytes' 4-bit QuantState: per-block absmax (itself quantised under double quantisation: state2), the
    # code table, the offset
    if quant_state is None:
        return []
    tensors = [v for v in vars(quant_state).values() if torch.is_tensor(v)]
    return tensors + _quant_state_tensors(getattr(quant_state, "state2", None))


def memory_account(model: nn.Module, optimizers: list | tuple = ()) -> dict[str, Any]:
    """What the model and its optimizers hold, in bytes, read from their tensors.

    `weights`: parameters and buffers by storage dtype ("4bit": packed 4-bit weights with their quantisation
    state; "fp32", "bf16", ...); `gradients`: one gradient per trainable parameter, in its dtype (they all exist
    at once, between backward and the step); `optimizer_state`: every tensor in the optimizers' state (AdamW's two
    moments, an 8-bit optimizer's quantised ones, Adafactor's factored ones: read, not assumed).
    """
    seen: set[tuple[str, int]] = set()
    weights: dict[str, int] = {}
    for p in [*model.parameters(), *model.buffers()]:
        quant_state = getattr(p, "quant_state", None)
        kind = "4bit" if quant_state is not None else _DTYPE_NAMES.get(p.dtype, str(p.dtype).removeprefix("torch."))
        n = storage_bytes([p, *_quant_state_tensors(quant_state)], seen)
        if n:
            weights[kind] = weights.get(kind, 0) + n
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "weights": weights,
        "trainable_params": sum(p.numel() for p in trainable),
        "gradients": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer_state": sum(optimizer_state_bytes(opt) for opt in optimizers),
    }


def _mb(n: float) -> float:
    return round(n / 2**20, 1)


class CostMonitor(L.Callback):
    """Times the training loop (validation and checkpoint writing excluded), counts what it processed, and reads peak
    memory: training's and validation's apart (validation generates with another batch size, and would hide what
    training needs).

    The run's own memory is the peak above what the process held just before the model was built (`setup` runs
    before `configure_model`): on CPU the interpreter, torch and the data (hundreds of MB) are not the strategy's
    cost. The account (`memory_account`) says what of it are weights, gradients and optimizer state; the rest is
    activations, workspace and allocator slack."""

    def __init__(self):
        self.train_time_s = self.checkpoint_time_s = 0.0
        self.examples = self.tokens = 0
        self._started = self._val_started = 0.0
        self._val_time_s = 0.0
        self.peak: PeakMemory | None = None
        self.peak_memory_mb = self.peak_val_memory_mb = 0.0
        self.memory_before_model_mb: float | None = None
        self.account: dict[str, Any] | None = None

    def _peak_since_reset(self, trainer) -> float:
        self.peak = self.peak or PeakMemory(trainer.strategy.root_device)
        peak = self.peak.read_mb()
        self.peak.reset()
        return peak

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.memory_before_model_mb is None:
            self.peak = self.peak or PeakMemory(trainer.strategy.root_device)
            self.memory_before_model_mb = self.peak.current_mb()

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
        # after the last step: the optimizer's state exists (the gradients, freed at each step, are counted by size)
        if pl_module is not None:
            self.account = memory_account(pl_module, trainer.optimizers)
        # Under DDP every process trains on its own share: throughput counts them all.
        # On the root device: NCCL all-reduces CUDA tensors only (gloo takes CPU ones, so CPU DDP cannot tell).
        counts = torch.tensor([self.examples, self.tokens], dtype=torch.long, device=trainer.strategy.root_device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        self.examples, self.tokens = (int(c) for c in counts.tolist())

    def own_mb(self, peak_mb: float) -> float | None:
        """`peak_mb` less what the process held before the model was built: the run's own."""
        return None if self.memory_before_model_mb is None else round(peak_mb - self.memory_before_model_mb, 1)

    def memory_dict(self) -> dict[str, Any]:
        """The run's own peaks and their account in MB: weights by dtype, gradients, optimizer state, and the rest
        (activations, workspace, allocator slack: the own peak less the others)."""
        own = self.own_mb(self.peak_memory_mb)
        before = self.memory_before_model_mb
        result: dict[str, Any] = {"memory_before_model_mb": None if before is None else round(before, 1),
                                  "own_peak_memory_mb": own,
                                  "own_peak_val_memory_mb": self.own_mb(self.peak_val_memory_mb)}
        if self.account is not None:
            a = self.account
            held = sum(a["weights"].values()) + a["gradients"] + a["optimizer_state"]
            result["memory_account"] = {
                "weights_mb": {kind: _mb(n) for kind, n in sorted(a["weights"].items())},
                "gradients_mb": _mb(a["gradients"]), "optimizer_state_mb": _mb(a["optimizer_state"]),
                "rest_mb": None if own is None else round(own - held / 2**20, 1),
            }
        return result

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
            **self.memory_dict(),
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
