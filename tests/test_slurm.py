"""Sweeps, multi-process jobs and preemption on a real SLURM cluster: the one-node cluster that
`scripts/local_slurm.sh` starts on this machine (slurmctld, slurmd, slurmdbd). `make test-slurm` runs them;
without SLURM installed they skip, naming what is missing (CI installs it and sets FLAN_SQUAD_REQUIRE_SLURM=1,
which turns the skip into a failure)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_config
from flan_squad.evaluate import evaluate
from flan_squad.report import build_report
from flan_squad.utils.config import PROJECT_ROOT
from slurm_cluster import array_id, job_dirs, job_states, local_cluster, run_sweep, slow_step, wait_until

pytestmark = pytest.mark.slurm

SMALL = ["experiment=smoke", "strategy=lora", "dataset.limit_train=16", "dataset.limit_val=8", "trainer.max_epochs=1",
         "eval.max_new_tokens=8"]


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """The environment of a command that talks to the local one-node cluster (started here unless it already runs)."""
    with local_cluster(nodes=1) as env:
        yield env


def test_sweep_runs_as_slurm_jobs_and_reports_like_the_local_sweep(slurm, tmp_path, cache_dir, run_entry_point):
    sweep, local = tmp_path / "slurm", tmp_path / "local"
    grid = ["strategy.lr=1e-3,3e-3", f"paths.cache_dir={cache_dir}"]
    # rank=0 is invalid: those 2 of the 6 jobs fail inside their SLURM job, the other 4 complete.
    result = run_sweep(slurm, sweep, SMALL + grid + ["strategy.rank=0,2,4"])
    assert result.returncode != 0, "a sweep with a failed job must not exit 0"
    assert "strategy.rank=0: must be a whole number > 0" in result.stderr
    states = job_states(slurm, array_id(sweep))
    assert sorted(states) == [f"{array_id(sweep)}_{i}" for i in range(6)]
    assert all(state == ("COMPLETED", "0:0") for state in states.values()), states  # each job returned its outcome
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in sweep.glob("*/status.json")}
    assert sorted(statuses.values()) == ["completed"] * 4 + ["failed"] * 2

    # The same 4 good jobs as a local sweep, in this process: the same seeds give the same scores.
    assert run_entry_point("flan_squad.train", ["-m", *SMALL, *grid, "strategy.rank=2,4",
                                                f"hydra.sweep.dir={local}"]).returncode == 0
    report = subprocess.run([sys.executable, "-m", "flan_squad.report", str(sweep)], cwd=PROJECT_ROOT, env=slurm,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and "4 completed run(s), 2 failed" in report.stdout, report.stderr[-2000:]
    _, on_slurm, _ = build_report([str(sweep)])
    _, on_this_machine, _ = build_report([str(local)])

    def scores(settings) -> dict:
        return {(s.first.metrics["lr"], s.first.metrics["trainable_params"]):
                (s.first.metrics["exact"], s.first.metrics["f1"], s.first.metrics["optimizer_steps"])
                for s in settings if s.status == "completed"}

    assert len(scores(on_slurm)) == 4 and scores(on_slurm) == scores(on_this_machine)
    assert [s.status for s in on_slurm].count("failed") == 2


def test_two_task_job_takes_its_ranks_from_slurm_and_answers_like_one_process(slurm, tmp_path, cache_dir):
    sweep = tmp_path / "ddp"
    # As tests/test_scale.py's local DDP test: 13 questions over 2 processes, fp32 (bf16 rounding depends on batching).
    overrides = ["experiment=smoke", "strategy=lora", "dataset=squad_v2", "dataset.limit_train=16",
                 "dataset.limit_val=13", "trainer.max_epochs=1", f"paths.cache_dir={cache_dir}",
                 "trainer.precision=32-true"]
    result = run_sweep(slurm, sweep, overrides + ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                               "hydra.launcher.tasks_per_node=2"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [job] = job_dirs(sweep)
    assert job_states(slurm, job) == {job: ("COMPLETED", "0:0")}
    # Two SLURM tasks, each one Lightning process with its rank from SLURM_PROCID (no process started by Lightning).
    for rank in (0, 1):
        log = (sweep / ".submitit" / job / f"{job}_{rank}_log.err").read_text()
        assert f"Initializing distributed: GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in log
    run_dir = sweep / "0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    predictions = json.loads((run_dir / "predictions.json").read_text())
    assert metrics["total"] == len(predictions) == 13 and metrics["train_examples_seen"] == 16

    single_dir = tmp_path / "single"
    cfg = compose_config(overrides + [f"run_dir={run_dir}", "trainer=cpu"], output_dir=single_dir, cache=cache_dir,
                         config_name="evaluate")
    single = evaluate(cfg)
    assert json.loads((single_dir / "predictions.json").read_text()) == predictions
    assert single["f1"] == metrics["f1"] and single["total"] == 13


def test_preempted_jobs_checkpoint_then_requeue_or_end_interrupted(slurm, tmp_path, cache_dir, run_entry_point,
                                                                    request):
    sweep = tmp_path / "preempted"
    # 32 questions in batches of 4, 2 epochs: 16 steps, slowed down so the signals land mid-epoch.
    run = ["experiment=smoke", "strategy=lora", "dataset.limit_train=32", "dataset.batch_size=4",
           "dataset.limit_val=8", "trainer.max_epochs=2", "callbacks.last_checkpoint.every_n_train_steps=4",
           f"paths.cache_dir={cache_dir}"]
    slow = ["+callbacks.slow._target_=fault_injection.SlowSteps", "+callbacks.slow.marker=${paths.output_dir}/step",
            "+callbacks.slow.seconds=1"]
    log = tmp_path / "driver.log"
    driver = run_sweep(slurm, sweep, run + slow + ["strategy.lr=1e-3,3e-3"], log)
    # Signalled as step 3 starts (or a little later), they stop at step 4-7: mid-epoch, well before its last batch.
    wait_until(lambda: all(slow_step(sweep / job / "step") >= 3 for job in "01"), "step 3 in both jobs", 600, driver,
               log)
    array = array_id(sweep)
    # Job 0: Lightning's SLURM auto-requeue (what `#SBATCH --signal=USR1@90` sends before a time limit): it requeues
    # the job, SLURM stops it with SIGTERM, and the job starts again. Job 1: SIGTERM alone, as a preemption.
    subprocess.run(["scancel", "--signal=USR1", f"{array}_0"], env=slurm, check=True)
    subprocess.run(["scancel", "--signal=TERM", f"{array}_1"], env=slurm, check=True)

    def pending_after_requeue() -> bool:
        state = subprocess.run(["squeue", "-h", "-j", f"{array}_0", "-o", "%T %r"], env=slurm, capture_output=True,
                               text=True).stdout.split()
        return state == ["PENDING", "BeginTime"]

    wait_until(pending_after_requeue, "requeue of job 0", 120, driver, log)
    # SLURM holds a requeued job back for 2 minutes; a cluster would start it when resources allow.
    subprocess.run(["scontrol", "update", f"jobid={array}_0", "StartTime=now"], env=slurm, check=True)
    driver.wait(timeout=600)
    output = log.read_text()

    states = job_states(slurm, array)
    assert states[f"{array}_0"] == ("COMPLETED", "0:0"), output[-3000:]
    assert states[f"{array}_1"][0] == "FAILED", states  # not COMPLETED 0:0: it did not finish
    assert driver.returncode != 0 and "state: FAILED" in output  # the driver ends, naming the job's state

    requeued = json.loads((sweep / "0" / "metrics.json").read_text())
    assert requeued["optimizer_steps"] == 16 and requeued["resumed_from"].endswith("checkpoints/last.ckpt")
    assert 4 * (16 - 8) < requeued["train_examples_seen"] <= 4 * (16 - 4)  # what was left after a mid-epoch checkpoint
    assert json.loads((sweep / "0" / "status.json").read_text())["status"] == "completed"
    assert not list((sweep / "0").glob("hpc_ckpt_*.ckpt"))  # Lightning's, written mid-step: superseded by last.ckpt
    interrupted = json.loads((sweep / "1" / "status.json").read_text())
    assert interrupted["status"] == "interrupted" and interrupted["signal"] == "SIGTERM"
    assert 4 <= interrupted["step"] < 8
    assert not (sweep / "1" / "metrics.json").exists()

    # Resubmitted (here, run in this process) with resume=true, job 1 finishes too; both end as uninterrupted runs do.
    # In this process as in the jobs, one thread (cpus_per_task=1): bf16-mixed sums in another order with two, and
    # the weights then differ by ~4e-4 whatever the resume does (measured for t5_tiny's inputs).
    threads = torch.get_num_threads()  # read now, before the change below: restored as it was
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.set_num_threads(1)
    resumed = run_entry_point("flan_squad.train", run + slow + ["strategy.lr=3e-3", f"hydra.run.dir={sweep / '1'}",
                                                                "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finished = json.loads((sweep / "1" / "metrics.json").read_text())
    assert finished["optimizer_steps"] == 16 and finished["train_examples_seen"] == (16 - interrupted["step"]) * 4
    for job, lr in (("0", "1e-3"), ("1", "3e-3")):
        reference = tmp_path / f"uninterrupted-{lr}"
        assert run_entry_point("flan_squad.train", run + [f"strategy.lr={lr}", f"hydra.run.dir={reference}"]
                               ).returncode == 0
        weights = load_file(sweep / job / "model" / "adapter_model.safetensors")
        for name, tensor in load_file(reference / "model" / "adapter_model.safetensors").items():
            assert (weights[name] - tensor).abs().max() < 1e-6, (job, name)
        assert (json.loads((sweep / job / "predictions.json").read_text())
                == json.loads((reference / "predictions.json").read_text())), job
