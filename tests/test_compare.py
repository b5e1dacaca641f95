"""`make compare-cpu` in miniature: the stages of its recipe (base, the base's own score, the multirun over strategies
and seeds on the decoy task, the report) through the real entry points on a tiny model, and the cost table's runs."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import TINY_ARCHITECTURE

TINY = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_ARCHITECTURE.items()) + "}"


@pytest.mark.long
def test_the_comparison_in_miniature_reports_seeds_memory_and_curves(tmp_path, cache_dir, run_entry_point):
    base, runs, docs = tmp_path / "base", tmp_path / "runs", tmp_path / "docs"
    common = [f"paths.cache_dir={cache_dir}", "logger=csv"]
    built = run_entry_point("flan_squad.train", ["experiment=base_cpu", f"model.architecture={TINY}",
                                                 "dataset.limit_train=32", "dataset.limit_val=8", "callbacks=none",
                                                 f"hydra.run.dir={base}", *common])
    assert built.returncode == 0, built.stderr[-2000:]
    model = [f"model.name_or_path={base}/model", f"model.architecture={TINY}"]
    tiny = ["dataset.limit_train=16", "dataset.batch_size=4", "dataset.limit_val=8", "trainer.max_epochs=1"]
    scored = run_entry_point("flan_squad.evaluate", ["experiment=compare_cpu", *model, *tiny,
                                                     f"hydra.run.dir={runs}/base", *common])
    assert scored.returncode == 0, scored.stderr[-2000:]
    trained = run_entry_point("flan_squad.train", ["experiment=compare_cpu", "hparams_search=strategies",
                                                   "strategy=full,lora", "seed=0,1", *model, *tiny, "callbacks=none",
                                                   f"hydra.sweep.dir={runs}", *common])
    assert trained.returncode == 0, trained.stderr[-2000:]
    reported = run_entry_point("flan_squad.report", [str(runs), "--out", str(docs)])
    assert reported.returncode == 0, reported.stderr[-2000:]

    jobs = [json.loads(p.read_text()) for p in sorted(runs.glob("[0-9]*/metrics.json"))]
    assert sorted((j["strategy"], j["seed"]) for j in jobs) == [("full", 0), ("full", 1), ("lora", 0), ("lora", 1)]
    assert all(j["dataset"] == "decoy_v2" and j["squad_version"] == "v2" and "not FLAN-T5" in j["model_note"]
               for j in jobs)
    for job in jobs:  # each at the lr the preset gives its strategy, validated twice an epoch
        assert job["lr"] == {"full": 3e-4, "lora": 1e-3}[job["strategy"]] and job["optimizer_steps"] == 4
        with open(runs / str(jobs.index(job)) / "csv" / "metrics.csv", newline="") as f:
            assert sum(1 for row in csv.DictReader(f) if row.get("val/f1")) == 2
    table = (docs / "results.md").read_text()
    assert "base model, not fine-tuned" in table and "ok (n=2)" in table and "Memory account" in table
    rows = {r["approach"]: r for r in csv.DictReader((docs / "results.csv").open())}
    assert {"full", "lora r=16", "base model, not fine-tuned"} <= set(rows)
    full = rows["full"]
    assert float(full["own_peak_memory_mb"]) > float(full["weights_fp32_mb"]) + float(full["optimizer_state_mb"])
    assert full["f1_std"] != "" and float(full["gradients_mb"]) > 100 * float(rows["lora r=16"]["gradients_mb"]) > 0
    assert {p.name for p in docs.glob("*.png")} == {"f1_vs_memory.png", "f1_vs_time.png", "learning_curves.png"}


@pytest.mark.long
def test_the_cost_table_accounts_each_strategy_with_and_without_checkpointing(tmp_path):
    # benchmarks/strategy_cost.py in miniature: real runs of flan_squad.train on t5-tiny (random init), each strategy
    # with and without gradient checkpointing; its account read from the run's tensors against the arithmetic.
    from benchmarks.strategy_cost import main

    results = main(["--models", "t5_tiny", "--steps", "1", "--strategies", "full,lora",
                    "--out", str(tmp_path / "cost.json"), "--markdown", str(tmp_path / "cost.md")])
    runs = {(r["strategy"], r["gradient_checkpointing"]): r for r in results["runs"]}
    assert set(runs) == {(s, gc) for s in ("full", "lora") for gc in (False, True)}
    assert not [r["error"] for r in runs.values() if "error" in r]
    for r in runs.values():
        account, arithmetic = r["memory_account"], r["arithmetic"]
        assert account["gradients_mb"] == pytest.approx(arithmetic["gradients_mb"], abs=0.2)
        assert account["optimizer_state_mb"] == pytest.approx(arithmetic["optimizer_state_mb"], abs=0.2)
    assert runs["full", False]["memory_account"]["gradients_mb"] > 50 * runs["lora", False]["memory_account"][
        "gradients_mb"]
    for strategy in ("full", "lora"):  # checkpointing keeps a few layer inputs instead of every activation
        assert runs[strategy, True]["saved_activations_mb"] < 0.5 * runs[strategy, False]["saved_activations_mb"]
    assert json.loads((tmp_path / "cost.json").read_text())["runs"] == results["runs"]
    assert (tmp_path / "cost.md").read_text().count("| t5_tiny |") == 4
