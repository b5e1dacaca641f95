"""Every config group option composes and instantiates; sweeps' override keys exist."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from flan_squad.config import CONFIG_DIR, auto_precision

GROUPS = {g: sorted(p.stem for p in (CONFIG_DIR / g).glob("*.yaml")) for g in
          ["model", "strategy", "dataset", "trainer", "logger", "callbacks", "experiment"]}


def test_groups_have_the_documented_options():
    assert GROUPS["model"] == ["flan_t5_base", "flan_t5_large", "flan_t5_small", "t5_tiny"]
    assert GROUPS["strategy"] == ["full", "lora", "qlora"]
    assert GROUPS["dataset"] == ["planted_v1", "planted_v2", "squad_v1", "squad_v2"]


@pytest.mark.parametrize("group, option", [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}"], output_dir=tmp_path)
    if group in ("model", "strategy"):
        instance = instantiate(cfg[group], _convert_="all")
        if group == "strategy":
            assert instance.name == option and instance.lr > 0
        else:
            assert instance.init in ("pretrained", "random")
    elif group == "dataset":
        dm = instantiate(cfg.dataset, tokenizer=None)
        assert dm.name == option
    elif group == "trainer" and cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        assert cfg.trainer.devices != 0 and cfg.trainer.precision == "32-true"  # composes; no GPU to build on
    elif group == "trainer":
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert trainer.max_epochs == cfg.trainer.max_epochs
    elif group in ("logger", "callbacks"):
        assert all(instantiate(c) is not None for c in (cfg[group] or {}).values())


def test_defaults_follow_the_reference_setup(tmp_path):
    cfg = compose_config([], output_dir=tmp_path)
    assert cfg.model.name_or_path == "google/flan-t5-base" and cfg.model.init == "pretrained"
    assert cfg.strategy.lr == 5e-5 and cfg.dataset.batch_size == 16 and cfg.trainer.max_epochs == 3
    assert cfg.dataset.max_source_length == 512 and cfg.dataset.max_target_length == 32
    assert cfg.trainer.precision == auto_precision("auto")  # its cases: tests/test_precision.py


def test_squad_v2_reads_the_shared_files(tmp_path):
    cfg = compose_config(["dataset=squad_v2"], output_dir=tmp_path)
    assert cfg.dataset.train_file.endswith("v2.0/train-v2.0.sample.json")
    assert cfg.dataset.validation_file.endswith("v2.0/dev-v2.0.reconstructed.json")


def test_sweep_keys_exist_for_lora_strategies(tmp_path):
    for strategy in ("lora", "qlora"):
        cfg = compose_config([f"strategy={strategy}", "strategy.lr=3e-4", "strategy.rank=4"], output_dir=tmp_path)
        assert instantiate(cfg.strategy).rank == 4 and instantiate(cfg.strategy).lr == 3e-4
