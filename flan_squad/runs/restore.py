"""Build a run's parts (`build_parts`: base, strategy, tokenizer) from conf/ or from a run dir, and restore what a
training run produced, exactly as it was trained: for train, evaluate, predict, export and the benchmarks.

A run dir (from `flan_squad.train`) holds `config.yaml` (the resolved config: its model, strategy and
dataset sections) and `model/` (the full model, or the adapter only, with the tokenizer). The base of
an adapter is rebuilt from the run's own model section (init=random weights are deterministic).

Loading a run dir runs no code of its choosing: run dirs are shared (a colleague's results, a downloaded
fine-tune), and `hydra.utils.instantiate` would call any `_target_` its config.yaml names. The model and strategy
are built from this project's own classes only (`build_section`), from plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from flan_squad.models import strategies
from flan_squad.models.base import BaseModel
from flan_squad.models.strategies import Strategy
from flan_squad.utils.errors import FlanSquadError


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


def _allowed(group: str) -> dict[str, type]:
    """The classes a run's config.yaml may name for `group`, by `_target_`."""
    if group == "model":
        return {f"{BaseModel.__module__}.{BaseModel.__qualname__}": BaseModel}
    # the strategies of conf/strategy/: the classes of flan_squad.models.strategies with a `name`
    classes = [c for c in vars(strategies).values() if isinstance(c, type) and c.__module__ == strategies.__name__]
    return {f"{c.__module__}.{c.__qualname__}": c for c in classes if isinstance(getattr(c, "name", None), str)}


def build_section(run_dir: str | Path, cfg: DictConfig, group: str) -> Any:
    """The run's `group` (model or strategy) built from plain values by one of the project's own classes;
    anything else in config.yaml is refused in one line naming the key."""
    where = f"{Path(run_dir) / 'config.yaml'}: {group}"
    section = cfg.get(group)
    if not isinstance(section, DictConfig):
        raise RunError(f"{where}: missing, or not a mapping")
    allowed = _allowed(group)
    target = section.get("_target_")
    if target not in allowed:
        raise RunError(f"{where}._target_={target!r} is not one of this project's {group} classes "
                       f"({', '.join(sorted(allowed))}): refused (loading a run dir must not run code it names)")
    values = OmegaConf.to_container(section, resolve=True)
    values.pop("_target_")
    special = _special_keys(values)
    if special:
        raise RunError(f"{where}.{special[0]}: refused (a run's config.yaml names no code: plain values only)")
    try:
        return allowed[target](**values)
    except TypeError as e:
        raise RunError(f"{where}: {e}") from None


def _special_keys(value: Any, prefix: str = "") -> list[str]:
    """Hydra's instantiation keys (`_target_`, `_args_`, `_partial_`, ...) anywhere in `value`, as dotted keys."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{prefix}{key}"
            if isinstance(key, str) and key.startswith("_") and key.endswith("_"):
                found.append(name)
            found += _special_keys(item, f"{name}.")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _special_keys(item, f"{prefix}{i}.")
    return found


@dataclass
class RunParts:
    """What every run starts from: which weights (`base`), how they train or load (`strategy`), the tokenizer."""

    base: BaseModel
    strategy: Strategy
    tokenizer: Any


def build_parts(cfg: DictConfig, run_dir: str | Path | None = None) -> RunParts:
    """The base, strategy and tokenizer of a run: the one place train, evaluate, predict, export and the benchmarks
    build them. From a config composed from conf/ (`run_dir=None`: its `_target_`s are the project's own), or from
    a run dir's config.yaml, built by the project's own classes only (`build_section`), with the run's tokenizer."""
    if run_dir is None:
        base = instantiate(cfg.model, _convert_="all")
        return RunParts(base, instantiate(cfg.strategy, _convert_="all"), base.load_tokenizer())
    from transformers import AutoTokenizer

    return RunParts(build_section(run_dir, cfg, "model"), build_section(run_dir, cfg, "strategy"),
                    AutoTokenizer.from_pretrained(Path(run_dir) / "model"))


def restore_weights(run_dir: str | Path, load) -> nn.Module:
    """`load(model_dir)` (a strategy's load or export), its failure on a missing or damaged weights file told in one
    line naming the file."""
    from safetensors import SafetensorError

    model_dir = Path(run_dir) / "model"
    weights = model_dir / ("adapter_model.safetensors" if (model_dir / "adapter_config.json").exists()
                           else "model.safetensors")
    if not weights.is_file() and not (model_dir / f"{weights.name}.index.json").is_file():
        raise RunError(f"run_dir={run_dir}: {weights} is missing: the run's model/ is incomplete")
    try:
        return load(model_dir)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RunError(f"run_dir={run_dir}: cannot load {weights} (truncated or damaged? {type(e).__name__}: "
                       f"{first_line})") from None


def load_run(run_dir: str | Path, device: torch.device) -> Restored:
    """The run's model (full, or adapter on its base) and tokenizer, on `device`."""
    cfg = run_config(run_dir)
    parts = build_parts(cfg, run_dir)
    model = restore_weights(run_dir, lambda model_dir: parts.strategy.load(model_dir, parts.base, device))
    return Restored(parts.base, parts.strategy, model.eval(), parts.tokenizer, cfg.dataset.version, cfg,
                    f"run {run_dir}", parts.strategy.describe())


def load_base(cfg: DictConfig, device: torch.device) -> Restored:
    """The base model as it is, loaded the way `cfg.strategy` loads it (e.g. 4-bit for qlora)."""
    parts = build_parts(cfg)
    model = parts.strategy.load_base(parts.base, device)
    return Restored(parts.base, parts.strategy, model.eval(), parts.tokenizer, cfg.dataset.version, cfg,
                    f"base model {parts.base.label}", {"label": "base model, not fine-tuned", "capacity": None})


def restore(cfg: DictConfig, device: torch.device) -> Restored:
    """`run_dir=...` if given, else the base model of `cfg`."""
    return load_run(cfg.run_dir, device) if cfg.get("run_dir") else load_base(cfg, device)
