"""The report's PNG plots: F1 against cost, learning curves, and heat maps of F1 over lr x capacity.

One point (or line) per setting or run, coloured by strategy, so the strategies read apart at a glance.
Capacity is what training recorded as the hyperparameter that sets how much trains (LoRA's rank, say:
`Strategy.describe()`); each such hyperparameter swept with lr gets its own `heatmap_lr_<key>.png`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display here, nor on CI
import matplotlib.pyplot as plt  # noqa: E402

from flan_squad.reporting.runs import Run, Setting  # noqa: E402


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
        _scatter(done, *memory_axis(done), out / "f1_vs_memory.png", colours),
        _scatter(done, "train_time_s", "training time (s)", out / "f1_vs_time.png", colours),
    ]
    curves = _learning_curves([r for s in done for r in s.runs], out / "learning_curves.png", colours)
    capacities = sorted({s.first.capacity["key"] for s in done if s.first.capacity})
    heat = [_heatmap(done, key, out / f"heatmap_lr_{key}.png") for key in capacities]
    return written + [p for p in (curves, *heat) if p is not None]


def memory_axis(settings: list[Setting]) -> tuple[str, str]:
    """(key, label) of the memory plotted: the run's own peak (above what the process held before the model was
    built), or for runs that did not record it the whole process's."""
    if any(s.values("own_peak_memory_mb") for s in settings):
        return "own_peak_memory_mb", "peak memory, the run's own (MB)"
    return "peak_memory_mb", "peak memory of the whole process (MB)"


# Marker shapes within a strategy's colour, one per setting; past these, the same shapes again, hollow.
MARKERS = "osD^vPX*ph<>d"


def _scatter(settings: list[Setting], key: str, label: str, path: Path, colours: dict[str, str]) -> Path:
    fig = scatter_figure(settings, key, label, colours)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": the legend beside the axes is kept
    plt.close(fig)
    return path


def scatter_figure(settings: list[Setting], key: str, label: str, colours: dict[str, str]):
    """F1 against `key`, one point per setting: colour = strategy, shape = setting within it. Points are named
    in a legend beside the axes, not by text beside them: nearby points' labels would print over each other."""
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    many_datasets = len({s.first.dataset for s in settings}) > 1
    for strategy in sorted({s.first.strategy for s in settings}):
        points = [s for s in settings if s.first.strategy == strategy and s.mean(key) is not None
                  and s.mean("f1") is not None]
        many_lrs = len({p.first.lr for p in points}) > 1
        for i, s in enumerate(points):
            text = s.first.approach
            if many_lrs and isinstance(s.first.lr, float):
                text += f" lr={s.first.lr:g}"
            if many_datasets:
                text += f" · {s.first.dataset}"
            ax.errorbar([s.mean(key)], [s.mean("f1")], xerr=[s.std(key) or 0], yerr=[s.std("f1") or 0],
                        fmt=MARKERS[i % len(MARKERS)], fillstyle="full" if i < len(MARKERS) else "none",
                        markersize=9, capsize=3, color=colours[strategy], label=text)
    ax.set_xlabel(label)
    ax.set_ylabel("F1 (validation)")
    ax.set_title(_title(f"F1 vs {label}", [r for s in settings for r in s.runs]), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="setting", loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, borderaxespad=0)
    ax.margins(0.15)
    _f1_axis(ax)
    fig.tight_layout()
    return fig


def _f1_axis(ax) -> None:
    """F1 is 0-100: no negative range, and some height when every run scored 0 (random init)."""
    top = max(ax.dataLim.y1, 1.0)
    ax.set_ylim(-0.04 * top, 1.04 * top)  # room below 0 and above the best, so no point is cut in half


def read_curve(run: Run, tag: str = "val/f1") -> list[tuple[int, float]]:
    """(step, value) of a logged metric: from TensorBoard events, else from the CSV logger's metrics.csv."""
    points: dict[int, float] = {}
    if (run.path / "tensorboard").is_dir():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run.path / "tensorboard"), size_guidance={"scalars": 0}).Reload()
        if tag in events.Tags().get("scalars", []):
            points = {e.step: e.value for e in events.Scalars(tag)}
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
        for i, _capacity in enumerate(capacities):
            for j, _lr in enumerate(lrs):
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
