"""Test-only: Lightning's FSDP strategy on CPU processes (gloo), so that tests run the FSDP path of the entry point.

Lightning 2.6.6 supports FSDP on GPUs only: its accelerator connector refuses `accelerator=cpu` for `FSDPStrategy`
itself, and it passes FSDP `device_id=<the device's index>`, None on CPU, which torch's FSDP refuses. torch's FSDP
runs on CPU given the CPU device itself; this subclass (which the connector's check does not name) does just that.
A full state dict gathered with `offload_to_cpu=True` (what Lightning's checkpoints ask for) segfaults when the
parameters already are on the CPU (torch 2.13, checked): on CPU, checkpoints gather without it.
Used by `trainer.strategy._target_=fsdp_cpu.cpu_t5_fsdp_strategy` with tests/ on PYTHONPATH; `ShardProbe` (a callback,
`+callbacks.probe._target_=fsdp_cpu.ShardProbe`) looks inside such a run.
"""

from __future__ import annotations

import gc
import json
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import lightning as L
import lightning.pytorch.strategies.fsdp as lightning_fsdp
from lightning.pytorch.strategies import FSDPStrategy


class CpuFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.root_device.type != "cpu" or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)  # wrapped already (by fit, before validate): Lightning wraps nothing
        return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                        mixed_precision=self.mixed_precision_config,
                                        sharding_strategy=self.sharding_strategy, device_id=self.root_device,
                                        **self.kwargs)


_full_state_dict_context = lightning_fsdp._get_full_state_dict_context


@contextmanager
def _full_state_dict_context_without_offload(module, world_size: int, rank0_only: bool = True):
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    if next(module.parameters()).device.type != "cpu":
        with _full_state_dict_context(module, world_size, rank0_only):
            yield
        return
    with FullyShardedDataParallel.state_dict_type(
            module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only)):
        yield


lightning_fsdp._get_full_state_dict_context = _full_state_dict_context_without_offload


def cpu_t5_fsdp_strategy(sharding_strategy: str = "FULL_SHARD", timeout_s: float | None = None,
                         **kwargs) -> CpuFSDPStrategy:
    """`timeout_s`: collectives that wait longer fail (a hang fails a test in seconds, not after torch's 30 min)."""
    from flan_squad.runs.trainer import t5_fsdp_strategy

    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    strategy = t5_fsdp_strategy(sharding_strategy, **kwargs)  # the shipped strategy's settings, then CPU-capable
    strategy.__class__ = CpuFSDPStrategy
    return strategy


class ShardProbe(L.Callback):
    """At each validation's start: makes rank 1's answers end at their first token (every token id is its end of
    sequence, as for a rank whose questions are answered early, while rank 0's go on), and writes, from rank 0, what
    is alive (after a garbage collection) into <run dir>/shard_probe.json, by trainer function: optimizers, and FSDP
    flat parameters (those of the fit's model too, at `validate`'s start, are shards kept on the device)."""

    def __init__(self):
        self.alive: dict[str, dict[str, int]] = {}

    def on_validation_start(self, trainer, pl_module) -> None:
        import torch
        from torch.distributed.fsdp._flat_param import FlatParameter

        if trainer.global_rank == 1:
            for module in pl_module.modules():
                if getattr(module, "generation_config", None) is not None:  # the model that generates
                    module.generation_config.eos_token_id = list(range(module.config.vocab_size))
        gc.collect()
        objects = gc.get_objects()
        self.alive[trainer.state.fn] = {"optimizers": sum(isinstance(o, torch.optim.Optimizer) for o in objects),
                                        "flat_parameters": sum(isinstance(o, FlatParameter) for o in objects)}
        if trainer.is_global_zero:
            (Path(trainer.default_root_dir) / "shard_probe.json").write_text(json.dumps(self.alive))
