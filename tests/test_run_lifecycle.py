"""The run's lifecycle object (flan_squad/runs/lifecycle.py) on its own, without training: what it leaves in the dir
when the run completes, fails, is interrupted or refused, on rank 0 and on the other ranks; the helpers it shares
with the package; and the adapters to other libraries' private APIs, which fail here when those libraries change.
The same paths through the entry points: test_faults.py, test_signals.py, test_sweeps.py, test_tracking.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_ARCHITECTURE, TOKENIZER_DIR
from flan_squad.runs.lifecycle import Run
from flan_squad.utils.errors import ConfigError, RunDirError, RunInterrupted, cause_chain, error_line, first_line


def _config(run_dir: Path):
    return OmegaConf.create({"paths": {"output_dir": str(run_dir)}, "seed": 1})


def _previous_run(run_dir: Path) -> dict[str, bytes]:
    """A finished run's files in `run_dir`; returns them, to compare with what is there later."""
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "weights").write_bytes(b"trained")
    (run_dir / "metrics.json").write_text('{"f1": 50.0}')
    (run_dir / "status.json").write_text('{"status": "completed"}')
    (run_dir / "notes.txt").write_text("mine")  # not a run's file: never moved
    return _files(run_dir)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


@pytest.fixture
def rank(monkeypatch):
    """Set this process's rank as a SLURM task's (SLURM_PROCID only), or none at all."""
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(variable, raising=False)
    return lambda n: monkeypatch.setenv("SLURM_PROCID", str(n))


def test_a_completed_run_replaces_the_previous_one_and_says_so(tmp_path, rank):
    run_dir = tmp_path / "run"
    _previous_run(run_dir)
    with Run(_config(run_dir)) as run:
        assert run.start(overwrite=True) is None
        assert not (run_dir / "metrics.json").exists() and (run_dir / "notes.txt").exists()  # set aside, not gone
        assert (tmp_path / ".run.lock").exists()
        run.complete({"f1": 70.0}, {"q": "a"}, None, "summary")
    assert json.loads((run_dir / "metrics.json").read_text()) == {"f1": 70.0}
    assert _status(run_dir)["status"] == "completed" and "finished_at" in _status(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.json", "notes.txt",
                                                         "predictions.json", "status.json"]
    assert not (tmp_path / ".run.lock").exists()


def test_a_failed_run_puts_the_previous_one_back_byte_for_byte(tmp_path, rank):
    run_dir = tmp_path / "run"
    before = _previous_run(run_dir)
    with pytest.raises(ValueError, match="boom"), Run(_config(run_dir)) as run:
        run.start(overwrite=True)
        (run_dir / "predictions.json").write_text("{}")  # half of a new run's results
        raise ValueError("boom")
    assert _files(run_dir) == before  # its status.json too: the dir is the previous run's again
    assert not (tmp_path / ".run.lock").exists()


def test_a_failed_run_in_a_new_dir_records_its_error(tmp_path, rank):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError), Run(_config(run_dir)) as run:
        run.start()
        try:
            raise ConfigError("strategy.rank=0: must be a whole number > 0")
        except ConfigError as e:
            raise RuntimeError("Error in call to target 'LoRA'") from e  # as hydra's instantiate wraps it
    status = _status(run_dir)
    assert status["status"] == "failed"
    assert status["error"] == "ConfigError: strategy.rank=0: must be a whole number > 0"
    assert "Error in call to target 'LoRA'" in status["traceback"] and status["job_num"] is None


@pytest.mark.parametrize("stop", ["signal", "ctrl_c"])
def test_an_interrupted_run_stays_resumable_and_keeps_the_previous_one_aside(stop, tmp_path, rank):
    run_dir = tmp_path / "run"
    _previous_run(run_dir)
    error = RunInterrupted(signal.SIGTERM, 7, "last.ckpt") if stop == "signal" else KeyboardInterrupt()
    with pytest.raises(type(error)), Run(_config(run_dir)) as run:
        run.start(overwrite=True)
        raise error
    status = _status(run_dir)
    assert status["status"] == "interrupted"
    if stop == "signal":
        assert (status["signal"], status["step"], status["exit_code"]) == ("SIGTERM", 7, 143)
    assert not (run_dir / "metrics.json").exists()  # not the previous run's results beside this run's checkpoint
    (aside,) = run_dir.glob(".previous-*")
    assert (aside / "metrics.json").read_text() == '{"f1": 50.0}'


def test_a_run_resumed_and_completed_keeps_nothing_of_its_interrupted_attempts(tmp_path, rank):
    # A kill mid-write leaves a temporary file or staging dir beside the file (utils/files.py): the next attempt
    # deletes them. An attempt that started over (or overwrote a run) set files aside in its own .previous-<pid>/: they
    # go when the run completes, whichever attempt completes it.
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 4}, run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "checkpoints" / ".last.ckpt.k3j2vx.tmp").write_bytes(b"half a checkpoint")
    (run_dir / ".model.staging-x1y2z3").mkdir()
    (run_dir / ".model.staging-x1y2z3" / "model.safetensors").write_bytes(b"half a model")
    (run_dir / ".predictions.json.a8b9c0.tmp").write_text("{")
    (run_dir / ".previous-123").mkdir()
    (run_dir / ".previous-123" / "config.yaml").write_text("seed: 1\n")
    (run_dir / "notes.txt").write_text("mine")
    with Run(_config(run_dir)) as run:
        assert run.start(resume=True).endswith("last.ckpt")
        assert sorted(p.name for p in run_dir.rglob(".*")) == [".previous-123"]
        run.complete({"f1": 70.0}, {"q": "a"}, None, "summary")
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.json", "notes.txt",
                                                         "predictions.json", "status.json"]


