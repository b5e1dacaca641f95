"""`logger=wandb` through the real command line (in this process: `run_entry_point`), read back from the offline run's
own files: `<run dir>/wandb/offline-run-*/run-<id>.wandb`, the record log that `wandb sync` uploads (LevelDB's log
format of W&B's protobuf `Record`s: the config, every history row, the summary updates, the exit code)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from wandb.proto import wandb_internal_pb2  # the tracking extra (make test installs it)

SMALL = ["experiment=smoke", "strategy=lora", "dataset=squad_v2", "dataset.limit_train=8", "dataset.limit_val=4",
         "dataset.batch_size=4", "eval.max_new_tokens=4", "trainer.max_epochs=2",
         "callbacks.last_checkpoint.every_n_train_steps=1", "logger=wandb"]
BLOCK, HEADER = 32768, b":W&B\xe1\xbe\x00"  # the log's block size, and its file header (ident, magic, version 0)


def records(path: Path):
    """The protobuf records of a W&B transaction log, in order (chunks of one record are joined)."""
    data = path.read_bytes()
    assert data[:len(HEADER)] == HEADER, f"{path}: not a W&B transaction log"
    pos, pending = len(HEADER), b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: Path) -> list[dict]:
    """Each offline run under `run_dir/wandb`, oldest first: id, config, history rows, summary, exit code."""
    runs = []
    for log in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"config": {}, "history": [], "summary": {}, "exit_code": None}
        for record in records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                run["config"].update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                run["config"].update({_key(i): json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                run["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                run["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        runs.append(run)
    return runs


@pytest.mark.long
def test_a_failed_then_resumed_run_is_one_wandb_run_with_its_results(tmp_path, cache_dir, run_entry_point):
    run_dir = tmp_path / "run"
    args = [*SMALL, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}"]
    # 8 questions in batches of 4: 2 steps an epoch. NaN weights at step 3 stop the run in its second epoch.
    poison = ["+callbacks.poison._target_=fault_injection.PoisonWeightsAtStep", "+callbacks.poison.step=3"]
    failed = run_entry_point("flan_squad.train", [*args, *poison])
    assert failed.returncode == 2 and "non-finite training loss" in failed.stderr
    (first,) = read_offline_run(run_dir)
    assert first["exit_code"] == 2  # the run ends with the process's exit code

    resumed = run_entry_point("flan_squad.train", [*args, *poison, "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first, second = read_offline_run(run_dir)
    assert second["id"] == first["id"] == json.loads((run_dir / "wandb_run.json").read_text())["run_id"]
    assert second["exit_code"] == 0

    # The config is the composed config, as config.yaml holds it
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    assert {k: second["config"][k] for k in config} == config
    assert second["config"]["strategy"]["rank"] == 16 and second["config"]["model"]["init"] == "random"

    # The curves per step, across the failure and the resume: losses 0-2 from the first run, 3 from the second
    steps = [row["trainer/global_step"] for run in (first, second) for row in run["history"] if "train/loss" in row]
    assert steps == [0, 1, 2, 3]
    assert sum("val/f1" in row for run in (first, second) for row in run["history"]) >= 2

    # The summary holds every value of metrics.json, as it is there
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {k: second["summary"][k] for k in metrics} == metrics
    assert metrics["optimizer_steps"] == 4 and metrics["init"] == "random"


def test_an_evaluation_gets_its_run_too(tmp_path, cache_dir, run_entry_point):
    run_dir = tmp_path / "eval"
    result = run_entry_point("flan_squad.evaluate", [
        "experiment=smoke", "dataset=squad_v2", "dataset.limit_val=4", "eval.max_new_tokens=4", "logger=wandb",
        f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = read_offline_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {k: run["summary"][k] for k in metrics} == metrics and run["exit_code"] == 0
    assert run["config"]["dataset"]["limit_val"] == 4 and run["history"] == []
