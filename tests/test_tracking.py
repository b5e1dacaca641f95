"""Experiment tracking against a real `mlflow server` (SQLite backend, artefacts in a temp dir), the offline
local store, and the model card saved with every model.

The runs go through the real command lines (in this process: `run_entry_point`); everything is read back
through `MlflowClient`, as a user's notebook or the MLflow UI would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient  # the tracking extra (make install installs it)

from conftest import compose_config, subprocess_env

# A few questions of the (small) v2 files, short answers: the cheapest runs that still validate.
SMALL = ["experiment=smoke", "strategy=lora", "dataset=squad_v2", "dataset.limit_train=8", "dataset.limit_val=4",
         "eval.max_new_tokens=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a free local port, with its own SQLite store and artefact dir; stopped afterwards."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log = open(root / "server.log", "w")
    # One worker and no job executor (MLflow's GenAI job queue starts seven more processes): start-up time.
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        assert process.poll() is None, f"mlflow server exited: {(root / 'server.log').read_text()[-3000:]}"
        assert time.time() < deadline, f"mlflow server not up in 240 s: {(root / 'server.log').read_text()[-3000:]}"
        time.sleep(0.5)
    yield uri
    os.killpg(process.pid, signal.SIGTERM)  # the server and its uvicorn worker
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    log.close()


def _runs(client: MlflowClient, where: str = "") -> list:
    experiment = client.get_experiment_by_name("flan-squad")
    return client.search_runs([experiment.experiment_id], where) if experiment else []


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _artefact(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp_path))).read_text()


@pytest.mark.long
def test_a_failed_then_resumed_run_is_one_mlflow_run_with_everything_in_it(server, tmp_path, cache_dir,
                                                                           run_entry_point):
    run_dir = tmp_path / "run"
    args = [*SMALL, "dataset.batch_size=4", "trainer.max_epochs=2", "callbacks.last_checkpoint.every_n_train_steps=1",
            "logger=tensorboard_mlflow", f"logger.mlflow.tracking_uri={server}", f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={cache_dir}"]
    # 8 questions in batches of 4: 2 steps an epoch. NaN weights at step 3 stop the run in its second epoch.
    poison = ["+callbacks.poison._target_=fault_injection.PoisonWeightsAtStep", "+callbacks.poison.step=3"]
    failed = run_entry_point("flan_squad.train", [*args, *poison])
    assert failed.returncode == 2 and "non-finite training loss" in failed.stderr
    client = MlflowClient(server)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "non-finite training loss (nan) at step 3" in run.data.tags["error"]

    resumed = run_entry_point("flan_squad.train", [*args, *poison, "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 4 and metrics["resumed_from"].endswith("last.ckpt")
    (run,) = _runs(client, f"tags.output_dir = '{run_dir}'")  # the same MLflow run, not a second one
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and "error" not in run.data.tags

    # The composed config as params, under the keys a user filters by (`resume` changed: not a param).
    params = run.data.params
    assert {k: params[k] for k in ("strategy.lr", "strategy.rank", "model.name", "model.init", "dataset.name",
                                   "dataset.batch_size", "trainer.precision", "seed")} == {
        "strategy.lr": "0.001", "strategy.rank": "16", "model.name": "t5-tiny", "model.init": "random",
        "dataset.name": "squad_v2", "dataset.batch_size": "4", "trainer.precision": metrics["precision"],
        "seed": "42"}
    assert "resume" not in params and not any(k.startswith("paths.") or str(run_dir) in v for k, v in params.items())
    tags = run.data.tags
    assert (tags["strategy"], tags["model"], tags["init"], tags["dataset"], tags["kind"]) == (
        "lora", "t5-tiny", "random", "squad_v2", "train")
    assert "random-init weights" in tags["model_note"] and "random-init" in tags["mlflow.note.content"]

    # Curves per step, across the failure and the resume: losses 0-2 from the first process, 3 from the second
    # (the lr of step 3 is in both: it was logged as the poisoned step began).
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1, 2, 3]
    assert {m.step for m in client.get_metric_history(run_id, "lr-AdamW")} == {0, 1, 2, 3}
    assert len(client.get_metric_history(run_id, "val/f1")) >= 2 and "val/exact" in run.data.metrics
    # Every number of metrics.json, as it is there; the artefacts are its files.
    final = _numbers(metrics)
    assert {k: run.data.metrics[k] for k in final} == pytest.approx(final)
    assert {a.path for a in client.list_artifacts(run_id)} == {  # error.txt: the first attempt's traceback
        "config.yaml", "metrics.json", "predictions.json", "na_probs.json", "model_card", "error.txt"}
    assert json.loads(_artefact(client, run_id, "metrics.json", tmp_path / "a")) == metrics
    assert json.loads(_artefact(client, run_id, "predictions.json", tmp_path / "b")) == json.loads(
        (run_dir / "predictions.json").read_text())
    card = (run_dir / "model" / "README.md").read_text()
    assert _artefact(client, run_id, "model_card/README.md", tmp_path / "c") == card
    assert (run_dir / "tensorboard").is_dir()  # tensorboard_mlflow: both loggers

    # The model card: Hugging Face metadata and the honest note (random init: no base_model claimed).
    meta = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in meta and meta["library_name"] == "peft" and "random-init" in meta["tags"]
    assert meta["datasets"] == ["rajpurkar/squad_v2"]
    scores = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert scores["F1"] == round(metrics["f1"], 2) and scores["Exact match"] == round(metrics["exact"], 2)
    assert "random-init weights" in card and "python -m flan_squad.train experiment=smoke" in card
    assert "resume=true" in card  # the command that made it: the resumed one

    exported = tmp_path / "exported"
    result = run_entry_point("flan_squad.export", [f"run_dir={run_dir}", f"output_dir={exported}"])
    assert result.returncode == 0, result.stderr[-3000:]
    card = (exported / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "transformers"
    assert f"python -m flan_squad.export run_dir={run_dir}" in card and "random-init weights" in card


def test_a_sweep_is_a_parent_run_and_its_failed_job_a_failed_run(server, tmp_path, run_entry_point):
    sweep = tmp_path / "sweep"
    # rank=0 is invalid: that job fails before training starts, the other one trains.
    result = run_entry_point("flan_squad.train", [
        "-m", *SMALL, "strategy.rank=0,2", "trainer.max_epochs=1", "callbacks=none", "logger=mlflow",
        f"logger.mlflow.tracking_uri={server}", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}"])
    assert result.returncode != 0, "a sweep with a failed job must not exit 0"
    client = MlflowClient(server)
    (parent,) = _runs(client, f"tags.sweep_dir = '{sweep}' and tags.kind = 'sweep'")
    assert parent.info.status == "FAILED" and "strategy.rank=0" in parent.data.tags["command"]
    children = _runs(client, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    jobs = {r.data.params["strategy.rank"]: r for r in children}
    assert set(jobs) == {"0", "2"}
    failed, trained = jobs["0"], jobs["2"]
    assert failed.info.status == "FAILED" and "strategy.rank=0: must be a whole number > 0" in failed.data.tags["error"]
    assert "must be a whole number > 0" in _artefact(client, failed.info.run_id, "error.txt", tmp_path / "e")
    assert trained.info.status == "FINISHED" and trained.data.tags["job_num"] == "1"
    metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    final = _numbers(metrics)
    assert {k: trained.data.metrics[k] for k in final} == pytest.approx(final)
    assert json.loads(_artefact(client, trained.info.run_id, "metrics.json", tmp_path / "m")) == metrics
    assert len(client.get_metric_history(trained.info.run_id, "train/loss")) == 1  # 8 questions: one batch of 8


def test_a_sweep_whose_jobs_all_completed_ends_finished(server, tmp_path):
    from hydra import compose, initialize_config_dir

    from flan_squad.runs.tracking import MLflowTracking
    from flan_squad.utils.config import CONFIG_DIR

    sweep = tmp_path / "sweep"
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "hparams_search=lr_rank", "logger=mlflow", f"logger.mlflow.tracking_uri={server}",
            f"hydra.sweep.dir={sweep}"])
    tracking, client = MLflowTracking(), MlflowClient(server)
    tracking.on_multirun_start(cfg)  # what Hydra calls around the jobs of a multirun
    (parent,) = _runs(client, f"tags.sweep_dir = '{sweep}'")
    assert parent.info.status == "RUNNING" and parent.data.params == {"sweep.strategy.lr": "3e-4,1e-3",
                                                                      "sweep.strategy.rank": "4,16"}
    tracking.on_multirun_end(cfg)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_an_unreachable_server_stops_the_run_before_it_starts(tmp_path, run_entry_point):
    run_dir = tmp_path / "run"
    result = run_entry_point("flan_squad.train", [
        *SMALL, "logger=mlflow", f"logger.mlflow.tracking_uri=http://127.0.0.1:{_free_port()}",
        f"hydra.run.dir={run_dir}"])
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: logger.mlflow.tracking_uri=http://127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1 and "no MLflow tracking server answers there" in result.stderr
    assert not run_dir.exists()  # nothing started


def test_offline_local_store_records_an_evaluation(tmp_path, cache_dir, run_entry_point):
    store, run_dir = tmp_path / "store", tmp_path / "eval"
    result = run_entry_point("flan_squad.evaluate", [
        "experiment=smoke", "dataset=squad_v2", "dataset.limit_val=4", "eval.max_new_tokens=4", "logger=mlflow",
        "logger.mlflow.tracking_uri=null", f"logger.mlflow.store_dir={store}", f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")  # no server: the files under store_dir
    (run,) = _runs(client)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "evaluate"
    assert run.data.tags["model"] == "t5-tiny" and "random-init weights" in run.data.tags["model_note"]
    assert {k: run.data.metrics[k] for k in _numbers(metrics)} == pytest.approx(_numbers(metrics))
    assert run.info.artifact_uri.startswith((store / "artifacts").as_uri())
    assert json.loads(_artefact(client, run.info.run_id, "metrics.json", tmp_path / "a")) == metrics


def test_tensorboard_mlflow_is_both_loggers():
    cfg = compose_config(["logger=tensorboard_mlflow"])
    assert set(cfg.logger) == {"tensorboard", "mlflow"}
    assert cfg.logger.mlflow._target_ == "flan_squad.runs.tracking.MLflowLogger"