def test_a_refused_run_writes_nothing(tmp_path, rank):
    run_dir = tmp_path / "run"
    before = _previous_run(run_dir)
    with pytest.raises(RunDirError, match="already holds results"), Run(_config(run_dir)) as run:
        run.start()  # no overwrite
    with pytest.raises(RunDirError, match="nothing to resume"), Run(_config(run_dir)) as run:
        run.start(resume=True)
    assert _files(run_dir) == before


def test_what_cannot_be_recorded_does_not_hide_why_the_run_failed(tmp_path, rank):
    # A full disk, say, fails status.json too: the run's own error is what propagates.
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="the real reason"), Run(_config(run_dir)) as run:
        run.start()
        (run_dir / "status.json").mkdir()
        (run_dir / "status.json" / "x").write_text("")  # status.json cannot be replaced
        raise ValueError("the real reason")


def test_a_run_that_ends_without_its_results_is_not_completed(tmp_path, rank):
    run_dir = tmp_path / "run"
    before = _previous_run(run_dir)
    with pytest.raises(RuntimeError, match="ended without its results"), Run(_config(run_dir)) as run:
        run.start(overwrite=True)
    assert _files(run_dir) == before


def test_only_rank_zero_writes_into_the_run_dir(tmp_path, rank):
    # Each task of a multi-task SLURM job runs the entry point: task 1 takes no lock and writes no status.json,
    # whether the run completes or fails, yet gets the same checkpoint to resume from.
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 3}, run_dir / "checkpoints" / "last.ckpt")
    rank(1)
    with Run(_config(run_dir)) as run:
        assert run.start(resume=True).endswith("checkpoints/last.ckpt")
        assert not (tmp_path / ".run.lock").exists()
        run.complete({"f1": 1.0}, {}, None, "summary")
    with pytest.raises(ValueError), Run(_config(run_dir)) as run:
        run.start(resume=True)
        raise ValueError("a rank's failure")
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]
    rank(0)
    with Run(_config(run_dir)) as run:
        run.start(resume=True)
        run.complete({"f1": 1.0}, {}, None, "summary")
    assert _status(run_dir)["status"] == "completed"


# --- one helper per idiom -----------------------------------------------------------------------------------


def test_the_error_helpers_follow_the_cause_chain_and_keep_one_line():
    try:
        try:
            raise OSError("disk full\nmore detail")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        error = e
    assert [type(e) for e in cause_chain(error)] == [RuntimeError, OSError]
    assert error_line(error) == "OSError: disk full"  # no user error inside: the root cause
    assert first_line(ValueError("")) == "ValueError" and first_line(ValueError(" a\nb")) == "a"
    assert error_line(KeyError()) == "KeyError"


def test_in_multirun_reads_a_running_job_and_a_saved_record():
    from flan_squad.utils.process import in_multirun

    assert in_multirun(OmegaConf.create({"mode": "MULTIRUN"}))
    assert not in_multirun(OmegaConf.create({"mode": "RUN"}))


# --- other libraries' private APIs: each used in one place, and pinned here -------------------------------------


def test_lightning_saves_last_ckpt_through_the_interruptions_adapter(tmp_path):
    # runs/signals.py's save_last_checkpoint: ModelCheckpoint's private _save_last_checkpoint,
    # _last_global_step_saved and _monitor_candidates. Fails when Lightning renames or changes them.
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from flan_squad.runs.signals import save_last_checkpoint

    last = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True)  # by itself: at an epoch's end only
    saved = []

    class SaveAtStep2(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 2:
                save_last_checkpoint(last, trainer)
                saved.append(torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"])
                os.remove(tmp_path / "last.ckpt")
                save_last_checkpoint(last, trainer)  # once per step: it holds this step's already
                saved.append((tmp_path / "last.ckpt").exists())

    trainer = L.Trainer(max_steps=4, callbacks=[SaveAtStep2(), last], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(BoringModel())
    assert saved == [2, False]


def test_random_init_is_its_seeds_weights_and_leaves_the_callers_random_state(tmp_path):
    # models/base.py builds random-init weights under torch.random.fork_rng: the weights a fresh
    # torch.manual_seed(init_seed) gives, bit for bit (the weights cached before it are still the run's), and the
    # caller's random state (seeded by the run) as it was.
    from safetensors.torch import load_file
    from transformers import T5ForConditionalGeneration

    from flan_squad.models.base import BaseModel

    base = BaseModel(name="t5-tiny", name_or_path=None, init="random", tokenizer=str(TOKENIZER_DIR),
                     architecture=TINY_ARCHITECTURE, init_seed=3, cache_dir=str(tmp_path))
    torch.manual_seed(11)
    caller = torch.get_rng_state()
    weights = load_file(Path(base.weights_path()) / "model.safetensors")
    assert torch.equal(torch.get_rng_state(), caller)

    torch.manual_seed(3)
    model = T5ForConditionalGeneration(base.config())
    std = model.config.initializer_factor * model.config.d_model ** -0.5
    expected = {**model.state_dict(), "lm_head.weight": torch.randn_like(model.shared.weight) * std}
    assert weights and all(torch.equal(tensor, expected[name]) for name, tensor in weights.items())
