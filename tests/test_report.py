"""The comparison report: reading runs, grouping seeds, failed jobs, mixed datasets, the table, CSV and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from conftest import STRATEGY_NAMES, make_strategy
from flan_squad.report import build_report, main
from flan_squad.reporting.runs import find_run_dirs, group, read_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, strategy: str, f1: float, *, dataset: str = "squad_v1", seed: int = 42,
             lr: float = 1e-3, rank: int | None = 16, memory: float = 800.0, seconds: float = 60.0,
             curve: list[tuple[int, float]] | None = None, recorded: bool = True,
             optimizer: dict | None = None) -> Path:
    """A run dir as flan_squad.train leaves it: metrics.json, config.yaml, .hydra/, TensorBoard events.
    recorded=False: as training left it before metrics.json recorded the strategy's `approach`. `rank`: the value
    of the strategy's capacity hyperparameter (LoRA's rank), if it has one."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    key = (make_strategy(strategy).describe()["capacity"] or {}).get("key", "rank")
    trainable = 10_000_000 if strategy == "full" else 2 * 16 * (rank or 1) * 100
    metrics = {"exact": f1 / 2, "f1": f1, "total": 100, "strategy": strategy, "model": "t5-tiny", "init": "random",
               "dataset": dataset, "squad_version": dataset[-2:], "trainable_params": trainable,
               "total_params": 10_000_000, "params_4bit": 0, "train_time_s": seconds,
               "train_examples_per_s": 480 / seconds, "peak_memory_mb": memory + 600, "peak_memory_kind": "rss",
               "memory_before_model_mb": 600.0, "own_peak_memory_mb": memory,
               "memory_account": {"weights_mb": {"fp32": 40.0}, "gradients_mb": 40.0 if strategy == "full" else 0.1,
                                  "optimizer_state_mb": 80.0 if strategy == "full" else 0.2, "rest_mb": memory - 120},
               "train_examples": 240, "val_examples": 100, "epochs": 2, "batch_size": 16, "lr": lr, "seed": seed,
               "precision": "32-true", "device": "cpu", **(optimizer or {})}
    if recorded:
        metrics["approach"] = make_strategy(strategy, lr=lr, **({} if rank is None else {key: rank})).describe()
    if dataset == "squad_v2":
        metrics.update(HasAns_f1=f1 / 3, NoAns_f1=f1 * 1.5, HasAns_exact=0.0, NoAns_exact=f1)
    (run / "metrics.json").write_text(json.dumps(metrics))
    strategy_cfg = {"lr": lr} if rank is None else {"lr": lr, key: rank}
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "strategy": strategy_cfg}))
    choices = {"strategy": strategy, "dataset": dataset, "model": "t5_tiny"}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    overrides = [f"strategy={strategy}", f"seed={seed}", f"strategy.lr={lr}"]
    overrides += [] if rank is None else [f"strategy.{key}={rank}"]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if curve:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run / "tensorboard"))
        for step, value in curve:
            writer.add_scalar("val/f1", value, step)
        writer.close()
    return run


def make_failed(root: Path, name: str, strategy: str, error: str, rank: int = 0) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"strategy": {"lr": "${oc.env:LR}", "rank": rank}}))
    choices = {"strategy": strategy, "dataset": "squad_v1", "model": "t5_tiny"}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"strategy={strategy}", f"strategy.rank={rank}"]))
    (run / "status.json").write_text(json.dumps({"status": "failed", "error": error, "overrides": []}))
    return run


def test_seeds_of_one_setting_are_mean_and_spread(tmp_path):
    for seed, f1 in [(1, 10.0), (2, 20.0), (3, 30.0)]:
        make_run(tmp_path, f"lora_{seed}", "lora", f1, seed=seed)
    make_run(tmp_path, "lora_other_lr", "lora", 5.0, lr=3e-4)
    settings = group([read_run(p) for p in find_run_dirs([str(tmp_path)])])
    assert [len(s.runs) for s in settings] == [3, 1]  # sorted by F1: the 3-seed setting (mean 20) first
    three = settings[0]
    assert three.mean("f1") == pytest.approx(20.0) and three.std("f1") == pytest.approx(10.0)
    assert sorted(r.get("seed") for r in three.runs) == [1, 2, 3]
    out, _, _ = build_report([str(tmp_path)])
    table = (out / "results.md").read_text()
    assert "20.00 ± 10.00" in table and "ok (n=3)" in table and "1, 2, 3" in table
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert float(rows[0]["f1"]) == pytest.approx(20.0) and float(rows[0]["f1_std"]) == pytest.approx(10.0)
    assert rows[0]["n_runs"] == "3" and rows[1]["f1_std"] == ""


