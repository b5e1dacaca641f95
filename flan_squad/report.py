"""Compare runs side by side: `python -m flan_squad.report PATH... [--out DIR]`.

PATH is a multirun dir, run dirs, or globs of them. Each run's `metrics.json` (or, for a failed job, its
`status.json`) is read; runs that differ only in `seed` are one setting, reported as mean ± std. Writes
into `PATH/report/` (or `--out`): `results.md` (the table, best value per column in bold), `results.csv`
(the same rows) and PNG plots (`flan_squad/plots.py`), and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flan_squad.utils.errors import FlanSquadError
from flan_squad.runs.status import STATUS_FILE

RUN_MARKERS = ("metrics.json", STATUS_FILE, ".hydra/overrides.yaml")


class ReportError(FlanSquadError):
    """Input the report cannot use; the message says which path and why."""


@dataclass
class Run:
    path: Path
    status: str  # completed | failed | incomplete
    metrics: dict[str, Any] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)  # config group choices (hydra.runtime.choices)
    config: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # the job's command-line overrides
    error: str = ""

    def get(self, key: str, default: Any = None) -> Any:
        return self.metrics.get(key, default)

    @property
    def strategy(self) -> str:
        return self.get("strategy") or self.choices.get("strategy") or "?"

    @property
    def lr(self) -> float | None:
        return self.get("lr", (self.config.get("strategy") or {}).get("lr"))

    @property
    def approach(self) -> str:
        """The strategy's label as training recorded it (`Strategy.describe()`, e.g. "lora r=16"). Failed runs,
        and runs from before it was recorded: the strategy's name and its settings given on the command line
        (lr aside: it has its own column), e.g. "lora rank=4"."""
        recorded = self.get("approach")
        if isinstance(recorded, dict) and recorded.get("label"):
            return str(recorded["label"])
        overrides = [o.lstrip("+") for o in self.overrides]
        settings = [o.removeprefix("strategy.") for o in overrides if o.startswith("strategy.")]
        return " ".join([self.strategy, *(s for s in settings if not s.startswith("lr="))])

    @property
    def capacity(self) -> dict[str, Any] | None:
        """What training recorded as the hyperparameter that sets how much trains: {"key", "title", "value"}."""
        recorded = self.get("approach")
        return recorded.get("capacity") if isinstance(recorded, dict) else None

    @property
    def dataset(self) -> str:
        return self.get("dataset") or self.choices.get("dataset") or "?"


# --- finding and reading runs ------------------------------------------------------------------------


def find_run_dirs(paths: list[str]) -> list[Path]:
    """Run dirs named by `paths` (run dirs, dirs holding runs at any depth, or globs), in sorted order."""
    found: set[Path] = set()
    for arg in paths:
        matches = sorted(glob.glob(arg)) if glob.has_magic(arg) else [arg]
        if not matches or not all(Path(m).exists() for m in matches):
            raise ReportError(f"{arg}: no such file or directory")
        for match in map(Path, matches):
            if match.is_file():
                match = match.parent  # e.g. .../metrics.json
            for marker in RUN_MARKERS:
                found.update(p.parents[marker.count("/")] for p in match.rglob(marker)
                             if "report" not in p.relative_to(match).parts)  # not a copy inside a report
    return sorted(found, key=lambda p: (len(p.parts), _natural(p)))


def _natural(path: Path) -> list:
    # multirun job 10 after job 9; numbered and named dirs (a base model's evaluation beside jobs) sort apart
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in path.parts]


def read_run(path: Path) -> Run:
    run = Run(path, "incomplete", error="no metrics.json: still running, or stopped before the end")
    hydra_yaml = path / ".hydra" / "hydra.yaml"
    if hydra_yaml.exists():
        run.choices = dict((_load_yaml(hydra_yaml).get("hydra") or {}).get("runtime", {}).get("choices") or {})
    for name in ("config.yaml", ".hydra/config.yaml"):  # resolved by train(), else as composed
        if (path / name).exists():
            run.config = _load_yaml(path / name)
            break
    status = _load_json(path / STATUS_FILE) if (path / STATUS_FILE).exists() else {}
    overrides = _load_yaml(path / ".hydra" / "overrides.yaml", list) or status.get("overrides") or []
    run.overrides = [str(o) for o in overrides]
    if (path / "metrics.json").exists():
        try:
            run.metrics = _load_json(path / "metrics.json")
            run.status, run.error = "completed", ""
        except ReportError as e:
            run.status, run.error = "failed", str(e)
    if status.get("status") == "failed":
        run.status, run.error = "failed", str(status.get("error") or "failed (no error recorded)")
    elif status.get("status") == "interrupted" and run.status == "incomplete":  # SIGTERM / SIGINT: resumable
        run.error = str(status.get("error"))
    return run


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _load_yaml(path: Path, kind: type = dict) -> Any:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # plain YAML: ${...} stays unresolved text
    except (OSError, yaml.YAMLError):
        return kind()
    return data if isinstance(data, kind) else kind()


# --- settings: runs that differ only in their seed ------------------------------------------------------

# (key in metrics.json, column title, better: "max" | "min" | None, format)
COLUMNS = [
    ("exact", "EM", "max", "{:.2f}"),
    ("f1", "F1", "max", "{:.2f}"),
    ("HasAns_f1", "HasAns F1", "max", "{:.2f}"),
    ("NoAns_f1", "NoAns F1", "max", "{:.2f}"),
    ("train_time_s", "train time (s)", "min", "{:.1f}"),
    ("train_examples_per_s", "examples/s", "max", "{:.2f}"),
    ("peak_memory_mb", "peak memory (MB)", "min", "{:.0f}"),
    ("trainable_params", "trainable params", "min", "{:,.0f}"),
    ("trainable_pct", "trainable %", "min", "{:.2f}"),
]


@dataclass
class Setting:
    """One row of the table: the runs of one setting (all seeds), or one failed/incomplete run."""

    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def status(self) -> str:
        return self.first.status

    def values(self, key: str) -> list[float]:
        out = []
        for run in self.runs:
            value = _trainable_pct(run) if key == "trainable_pct" else run.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out.append(float(value))
        return out

    def mean(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.fmean(values) if values else None

    def std(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.stdev(values) if len(values) > 1 else None


def _trainable_pct(run: Run) -> float | None:
    trainable, total = run.get("trainable_params"), run.get("total_params")
    return 100.0 * trainable / total if isinstance(trainable, int) and isinstance(total, int) and total else None


def setting_key(run: Run) -> tuple:
    """What makes two completed runs the same setting: everything the table shows or depends on, not the seed."""
    return (run.dataset, run.approach, run.lr, run.get("model"), run.get("init"), run.get("train_examples"),
            run.get("val_examples"), run.get("epochs"), run.get("precision"), run.get("device"))


def group(runs: list[Run]) -> list[Setting]:
    """Completed runs grouped by setting, sorted by dataset then F1 (best first); failed ones after, alone."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.status == "completed":
            groups.setdefault(setting_key(run), []).append(run)
    settings = sorted((Setting(rs) for rs in groups.values()),
                      key=lambda s: (s.first.dataset, -(s.mean("f1") or 0.0), s.first.approach))
    return settings + [Setting([run]) for run in runs if run.status != "completed"]


