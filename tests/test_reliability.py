"""Crash and resume, no lost results, non-finite losses, and refusing to overwrite a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import compose_config, subprocess_env
from flan_squad.utils.config import PROJECT_ROOT
from flan_squad.utils.errors import RunDirError, TrainingError
from flan_squad.utils.files import write_dir_atomic, write_json_atomic
from flan_squad.runs.results import prepare_run_dir
from flan_squad.train import train

TESTS = Path(__file__).parent
# 32 questions in batches of 4: 8 steps an epoch, 16 in all; a rolling last.ckpt after every step.
RUN = ["experiment=smoke", "strategy=lora", "dataset=squad_v1", "dataset.limit_train=32", "dataset.batch_size=4",
       "dataset.limit_val=8", "trainer.max_epochs=2", "callbacks.last_checkpoint.every_n_train_steps=1"]


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "flan_squad.train", *RUN, *args]


def _env() -> dict:
    return subprocess_env(PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


def test_killed_run_resumes_to_the_same_result(tmp_path, cache_dir, run_entry_point):
    run_dir, marker = tmp_path / "killed", tmp_path / "step"
    args = [f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}"]
    slow = ["+callbacks.slow._target_=fault_injection.SlowSteps", f"+callbacks.slow.marker={marker}"]
    process = subprocess.Popen(_command(args + slow), cwd=PROJECT_ROOT, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (marker.exists() and marker.read_text().strip().isdigit() and int(marker.read_text()) >= 11):
        assert process.poll() is None, f"run ended before it could be killed: {process.stderr.read()[-2000:]}"
        assert time.time() < deadline, "run never reached step 11"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # mid-epoch 2 (steps 8-15), no chance to clean up
    process.wait()
    assert not (run_dir / "metrics.json").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()

    # The killed process is the only one that must be real: the rest run the same command line in this process.
    refused = run_entry_point("flan_squad.train", RUN + args)
    assert refused.returncode != 0 and "already holds results" in refused.stderr.splitlines()[-1]
    assert "Traceback" not in refused.stderr

    resumed = run_entry_point("flan_squad.train", RUN + args + ["resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 16 and metrics["epochs"] == 2
    assert 4 * 2 <= metrics["train_examples_seen"] < 32  # only what was left of epoch 2 was trained again
    assert metrics["resumed_from"].endswith("last.ckpt")

    # The same run without the interruption: same data order, dropout and optimizer state give the same adapter.
    cfg = compose_config(RUN, output_dir=tmp_path / "uninterrupted", cache=cache_dir)
    reference = train(cfg)
    assert reference["optimizer_steps"] == 16
    resumed_weights = load_file(run_dir / "model" / "adapter_model.safetensors")
    reference_weights = load_file(tmp_path / "uninterrupted" / "model" / "adapter_model.safetensors")
    assert resumed_weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        assert (resumed_weights[name] - tensor).abs().max() < 1e-6, name
    assert (json.loads((run_dir / "predictions.json").read_text())
            == json.loads((tmp_path / "uninterrupted" / "predictions.json").read_text()))


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
    (tmp_path / "checkpoints" / "last.ckpt").write_text("x")
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
