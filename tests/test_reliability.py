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


@pytest.mark.long
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


@pytest.mark.long
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


@pytest.mark.long
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


# --- interrupted anywhere, any number of times ----------------------------------------------------------------

# One run, interrupted at moments drawn from its own timeline (fault_injection.InterruptAt) and resumed each time. The
# learning check's task, fp32, dropout on: 40 questions in batches of 8, 5 steps an epoch, 3 epochs, each validated
# in 2 batches; last.ckpt every 2 steps. The best checkpoint follows val/loss, which falls every epoch: each validation
# replaces the best (and deletes the old one). A second checkpoint callback keeps every validated epoch's weights
# (epoch=E-step=S.ckpt), so that a validation skipped or done on other weights shows.
INTERRUPTED = ["experiment=learning_check", "strategy=full", "strategy.lr=1e-2", "dataset.limit_train=40",
               "dataset.batch_size=8", "dataset.limit_val=8", "dataset.eval_batch_size=4", "trainer.max_epochs=3",
               "trainer.precision=32-true", "logger=none", "model.architecture.dropout_rate=0.1",
               "callbacks.last_checkpoint.every_n_train_steps=2", "callbacks.model_checkpoint.monitor=val/loss",
               "callbacks.model_checkpoint.mode=min",
               "+callbacks.every_validation._target_=lightning.pytorch.callbacks.ModelCheckpoint",
               "+callbacks.every_validation.monitor=val/f1", "+callbacks.every_validation.save_top_k=-1",
               "+callbacks.every_validation.enable_version_counter=false",
               "+callbacks.interrupt._target_=fault_injection.InterruptAt"]
INTERRUPTIONS = 8
RESULTS = ("write model", "write predictions.json", "write metrics.json")  # the final writes, in order
# What the interruptions cover, each at least once: a moment's kind (`_kind`).
KINDS = ("before the first checkpoint", "validation", "checkpoint write", "end of training", "final writes")


def _kind(timeline: list[str], index: int) -> str:
    moment = timeline[index]
    if index < next(i for i, m in enumerate(timeline) if m.startswith("write checkpoints/")):
        return "before the first checkpoint"
    if moment in RESULTS:
        return "final writes"
    if index >= _end_of_training(timeline):  # the last epoch's end, the best checkpoint validated again
        return "end of training"
    if moment.startswith("write checkpoints/"):
        return "checkpoint write"
    return "validation" if moment.startswith("validation") else "training"


def _end_of_training(timeline: list[str]) -> int:
    return next(i for i, moment in enumerate(timeline) if moment.startswith("end of training"))


