"""Faults that must neither lose nor falsify results: overwrite keeps the old results until the new run has
finished, one writer per run dir, loading a run dir runs no code, and every bad input or damaged file ends in one
line naming it (exit status 2). Exact resume after a kill is in test_reliability.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import DEV_V1, SHARED, one_error_line, subprocess_env
from flan_squad.data.squad import DataError, read_squad_file
from flan_squad.runs.lifecycle import Run
from flan_squad.runs.lock import hold
from flan_squad.utils.config import PROJECT_ROOT
from flan_squad.utils.errors import RunDirError

# A tiny full fine-tuning on SQuAD v2 (so it writes na_probs.json), with the default callbacks and no logger.
TINY = ["experiment=smoke", "strategy=full", "dataset.limit_train=8", "dataset.limit_val=4", "trainer.max_epochs=1",
        "dataset.max_source_length=128", "callbacks.last_checkpoint.every_n_train_steps=1"]


def _files(directory: Path) -> dict[str, bytes]:
    """Every file of a run dir but Hydra's log, to which each run appends."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.suffix != ".log"}


@pytest.fixture(scope="module")
def v2_run(tmp_path_factory, cache_dir) -> Path:
    """A finished run, trained with logger=none and the default callbacks (LearningRateMonitor among them)."""
    from conftest import compose_config
    from flan_squad.train import train

    run_dir = tmp_path_factory.mktemp("v2_run") / "run"
    train(compose_config([*TINY, "dataset=squad_v2", "logger=none"], output_dir=run_dir, cache=cache_dir))
    return run_dir


def test_logger_none_trains_with_the_default_callbacks(v2_run):
    metrics = json.loads((v2_run / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 1 and (v2_run / "na_probs.json").exists()
    assert not (v2_run / "tensorboard").exists()


# --- overwrite=true: results are replaced only by results --------------------------------------------------------


def test_overwrite_keeps_the_previous_results_until_the_new_run_has_finished(v2_run, tmp_path, cache_dir,
                                                                               run_entry_point):
    run_dir = tmp_path / "run"
    shutil.copytree(v2_run, run_dir)
    (run_dir / "status.json").write_text('{"status": "completed"}')
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- dataset=squad_v2\n")  # what reports show of the run
    before = _files(run_dir)
    args = [*TINY, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}", "overwrite=true", "logger=none"]

    bad = tmp_path / "invalid.json"
    bad.write_text('{"version": "1.1", "data": 5}')
    failed = run_entry_point("flan_squad.train", [*args, f"dataset.train_file={bad}"])
    one_error_line(failed, str(bad))
    assert _files(run_dir) == before  # every file of the previous run, byte for byte; nothing of the failed one

    replaced = run_entry_point("flan_squad.train", [*args, "dataset=squad_v1"])
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["squad_version"] == "v1"
    assert not (run_dir / "na_probs.json").exists()  # the v2 run's: nothing of it survives beside v1 results
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".previous")]
    assert not list(tmp_path.glob(".*.lock"))  # the lock goes with the run


def test_a_single_run_that_fails_with_exit_status_2_writes_status_json(tmp_path, cache_dir, run_entry_point):
    bad = tmp_path / "invalid.json"
    bad.write_text('{"version": "1.1", "data": 5}')
    run_dir = tmp_path / "run"
    result = run_entry_point("flan_squad.train", [*TINY, "logger=none", f"hydra.run.dir={run_dir}",
                                                  f"paths.cache_dir={cache_dir}", f"dataset.train_file={bad}"])
    one_error_line(result, str(bad))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and str(bad) in status["error"]


# --- one writer per run dir ------------------------------------------------------------------------------------


