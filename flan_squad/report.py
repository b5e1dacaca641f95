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
import math
import os
import sys
from pathlib import Path

from flan_squad.reporting.plots import write_plots
from flan_squad.reporting.runs import ReportError, Run, Setting, find_run_dirs, group, read_run
from flan_squad.runs.status import STATUS_FILE
from flan_squad.utils.errors import print_error

# (key in metrics.json, column title, better: "max" | "min" | None, format)
COLUMNS = [
    ("exact", "EM", "max", "{:.2f}"),
    ("f1", "F1", "max", "{:.2f}"),
    ("HasAns_f1", "HasAns F1", "max", "{:.2f}"),
    ("NoAns_f1", "NoAns F1", "max", "{:.2f}"),
    ("train_time_s", "train time (s)", "min", "{:.1f}"),
    ("train_examples_per_s", "examples/s", "max", "{:.2f}"),
    ("own_peak_memory_mb", "memory, run's own (MB)", "min", "{:.0f}"),
    ("peak_memory_mb", "raw peak (MB)", None, "{:.0f}"),
    ("optimizer_state_mb", "optimizer state (MB)", "min", "{:.1f}"),
    ("trainable_params", "trainable params", "min", "{:,.0f}"),
    ("trainable_pct", "trainable %", "min", "{:.2f}"),
]


def best_values(settings: list[Setting]) -> dict[tuple[str, str], float]:
    """(dataset, column key) -> the best mean among completed settings of that dataset (2 or more only)."""
    best: dict[tuple[str, str], float] = {}
    for dataset in {s.first.dataset for s in settings if s.status == "completed"}:
        rows = [s for s in settings if s.status == "completed" and s.first.dataset == dataset]
        if len(rows) < 2:
            continue
        for key, _, better, _ in COLUMNS:
            if better is None:
                continue
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
    header = ["dataset", "approach", "lr", "optimizer", "seeds", *(title for _, title, _, _ in columns), "model",
              "init", "status"]
    best = best_values(settings)
    rows = []
    for s in settings:
        run = s.first
        seeds = ", ".join(str(r.get("seed")) for r in s.runs if r.get("seed") is not None) or "–"
        row = [run.dataset, run.approach, f"{run.lr:g}" if isinstance(run.lr, (int, float)) else "–",
               str(run.get("optimizer") or "–"), seeds]
        if s.status == "completed":
            row += [_cell(s, key, fmt, best.get((run.dataset, key))) for key, _, _, fmt in columns]
            row += [str(run.get("model", "?")), _init_cell(run), "ok" if len(s.runs) == 1 else f"ok (n={len(s.runs)})"]
        else:
            row += ["–"] * len(columns) + [run.choices.get("model", "?"), "–", f"{s.status}: {run.error}"]
        rows.append(row)
    return header, rows


# The account of the run's own training peak (metrics.json "memory_account", flan_squad.runs.cost): weights by dtype,
# then these; "rest" is the own peak less all of them.
ACCOUNT = [("memory_account.gradients_mb", "gradients"), ("memory_account.optimizer_state_mb", "optimizer state"),
           ("memory_account.rest_mb", "rest: activations, workspace")]


def weight_kinds(settings: list[Setting]) -> list[str]:
    """The dtypes the runs' weights are held in (4bit, bf16, fp32, ...), from their memory accounts."""
    return sorted({kind for s in settings for r in s.runs for kind in (r.get("memory_account.weights_mb") or {})})


