"""Which process this is, before Lightning's Trainer exists (which knows it as `trainer.is_global_zero`)."""

from __future__ import annotations

import os


def is_rank_zero() -> bool:
    """Whether this process is global rank 0. RANK (torchrun) is the global rank; without it, every rank the process
    was given must be 0: LOCAL_RANK and NODE_RANK (processes Lightning starts, on one node or several), SLURM_PROCID
    (each task of a SLURM job: on another node SLURM_LOCALID is 0 again)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    ranks = ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
    return all(int(os.environ[variable]) == 0 for variable in ranks if variable in os.environ)