def test_a_run_dir_held_by_a_live_process_is_refused_and_a_dead_ones_lock_does_not_block(tmp_path, run_entry_point,
                                                                                         monkeypatch):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from flan_squad.runs.lock import hold\nwith hold({str(run_dir)!r}):\n"
                               f"    print('held', flush=True)\n    input()"],
        cwd=PROJECT_ROOT, env=subprocess_env(PYTHONPATH=str(PROJECT_ROOT)), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for module, argv in [("flan_squad.train", [*TINY, f"hydra.run.dir={run_dir}"]),
                             ("flan_squad.evaluate", ["experiment=smoke", f"hydra.run.dir={run_dir}"]),
                             ("flan_squad.export", [f"run_dir={tmp_path}", f"output_dir={run_dir}"])]:
            one_error_line(run_entry_point(module, argv), f"{run_dir} is in use by process {holder.pid}")
        # DDP: the other ranks re-run the entry point in the dir that rank 0 holds
        monkeypatch.setenv("LOCAL_RANK", "1")
        with Run(OmegaConf.create({"paths": {"output_dir": str(run_dir)}})) as run:
            ran = not run.is_rank_zero
        assert ran
        monkeypatch.delenv("LOCAL_RANK")
    finally:
        holder.send_signal(signal.SIGKILL)  # its lock file stays behind, its lock does not
        holder.wait()
    assert (tmp_path / ".run.lock").exists()
    with hold(run_dir):
        with pytest.raises(RunDirError, match=f"in use by process {os.getpid()}"):
            with hold(run_dir):  # a second writer in this very process is refused too
                pass


# --- loading a run dir runs no code ------------------------------------------------------------------------------


@pytest.mark.parametrize("section", [
    {"model": {"_target_": "shutil.copyfile", "_args_": ["/etc/hostname", "PWNED"]}},  # the payload
    {"model": {"_target_": "flan_squad.models.base.BaseModel", "name": "x",
               "name_or_path": {"_target_": "shutil.copyfile", "src": "/etc/hostname", "dst": "PWNED"}}},
    {"strategy": {"_target_": "shutil.copyfile", "src": "/etc/hostname", "dst": "PWNED"}},
])
def test_loading_a_run_dir_calls_no_function_it_names(section, v2_run, tmp_path, cache_dir, run_entry_point):
    run_dir = tmp_path / "shared_run"
    shutil.copytree(v2_run, run_dir)
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (group, values), = section.items()
    values = json.loads(json.dumps(values).replace("PWNED", str(tmp_path / "PWNED")))
    config[group] = values
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    key = "model.name_or_path._target_" if "name" in values else f"{group}._target_"
    for module, argv in [
        ("flan_squad.predict", [f"run_dir={run_dir}", "question=Where?", "context=Paris is in France."]),
        ("flan_squad.export", [f"run_dir={run_dir}", f"output_dir={tmp_path / 'export'}"]),
        ("flan_squad.evaluate", ["experiment=smoke", f"run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'eval'}",
                                 f"paths.cache_dir={cache_dir}", "dataset.limit_val=2"]),
    ]:
        one_error_line(run_entry_point(module, argv), f"{run_dir / 'config.yaml'}: {key}", "refused")
        assert not (tmp_path / "PWNED").exists()


def test_remote_and_unreadable_checkpoints_are_refused_in_one_line(v2_run, tmp_path, cache_dir, run_entry_point):
    args = [*TINY, f"paths.cache_dir={cache_dir}"]
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    for ckpt, fragments in [("https://example.com/x.ckpt", ["ckpt_path=https://example.com/x.ckpt", "remote"]),
                            (str(text), [f"ckpt_path={text}", "not a readable checkpoint"])]:
        one_error_line(run_entry_point("flan_squad.train", [*args, f"hydra.run.dir={tmp_path / 'new'}",
                                                             f"ckpt_path={ckpt}"]), *fragments)

    killed = tmp_path / "killed"  # a run killed while writing last.ckpt
    shutil.copytree(v2_run, killed)
    (killed / "metrics.json").unlink()
    last = killed / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    one_error_line(run_entry_point("flan_squad.train", [*args, f"hydra.run.dir={killed}", "resume=true"]),
                    f"resume=true: {last} is not a readable checkpoint", "ckpt_path=")


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_model_file_is_named_by_predict_export_and_evaluate(damage, v2_run, tmp_path, cache_dir,
                                                                      run_entry_point):
    run_dir = tmp_path / "run"
    shutil.copytree(v2_run, run_dir)
    weights = run_dir / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000]) if damage == "truncated" else weights.unlink()
    for module, argv in [
        ("flan_squad.predict", [f"run_dir={run_dir}", "question=Where?", "context=Paris is in France."]),
        ("flan_squad.export", [f"run_dir={run_dir}", f"output_dir={tmp_path / 'export'}"]),
        ("flan_squad.evaluate", ["experiment=smoke", f"run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'eval'}",
                                 f"paths.cache_dir={cache_dir}", "dataset.limit_val=2"]),
    ]:
        one_error_line(run_entry_point(module, argv), str(weights), damage)
    assert not (tmp_path / "export").exists()


