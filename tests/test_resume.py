"""What a resume continues with: the run's own config (a change to what it computes is refused, or recorded with
resume=force), a fresh start for a run stopped before its first checkpoint, and the validation an interruption
cut short, redone."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from flan_squad.runs.lifecycle import Run
from flan_squad.runs.resume import RESUMABLE_CHANGES, requeued, resume_mode
from flan_squad.utils.errors import ConfigError, RunDirError, RunInterrupted

SMOKE = ["experiment=smoke", "strategy=full", "dataset=squad_v1"]


@pytest.fixture(autouse=True)
def _rank_zero(monkeypatch):
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(variable, raising=False)


def _interrupted_run(run_dir: Path, overrides: list[str], checkpoint: bool = True) -> dict[str, bytes]:
    """What an interrupted run of `overrides` leaves in `run_dir` (its config.yaml, and a last.ckpt unless the run
    stopped before its first); returns the files, to compare with what is there later."""
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(compose_config(overrides, output_dir=run_dir), run_dir / "config.yaml", resolve=True)
    (run_dir / "status.json").write_text('{"status": "interrupted"}')
    if checkpoint:
        (run_dir / "checkpoints").mkdir()
        torch.save({"global_step": 4}, run_dir / "checkpoints" / "last.ckpt")
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


# --- a resume continues with the run's own config ------------------------------------------------------------


def test_a_resume_that_changes_what_the_run_computes_is_refused_naming_each_key(tmp_path):
    run_dir = tmp_path / "run"
    before = _interrupted_run(run_dir, SMOKE)
    changed = SMOKE + ["dataset=squad_v2", "strategy.lr=1e-2", "trainer.max_epochs=5", "resume=true"]
    with pytest.raises(ConfigError) as refused, Run(compose_config(changed, output_dir=run_dir)) as run:
        run.start(resume=True)
    message = str(refused.value)
    assert "\n" not in message and "resume=force" in message and str(run_dir / "config.yaml") in message
    assert "dataset.name: squad_v1 -> squad_v2" in message and "strategy.lr: 5e-05 -> 0.01" in message
    assert "dataset.version: v1 -> v2" in message
    assert "trainer.max_epochs" not in message  # training longer is a resume, not another run
    after = {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    assert after == before  # refused: nothing written


def test_a_resume_that_only_extends_or_observes_the_run_is_accepted(tmp_path):
    run_dir = tmp_path / "run"
    _interrupted_run(run_dir, SMOKE)
    extended = SMOKE + ["trainer.max_epochs=5", "logger=csv", "callbacks.progress_bar.refresh_rate=50",
                        "callbacks.last_checkpoint.every_n_train_steps=7", "dataset.num_workers=2", "resume=true"]
    with Run(compose_config(extended, output_dir=run_dir)) as run:
        assert run.start(resume=True).endswith("last.ckpt")
        assert run.config_changes == []
        run.complete({"f1": 1.0}, {}, None, "")
    assert OmegaConf.load(run_dir / "config.yaml").trainer.max_epochs == 5
    assert "config_changes" not in json.loads((run_dir / "status.json").read_text())
    assert {"trainer.max_epochs", "logger", "paths"} <= set(RESUMABLE_CHANGES)  # the documented list


def test_resume_force_continues_and_every_later_attempt_records_the_change(tmp_path):
    run_dir = tmp_path / "run"
    _interrupted_run(run_dir, SMOKE)
    changed = SMOKE + ["strategy.lr=1e-2"]
    with pytest.raises(RunInterrupted), Run(compose_config(changed, output_dir=run_dir)) as run:
        assert run.start(resume="force").endswith("last.ckpt")
        raise RunInterrupted(signal.SIGTERM, 5, str(run_dir / "checkpoints" / "last.ckpt"))
    change = [{"key": key, "old": 5e-05, "new": 0.01} for key in ("optimizer.lr", "strategy.lr")]  # as resolved
    assert json.loads((run_dir / "status.json").read_text())["config_changes"] == change
    with Run(compose_config(changed, output_dir=run_dir)) as run:  # resumed again, with the config it now has
        run.start(resume=True)
        assert run.config_changes == change
        run.complete({"f1": 1.0}, {}, None, "")
    assert json.loads((run_dir / "status.json").read_text())["config_changes"] == change
    with pytest.raises(ConfigError, match="resume=maybe: must be true, false or force"):
        resume_mode("maybe")


# --- resume=true before the first checkpoint -------------------------------------------------------------------


def test_resume_true_starts_again_a_run_stopped_before_its_first_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _interrupted_run(run_dir, SMOKE, checkpoint=False)
    (run_dir / "tensorboard").mkdir()
    (run_dir / "checkpoints").mkdir()  # Lightning creates it as training starts
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued SLURM job resumes as resume=true does
    assert requeued(run_dir)
    with Run(compose_config(SMOKE, output_dir=run_dir)) as run:
        assert run.start(resume=requeued(run_dir)) is None  # a fresh start
        assert not any((run_dir / name).exists() for name in ("tensorboard", "checkpoints", "status.json"))  # aside
        run.complete({"f1": 1.0}, {}, None, "")
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"

    for name, content in (("empty", None), ("finished", "{}")):  # no trace of a run, or a finished one: refused
        other = tmp_path / name
        other.mkdir()
        if content:
            OmegaConf.save(compose_config(SMOKE, output_dir=other), other / "config.yaml")
            (other / "metrics.json").write_text(content)
        refusal = "nothing to resume" if name == "empty" else "finished run"
        with pytest.raises(RunDirError, match=refusal), Run(compose_config(SMOKE, output_dir=other)) as run:
            run.start(resume=True)


# 24 questions in batches of 4: 6 steps; last.ckpt after every step; the crash as step 4 starts leaves it at step 4.
SHORT = ["experiment=smoke", "strategy=full", "dataset=squad_v1", "dataset.limit_train=24", "dataset.batch_size=4",
         "dataset.limit_val=4", "trainer.max_epochs=1", "trainer.precision=32-true", "logger=none",
         "eval.max_new_tokens=4", "callbacks.last_checkpoint.every_n_train_steps=1"]
CRASH = ["+callbacks.crash._target_=fault_injection.CrashAtStep", "+callbacks.crash.step=4"]


def test_through_the_entry_point_a_changed_resume_is_refused_and_a_forced_one_recorded(tmp_path, cache_dir,
                                                                                      run_entry_point):
    run_dir = tmp_path / "run"
    args = SHORT + [f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}"]
    assert run_entry_point("flan_squad.train", args + CRASH).returncode != 0
    changed = ["dataset=squad_v2", "strategy.lr=1e-2"]
    refused = run_entry_point("flan_squad.train", args + CRASH + ["resume=true", *changed])
    line = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and "dataset.name: squad_v1 -> squad_v2" in line, refused.stderr[-2000:]
    assert "strategy.lr: 5e-05 -> 0.01" in line and not (run_dir / "metrics.json").exists()

    forced = run_entry_point("flan_squad.train", args + CRASH + ["resume=force", "strategy.lr=1e-2"])
    assert forced.returncode == 0, forced.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    status = json.loads((run_dir / "status.json").read_text())
    change = {"key": "strategy.lr", "old": 5e-05, "new": 0.01}
    assert change in metrics["config_changes"] and status["config_changes"] == metrics["config_changes"]
    assert metrics["resumed_from"].endswith("last.ckpt") and metrics["optimizer_steps"] == 6


# --- validation interrupted is validation redone ---------------------------------------------------------------

# 32 questions in batches of 8: 4 steps an epoch, 3 epochs; fp32, dropout on (t5_tiny's 0.1), last.ckpt after every
# step. Every validated epoch keeps its checkpoint (save_top_k=-1), so a test sees which epochs a run validated and
# with which weights.
EPOCHS = ["experiment=smoke", "strategy=full", "dataset=squad_v1", "dataset.limit_train=32", "dataset.batch_size=8",
          "dataset.limit_val=4", "trainer.max_epochs=3", "trainer.precision=32-true", "logger=none",
          "eval.max_new_tokens=4", "callbacks.last_checkpoint.every_n_train_steps=1",
          "callbacks.model_checkpoint.save_top_k=-1"]
CRASH_IN_VALIDATION = ["+callbacks.crash._target_=fault_injection.CrashInValidation"]


def _checkpoints(run_dir: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted((run_dir / "checkpoints").glob("*.ckpt"))}


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir) -> tuple[Path, dict]:
    from flan_squad.train import train

    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_dir, train(compose_config(EPOCHS, output_dir=run_dir, cache=cache_dir))


@pytest.mark.long
def test_a_run_killed_in_validation_validates_that_epoch_first_when_resumed(uninterrupted, tmp_path, cache_dir):
    # Killed as epoch 0's validation begins: last.ckpt holds the epoch's last step, written before the validation.
    from safetensors.torch import load_file

    from fault_injection import InjectedCrash
    from flan_squad.train import train

    reference_dir, reference = uninterrupted
    args = EPOCHS + CRASH_IN_VALIDATION + ["+callbacks.crash.epoch=0"]
    with pytest.raises(InjectedCrash):
        train(compose_config(args, output_dir=tmp_path, cache=cache_dir))
    assert [name for name in _checkpoints(tmp_path)] == ["last.ckpt"]
    resumed = train(compose_config(args + ["resume=true"], output_dir=tmp_path, cache=cache_dir))

    ours, theirs = _checkpoints(tmp_path), _checkpoints(reference_dir)
    assert set(ours) == set(theirs) == {"last.ckpt", "best-epoch0-step4.ckpt", "best-epoch1-step8.ckpt",
                                        "best-epoch2-step12.ckpt"}  # every epoch validated, as uninterrupted
    for name in theirs:
        assert _same_weights(ours[name]["state_dict"], theirs[name]["state_dict"]), name
    assert resumed["best_checkpoint"] == reference["best_checkpoint"]
    model, reference_model = load_file(tmp_path / "model/model.safetensors"), load_file(
        reference_dir / "model/model.safetensors")
    assert _same_weights(model, reference_model)
    assert (tmp_path / "predictions.json").read_text() == (reference_dir / "predictions.json").read_text()
    assert (resumed["f1"], resumed["exact"]) == (reference["f1"], reference["exact"])


@pytest.mark.long
def test_a_best_checkpoint_gone_since_last_ckpt_is_forgotten_in_one_line(tmp_path, cache_dir, caplog):
    # Killed in epoch 1's validation after it had replaced epoch 0's best checkpoint (deleted here): last.ckpt, written
    # before that validation, still names epoch 0's. The resumed run says so, validates epoch 1 again, and ends with
    # a best checkpoint that exists.
    from fault_injection import InjectedCrash
    from flan_squad.train import train

    args = [*EPOCHS[:-1], *CRASH_IN_VALIDATION, "+callbacks.crash.epoch=1"]  # save_top_k=1: one best on disk
    with pytest.raises(InjectedCrash):
        train(compose_config(args, output_dir=tmp_path, cache=cache_dir))
    (tmp_path / "checkpoints" / "best-epoch0-step4.ckpt").unlink()
    resumed = train(compose_config(args + ["resume=true"], output_dir=tmp_path, cache=cache_dir))
    (line,) = [r.getMessage() for r in caplog.records if "best-epoch0-step4.ckpt" in r.getMessage()]
    assert "is gone" in line and "\n" not in line
    assert (tmp_path / resumed["best_checkpoint"]).is_file()
    assert resumed["best_checkpoint"] != "checkpoints/best-epoch0-step4.ckpt"


@pytest.mark.long
def test_how_often_a_run_validates_does_not_change_what_it_trains(uninterrupted, tmp_path, cache_dir):
    from flan_squad.train import train

    reference_dir, _ = uninterrupted
    train(compose_config(EPOCHS + ["+trainer.check_val_every_n_epoch=3"], output_dir=tmp_path, cache=cache_dir))
    last = [torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
            for d in (tmp_path, reference_dir)]
    assert _same_weights(*last)


# --- checkpoints written whole -----------------------------------------------------------------------------------

# A process killed halfway through moving a checkpoint's bytes from the system's temp dir onto last.ckpt, as happens
# when the temp dir (here /dev/shm) and the run dir are different filesystems (Lightning's own save does this).
KILLED_WRITING = """
import os, shutil, signal, sys, torch

def half_then_killed(src, dst, **kwargs):
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

shutil.copyfile = half_then_killed
from flan_squad.runs.trainer import make_trainer  # the checkpoint writer a run's trainer uses
trainer = make_trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
trainer.strategy.checkpoint_io.save_checkpoint({"global_step": 2, "weights": torch.ones(100_000)}, sys.argv[1])
"""


@pytest.mark.long
@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second filesystem (/dev/shm) for the temp dir")
def test_a_kill_while_a_checkpoint_is_written_leaves_last_ckpt_whole(tmp_path):
    import subprocess
    import sys

    from conftest import subprocess_env

    last = tmp_path / "last.ckpt"
    torch.save({"global_step": 1}, last)
    writer = subprocess.run([sys.executable, "-c", KILLED_WRITING, str(last)], env=subprocess_env(TMPDIR="/dev/shm"),
                            capture_output=True, text=True, timeout=300)
    assert writer.returncode in (0, -signal.SIGKILL), writer.stderr[-2000:]
    assert torch.load(last, weights_only=True)["global_step"] in (1, 2)  # the old checkpoint or the new one, whole
