"""Comparison presets and sweeps: they compose as documented, a failed job is recorded while the others run,
an lr x rank sweep yields the heat map, Optuna runs trials, and the batch size finder records its choice."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import yaml
from hydra.types import RunMode

from conftest import compose_config
from flan_squad.report import build_report
from flan_squad.train import train
from flan_squad.utils.config import compose

# The smallest real runs: a few questions of the (small) v2 files, one epoch, short answers, no checkpoints.
TINY = ["dataset.limit_train=8", "dataset.limit_val=4", "trainer.max_epochs=1", "eval.max_new_tokens=4",
        "callbacks=none"]


def compose_with_hydra(overrides: list[str]):
    return compose("train", overrides, return_hydra_config=True)


@pytest.mark.parametrize("preset", ["compare", "compare_cpu"])
def test_compare_presets_with_the_strategies_sweep_are_multiruns_over_the_three_strategies(preset):
    assert compose_with_hydra([f"experiment={preset}"]).hydra.mode != RunMode.MULTIRUN  # a preset alone: one run
    cfg = compose_with_hydra([f"experiment={preset}", "hparams_search=strategies"])
    assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.hydra.sweeper.params == {"strategy": "full,lora,qlora"}
    if preset == "compare":  # the reference setup
        assert cfg.seed == 42
        assert cfg.model.name_or_path == "google/flan-t5-base" and cfg.model.init == "pretrained"
        assert cfg.dataset.name == "squad_v1" and cfg.dataset.limit_train is None
        assert cfg.dataset.batch_size == 16 and cfg.trainer.max_epochs == 3 and cfg.trainer.accelerator == "gpu"
    else:  # the self-trained base (experiment=base_cpu builds it) on the decoy task; make compare-cpu adds 3 seeds
        assert cfg.model.name_or_path.endswith("outputs/bases/t5-mid-planted/model") and cfg.model.init == "pretrained"
        assert "not FLAN-T5" in cfg.model.note and cfg.dataset.name == "decoy_v2"
        assert cfg.dataset.val_split == "validation"  # the lrs were chosen on "tune"
        assert cfg.trainer.accelerator == "cpu" and cfg.dataset.limit_train
        base = compose_with_hydra(["experiment=base_cpu"])
        assert base.hydra.run.dir == str(Path(cfg.model.name_or_path).parent)  # the base run saves it there
        assert base.model.init == "random" and base.model.architecture == cfg.model.architecture
        assert base.dataset.name == "planted_v1"  # never an unanswerable question, nor a code of another kind
    for strategy in ("full", "lora", "qlora"):  # each job trains at its strategy's own learning rate
        job = compose_config([f"experiment={preset}", f"strategy={strategy}"])
        own = compose_with_hydra([f"strategy={strategy}"]).strategy.lr
        expected = cfg.compare_lr[strategy] if preset == "compare_cpu" else own
        assert job.strategy.lr == expected
        # ... unless the command line sets one (compare-cpu-sweep)
        assert compose_config([f"experiment={preset}", f"strategy={strategy}", "strategy.lr=0.5"]).strategy.lr == 0.5


def test_search_presets_compose():
    grid = compose_with_hydra(["hparams_search=lr_rank"])
    assert grid.hydra.sweeper.params == {"strategy.lr": "3e-4,1e-3", "strategy.rank": "4,16"}
    assert grid.strategy._target_.endswith("LoRA")
    optuna = compose_with_hydra(["hparams_search=optuna", "strategy=qlora"])
    assert optuna.hydra.sweeper._target_.endswith("OptunaSweeper") and optuna.hydra.sweeper.direction == "maximize"
    assert set(optuna.hydra.sweeper.params) == {"strategy.lr", "strategy.rank"}
    assert optuna.strategy._target_.endswith("QLoRA")  # the command line picks the strategy


def test_auto_batch_size_is_found_and_recorded(tmp_path, cache_dir):
    cfg = compose_config(["experiment=smoke", "strategy=lora", "dataset=squad_v2", *TINY, "dataset.batch_size=3",
                          "trainer.auto_batch_size=true", "trainer.auto_batch_size_max=4"],
                         output_dir=tmp_path, cache=cache_dir)
    metrics = train(cfg)
    assert metrics["auto_batch_size"] is True and metrics["batch_size"] == 4  # tried 2, stopped at the ceiling
    # The training itself ran with the size it chose (8 questions / 4 per batch = 2 steps), and was
    # counted once: the finder's trial steps are not part of training time or throughput.
    assert metrics["optimizer_steps"] == math.ceil(8 / 4) and metrics["train_examples_seen"] == 8
    assert json.loads((tmp_path / "metrics.json").read_text())["batch_size"] == 4


@pytest.mark.long
def test_grid_sweep_records_a_failed_job_runs_the_rest_and_reports_a_heat_map(tmp_path, run_entry_point):
    sweep = tmp_path / "sweep"
    # No -m: the preset makes it a multirun. rank=0 is invalid: those 2 of the 6 jobs fail.
    result = run_entry_point("flan_squad.train", [
        "hparams_search=lr_rank", "experiment=smoke", "strategy.rank=0,2,4", "dataset=squad_v2", *TINY,
        f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}"])
    assert result.returncode != 0, "a sweep with a failed job must not exit 0"
    assert "strategy.rank=0: must be a whole number > 0" in result.stderr
    statuses = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/status.json")}
    assert len(statuses) == 6
    failed = {name for name, s in statuses.items() if s["status"] == "failed"}
    assert len(failed) == 2 and all("strategy.rank=0" in statuses[n]["overrides"] for n in failed)
    assert all("must be a whole number > 0" in statuses[n]["error"] for n in failed)
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == sorted(set(statuses) - failed)
    trainable = {}  # each job built its own strategy: rank 4 has twice the adapter parameters of rank 2
    for job in sweep.glob("*/metrics.json"):
        metrics = json.loads(job.read_text())
        trainable.setdefault(metrics["approach"]["capacity"]["value"], set()).add(metrics["trainable_params"])
    assert set(trainable) == {2, 4} and all(len(v) == 1 for v in trainable.values())
    assert trainable[4] == {2 * next(iter(trainable[2]))}

    out, settings, plots = build_report([str(sweep)])
    assert [s.status for s in settings].count("failed") == 2 and len(settings) == 6
    assert {p.name for p in plots} == {"f1_vs_memory.png", "f1_vs_time.png", "learning_curves.png",
                                       "heatmap_lr_rank.png"}
    table = (out / "results.md").read_text().split("Memory account")[0]  # the results table, not the account's
    assert table.count("| squad_v2 | lora r=") == 4  # as training recorded it: Strategy.describe()
    assert table.count("| squad_v2 | lora rank=0 |") == 2  # failed before that: the strategy's overrides


@pytest.mark.long
def test_a_sweep_run_again_with_resume_keeps_finished_jobs_reruns_failed_ones_and_continues_the_rest(
        tmp_path, cache_dir, run_entry_point):
    sweep = tmp_path / "sweep"
    # 4 jobs of 4 steps: job 0 finishes, job 1 fails (once), Ctrl-C at job 2's step 2 ends the sweep, job 3 never runs
    command = ["hparams_search=lr_rank", "experiment=smoke", "strategy.lr=1e-3", "strategy.rank=2,4,8,16",
               "dataset.limit_train=16", "dataset.limit_val=4", "dataset.batch_size=4", "trainer.max_epochs=1",
               "eval.max_new_tokens=4", "callbacks.last_checkpoint.every_n_train_steps=1", "logger=none",
               f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}",
               "+callbacks.crash._target_=fault_injection.CrashInJobOnce", "+callbacks.crash.job=1",
               f"+callbacks.crash.marker={tmp_path / 'crashed'}",
               "+callbacks.sigint._target_=fault_injection.SignalAtStep",
               f"+callbacks.sigint.signum={int(signal.SIGINT)}", "+callbacks.sigint.step=2", "+callbacks.sigint.job=2"]
    first = run_entry_point("flan_squad.train", command)
    assert first.returncode == 130, first.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    assert [_status(sweep / job)["status"] for job in "012"] == ["completed", "failed", "interrupted"]
    finished = (sweep / "0" / "metrics.json").stat().st_mtime_ns
    stopped_at = _status(sweep / "2")["step"]  # the end of the step during which Ctrl-C came: its checkpoint's

    again = run_entry_point("flan_squad.train", [*command, "resume=true"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").stat().st_mtime_ns == finished  # kept, not trained again
    metrics = {job: json.loads((sweep / job / "metrics.json").read_text()) for job in "0123"}
    assert all(_status(sweep / job)["status"] == "completed" for job in "0123")
    assert [m["approach"]["capacity"]["value"] for m in metrics.values()] == [2, 4, 8, 16]
    assert all(m["optimizer_steps"] == 4 for m in metrics.values())
    assert metrics["2"]["resumed_from"] == str(sweep / "2" / "checkpoints" / "last.ckpt")  # from its step-2 checkpoint
    assert stopped_at == 3 and metrics["2"]["train_examples_seen"] == (4 - stopped_at) * 4
    assert metrics["1"]["resumed_from"] is None and metrics["3"]["resumed_from"] is None  # run from the start
    _, settings, _ = build_report([str(sweep)])
    assert [s.status for s in settings] == ["completed"] * 4

    # Run again over another grid: a finished job with another config is refused by name; the others are kept.
    other = run_entry_point("flan_squad.train", [*[a if a != "strategy.rank=2,4,8,16" else "strategy.rank=32,4,8,16"
                                                   for a in command], "resume=true"])
    assert other.returncode != 0
    assert "finished with another config (strategy.rank: 2 -> 32)" in other.stderr
    assert (sweep / "0" / "metrics.json").stat().st_mtime_ns == finished


def _status(job_dir: Path) -> dict:
    return json.loads((job_dir / "status.json").read_text())


def test_optuna_sweeper_runs_trials_and_keeps_the_best(tmp_path, run_entry_point):
    sweep = tmp_path / "optuna"
    result = run_entry_point("flan_squad.train", [
        "hparams_search=optuna", "experiment=smoke", "hydra.sweeper.n_trials=2", "dataset=squad_v2", *TINY,
        "logger=none", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    trials = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert len(trials) == 2 and all(t["strategy"] == "lora" for t in trials)
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in best and "strategy.rank" in best


@pytest.mark.long
def test_a_killed_optuna_search_run_again_continues_with_its_trials(tmp_path, cache_dir, run_entry_point):
    sweep = tmp_path / "optuna"
    # 3 trials of 4 steps; Ctrl-C at trial 1's step 2 ends the sweep while trial 1 is running
    command = ["hparams_search=optuna", "experiment=smoke", "hydra.sweeper.n_trials=3", "dataset.limit_train=16",
               "dataset.limit_val=4", "dataset.batch_size=4", "trainer.max_epochs=1", "eval.max_new_tokens=4",
               "logger=none", f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}",
               "+callbacks.sigint._target_=fault_injection.SignalAtStep",
               f"+callbacks.sigint.signum={int(signal.SIGINT)}", "+callbacks.sigint.step=2", "+callbacks.sigint.job=1"]
    first = run_entry_point("flan_squad.train", command)
    assert first.returncode == 130, first.stderr[-3000:]
    assert [_status(sweep / job)["status"] for job in "01"] == ["completed", "interrupted"]
    finished = (sweep / "0" / "metrics.json").stat().st_mtime_ns

    again = run_entry_point("flan_squad.train", command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").stat().st_mtime_ns == finished  # trial 0 counted, not run again
    assert _status(sweep / "1")["status"] == "interrupted"
    params = {job: _searched(sweep / job) for job in "0123"}
    assert params["2"] == params["1"] and params["3"] not in (params["0"], params["1"])  # tried again, then a new one
    f1 = {job: json.loads((sweep / job / "metrics.json").read_text())["f1"] for job in "023"}
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(f1.values())  # over the 3 trials of both runs
    best = max(f1, key=f1.get)
    assert {f"{k}={v}" for k, v in results["best_params"].items()} == set(params[best])


def _searched(job_dir: Path) -> list[str]:
    """The overrides that Optuna chose for this job."""
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    return sorted(o for o in overrides if o.startswith(("strategy.lr=", "strategy.rank=")))


def test_main_returns_the_optimized_metric_to_the_sweeper():
    from flan_squad.train import optimized_metric
    from flan_squad.utils.errors import ConfigError

    metrics = {"f1": 61.5, "NoAns_f1": 80.0, "exact": 50.0, "strategy": "lora"}
    assert compose_with_hydra([]).optimized_metric == "f1"
    assert optimized_metric(compose_with_hydra([]), metrics) == 61.5
    assert optimized_metric(compose_with_hydra(["optimized_metric=NoAns_f1"]), metrics) == 80.0
    with pytest.raises(ConfigError, match="optimized_metric=strategy: not a number .* NoAns_f1, exact, f1"):
        optimized_metric(compose_with_hydra(["optimized_metric=strategy"]), metrics)