def test_a_dir_under_a_regular_file_is_refused_in_one_line(v2_run, tmp_path, run_entry_point):
    regular = tmp_path / "file"
    regular.write_text("")
    one_error_line(run_entry_point("flan_squad.train", ["experiment=smoke", f"hydra.run.dir={regular}/run"]),
                    f"hydra.run.dir={regular}/run", "under a regular file")
    # export refuses before it merges anything: a model it could not load would be named otherwise
    damaged = tmp_path / "damaged"
    shutil.copytree(v2_run, damaged)
    (damaged / "model" / "model.safetensors").unlink()
    one_error_line(run_entry_point("flan_squad.export", [f"run_dir={damaged}", f"output_dir={regular}/export"]),
                    f"output_dir={regular}/export", "under a regular file")


# --- input files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", ['"abc"', "null", "1.5"])
def test_a_non_integer_answer_start_is_named_with_its_file_and_record(start, tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "Paris is big.", "qas": '
                    '[{"id": "q1", "question": "What?", "answers": [{"text": "Paris", "answer_start": ' + start +
                    "}]}]}]}]}")
    with pytest.raises(DataError, match=rf"{path}: data\[0\].paragraphs\[0\].qas\[0\].answers\[0\].answer_start: "
                                        "expected int"):
        read_squad_file(path)


@pytest.mark.parametrize("value", ["NaN", "1.7", "-0.1"])
def test_the_scorer_refuses_no_answer_probabilities_outside_0_1(value, tmp_path, capsys):
    from flan_squad.score import main

    data = json.loads((SHARED / "data/squad/v2.0/dev-v2.0.reconstructed.json").read_text())
    data["data"] = data["data"][:1]
    questions = read_squad_file(_write(tmp_path / "data.json", data))[1]
    _write(tmp_path / "pred.json", {q.id: "" for q in questions})
    (tmp_path / "na.json").write_text(
        "{" + ", ".join(f'"{q.id}": {value if i == 3 else 0.5}' for i, q in enumerate(questions)) + "}")
    assert main([str(tmp_path / "data.json"), str(tmp_path / "pred.json"), "-n", str(tmp_path / "na.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no-answer probability for {questions[3].id!r}" in err and "[0, 1]" in err


@pytest.mark.parametrize("version", ["3.0", None])
def test_the_scorer_warns_about_a_version_that_is_neither_1_1_nor_2_0(version, tmp_path, capsys, caplog):
    from flan_squad.score import main

    data = json.loads(DEV_V1.read_text())
    data["data"] = data["data"][:1]
    data.pop("version") if version is None else data.update(version=version)
    questions = read_squad_file(_write(tmp_path / "ok.json", {**data, "version": "1.1"}))[1]
    _write(tmp_path / "pred.json", {q.id: q.answers[0] for q in questions})
    assert main([str(_write(tmp_path / "data.json", data)), str(tmp_path / "pred.json")]) == 0
    assert json.loads(capsys.readouterr().out)["f1"] == 100.0  # scored with the v1.1 rules, as the official script
    warning = f"version {'missing' if version is None else repr(version)} is neither SQuAD 1.1 nor 2.0"
    assert [r.getMessage() for r in caplog.records if warning in r.getMessage()]


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_rank_zero_before_the_trainer_exists_is_global_rank_zero(monkeypatch):
    # A multi-task SLURM job's tasks have only SLURM_PROCID: task 1 must not take (and be refused) the run dir's lock.
    from flan_squad.utils.process import is_rank_zero

    for variable in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(variable, raising=False)
    assert is_rank_zero()
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert not is_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")  # the first process of the second node: local rank 0, global rank 1
    assert not is_rank_zero()
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # as Lightning starts it there without SLURM
    assert not is_rank_zero()
    monkeypatch.setenv("RANK", "0")  # torchrun's global rank decides alone
    assert is_rank_zero()
