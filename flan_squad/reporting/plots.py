"""The report's PNG plots: F1 against cost, learning curves, and heat maps of F1 over lr x capacity.

One point (or line) per setting or run, coloured by strategy, so the strategies read apart at a glance.
Capacity is what training recorded as the hyperparameter that sets how much trains (LoRA's rank, say:
`Strategy.describe()`); each such hyperparameter swept with lr gets its own `heatmap_lr_<key>.png`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display here, nor on CI
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from flan_squad.report import Run, Setting


def _colours(strategies: set[str]) -> dict[str, str]:
    """Matplotlib's default colour cycle in the strategies' name order: the same colours for the same set."""
    return {name: f"C{i % 10}" for i, name in enumerate(sorted(strategies))}


def _title(base: str, runs: list[Run]) -> str:
    random = any(r.get("init") == "random" for r in runs)
    datasets = sorted({r.dataset for r in runs})
    return f"{base} · {', '.join(datasets)}" + (" · random init: scores meaningless" if random else "")


def write_plots(settings: list[Setting], out: Path) -> list[Path]:
    """Every plot the runs support; returns the files written."""
    done = [s for s in settings if s.status == "completed"]
    colours = _colours({s.first.strategy for s in done})
    written = [
        _scatter(done, "peak_memory_mb", "peak memory (MB)", out / "f1_vs_memory.png", colours),
        _scatter(done, "train_time_s", "training time (s)", out / "f1_vs_time.png", colours),
    ]
    curves = _learning_curves([r for s in done for r in s.runs], out / "learning_curves.png", colours)
    capacities = sorted({s.first.capacity["key"] for s in done if s.first.capacity})
    heat = [_heatmap(done, key, out / f"heatmap_lr_{key}.png") for key in capacities]
    return written + [p for p in (curves, *heat) if p is not None]


def _scatter(settings: list[Setting], key: str, label: str, path: Path, colours: dict[str, str]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in sorted({s.first.strategy for s in settings}):
        points = [s for s in settings if s.first.strategy == strategy and s.mean(key) is not None
                  and s.mean("f1") is not None]
        if not points:
            continue
        ax.errorbar([s.mean(key) for s in points], [s.mean("f1") for s in points],
                    xerr=[s.std(key) or 0 for s in points], yerr=[s.std("f1") or 0 for s in points],
                    fmt="o", markersize=9, capsize=3, color=colours[strategy], label=strategy)
        for s in points:
            text = s.first.approach
            if len({p.first.lr for p in points}) > 1 and isinstance(s.first.lr, float):
                text += f" lr={s.first.lr:g}"
            if len({p.first.dataset for p in settings}) > 1:
                text += f" · {s.first.dataset}"
            ax.annotate(text, (s.mean(key), s.mean("f1")), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.set_xlabel(label)
    ax.set_ylabel("F1 (validation)")
    ax.set_title(_title(f"F1 vs {label}", [r for s in settings for r in s.runs]), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="strategy")
    ax.margins(0.15)
    _f1_axis(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _f1_axis(ax) -> None:
    """F1 is 0-100: no negative range, and some height when every run scored 0 (random init)."""
    top = max(ax.get_ylim()[1], 1.0)
    ax.set_ylim(-0.04 * top, top)  # a little room below 0, so points at 0 are not cut in half


def read_curve(run: Run, tag: str = "val/f1") -> list[tuple[int, float]]:
    """(step, value) of a logged metric: from TensorBoard events, else from the CSV logger's metrics.csv."""
    points: dict[int, float] = {}
    if (run.path / "tensorboard").is_dir():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run.path / "tensorboard"), size_guidance={"scalars": 0}).Reload()
        if tag in events.Tags().get("scalars", []):
            points = {e.step: e.value for e in events.Scalars(tag)}  # the final re-validation repeats a step
    if not points and (run.path / "csv" / "metrics.csv").is_file():
        with open(run.path / "csv" / "metrics.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get(tag) not in (None, "") and row.get("step") not in (None, ""):
                    points[int(row["step"])] = float(row[tag])
    return sorted(points.items())


def reference_scores(runs: list[Run]) -> list[tuple[str, float]]:
    """(label, F1) of the base-model evaluations among the runs (`flan_squad.evaluate` without a run_dir): what
    the learning curves started from, drawn across them as dashed lines."""
    return [(run.approach, run.get("f1")) for run in runs
            if run.get("evaluated") and not run.get("run_dir") and run.get("f1") is not None]


def _learning_curves(runs: list[Run], path: Path, colours: dict[str, str]) -> Path | None:
    curves = [(run, read_curve(run)) for run in runs]
    curves = [(run, points) for run, points in curves if points]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled: set[str] = set()
    for run, points in curves:
        steps, values = zip(*points)
        label = run.strategy if run.strategy not in labelled else None
        labelled.add(run.strategy)
        ax.plot(steps, values, marker="o", color=colours[run.strategy], label=label, alpha=0.8)
    for label, f1 in reference_scores(runs):
        ax.axhline(f1, linestyle="--", color="grey", alpha=0.8, label=f"{label} ({f1:.1f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation F1")
    ax.set_title(_title("Learning curves", [run for run, _ in curves]), fontsize=10)
    _f1_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend(title="strategy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _heatmap(settings: list[Setting], key: str, path: Path) -> Path | None:
    """Mean F1 over an lr x `key` grid, one panel per (dataset, strategy) that swept both (2+ values each)."""
    panels = []
    for dataset, strategy in sorted({(s.first.dataset, s.first.strategy) for s in settings}):
        cells = [s for s in settings if (s.first.dataset, s.first.strategy) == (dataset, strategy)
                 and (s.first.capacity or {}).get("key") == key]
        lrs = sorted({s.first.lr for s in cells})
        capacities = sorted({s.first.capacity["value"] for s in cells})
        if len(lrs) >= 2 and len(capacities) >= 2:
            f1 = {(s.first.lr, s.first.capacity["value"]): s.mean("f1") for s in cells}
            panels.append(((dataset, strategy), cells[0].first.capacity["title"], lrs, capacities, f1))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1, 4), squeeze=False)
    for ax, ((dataset, strategy), title, lrs, capacities, f1) in zip(axes[0], panels):
        grid = [[f1.get((lr, capacity), math.nan) for lr in lrs] for capacity in capacities]
        image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
        for i, capacity in enumerate(capacities):
            for j, lr in enumerate(lrs):
                value = grid[i][j]
                ax.text(j, i, "n/a" if math.isnan(value) else f"{value:.2f}", ha="center", va="center",
                        color="white" if math.isnan(value) or value < (image.norm.vmax + image.norm.vmin) / 2
                        else "black")
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_yticks(range(len(capacities)), [str(c) for c in capacities])
        ax.set_xlabel("learning rate")
        ax.set_ylabel(title)
        ax.set_title(f"F1 · {strategy} · {dataset}", fontsize=10)
        fig.colorbar(image, ax=ax, label="F1")
    if any(r.get("init") == "random" for s in settings for r in s.runs):
        fig.suptitle("random init: scores meaningless", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
