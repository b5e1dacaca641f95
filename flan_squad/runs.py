"""Restore what a training run produced, exactly as it was trained: for evaluate, predict and export.

A run dir (from `flan_squad.train`) holds `config.yaml` (the resolved config: its model, strategy and
dataset sections) and `model/` (the full model, or the adapter only, with the tokenizer). The base of
an adapter is rebuilt from the run's own model section (init=random weights are deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from flan_squad.base import BaseModel
from flan_squad.errors import FlanSquadError
from flan_squad.strategies import Strategy


class RunError(FlanSquadError, ValueError):
    """A run dir that cannot be restored; the message names it."""


@dataclass
class Restored:
    base: BaseModel
    strategy: Strategy
    model: nn.Module
    tokenizer: Any
    version: str  # the SQuAD version (prompt) the run was trained on
    config: DictConfig
    source: str  # what is being used, for metrics.json and messages
    approach: dict[str, Any]  # how reports show it: the run's `strategy.describe()`, or the untrained base


def run_config(run_dir: str | Path) -> DictConfig:
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise RunError(f"run_dir={run_dir}: no config.yaml there: not a run dir written by flan_squad.train")
    if not (run_dir / "model").is_dir():
        raise RunError(f"run_dir={run_dir}: no model/ dir: the run did not finish (it is saved at the end)")
    return OmegaConf.load(config_file)


def load_run(run_dir: str | Path, device: torch.device) -> Restored:
    """The run's model (full, or adapter on its base) and tokenizer, on `device`."""
    from transformers import AutoTokenizer

    cfg = run_config(run_dir)
    base = instantiate(cfg.model, _convert_="all")
    strategy = instantiate(cfg.strategy, _convert_="all")
    model_dir = Path(run_dir) / "model"
    model = strategy.load(model_dir, base, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return Restored(base, strategy, model.eval(), tokenizer, cfg.dataset.version, cfg, f"run {run_dir}",
                    strategy.describe())


def load_base(cfg: DictConfig, device: torch.device) -> Restored:
    """The base model as it is, loaded the way `cfg.strategy` loads it (e.g. 4-bit for qlora)."""
    base = instantiate(cfg.model, _convert_="all")
    strategy = instantiate(cfg.strategy, _convert_="all")
    model = strategy.load_base(base, device)
    return Restored(base, strategy, model.eval(), base.load_tokenizer(), cfg.dataset.version, cfg,
                    f"base model {base.label}", {"label": "base model, not fine-tuned", "capacity": None})


def restore(cfg: DictConfig, device: torch.device) -> Restored:
    """`run_dir=...` if given, else the base model of `cfg`."""
    return load_run(cfg.run_dir, device) if cfg.get("run_dir") else load_base(cfg, device)
