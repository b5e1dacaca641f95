"""What this process is within a job: rank zero or another rank, a multirun's job or a run of its own.

Both are asked before the Trainer exists (and by code that never sees one), so they read what the launcher
set: the environment for the rank, Hydra's config for the run mode.
"""

from __future__ import annotations

import os
from typing import Any


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (or the only process): the one that writes a run dir's files.

    Asked before the Trainer exists (which knows it as `trainer.is_global_zero`). RANK (torchrun) is the global rank;
    without it, every rank the process was given must be 0: LOCAL_RANK and NODE_RANK (processes Lightning starts, on
    one node or several), SLURM_PROCID (each task of a SLURM job: on another node SLURM_LOCALID is 0 again).
    """
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    ranks = ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
    return all(int(os.environ[variable]) == 0 for variable in ranks if variable in os.environ)


def in_multirun(hydra_cfg: Any = None) -> bool:
    """Whether Hydra runs this job as one of a multirun's jobs (`-m`, or a preset with hydra.mode=MULTIRUN).

    Args:
        hydra_cfg: a `hydra` node, e.g. a run's saved `.hydra/hydra.yaml`; default: the running job's (False
            outside Hydra).
    """
    if hydra_cfg is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return False
        hydra_cfg = HydraConfig.get()
    return str(hydra_cfg.get("mode")).endswith("MULTIRUN")  # RunMode.MULTIRUN live, "MULTIRUN" once saved
