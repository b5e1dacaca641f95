"""End to end: the smoke runs in-process for each strategy,
and the command line (as a multirun: tests/test_sweeps.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoTokenizer

from conftest import compose_config
from flan_squad.evaluation.metrics import score
from flan_squad.train import train

REQUIRED = {"exact", "f1", "total", "strategy", "model", "init", "trainable_params", "total_params",
            "train_time_s", "train_examples_per_s", "peak_memory_mb", "peak_val_memory_mb", "dataset", "train_examples",
            "val_examples"}
V2_KEYS = {f"{part}_{k}" for part in ("HasAns", "NoAns") for k in ("exact", "f1", "total")}


def _memory_mb(field: str) -> float:
    """This process's VmRSS (resident now) or VmHWM (its peak) from /proc, in MB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def _numel(tensors: dict[str, torch.Tensor]) -> int:
    """Parameters in a state dict, tied ones (T5's embeddings share one storage) once."""
    return sum({t.untyped_storage().data_ptr(): t.numel() for t in tensors.values()}.values())


@pytest.mark.parametrize("strategy, dataset", [("full", "squad_v1"), ("lora", "squad_v2"), ("qlora", "squad_v1")])
def test_smoke_run_writes_complete_results(strategy, dataset, tmp_path, cache_dir):
    cfg = compose_config(["experiment=smoke", f"strategy={strategy}", f"dataset={dataset}",
                          "dataset.limit_train=16", "dataset.limit_val=12", "trainer.max_epochs=1"],
                         output_dir=tmp_path, cache=cache_dir)
    rss_before = _memory_mb("VmRSS")
    started = time.perf_counter()
    metrics = train(cfg)
    wall = time.perf_counter() - started
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert REQUIRED <= on_disk.keys()
    assert (V2_KEYS <= on_disk.keys()) == (dataset == "squad_v2")
    assert on_disk["strategy"] == strategy and on_disk["init"] == "random" and on_disk["model"] == "t5-tiny"
    assert on_disk["train_examples"] == 16 and on_disk["val_examples"] == on_disk["total"] == 12
    assert on_disk["optimizer_steps"] == 2 and on_disk["train_examples_seen"] == 16
    # This process's peak resident set while training, in MB (not kB, not bytes); the loop's time, within the run's
    # (the high-water mark is reset between training and validation, so /proc's VmHWM no longer bounds it; a tiny
    # model adds far less than 1 GB to what the process held before, and a figure in kB would be ~1000x that)
    assert 0.9 * rss_before <= on_disk["peak_memory_mb"] <= rss_before + 1024
    assert on_disk["peak_memory_kind"] == "rss"
    # the run's own: above what the process held before the model was built, which holds the model's account
    own, account = on_disk["own_peak_memory_mb"], on_disk["memory_account"]
    assert own == pytest.approx(on_disk["peak_memory_mb"] - on_disk["memory_before_model_mb"], abs=0.2)
    held = sum(account["weights_mb"].values()) + account["gradients_mb"] + account["optimizer_state_mb"]
    assert held <= own and account["rest_mb"] == pytest.approx(own - held, abs=0.3)
    assert ("4bit" in account["weights_mb"]) == (strategy == "qlora")
    assert 0 < on_disk["train_time_s"] < wall
    assert 0 < on_disk["trainable_params"] <= on_disk["total_params"]
    # predictions.json is what was scored: the official rules on it give metrics.json's figures
    datamodule = instantiate(cfg.dataset, tokenizer=AutoTokenizer.from_pretrained(tmp_path / "model"))
    datamodule.setup("validate")
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert set(predictions) == {q.id for q in datamodule.val_questions}
    rescored = score(on_disk["squad_version"], datamodule.val_questions, predictions,
                     json.loads((tmp_path / "na_probs.json").read_text()) if dataset == "squad_v2" else None)
    assert {k: on_disk[k] for k in rescored} == pytest.approx(rescored)
    assert OmegaConf.load(tmp_path / "config.yaml") == OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    # the best checkpoint holds what trains (adapters: only they); model/ holds what trained, all of it
    checkpoint = torch.load(tmp_path / on_disk["best_checkpoint"], map_location="cpu")
    assert _numel(checkpoint["state_dict"]) == on_disk["trainable_params"]
    saved = load_file(tmp_path / "model" / ("model.safetensors" if strategy == "full" else "adapter_model.safetensors"))
    assert _numel(saved) == on_disk["trainable_params"]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"val/exact", "val/f1", "train/loss"} <= set(events.Tags()["scalars"])
    # one validation (the epoch's end), drawn once: the best checkpoint's re-validation is not a second point
    assert len(events.Scalars("val/f1")) == 1


def test_command_line_run_honours_run_dir(tmp_path, run_entry_point):
    run_dir = tmp_path / "run"
    result = run_entry_point("flan_squad.train", ["experiment=smoke", "strategy=qlora", "dataset=squad_v2",
                                                  f"hydra.run.dir={run_dir}", "trainer.max_epochs=1",
                                                  f"paths.cache_dir={tmp_path / 'cache'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["strategy"] == "qlora" and V2_KEYS <= metrics.keys() and metrics["params_4bit"] > 0
    assert "random-init weights" in result.stdout and str(run_dir) in result.stdout  # the end-of-run summary