def best_values(settings: list[Setting]) -> dict[tuple[str, str], float]:
    """(dataset, column key) -> the best mean among completed settings of that dataset (2 or more only)."""
    best: dict[tuple[str, str], float] = {}
    for dataset in {s.first.dataset for s in settings if s.status == "completed"}:
        rows = [s for s in settings if s.status == "completed" and s.first.dataset == dataset]
        if len(rows) < 2:
            continue
        for key, _, better, _ in COLUMNS:
            means = [m for m in (s.mean(key) for s in rows) if m is not None]
            if len(means) >= 2 and max(means) > min(means):  # all equal: nothing to single out
                best[(dataset, key)] = max(means) if better == "max" else min(means)
    return best


# --- the table -----------------------------------------------------------------------------------------


def _cell(setting: Setting, key: str, fmt: str, best: float | None) -> str:
    mean = setting.mean(key)
    if mean is None:
        return "–"
    text = fmt.format(mean)
    std = setting.std(key)
    if std is not None:
        text += " ± " + fmt.format(std)
    return f"**{text}**" if best is not None and math.isclose(mean, best, rel_tol=1e-9, abs_tol=1e-9) else text


def _init_cell(run: Run) -> str:
    if run.get("model_note"):
        return str(run.get("model_note"))
    return "random init (scores meaningless)" if run.get("init") == "random" else str(run.get("init", "?"))


