"""The runs a report compares: run dirs found under the given paths, each read into a `Run` (its metrics.json,
or for a failed job its status.json, and the Hydra choices and overrides), and grouped into `Setting`s: runs that
differ only in `seed`, reported as mean ± std. Read by the table (`flan_squad.report`) and the plots
(`flan_squad.reporting.plots`); torch-free, like both.
"""

from __future__ import annotations

import glob
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flan_squad.runs.status import STATUS_FILE
from flan_squad.utils.errors import FlanSquadError

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
        """A value of metrics.json; "a.b" reads inside a nested record (e.g. "memory_account.gradients_mb")."""
        value: Any = self.metrics
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return default
            value = value[part]
        return value

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
    return (run.dataset, run.approach, run.lr, run.get("optimizer"), run.get("model"), run.get("init"),
            run.get("train_examples"), run.get("val_examples"), run.get("epochs"), run.get("precision"),
            run.get("device"))


def group(runs: list[Run]) -> list[Setting]:
    """Completed runs grouped by setting, sorted by dataset then F1 (best first); failed ones after, alone."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.status == "completed":
            groups.setdefault(setting_key(run), []).append(run)
    settings = sorted((Setting(rs) for rs in groups.values()),
                      key=lambda s: (s.first.dataset, -(s.mean("f1") or 0.0), s.first.approach))
    return settings + [Setting([run]) for run in runs if run.status != "completed"]
