"""What this process is within a job: rank zero or another rank, a multirun's job or a run of its own.

Both are asked before the Trainer exists (and by code that never sees one), so they read what the launcher
set: the environment for the rank, Hydra's config for the run mode.
"""

from __future__ import annotations

import os
from typing import Any

# The variables that carry a process's global rank, in the order Lightning reads them: its own DDP children get
# RANK / LOCAL_RANK, each task of a multi-task SLURM job SLURM_PROCID, an LSF job JSM_NAMESPACE_RANK.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (or the only process): the one that writes a run dir's files."""
    for variable in RANK_VARIABLES:
        if variable in os.environ:
            return int(os.environ[variable]) == 0
    return True


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