def table_rows(settings: list[Setting]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the markdown table; columns no run has (e.g. NoAns F1 on v1) are left out."""
    columns = [c for c in COLUMNS if any(s.values(c[0]) for s in settings)]
    header = ["dataset", "approach", "lr", "seeds", *(title for _, title, _, _ in columns), "model", "init", "status"]
    best = best_values(settings)
    rows = []
    for s in settings:
        run = s.first
        seeds = ", ".join(str(r.get("seed")) for r in s.runs if r.get("seed") is not None) or "–"
        row = [run.dataset, run.approach, f"{run.lr:g}" if isinstance(run.lr, (int, float)) else "–", seeds]
        if s.status == "completed":
            row += [_cell(s, key, fmt, best.get((run.dataset, key))) for key, _, _, fmt in columns]
            row += [str(run.get("model", "?")), _init_cell(run), "ok" if len(s.runs) == 1 else f"ok (n={len(s.runs)})"]
        else:
            row += ["–"] * len(columns) + [run.choices.get("model", "?"), "–", f"{s.status}: {run.error}"]
        rows.append(row)
    return header, rows


def markdown(settings: list[Setting], sources: list[str]) -> str:
    header, rows = table_rows(settings)
    escape = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["# flan-squad: strategy comparison", ""]
    completed = [r for s in settings if s.status == "completed" for r in s.runs]
    if any(r.get("init") == "random" for r in completed):
        lines += ["**Random-init runs** (marked in the init column): their EM/F1 say nothing about FLAN-T5's "
                  "accuracy; time, throughput, memory and parameter counts are real.", ""]
    kinds = sorted({str(r.get("peak_memory_kind")) for r in completed if r.get("peak_memory_kind")})
    lines += [f"Runs from: {', '.join(sources)}. Best value per dataset in **bold**; mean ± std over seeds. "
              f"Peak memory: {' / '.join(kinds) or 'n/a'} (rss = peak resident set on CPU, "
              f"cuda_max_allocated on GPU).", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(settings: list[Setting]) -> str:
    out = io.StringIO()
    keys = [key for key, _, _, _ in COLUMNS]
    writer = csv.writer(out)
    writer.writerow(["dataset", "approach", "strategy", "capacity", "capacity_value", "lr", "n_runs", "seeds",
                     "status", "error",
                     *[k for key in keys for k in (key, f"{key}_std")], "model", "init", "runs"])
    for s in settings:
        run = s.first
        stats = [v if v is not None else "" for key in keys for v in (s.mean(key), s.std(key))]
        capacity = run.capacity or {}
        writer.writerow([run.dataset, run.approach, run.strategy, capacity.get("key", ""), capacity.get("value", ""),
                         run.lr if run.lr is not None else "", len(s.runs),
                         " ".join(str(r.get("seed", "")) for r in s.runs), s.status, run.error, *stats,
                         run.get("model", run.choices.get("model", "")), run.get("init", ""),
                         " ".join(str(r.path) for r in s.runs)])
    return out.getvalue()


# --- entry point -------------------------------------------------------------------------------------------


def build_report(paths: list[str], out: str | Path | None = None) -> tuple[Path, list[Setting], list[Path]]:
    """Read the runs under `paths`, write the table, CSV and plots; return (out dir, rows, plot files)."""
    from flan_squad.reporting.plots import write_plots

    run_dirs = find_run_dirs(paths)
    if not run_dirs:
        raise ReportError(f"no runs found under {', '.join(paths)} (a run dir holds metrics.json, "
                          f"{STATUS_FILE} or .hydra/; is this the output of flan_squad.train?)")
    runs = [read_run(p) for p in run_dirs]
    settings = group(runs)
    if out is None:
        roots = [Path(p) for p in paths if not glob.has_magic(p) and Path(p).is_dir()]
        out = (roots[0] if len(roots) == 1 == len(paths) else Path(os.path.commonpath(run_dirs))) / "report"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(settings, paths), encoding="utf-8")
    (out / "results.csv").write_text(csv_text(settings), encoding="utf-8")
    plots = write_plots(settings, out) if any(s.status == "completed" for s in settings) else []
    return out, settings, plots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flan_squad.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="a multirun dir, run dirs, or globs")
    parser.add_argument("--out", help="where to write the report (default: PATH/report)")
    args = parser.parse_args(argv)
    try:
        out, settings, plots = build_report(args.paths, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / "results.md").read_text(encoding="utf-8"))
    completed = sum(len(s.runs) for s in settings if s.status == "completed")
    others = [s.first for s in settings if s.status != "completed"]
    print(f"{completed} completed run(s), {len(others)} failed or incomplete; wrote {out}/results.md, "
          f"results.csv" + "".join(f", {p.name}" for p in plots))
    for run in others:
        print(f"  {run.status}: {run.path}: {run.error}", file=sys.stderr)
    if not completed:
        print("error: no completed run to compare (see the failed/incomplete rows above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
