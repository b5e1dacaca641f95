"""Multi-process training (DDP on CPU with gloo) and the scale-out configs (GPU, FSDP, SLURM launcher)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoModelForSeq2SeqLM

from conftest import compose_config, subprocess_env
from flan_squad.evaluate import evaluate
from flan_squad.utils.config import PROJECT_ROOT, compose

# 2 processes (gloo), 4 steps an epoch (32 questions, 2 x 4 a step), 2 epochs; 13 validation questions, so the
# distributed sampler pads one duplicate. fp32 also where bf16 is native: each process batches other questions than one
# process does, and bf16 rounding depends on that. last.ckpt only at each epoch's validation, unless an interruption
# writes one.
DDP = ["experiment=smoke", "strategy=lora", "dataset=squad_v2", "dataset.limit_train=32", "dataset.batch_size=4",
       "dataset.limit_val=13", "trainer.max_epochs=2", "trainer.precision=32-true", "eval.max_new_tokens=8",
       "callbacks.last_checkpoint.every_n_train_steps=100", "logger=none", "trainer=ddp", "trainer.accelerator=cpu",
       "trainer.devices=2"]


def _train_ddp(run_dir, cache_dir, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flan_squad.train", *DDP, f"paths.cache_dir={cache_dir}",
                           f"hydra.run.dir={run_dir}", *more],
                          cwd=PROJECT_ROOT, env=_fault_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cache_dir):
    """An uninterrupted DDP run, and what it printed."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = _train_ddp(run_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.mark.long
def test_ddp_scores_every_question_once_and_matches_one_process(ddp_run, tmp_path, cache_dir):
    run_dir, result = ddp_run
    assert [p.name for p in run_dir.parent.iterdir()] == ["run"]  # the second process wrote into the same run dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    predictions = json.loads((run_dir / "predictions.json").read_text())
    assert metrics["total"] == metrics["val_examples"] == len(predictions) == 13
    assert metrics["train_examples_seen"] == 64 and metrics["optimizer_steps"] == 8  # 2 x 4 a step, 2 x 4 steps
    assert result.stdout.count("flan-squad · lora") == 1  # one summary: only rank 0 reports

    # The same trained adapter, restored and evaluated in one process, gives the same answers and scores.
    same = ["experiment=smoke", "strategy=lora", "dataset=squad_v2", "dataset.limit_val=13",
            "trainer.precision=32-true", "eval.max_new_tokens=8"]
    cfg = compose_config([*same, f"run_dir={run_dir}", "trainer=cpu"], output_dir=tmp_path / "single",
                         cache=cache_dir, config_name="evaluate")
    single = evaluate(cfg)
    assert json.loads((tmp_path / "single" / "predictions.json").read_text()) == predictions
    assert single["exact"] == metrics["exact"] and single["f1"] == metrics["f1"] and single["total"] == 13
    assert single["best_f1"] == metrics["best_f1"]


@pytest.mark.long
def test_ddp_stopped_by_sigterm_checkpoints_the_step_on_every_process_and_resumes_to_the_same_run(ddp_run, tmp_path,
                                                                                                    cache_dir):
    # SIGTERM to rank 0 alone as step 5 starts (epoch 2): Lightning passes it on to the other process.
    sigterm = ["+callbacks.sigterm._target_=fault_injection.SignalAtStep",
               f"+callbacks.sigterm.signum={int(signal.SIGTERM)}", "+callbacks.sigterm.step=5",
               "+callbacks.sigterm.rank=0"]
    stopped = _train_ddp(tmp_path / "run", cache_dir, *sigterm)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["step"] == 6  # the end of step 5, not the step-4 checkpoint
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6
    assert not (tmp_path / "run" / "metrics.json").exists()

    resumed = _train_ddp(tmp_path / "run", cache_dir, *sigterm, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = ddp_run[0]
    metrics = {run: json.loads((run / "metrics.json").read_text()) for run in (tmp_path / "run", whole)}
    assert metrics[tmp_path / "run"]["train_examples_seen"] == (8 - 6) * 8  # the resumed attempt trained steps 6, 7
    for name in ("predictions.json", "model/adapter_model.safetensors"):
        assert (tmp_path / "run" / name).read_bytes() == (whole / name).read_bytes(), name
    assert metrics[tmp_path / "run"]["best_checkpoint"] == metrics[whole]["best_checkpoint"]


def _fault_env() -> dict:
    return subprocess_env(PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))