def test_failed_job_and_mixed_datasets(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make_run(sweep, "0", "full", 12.0, rank=None, lr=5e-5, memory=2000.0, seconds=100.0)
    make_run(sweep, "1", "lora", 8.0, memory=900.0, seconds=50.0)
    make_failed(sweep, "2", "qlora", "ValueError: strategy.rank=0: must be > 0")
    make_run(sweep, "3", "qlora", 7.0, dataset="squad_v2", memory=700.0)
    assert main([str(sweep)]) == 0
    printed = capsys.readouterr()
    table = (sweep / "report" / "results.md").read_text()
    assert printed.out.startswith(table)  # the table goes to the terminal too
    assert "failed: ValueError: strategy.rank=0: must be > 0" in table and "failed" in printed.err
    lines = [line for line in table.split("Memory account")[0].splitlines() if line.startswith("| squad")]
    # a failed run recorded no approach: its strategy and the settings it was given label it
    assert [line.split(" | ")[1] for line in lines] == ["full", "lora r=16", "qlora r=16", "qlora rank=0"]
    assert lines[-1].split(" | ")[0] == "| squad_v1" and "failed" in lines[-1]  # failed rows last
    header = next(line for line in table.splitlines() if line.startswith("| dataset"))
    assert "HasAns F1" in header and "NoAns F1" in header  # v2 columns appear when a v2 run is there
    full, lora, v2 = lines[0].split(" | "), lines[1].split(" | "), lines[2].split(" | ")
    col = header.split(" | ").index
    # Best per dataset: full wins F1 on v1, lora wins memory and time; the lone v2 row is not "best" of anything.
    assert full[col("F1")] == "**12.00**" and lora[col("F1")] == "8.00"
    assert lora[col("memory, run's own (MB)")] == "**900**" and full[col("memory, run's own (MB)")] == "2000"
    assert full[col("raw peak (MB)")] == "2600"  # the whole process's, beside it: never singled out
    assert lora[col("train time (s)")] == "**50.0**" and "**" not in lines[2]
    assert v2[col("HasAns F1")] == f"{7.0 / 3:.2f}" and full[col("HasAns F1")] == "–"
    assert "random init (scores meaningless)" in lines[0] and "Random-init runs" in table
    rows = list(csv.DictReader((sweep / "report" / "results.csv").open()))
    assert [r["status"] for r in rows] == ["completed", "completed", "completed", "failed"]
    assert {r["dataset"] for r in rows} == {"squad_v1", "squad_v2"} and rows[3]["strategy"] == "qlora"


def test_runs_with_other_optimizers_are_other_settings_with_their_state_memory(tmp_path):
    sweep = tmp_path / "sweep"
    make_run(sweep, "0", "lora", 5.0, optimizer={"optimizer": "AdamW", "optimizer_state_mb": 2.0})
    for seed in (1, 2):  # one setting, two seeds
        make_run(sweep, str(seed), "lora", 4.0 + seed, seed=seed,
                 optimizer={"optimizer": "AdamW8bit", "optimizer_state_mb": 0.5})
    _, settings, _ = build_report([str(sweep)])
    assert sorted((s.first.get("optimizer"), len(s.runs)) for s in settings) == [("AdamW", 1), ("AdamW8bit", 2)]
    table = (sweep / "report" / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| dataset")).split(" | ")
    rows = {line.split(" | ")[header.index("optimizer")]: line.split(" | ")
            for line in table.splitlines() if line.startswith("| squad")}
    assert rows["AdamW8bit"][header.index("optimizer state (MB)")] == "**0.5 ± 0.0**"  # two seeds, one setting
    assert rows["AdamW"][header.index("optimizer state (MB)")] == "2.0"
    assert [r["optimizer"] for r in csv.DictReader((sweep / "report" / "results.csv").open())] == ["AdamW8bit",
                                                                                                   "AdamW"]


def test_memory_is_the_runs_own_with_its_account_beside_and_the_plot_follows(tmp_path):
    from flan_squad.reporting.plots import memory_axis

    for seed, memory in [(1, 2000.0), (2, 2100.0)]:
        make_run(tmp_path, f"full_{seed}", "full", 12.0, rank=None, lr=5e-5, memory=memory, seed=seed)
    make_run(tmp_path, "lora", "lora", 8.0, memory=900.0)
    out, settings, _ = build_report([str(tmp_path)])
    table = (out / "results.md").read_text()
    account = table[table.index("Memory account"):].splitlines()
    header = next(line for line in account if line.startswith("| dataset")).split(" | ")
    full = next(line for line in account if "| full |" in line).split(" | ")
    assert header[3:] == ["memory, run's own (MB)", "weights fp32", "gradients", "optimizer state",
                          "rest: activations, workspace |"]
    assert full[3:] == ["2050 ± 71", "40 ± 0", "40 ± 0", "80 ± 0", "1930 ± 71 |"]  # mean ± sd over the two seeds
    rows = {r["approach"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert float(rows["full"]["own_peak_memory_mb"]) == 2050.0 and float(rows["full"]["peak_memory_mb"]) == 2650.0
    assert float(rows["lora r=16"]["weights_fp32_mb"]) == 40.0 and float(rows["lora r=16"]["rest_mb"]) == 780.0
    assert memory_axis(settings)[0] == "own_peak_memory_mb"
    for run in settings[0].runs + settings[1].runs:  # runs from before the own peak was recorded: the whole process's
        del run.metrics["own_peak_memory_mb"]
    assert memory_axis(settings)[0] == "peak_memory_mb"


def _assert_real_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]).round(3), axis=0)
    assert len(colours) > 50, f"{path.name}: only {len(colours)} colours: blank?"
    background = (pixels[..., :3] > 0.98).all(axis=-1).mean()
    assert background < 0.97, f"{path.name}: {background:.1%} white"


def test_every_plot_is_a_png_with_content(tmp_path):
    sweep = tmp_path / "sweep"
    f1 = {(3e-4, 4): 1.0, (3e-4, 16): 2.0, (1e-3, 4): 3.0, (1e-3, 16): 4.5}
    for i, ((lr, rank), value) in enumerate(f1.items()):
        make_run(sweep, str(i), "lora", value, lr=lr, rank=rank, curve=[(15, value / 2), (30, value)])
    make_run(sweep, "4", "full", 0.5, rank=None, lr=5e-5, memory=1500.0, curve=[(15, 0.1), (30, 0.5)])
    out, settings, plots = build_report([str(sweep)], tmp_path / "elsewhere")
    assert out == tmp_path / "elsewhere" and not (sweep / "report").exists()
    assert sorted(p.name for p in plots) == ["f1_vs_memory.png", "f1_vs_time.png", "heatmap_lr_rank.png",
                                             "learning_curves.png"]
    for plot in plots:
        _assert_real_png(plot)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_each_strategy_reads_as_its_own_rows_and_plots(name, tmp_path):
    # What a report knows of a strategy is what training recorded (its name, `describe()`): an lr x capacity
    # sweep of any strategy gives one row per setting, labelled as it describes itself, and its heat map.
    capacity = make_strategy(name).describe()["capacity"]
    values = [capacity["value"], capacity["value"] * 2] if capacity else [None]
    for i, (lr, value) in enumerate((lr, value) for lr in (1e-4, 1e-3) for value in values):
        make_run(tmp_path, str(i), name, 10.0 * i + 1, lr=lr, rank=value, curve=[(5, i), (10, 2 * i)])
    _, settings, plots = build_report([str(tmp_path)])
    expected = {make_strategy(name, lr=lr, **({} if value is None else {capacity["key"]: value})).describe()["label"]
                for lr in (1e-4, 1e-3) for value in values}
    assert {s.first.approach for s in settings} == expected and {s.first.strategy for s in settings} == {name}
    assert len(settings) == 2 * len(values) and all(s.status == "completed" for s in settings)
    names = {p.name for p in plots}
    assert {"f1_vs_memory.png", "f1_vs_time.png", "learning_curves.png"} <= names
    assert (f"heatmap_lr_{capacity['key']}.png" in names) if capacity else not any("heatmap" in n for n in names)


def test_nearby_points_are_named_without_labels_colliding(tmp_path):
    # make compare-cpu's points: LoRA and QLoRA at the same F1, 100 MB apart, once labelled "lora r=16qlora r=16"
    from flan_squad.reporting.plots import _colours, scatter_figure

    make_run(tmp_path, "0", "full", 95.3, rank=None, lr=5e-5, memory=1217.0)
    make_run(tmp_path, "1", "lora", 99.3, memory=1378.0)
    make_run(tmp_path, "2", "qlora", 99.3, memory=1474.0)
    make_run(tmp_path, "3", "lora", 99.0, lr=3e-4, memory=1380.0)
    settings = group([read_run(p) for p in find_run_dirs([str(tmp_path)])])
    fig = scatter_figure(settings, "peak_memory_mb", "peak memory (MB)", _colours({"full", "lora", "qlora"}))
    fig.canvas.draw()  # lays the legend out
    renderer = fig.canvas.get_renderer()
    ax, = fig.axes
    names = [t for t in ax.get_legend().get_texts()]
    assert sorted(t.get_text() for t in names) == ["full", "lora r=16 lr=0.0003", "lora r=16 lr=0.001", "qlora r=16"]
    texts = [t for t in [*ax.texts, *names, ax.title, ax.xaxis.label, ax.yaxis.label] if t.get_text()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i, a in enumerate(boxes):
        for j in range(i):
            assert not a.overlaps(boxes[j]), f"{texts[i].get_text()!r} prints over {texts[j].get_text()!r}"
    assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))  # beside


