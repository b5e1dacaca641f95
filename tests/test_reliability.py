"""Crash and resume, no lost results, non-finite losses, and refusing to overwrite a run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import compose_config, subprocess_env
from flan_squad.runs.lifecycle import prepare_run_dir
from flan_squad.train import train
from flan_squad.utils.config import PROJECT_ROOT
from flan_squad.utils.errors import RunDirError, TrainingError
from flan_squad.utils.files import write_dir_atomic, write_json_atomic

TESTS = Path(__file__).parent
# 32 questions in batches of 4: 8 steps an epoch, 16 in all; a rolling last.ckpt after every step.
RUN = ["experiment=smoke", "strategy=lora", "dataset=squad_v1", "dataset.limit_train=32", "dataset.batch_size=4",
       "dataset.limit_val=8", "trainer.max_epochs=2", "callbacks.last_checkpoint.every_n_train_steps=1"]


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "flan_squad.train", *RUN, *args]


def _env() -> dict:
    return subprocess_env(PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


# A model that learns (the learning check's task, fp32, with dropout so that the random state matters): 256 questions
# in batches of 16, 16 steps an epoch; last.ckpt every 4 steps. Killed as step 22 starts (epoch 2, its 7th batch):
# last.ckpt holds step 20, and steps 20-21 are lost with the process.
LEARNS = ["experiment=learning_check", "strategy=full", "strategy.lr=1e-2", "dataset.limit_train=256",
          "dataset.limit_val=50", "trainer.max_epochs=2", "trainer.precision=32-true", "logger=csv",
          "model.architecture.dropout_rate=0.1", "callbacks.last_checkpoint.every_n_train_steps=4"]


def test_killed_mid_epoch_run_resumes_to_the_uninterrupted_weights_and_answers(tmp_path, cache_dir, run_entry_point):
    run_dir = tmp_path / "killed"
    args = [f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}"]
    kill = ["+callbacks.kill._target_=fault_injection.KillAtStep", "+callbacks.kill.step=22"]
    killed = subprocess.run([sys.executable, "-m", "flan_squad.train", *LEARNS, *args, *kill], cwd=PROJECT_ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    import torch

    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20
    assert not (run_dir / "metrics.json").exists()

    # The killed process is the only one that must be real: the rest run the same command line in this process.
    refused = run_entry_point("flan_squad.train", LEARNS + args)
    assert refused.returncode == 2 and "already holds results" in refused.stderr.splitlines()[-1]
    resumed = run_entry_point("flan_squad.train", LEARNS + args + kill + ["resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["optimizer_steps"], metrics["epochs"], metrics["train_examples_seen"]) == (32, 2, 12 * 16)
    assert metrics["resumed_from"].endswith("last.ckpt")

    # The same run without the interruption: same batches, dropout masks, optimizer and schedule give the same weights.
    reference_dir = tmp_path / "uninterrupted"
    reference = train(compose_config(LEARNS, output_dir=reference_dir, cache=cache_dir))
    with open(reference_dir / "csv" / "metrics.csv", newline="") as f:
        val_losses = [float(row["val/loss"]) for row in csv.DictReader(f) if row.get("val/loss")]
    # It learned (validation loss 1.6 after 2 epochs, measured; ln(32128) = 10.4 untrained): its answers depend
    # on its weights (F1 4 here, 0 untrained).
    assert val_losses[-1] < 3, val_losses
    for name in ("checkpoints/last.ckpt", f"{metrics['best_checkpoint']}"):  # the final weights, and the best
        resumed_weights = torch.load(run_dir / name, weights_only=True)["state_dict"]
        reference_weights = torch.load(reference_dir / name, weights_only=True)["state_dict"]
        assert resumed_weights.keys() == reference_weights.keys()
        for key, tensor in reference_weights.items():
            assert (resumed_weights[key] - tensor).abs().max() <= 1e-6, (name, key)
    for name in ("model/model.safetensors",):
        resumed_weights, reference_weights = load_file(run_dir / name), load_file(reference_dir / name)
        assert all((resumed_weights[k] - t).abs().max() <= 1e-6 for k, t in reference_weights.items())
    assert (json.loads((run_dir / "predictions.json").read_text())
            == json.loads((reference_dir / "predictions.json").read_text()))
    assert metrics["f1"] == reference["f1"] and metrics["best_checkpoint"] == reference["best_checkpoint"]


# A crash in this process (cheaper than a killed subprocess, which the test above covers): 24 questions in batches
# of 4, 6 steps; last.ckpt after every step; the crash as step 4 starts leaves last.ckpt at step 4 (steps 0-3 done).
CRASH = ["+callbacks.crash._target_=fault_injection.CrashAtStep", "+callbacks.crash.step=4"]
SHORT = ["experiment=smoke", "strategy=full", "dataset=squad_v1", "dataset.limit_train=24", "dataset.batch_size=4",
         "dataset.limit_val=4", "trainer.max_epochs=1", "trainer.precision=32-true", "logger=none",
         "eval.max_new_tokens=4", "callbacks.last_checkpoint.every_n_train_steps=1"]


def _assert_same_tensors(resumed, reference, where: str = "") -> None:
    """Every tensor in two nested checkpoint structures equal (to 1e-6), and the structures alike."""
    import torch

    if isinstance(reference, dict):
        assert resumed.keys() == reference.keys(), where
        for key in reference:
            _assert_same_tensors(resumed[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, (list, tuple)):
        assert len(resumed) == len(reference), where
        for i, (a, b) in enumerate(zip(resumed, reference)):
            _assert_same_tensors(a, b, f"{where}[{i}]")
    elif torch.is_tensor(reference):
        assert resumed.dtype == reference.dtype and (resumed.double() - reference.double()).abs().max() <= 1e-6, where
    else:
        assert resumed == reference, where


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit", "adafactor"])
def test_each_optimizer_resumes_to_the_uninterrupted_weights_and_state(optimizer, tmp_path, cache_dir):
    import torch

    from fault_injection import InjectedCrash

    args = [*SHORT, f"optimizer={optimizer}"]
    with pytest.raises(InjectedCrash):
        train(compose_config(args + CRASH, output_dir=tmp_path / "crashed", cache=cache_dir))
    assert torch.load(tmp_path / "crashed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = train(compose_config(args + CRASH + ["resume=true"], output_dir=tmp_path / "crashed", cache=cache_dir))
    reference = train(compose_config(args, output_dir=tmp_path / "reference", cache=cache_dir))
    assert resumed["resumed_from"] and resumed["optimizer_steps"] == reference["optimizer_steps"] == 6
    assert resumed["optimizer"] == reference["optimizer"] and resumed["optimizer_state_mb"] > 0
    last = [torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (tmp_path / "crashed",
                                                                                     tmp_path / "reference")]
    _assert_same_tensors(last[0]["state_dict"], last[1]["state_dict"], "weights")
    # the optimizer's own state (8-bit moments and their scales, Adafactor's factored moments) went on exactly
    _assert_same_tensors(last[0]["optimizer_states"], last[1]["optimizer_states"], "optimizer")


def test_early_stopping_count_survives_a_crash_and_resume(tmp_path, cache_dir):
    # A random-init model whose answers stay wrong: val/f1 is 0 after every epoch, so with patience 2 training stops
    # after its third epoch (the first sets the best, the next two do not beat it). 8 questions in batches of 4: 2
    # steps an epoch. The crash as step 5 starts (the third epoch's second) resumes from the checkpoint written after
    # step 4, when the second epoch's validation had counted one epoch without improvement: the resumed run must stop
    # where the uninterrupted one does, not count from 0 again (which would train two more epochs).
    import torch

    from fault_injection import InjectedCrash

    args = [*SHORT, "dataset.limit_train=8", "trainer.max_epochs=8", "callbacks=early_stopping",
            "callbacks.early_stopping.patience=2"]
    reference = train(compose_config(args, output_dir=tmp_path / "reference", cache=cache_dir))
    assert reference["stopped_early"] and (reference["epochs"], reference["optimizer_steps"]) == (3, 6)
    crash = [*CRASH[:1], "+callbacks.crash.step=5"]
    with pytest.raises(InjectedCrash):
        train(compose_config(args + crash, output_dir=tmp_path / "crashed", cache=cache_dir))
    saved = torch.load(tmp_path / "crashed" / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("EarlyStopping")]
    assert saved["global_step"] == 5 and state["wait_count"] == 1
    resumed = train(compose_config(args + crash + ["resume=true"], output_dir=tmp_path / "crashed", cache=cache_dir))
    assert resumed["stopped_early"] and (resumed["epochs"], resumed["optimizer_steps"]) == (3, 6)


def test_the_loader_position_skips_only_what_its_epoch_trained_on():
    from flan_squad.data.sampler import LengthGroupedSampler, LoaderPosition, ResumableDataLoader

    def loader(position: LoaderPosition, epoch: int) -> ResumableDataLoader:
        sampler = LengthGroupedSampler([1] * 10, batch_size=2, seed=0)
        sampler.set_epoch(epoch)  # as Lightning does before each epoch
        return ResumableDataLoader(list(range(10)), batch_size=2, sampler=sampler, position=position)

    epoch_1 = [batch.tolist() for batch in loader(LoaderPosition(), 1)]
    saved = LoaderPosition()
    for i, _ in enumerate(loader(saved, 1)):
        if i == 2:  # a checkpoint written after the third batch of epoch 1
            break
    resumed = LoaderPosition()
    resumed.load_state_dict(saved.state_dict())
    assert [batch.tolist() for batch in loader(resumed, 1)] == epoch_1[3:]
    # after an epoch's last batch (also one cut short by trainer.limit_train_batches) the next epoch runs whole
    resumed.load_state_dict({"epoch": 1, "batches_yielded": 3})
    assert len(list(loader(resumed, 2))) == 5


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
    cfg = compose_config(RUN + ["+callbacks.poison._target_=fault_injection.PoisonWeightsAtStep",
                                "+callbacks.poison.step=5"], output_dir=tmp_path, cache=cache_dir)
    with pytest.raises(TrainingError, match=r"non-finite training loss \(nan\) at step 5 \(epoch 0, batch 5\)"):
        train(cfg)
    import torch
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5  # written after step 4 (the 5th): all of it finite
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not (tmp_path / "metrics.json").exists()


# --- run dirs: refuse to overwrite, resume only what can be resumed -------------------------------------


def test_new_run_into_a_dir_with_results_is_refused(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(RunDirError, match="already holds results \\(metrics.json\\).*overwrite=true"):
        prepare_run_dir(tmp_path, resume=False, ckpt_path=None, overwrite=False)
    assert (tmp_path / "metrics.json").read_text() == "{}"  # untouched


def test_overwrite_clears_old_results(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_text("x")
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert prepare_run_dir(tmp_path, resume=False, ckpt_path=None, overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_needs_a_checkpoint_and_an_unfinished_run(tmp_path):
    with pytest.raises(RunDirError, match="nothing to resume: no checkpoint at .*last.ckpt"):
        prepare_run_dir(tmp_path, resume=True, ckpt_path=None, overwrite=False)
    (tmp_path / "checkpoints").mkdir()
    import torch

    torch.save({"global_step": 1}, tmp_path / "checkpoints" / "last.ckpt")
    assert prepare_run_dir(tmp_path, resume=True, ckpt_path=None, overwrite=False).endswith("last.ckpt")
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(RunDirError, match="finished run"):
        prepare_run_dir(tmp_path, resume=True, ckpt_path=None, overwrite=False)


# --- atomic writes -----------------------------------------------------------------------------------


class _Boom(Exception):
    pass


def test_json_write_is_all_or_nothing(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"f1": 1.0})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        write_json_atomic(path, {"f1": 2.0, "bad": Unserialisable()})  # fails halfway through dumping
    assert json.loads(path.read_text()) == {"f1": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # readable like any other file


def test_dir_write_is_all_or_nothing(tmp_path):
    target = tmp_path / "model"
    write_dir_atomic(target, lambda d: (d / "weights").write_text("old"))

    def fail_halfway(d: Path):
        (d / "weights").write_text("half")
        raise _Boom

    with pytest.raises(_Boom):
        write_dir_atomic(target, fail_halfway)
    assert (target / "weights").read_text() == "old"
    write_dir_atomic(target, lambda d: (d / "weights").write_text("new"))
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)  # mkdtemp's mode would hide it from other users
