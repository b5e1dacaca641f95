"""Shared fixtures: the real tokenizer and SQuAD files from ../shared, tiny random T5 models, Hydra configs."""

from __future__ import annotations

import logging
import os
import runpy
import subprocess
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/datasets read it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from flan_squad.models.base import BaseModel  # noqa: E402
from flan_squad.utils.config import CONFIG_DIR, PROJECT_ROOT, compose  # noqa: E402

SHARED = Path(os.environ.get("FLAN_SQUAD_SHARED", PROJECT_ROOT.parent / "shared")).resolve()

# Modules whose tests train through an entry point, start processes or servers, or run a benchmark: `make test`
# runs them, `make test-fast` (the inner loop) leaves them out.
SLOW_MODULES = {
    "test_bench", "test_compare", "test_disk_full", "test_evaluate", "test_faults", "test_learning",
    "test_new_strategy", "test_own_data", "test_regression", "test_reliability", "test_resume", "test_scale",
    "test_serve", "test_signals", "test_sweeps", "test_tracking", "test_train", "test_wandb",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)

SQUAD = SHARED / "data" / "squad"
DEV_V1 = SQUAD / "v1.1" / "dev-v1.1.json"
DEV_V2 = SQUAD / "v2.0" / "dev-v2.0.reconstructed.json"
TRAIN_V2_SAMPLE = SQUAD / "v2.0" / "train-v2.0.sample.json"
TOKENIZER_DIR = SHARED / "models" / "flan-t5-small-tokenizer"
TINY_ARCHITECTURE = dict(d_model=64, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4, d_ff=128)
# Every shipped strategy, by its YAML: a strategy added as a class and a YAML file gets every test that uses these.
STRATEGY_NAMES = sorted(p.stem for p in (CONFIG_DIR / "strategy").glob("*.yaml"))


def make_strategy(name: str, **settings):
    """The strategy `conf/strategy/<name>.yaml` builds, with `settings` replacing the YAML's values of the same
    key (settings the strategy does not have, e.g. `rank` for full fine-tuning, are left out)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIG_DIR / "strategy" / f"{name}.yaml")
    cfg.merge_with({key: value for key, value in settings.items() if key in cfg})
    return instantiate(cfg, _convert_="all")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_base(cache_dir) -> BaseModel:
    return BaseModel(name="t5-tiny", name_or_path=None, init="random", tokenizer=str(TOKENIZER_DIR),
                     architecture=TINY_ARCHITECTURE, cache_dir=str(cache_dir))


@pytest.fixture(autouse=True)
def _no_tracking_uri_from_an_earlier_test(monkeypatch):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI to the process environment, which conf/logger/mlflow.yaml
    # reads: a server that an earlier test stopped must not become this test's store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test's real subprocess: offline, reading ../shared (or FLAN_SQUAD_SHARED)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "FLAN_SQUAD_SHARED": str(SHARED), **extra}


def run_module(monkeypatch, module: str, argv: list[str]) -> int:
    """`python -m <module> <argv>` in this process; its exit status. Hydra's logging set-up is undone after."""
    monkeypatch.setenv("FLAN_SQUAD_SHARED", str(SHARED))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # Hydra sets up logging for its job: undone after
    monkeypatch.setattr(sys, "argv", [module, *argv])
    code = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": it runs again as __main__
            runpy.run_module(module, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        root.handlers[:], root.level = handlers, level
    return code


@pytest.fixture
def run_entry_point(monkeypatch, capsys):
    """`python -m <module> <argv>` in this process, as a `subprocess.CompletedProcess`: the same argument
    parsing, Hydra main, output and exit status as a subprocess, without its ~9 s import of the stack. Tests
    where the process itself matters (killed, distributed, one-line errors on a real stderr) run subprocesses."""

    def run(module: str, argv: list[str]) -> subprocess.CompletedProcess:
        capsys.readouterr()  # only this run's output
        code = run_module(monkeypatch, module, argv)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([module, *argv], code, out, err)

    return run


def one_error_line(result, *fragments: str) -> str:
    """The run failed with exit status 2 and one line on stderr, `error: ...`, holding every fragment."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


@pytest.fixture(scope="session")
def cpu() -> torch.device:
    return torch.device("cpu")


def compose_config(overrides: list[str], output_dir: Path | None = None, cache: Path | None = None,
                   config_name: str = "train"):
    """Compose conf/<config_name>.yaml as `@hydra.main` would, with the run dir (and weight cache) in tmp dirs."""
    cfg = compose(config_name, overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:...} interpolations
    with open_dict(cfg):
        del cfg["hydra"]  # as in @hydra.main, the job config does not carry the hydra node
        if "paths" in cfg:
            cfg.paths.shared_dir = str(SHARED)
            if output_dir is not None:
                cfg.paths.output_dir = str(output_dir)
            if cache is not None:
                cfg.paths.cache_dir = str(cache)
    return cfg