def test_no_heat_map_without_a_grid_and_curves_from_csv_logger(tmp_path):
    run = make_run(tmp_path, "only", "lora", 3.0)
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text("epoch,step,train/loss,val/f1\n0,9,2.5,\n0,10,,1.5\n1,20,,3.0\n")
    from flan_squad.reporting.plots import read_curve

    assert read_curve(read_run(run)) == [(10, 1.5), (20, 3.0)]
    _, _, plots = build_report([str(run)])
    assert sorted(p.name for p in plots) == ["f1_vs_memory.png", "f1_vs_time.png", "learning_curves.png"]


def test_learning_curves_start_from_the_base_models_score(tmp_path):
    from flan_squad.reporting.plots import reference_scores

    make_run(tmp_path, "trained", "lora", 9.0, curve=[(10, 5.0), (20, 9.0)])
    base = make_run(tmp_path, "base", "lora", 2.5)  # evaluate's metrics.json for a base model, no curve
    metrics = json.loads((base / "metrics.json").read_text())
    metrics.update(evaluated="base model t5-tiny", approach={"label": "base model, not fine-tuned", "capacity": None})
    (base / "metrics.json").write_text(json.dumps(metrics))
    runs = [read_run(tmp_path / "trained"), read_run(base)]
    assert reference_scores(runs) == [("base model, not fine-tuned", 2.5)]  # the trained run is a curve, not a line
    _, _, plots = build_report([str(tmp_path)])
    assert "learning_curves.png" in {p.name for p in plots}


