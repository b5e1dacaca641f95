"""SIGTERM and SIGINT during training (a scheduler's time limit or preemption, Ctrl-C): a resumable checkpoint,
status.json "interrupted" with the step, exit 143 / 130, never 0; resume=true then finishes the run."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch

from flan_squad.utils.config import PROJECT_ROOT
from test_reliability import RUN, _command, _env


def _checkpoint_step(run_dir) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


@pytest.mark.long
def test_sigterm_saves_a_checkpoint_says_interrupted_exits_143_and_resumes(tmp_path, cache_dir, run_entry_point):
    run_dir, marker = tmp_path / "run", tmp_path / "step"
    # A rolling checkpoint every 4 steps: the one at the signal's step is the interruption's own.
    args = [f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}",
            "callbacks.last_checkpoint.every_n_train_steps=4"]
    slow = ["+callbacks.slow._target_=fault_injection.SlowSteps", f"+callbacks.slow.marker={marker}"]
    process = subprocess.Popen(_command(args + slow), cwd=PROJECT_ROOT, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (marker.exists() and marker.read_text().strip().isdigit() and int(marker.read_text()) >= 5):
        assert process.poll() is None, f"run ended before the signal: {process.stderr.read()[-2000:]}"
        assert time.time() < deadline, "run never reached step 5"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # mid-epoch 1, as SLURM or Kubernetes stop a job
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 143, stderr[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    step = status["step"]
    assert status["status"] == "interrupted" and status["signal"] == "SIGTERM" and status["exit_code"] == 143
    assert 6 <= step < 16
    assert _checkpoint_step(run_dir) == step and status["checkpoint"].endswith("checkpoints/last.ckpt")
    assert stderr.splitlines()[-1] == f"error: interrupted by SIGTERM at step {step}: continue with resume=true"
    assert not (run_dir / "metrics.json").exists()

    resumed = run_entry_point("flan_squad.train", RUN + args + slow + ["resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 16 and metrics["train_examples_seen"] == (16 - step) * 4
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


@pytest.mark.long
def test_sigint_stops_a_sweep_job_at_a_step_with_130_and_the_sweep_with_it(tmp_path, cache_dir, run_entry_point):
    # In this process: the callback sends SIGINT (Ctrl-C) to it as step 3 starts; the sweep's second job never runs.
    sweep = tmp_path / "sweep"
    before = signal.getsignal(signal.SIGINT)
    args = [f"paths.cache_dir={cache_dir}", "callbacks.last_checkpoint.every_n_train_steps=100"]
    ctrl_c = ["+callbacks.sigint._target_=fault_injection.SignalAtStep",
              f"+callbacks.sigint.signum={int(signal.SIGINT)}", "+callbacks.sigint.step=3"]
    result = run_entry_point("flan_squad.train", ["-m", *RUN, *args, *ctrl_c, "strategy.lr=1e-3,3e-3",
                                                  f"hydra.sweep.dir={sweep}"])
    assert result.returncode == 130, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0"]
    status = json.loads((sweep / "0" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == "SIGINT" and status["step"] == 4
    assert status["job_num"] == 0 and _checkpoint_step(sweep / "0") == 4
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C does what it did before the run

    resumed = run_entry_point("flan_squad.train", RUN + args + ctrl_c + ["strategy.lr=1e-3",
                                                                         f"hydra.run.dir={sweep / '0'}", "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((sweep / "0" / "metrics.json").read_text())["optimizer_steps"] == 16
