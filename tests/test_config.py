"""Every config group option composes and instantiates, as the README documents it; sweeps' override keys exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from conftest import compose_config
from flan_squad.data.records import Columns
from flan_squad.data.squad import DataError, read_squad_file
from flan_squad.models.strategies import Strategy
from flan_squad.runs.tracking import MLflowLogger
from flan_squad.runs.wandb_logger import WandbLogger
from flan_squad.utils.config import CONFIG_DIR, PROJECT_ROOT
from flan_squad.utils.errors import ConfigError
from flan_squad.utils.precision import auto_precision


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


GROUPS = {g: _options(g) for g in ["model", "strategy", "dataset", "optimizer", "trainer", "logger", "callbacks",
                                   "experiment"]}


def _documented_options(group: str) -> list[str]:
    """The options README's "Config groups" table lists for `group` (the names in backticks of its 2nd column)."""
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    row = next((line for line in readme.splitlines() if line.startswith(f"| `{group}` |")), None)
    assert row is not None, f"README's config groups table has no row for {group}"
    return sorted(re.findall(r"`([^`]+)`", row.split(" | ")[1]))


@pytest.mark.parametrize("group", sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir()))
def test_groups_have_the_documented_options(group):
    assert _options(group) == _documented_options(group)


@pytest.mark.parametrize("group, option", [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}"], output_dir=tmp_path)
    if group in ("model", "strategy"):
        instance = instantiate(cfg[group], _convert_="all")
        if group == "strategy":  # the YAML's settings reach the object (more in tests/test_strategies.py)
            assert isinstance(instance, Strategy) and instance.name == option and instance.lr == cfg.strategy.lr
            description = instance.describe()  # what metrics.json records for the report
            assert description["label"] and json.loads(json.dumps(description)) == description
        else:  # the architecture the YAML gives is the one built (random init) or documented (pretrained)
            assert (instance.name, instance.init) == (cfg.model.name, cfg.model.init)
            config = instance.config()
            assert {key: getattr(config, key) for key in cfg.model.architecture} == cfg.model.architecture
            if instance.init == "pretrained":
                assert instance.weights_path() == cfg.model.name_or_path
    elif group == "dataset" and option == "records":  # your own files: none until named
        dm = instantiate(cfg.dataset, tokenizer=None)
        assert dm.columns == Columns.from_config(compose_config([], output_dir=tmp_path).dataset.columns)
        with pytest.raises(DataError, match="dataset.validation_file is not set, nor dataset.hub_id"):
            dm.setup("validate")
    elif group == "dataset":
        dm = instantiate(cfg.dataset, tokenizer=None)
        assert (dm.name, dm.version) == (option, option[-2:])  # squad_v2, planted_v2: SQuAD 2.0 prompts and rules
        dm.prepare_data()  # the planted task's files are generated here (its config only names them)
        assert Path(dm.validation_file).is_file() and read_squad_file(dm.validation_file)[0] == dm.version
    elif group == "optimizer":  # the class named, with the strategy's lr and the YAML's settings
        optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
        assert type(optimizer).__name__ == {"adamw": "AdamW", "adamw8bit": "AdamW8bit",
                                            "paged_adamw8bit": "PagedAdamW8bit", "adafactor": "Adafactor"}[option]
        assert optimizer.defaults["lr"] == cfg.strategy.lr
        settings = {k: v for k, v in cfg.optimizer.items() if not k.startswith("_") and k in optimizer.defaults}
        assert settings and all(optimizer.defaults[k] == v for k, v in settings.items()), optimizer.defaults
    elif group == "trainer" and cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        # No GPU to build on: the config composes, in fp32 (no native bf16 without one), and FSDP's strategy builds.
        assert cfg.trainer.precision == "32-true"
        if "strategy" in cfg.trainer:
            assert type(instantiate(cfg.trainer.strategy)).__name__ == "FSDPStrategy"
    elif group == "trainer":  # what the YAML says is what the Trainer does
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert (trainer.max_epochs, trainer.gradient_clip_val, trainer.num_devices, trainer.precision) == (
            cfg.trainer.max_epochs, cfg.trainer.gradient_clip_val, cfg.trainer.devices, cfg.trainer.precision)
        assert type(trainer.strategy).__name__ == ("DDPStrategy" if option == "ddp" else "SingleDeviceStrategy")
    elif group == "logger":  # each writes into its own folder of the run dir; MLflow into its store (outputs/mlflow)
        if "mlflow" in (cfg.logger or {}):
            cfg.logger.mlflow.store_dir = str(tmp_path / "mlflow")
        loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
        expected = {"tensorboard": [(TensorBoardLogger, "tensorboard")], "csv": [(CSVLogger, "csv")], "none": [],
                    "mlflow": [(MLflowLogger, "mlflow")],
                    "tensorboard_mlflow": [(TensorBoardLogger, "tensorboard"), (MLflowLogger, "mlflow")],
                    "wandb": [(WandbLogger, "wandb")]}  # W&B makes <save_dir>/wandb/

        def where(x) -> Path:
            return Path(x.store.store_dir if isinstance(x, MLflowLogger) else
                        Path(x.save_dir) / "wandb" if isinstance(x, WandbLogger) else x.log_dir)

        assert [(type(x), where(x)) for x in loggers] == [
            (kind, tmp_path / d) for kind, d in expected[option]]
    elif group == "callbacks":
        callbacks = {name: instantiate(c) for name, c in (cfg.callbacks or {}).items()}
        if option == "none":
            assert callbacks == {}
        else:  # the best-F1 checkpoint, a rolling last.ckpt for resume=true, a progress bar, the lr per step
            best, last = callbacks["model_checkpoint"], callbacks["last_checkpoint"]
            assert isinstance(best, ModelCheckpoint) and isinstance(last, ModelCheckpoint)
            assert Path(best.dirpath) == Path(last.dirpath) == tmp_path / "checkpoints"
            assert (best.monitor, best.mode, best.save_top_k, best.save_last) == ("val/f1", "max", 1, False)
            assert last.save_top_k == 0 and last.save_last and last._every_n_train_steps == 200
            assert isinstance(callbacks["progress_bar"], TQDMProgressBar)
            assert isinstance(callbacks["lr_monitor"], LearningRateMonitor)
            assert callbacks["lr_monitor"].logging_interval == "step"
            if option == "early_stopping":  # on validation F1, checked where validation computes it
                stop = callbacks["early_stopping"]
                assert isinstance(stop, EarlyStopping)
                assert (stop.monitor, stop.mode, stop.patience) == ("val/f1", "max", 2)
                assert stop._check_on_train_epoch_end is False


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


@pytest.mark.parametrize("strategy", GROUPS["strategy"])
def test_sweep_keys_exist_for_lr_and_capacity(strategy, tmp_path):
    # hparams_search sweeps strategy.lr and, for a strategy that has one, its capacity (e.g. strategy.rank)
    default = instantiate(compose_config([f"strategy={strategy}"], output_dir=tmp_path).strategy)
    capacity = default.describe()["capacity"]
    overrides = [f"strategy={strategy}", "strategy.lr=3e-4"] + ([f"strategy.{capacity['key']}=4"] if capacity else [])
    swept = instantiate(compose_config(overrides, output_dir=tmp_path).strategy)
    assert swept.lr == 3e-4 and (not capacity or swept.describe()["capacity"]["value"] == 4)


@pytest.mark.parametrize("size", ["flan_t5_small", "flan_t5_base", "flan_t5_large"])
def test_random_init_of_any_flan_t5_size_needs_no_hub(size, tmp_path):
    # every FLAN-T5 size shares one tokenizer: init=random takes the one in the shared folder
    base = instantiate(compose_config([f"model={size}", "model.init=random"], output_dir=tmp_path).model)
    assert len(base.load_tokenizer()) == 32100  # 32,000 pieces + 100 extra ids (../shared/README.md)
    assert instantiate(compose_config([f"model={size}"], output_dir=tmp_path).model).tokenizer is None  # the hub's


def test_only_hparams_search_defines_multiruns(tmp_path):
    """A preset is one run; a sweep is an `hparams_search` option (and `-m` on the command line)."""
    from hydra.types import RunMode

    presets = [p for p in CONFIG_DIR.rglob("*.yaml") if "MULTIRUN" in p.read_text()]
    assert presets and all(p.parent.name == "hparams_search" for p in presets), presets
    from flan_squad.utils.config import compose

    assert compose("train", ["experiment=compare_cpu"], return_hydra_config=True).hydra.mode != RunMode.MULTIRUN
    swept = compose("train", ["experiment=compare_cpu", "hparams_search=strategies"], return_hydra_config=True).hydra
    assert swept.mode == RunMode.MULTIRUN and swept.sweeper.params.strategy == "full,lora,qlora"


def test_model_compile_is_off_by_default_and_must_be_a_boolean():
    from flan_squad.models.base import BaseModel

    for model in ("flan_t5_base", "flan_t5_small", "flan_t5_large", "t5_tiny", "t5_mid_planted"):
        assert compose_config([f"model={model}"]).model.compile is False, model
    with pytest.raises(ConfigError, match="model.compile='yes': expected true or false"):
        BaseModel(name="x", name_or_path="y", compile="yes")