def test_empty_missing_and_partial_inputs_give_messages(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "nope: no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no runs found under" in capsys.readouterr().err
    make_failed(tmp_path / "bad", "0", "lora", "RuntimeError: boom")
    (tmp_path / "bad" / "1" / ".hydra").mkdir(parents=True)  # a job killed before it wrote anything
    (tmp_path / "bad" / "1" / ".hydra" / "overrides.yaml").write_text("- strategy=full\n")
    (tmp_path / "bad" / "2").mkdir()
    (tmp_path / "bad" / "2" / "metrics.json").write_text("{not json")  # a damaged file
    assert main([str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "no completed run to compare" in err and "incomplete" in err and "unreadable" in err
    table = (tmp_path / "bad" / "report" / "results.md").read_text()
    assert "failed: RuntimeError: boom" in table and "incomplete: no metrics.json" in table


def test_runs_from_before_the_approach_was_recorded(tmp_path):
    # No `approach` in metrics.json: labelled by strategy and command-line settings, so a sweep's rows stay apart.
    for rank, f1 in ((4, 2.0), (16, 3.0)):
        make_run(tmp_path, f"lora_{rank}", "lora", f1, rank=rank, recorded=False)
    make_run(tmp_path, "full", "full", 1.0, rank=None, recorded=False)
    _, settings, plots = build_report([str(tmp_path)])
    assert [s.first.approach for s in settings] == ["lora rank=16", "lora rank=4", "full"]
    assert not any(p.name.startswith("heatmap") for p in plots)  # no recorded capacity to put on an axis


def test_globs_and_several_run_dirs(tmp_path):
    for name in ("a_full", "b_lora", "c_qlora"):
        make_run(tmp_path / "runs", name, name[2:], 1.0, rank=None if name == "a_full" else 8)
    out, settings, _ = build_report([str(tmp_path / "runs" / "*_*lora"), str(tmp_path / "runs" / "a_full")])
    assert out == tmp_path / "runs" / "report"
    assert sorted(s.first.strategy for s in settings) == ["full", "lora", "qlora"]


def test_numbered_jobs_and_named_dirs_sort_together(tmp_path):
    for name in ("10", "9", "base"):  # e.g. make compare-cpu: jobs 0-2 and the base model's evaluation
        make_run(tmp_path, name, "full", 1.0, rank=None)
    assert [p.name for p in find_run_dirs([str(tmp_path)])] == ["9", "10", "base"]