def account_rows(settings: list[Setting]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the memory account table: the trained runs that have one."""
    kinds = weight_kinds(settings)
    header = ["dataset", "approach", "lr", "memory, run's own (MB)", *(f"weights {k}" for k in kinds),
              *(title for _, title in ACCOUNT)]
    rows = []
    for s in settings:
        if s.status != "completed" or not s.values("memory_account.gradients_mb"):
            continue
        run = s.first
        keys = ["own_peak_memory_mb", *(f"memory_account.weights_mb.{k}" for k in kinds), *(k for k, _ in ACCOUNT)]
        rows.append([run.dataset, run.approach, f"{run.lr:g}" if isinstance(run.lr, (int, float)) else "–",
                     *(_cell(s, key, "{:.0f}", None) for key in keys)])
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    escape = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return (["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
            + ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows])


def markdown(settings: list[Setting], sources: list[str]) -> str:
    header, rows = table_rows(settings)
    lines = ["# flan-squad: strategy comparison", ""]
    completed = [r for s in settings if s.status == "completed" for r in s.runs]
    if any(r.get("init") == "random" for r in completed):
        lines += ["**Random-init runs** (marked in the init column): their EM/F1 say nothing about FLAN-T5's "
                  "accuracy; time, throughput, memory and parameter counts are real.", ""]
    kinds = sorted({str(r.get("peak_memory_kind")) for r in completed if r.get("peak_memory_kind")})
    lines += [f"Runs from: {', '.join(sources)}. Best value per dataset in **bold**; mean ± std over seeds. "
              f"Peak memory: {' / '.join(kinds) or 'n/a'} (rss = peak resident set on CPU, cuda_max_allocated on GPU); "
              f"the run's own is the training peak above what the process held just before the model was built (the "
              f"interpreter, torch, the data); a base model's row: its evaluation's.", ""]
    lines += _markdown_table(header, rows)
    account_header, account = account_rows(settings)
    if account:
        lines += ["", "Memory account of the run's own training peak (MB; mean ± std over seeds): weights by dtype, "
                  "gradients and optimizer state read from the model and optimizer; the rest is the peak less them.",
                  "", *_markdown_table(account_header, account)]
    return "\n".join(lines) + "\n"


def _csv_name(key: str) -> str:
    """A CSV column for a metrics.json key: the account's flattened ("memory_account.weights_mb.fp32" ->
    "weights_fp32_mb")."""
    parts = key.split(".")
    return f"weights_{parts[2]}_mb" if parts[:2] == ["memory_account", "weights_mb"] else parts[-1]


def csv_text(settings: list[Setting]) -> str:
    out = io.StringIO()
    keys = [key for key, _, _, _ in COLUMNS] + ["memory_before_model_mb", "own_peak_val_memory_mb"]
    keys += [f"memory_account.weights_mb.{k}" for k in weight_kinds(settings)] + [k for k, _ in ACCOUNT]
    writer = csv.writer(out)
    writer.writerow(["dataset", "approach", "strategy", "capacity", "capacity_value", "lr", "optimizer", "n_runs",
                     "seeds",
                     "status", "error",
                     *[name for key in keys for name in (_csv_name(key), f"{_csv_name(key)}_std")],
                     "model", "init", "runs"])
    for s in settings:
        run = s.first
        stats = [v if v is not None else "" for key in keys for v in (s.mean(key), s.std(key))]
        capacity = run.capacity or {}
        writer.writerow([run.dataset, run.approach, run.strategy, capacity.get("key", ""), capacity.get("value", ""),
                         run.lr if run.lr is not None else "", run.get("optimizer") or "", len(s.runs),
                         " ".join(str(r.get("seed", "")) for r in s.runs), s.status, run.error, *stats,
                         run.get("model", run.choices.get("model", "")), run.get("init", ""),
                         " ".join(str(r.path) for r in s.runs)])
    return out.getvalue()


# --- entry point -------------------------------------------------------------------------------------------


def build_report(paths: list[str], out: str | Path | None = None) -> tuple[Path, list[Setting], list[Path]]:
    """Read the runs under `paths`, write the table, CSV and plots; return (out dir, rows, plot files)."""
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
        print_error(e)
        return 2
    print((out / "results.md").read_text(encoding="utf-8"))
    completed = sum(len(s.runs) for s in settings if s.status == "completed")
    others = [s.first for s in settings if s.status != "completed"]
    print(f"{completed} completed run(s), {len(others)} failed or incomplete; wrote {out}/results.md, "
          f"results.csv" + "".join(f", {p.name}" for p in plots))
    for run in others:
        print(f"  {run.status}: {run.path}: {run.error}", file=sys.stderr)
    if not completed:
        print_error("no completed run to compare (see the failed/incomplete rows above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