def _next_moment(rng, timeline: list[str], reached: int, attempt: int, kinds: list[str]) -> int:
    """Where attempt `attempt` is interrupted: a moment past the furthest the run has reached (so that this attempt
    passes it), of the kind `kinds` plans for it; during training, among the next few, so that the attempts spread."""
    kind = kinds[attempt]
    if kind in ("end of training", "final writes"):
        return rng.choice([i for i in range(reached + 1, len(timeline)) if _kind(timeline, i) == kind])
    training = list(range(reached + 1, _end_of_training(timeline)))
    window = training[: max(1, len(training) // (kinds.index("end of training") - attempt))]
    of_kind = [i for i in training if kind == "any" or _kind(timeline, i) == kind]
    return rng.choice([i for i in of_kind if i in window] or of_kind[:1])


def _plan(rng) -> tuple[list[str], list[signal.Signals]]:
    """Each attempt's kind of moment and signal: every kind in KINDS, and every signal, at least once."""
    during_training = ["validation", "checkpoint write"] + ["any"] * (INTERRUPTIONS - 5)
    rng.shuffle(during_training)
    kinds = ["before the first checkpoint", *during_training, "end of training", "final writes"]
    signals = [signal.SIGTERM, signal.SIGINT]
    signals += [rng.choice([signal.SIGKILL, *signals]) for _ in range(INTERRUPTIONS - 4)]
    rng.shuffle(signals)
    # SIGKILL first, so that the run has no checkpoint (resume=true then starts it again); the end of training gets a
    # signal the run can catch (what the run does with it is what is tested there)
    signals.insert(0, signal.SIGKILL)
    signals.insert(kinds.index("end of training"), rng.choice([signal.SIGTERM, signal.SIGINT]))
    return kinds, signals


def _exit_status(signum: signal.Signals, kind: str) -> int:
    """What an attempt stopped by `signum` exits with: 143 / 130 as the run stops itself; killed by the signal (-9, or
    -15 for a SIGTERM in the final writes, after Lightning's handler is gone)."""
    killed = signum == signal.SIGKILL or (signum == signal.SIGTERM and kind == "final writes")
    return -signum if killed else 128 + signum


@pytest.fixture
def one_thread():
    """Torch on one thread in this process, as in the subprocesses that set OMP_NUM_THREADS=1: sums over two threads
    come in another order (the weights then differ by ~1e-5 whatever a resume does)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.long
def test_a_run_interrupted_anywhere_any_number_of_times_ends_as_the_uninterrupted_run(tmp_path, cache_dir, one_thread,
                                                                                      run_entry_point, monkeypatch):
    import random

    import torch

    from fault_injection import INTERRUPT_AT, INTERRUPTED_BY, MOMENTS_FILE

    # The uninterrupted run, in this process: its moments, in order, are the timeline that interruptions are drawn from.
    args = [*INTERRUPTED, f"paths.cache_dir={cache_dir}"]
    reference_dir, timeline_file = tmp_path / "uninterrupted", tmp_path / "timeline.txt"
    monkeypatch.setenv(MOMENTS_FILE, str(timeline_file))
    uninterrupted = run_entry_point("flan_squad.train", args + [f"hydra.run.dir={reference_dir}"])
    monkeypatch.delenv(MOMENTS_FILE)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    timeline = timeline_file.read_text().splitlines()
    assert len(set(timeline)) == len(timeline) and set(RESULTS) <= set(timeline), timeline
    timeline = timeline[: timeline.index(RESULTS[-1]) + 1]  # from metrics.json on, the run has finished

    # Seed 3's draw also has Ctrl-C in a validation, a checkpoint killed half written, a best checkpoint written again
    # by a resumed run, and a SIGTERM as training ends; each attempt's moment and signal are printed.
    seed = int(os.environ.get("FLAN_SQUAD_INTERRUPT_SEED", "3"))
    story = [f"interruptions drawn with seed {seed} (FLAN_SQUAD_INTERRUPT_SEED=<n> draws others)"]
    rng = random.Random(seed)
    kinds, signals = _plan(rng)

    run_dir = tmp_path / "interrupted"
    command = [sys.executable, "-m", "flan_squad.train", *args, f"hydra.run.dir={run_dir}"]
    reached, fired = -1, []  # the furthest moment of the timeline that an attempt passed; where each was interrupted
    for attempt, signum in enumerate(signals):
        at = _next_moment(rng, timeline, reached, attempt, kinds)
        moments = tmp_path / f"moments-{attempt}.txt"
        env = {**_env(), "OMP_NUM_THREADS": "1", MOMENTS_FILE: str(moments),
               INTERRUPT_AT: f"{signum.name} {at} {timeline_file}"}
        ended = subprocess.run(command + (["resume=true"] if attempt else []), cwd=PROJECT_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
        passed = moments.read_text().splitlines() if moments.exists() else []
        where = [passed[i - 1] for i, line in enumerate(passed) if line.startswith(INTERRUPTED_BY)]
        story.append(f"attempt {attempt}: {signum.name} at {where[0] if where else None!r} (drawn: "
                     f"{timeline[at]!r}, {kinds[attempt]}), exit status {ended.returncode}")
        print(story[-1])  # (shown when the test fails)
        assert where == [timeline[at]], (passed, ended.stderr[-3000:])  # it got there, and was interrupted there
        assert ended.returncode == _exit_status(signum, _kind(timeline, at)), ended.stderr[-3000:]
        assert not (run_dir / "metrics.json").exists()
        reached = max([reached, *(timeline.index(moment) for moment in passed if moment in timeline)])
        fired.append(at)
    assert {_kind(timeline, at) for at in fired} >= set(KINDS)

    resumed = run_entry_point("flan_squad.train", args + [f"hydra.run.dir={run_dir}", "resume=true"])
    print("\n".join(story))  # again: the run above read what was printed before
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics, reference = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference_dir))
    assert metrics["resumed_from"] and metrics["best_checkpoint"] == reference["best_checkpoint"]
    assert reference["best_checkpoint"] == "checkpoints/best-epoch2-step15.ckpt"  # replaced at every validation
    assert {k: metrics[k] for k in ("exact", "f1", "optimizer_steps")} == {
        k: reference[k] for k in ("exact", "f1", "optimizer_steps")}
    assert (json.loads((run_dir / "predictions.json").read_text())
            == json.loads((reference_dir / "predictions.json").read_text()))
    # the same files (no leftovers of a write cut short), the same checkpoints and model
    for where in (".", "checkpoints", "model"):
        assert sorted(p.name for p in (run_dir / where).iterdir()) == sorted(
            p.name for p in (reference_dir / where).iterdir()), where
    for checkpoint in (reference_dir / "checkpoints").iterdir():
        ours, theirs = (torch.load(d / "checkpoints" / checkpoint.name, weights_only=True)
                        for d in (run_dir, reference_dir))
        for part in ("global_step", "state_dict", "optimizer_states", "lr_schedulers"):
            _assert_same_tensors(ours[part], theirs[part], f"{checkpoint.name}: {part}")
    _assert_same_tensors(load_file(run_dir / "model" / "model.safetensors"),
                         load_file(reference_dir / "model" / "model.safetensors"), "model")
