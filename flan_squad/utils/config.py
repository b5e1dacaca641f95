"""Hydra/OmegaConf glue: where conf/ is, the resolvers it uses, and composing a config outside `@hydra.main`.

Resolvers only resolve (no files are written while a config is read); the entry points register them
explicitly with `register_resolvers()`, and `compose()` does for tests and benchmarks.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "conf"


def register_resolvers() -> None:
    from flan_squad.utils.precision import auto_precision  # torch: imported only by those that resolve a config

    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
    OmegaConf.register_new_resolver("auto_precision", auto_precision, replace=True)


def compose(config_name: str, overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """conf/<config_name>.yaml with `overrides`, as its entry point would compose it (the one helper tests and
    benchmarks use)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides, return_hydra_config=return_hydra_config)