def _fsdp_run(run_dir, cache_dir, *overrides: str) -> dict:
    """trainer=fsdp through the entry point on 2 CPU processes (gloo): Lightning allows FSDP on GPUs only, so the
    strategy is the shipped one made CPU-capable (tests/fsdp_cpu.py), with a probe inside (`ShardProbe`). A collective
    that waits 5 minutes (torch's default: 30) fails the run."""
    result = subprocess.run(
        [sys.executable, "-m", "flan_squad.train", "experiment=smoke", "trainer=fsdp", "trainer.accelerator=cpu",
         "trainer.devices=2", "trainer.strategy._target_=fsdp_cpu.cpu_t5_fsdp_strategy",
         "+trainer.strategy.timeout_s=300",
         "+callbacks.probe._target_=fsdp_cpu.ShardProbe", "dataset.limit_train=16", "dataset.limit_val=8",
         "trainer.max_epochs=1", "eval.max_new_tokens=4", *overrides, f"paths.cache_dir={cache_dir}",
         f"hydra.run.dir={run_dir}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
        env=subprocess_env(PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "tests")])))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 1 and metrics["train_examples_seen"] == 16 and metrics["total"] == 8
    # The best checkpoint was validated on a rebuilt model: the fit's optimizer (its state: twice the trainable
    # parameters) was let go before, or it would sit beside the new model through the final validation.
    alive = json.loads((run_dir / "shard_probe.json").read_text())
    assert alive["fit"]["optimizers"] >= 1 and alive["validate"]["optimizers"] == 0, alive
    return metrics


@pytest.mark.long
def test_fsdp_clips_gradients_and_saves_the_whole_model(tmp_path, cache_dir, tiny_base):
    # Clipping at 1.0 (the default) is what raised at the first step; the model saved from sharded weights must be the
    # whole trained model (not the weights it started from), and metrics.json count all of it, not one process's shard.
    run_dir = tmp_path / "fsdp"
    metrics = _fsdp_run(run_dir, cache_dir, "strategy=full", "trainer.gradient_clip_val=1.0")
    model = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "model")
    saved = model.state_dict()
    trained = torch.load(run_dir / metrics["best_checkpoint"], weights_only=True)["state_dict"]
    assert saved and all(torch.equal(value, trained[f"model.{name}"]) for name, value in saved.items())
    initial = tiny_base.load().state_dict()  # the run's base: experiment=smoke's t5-tiny, built in the same cache
    assert saved.keys() == initial.keys() and any(not torch.equal(saved[k], initial[k]) for k in saved)
    whole = sum(p.numel() for p in model.parameters())
    assert metrics["total_params"] == metrics["trainable_params"] == whole


@pytest.mark.long
def test_fsdp_lora_keeps_its_trained_adapters_and_ranks_generate_in_step(tmp_path, cache_dir, tiny_base):
    # LoRA's checkpoints keep the trainable parameters only: found by their names, which under FSDP carry its
    # wrappers' prefix while the checkpoint's keys do not (every adapter was dropped: validation and model/ then used
    # untrained ones). Rank 1's answers end at once (ShardProbe) while rank 0's go on: every forward pass gathers
    # weights from both, so rank 1 keeps stepping (synced generation) or rank 0 waits forever.
    from safetensors.torch import load_file

    from conftest import make_strategy
    from flan_squad.models.base import count_parameters

    run_dir = tmp_path / "fsdp_lora"
    metrics = _fsdp_run(run_dir, cache_dir, "strategy=lora")
    best = torch.load(run_dir / metrics["best_checkpoint"], weights_only=True)["state_dict"]
    adapters = {k: v for k, v in best.items() if ".lora_" in k}
    assert adapters and set(best) == set(adapters)  # the adapters, and only they
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if ".lora_B." in k)  # trained: LoRA's B starts at 0
    counts = count_parameters(make_strategy("lora").build(tiny_base, torch.device("cpu")))
    assert (metrics["trainable_params"], metrics["total_params"]) == (counts["trainable_params"],
                                                                      counts["total_params"])
    saved = load_file(run_dir / "model" / "adapter_model.safetensors")  # saved inside FSDP's gather
    assert {f"model.{k}".replace(".weight", ".default.weight") for k in saved} == set(adapters)
    assert all(torch.equal(v, adapters[f"model.{k}".replace(".weight", ".default.weight")]) for k, v in saved.items())


def test_scale_out_configs_compose(tmp_path):
    ddp = compose_config(["trainer=ddp"], output_dir=tmp_path)
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.devices == 2
    fsdp = compose_config(["trainer=fsdp", "model=flan_t5_large"], output_dir=tmp_path)
    strategy = instantiate(fsdp.trainer.strategy)
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.t5.modeling_t5 import T5Block
    assert isinstance(strategy, FSDPStrategy) and fsdp.trainer.accelerator == "gpu"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {T5Block}
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    slurm = compose("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = slurm.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 720
