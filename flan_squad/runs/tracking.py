"""Experiment tracking in MLflow (`logger=mlflow`, `logger=tensorboard_mlflow`): every run, evaluation and sweep.

- `MLflowRun`: a run's own MLflow run, which the run's lifecycle (`runs.lifecycle.Run`) opens when the run
  starts, with the composed config as params and the tags a user filters by, and ends with what the run dir
  holds (the final `metrics.json` values, tags, artefacts) as FINISHED, FAILED with its error, or KILLED
  (interrupted). Its id is kept in `<run dir>/mlflow_run.json`: `resume=true` continues the same MLflow run.
- `MLflowLogger` (conf/logger/mlflow.yaml): Lightning's `MLFlowLogger`, logging the curves (train/loss,
  val/exact, val/f1, lr) per step into that run.
- `MLflowTracking` (a Hydra callback, conf/hydra/default.yaml): checks the tracking store before a run or
  sweep starts (a server that does not answer ends it with one line, exit 2), and opens a parent run for a
  multirun, so that its jobs show as one sweep.

The store: `logger.mlflow.tracking_uri=http://host:5000` (or MLFLOW_TRACKING_URI) for a server; by default a
local one that needs no server, `outputs/mlflow/` (a SQLite file and the artefacts):
`mlflow ui --backend-store-uri sqlite:///outputs/mlflow/mlflow.db` shows it.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from flan_squad.runs.model_card import command_line
from flan_squad.runs.results import weights_note
from flan_squad.utils.errors import ConfigError, first_line, print_error
from flan_squad.utils.files import read_json, write_json_atomic
from flan_squad.utils.process import in_multirun

log = logging.getLogger(__name__)

TARGET = f"{__name__}.MLflowLogger"  # how the callback finds the tracking settings in the `logger` group
RUN_FILE = "mlflow_run.json"  # in the run dir: which MLflow run it is (resume=true continues it)
SWEEP_FILE = "mlflow_sweep.json"  # in the sweep dir: the parent run of its jobs
# Not params: run control (`resume` turns true when a run continues, and MLflow params cannot change) and where
# files go (`paths`, and below, any value inside the run dir: they differ from job to job and would crowd the lr
# and rank out of MLflow's compare view).
NOT_PARAMS = {"resume", "ckpt_path", "overwrite", "paths"}
# metrics.json values that say what a run is: tags, to filter and group runs by.
TAG_KEYS = ("strategy", "model", "init", "dataset", "squad_version", "precision", "device", "output_dir", "evaluated")


@dataclass
class Store:
    """Where runs go: `tracking_uri` (a server, or any MLflow store URI), else the local store in `store_dir`."""

    tracking_uri: str | None
    store_dir: str
    experiment_name: str = "flan-squad"
    log_model: bool = False

    @property
    def uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{Path(self.store_dir).resolve() / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str | None:
        # A server decides where artefacts go; the local store keeps them beside its database (MLflow's own
        # default would be ./mlruns under whatever directory the run was started from).
        return None if self.tracking_uri else (Path(self.store_dir).resolve() / "artifacts").as_uri()

    def check(self) -> None:
        """Fail in one line, before any training, when the store cannot be reached or written."""
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError("logger=mlflow needs MLflow: pip install -e '.[tracking]' (or make tracking)")
        if self.tracking_uri and self.tracking_uri.startswith(("http://", "https://")):
            import requests

            try:
                answer = requests.get(f"{self.tracking_uri.rstrip('/')}/health", timeout=10)
                answer.raise_for_status()
            except requests.RequestException as e:
                reason = type(e).__name__ if not isinstance(e, requests.HTTPError) else str(e)
                raise ConfigError(
                    f"logger.mlflow.tracking_uri={self.tracking_uri}: no MLflow tracking server answers there "
                    f"({reason}); start one (mlflow server --host 127.0.0.1 --port 5000), fix the address, or drop "
                    f"the option to track in the local store ({self.store_dir})") from None
        elif not self.tracking_uri:
            try:
                Path(self.store_dir).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"logger.mlflow.store_dir={self.store_dir}: cannot create it ({e.strerror})") \
                    from None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def experiment_id(self, client) -> str:
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None and experiment.lifecycle_stage != "deleted":
            return experiment.experiment_id
        return client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)


def store_of(config: DictConfig) -> Store | None:
    """The MLflow settings of a composed config (its `logger` group), or None when it does not track."""
    for entry in (OmegaConf.select(config, "logger") or {}).values():
        if isinstance(entry, DictConfig) and entry.get("_target_") == TARGET:
            return Store(entry.tracking_uri, entry.store_dir, entry.experiment_name, entry.log_model)
    return None


class MLflowRun:
    """A run's MLflow run in `store`: `open` when the run starts (or continues), `end` when it has ended.
    Rank 0 only; see the module's docstring."""

    def __init__(self, store: Store, output_dir: Path):
        self.store, self.output_dir = store, Path(output_dir)
        self.run_id: str | None = None
        self.parent: str | None = None  # a sweep's run, when this is one of its jobs

    def open(self, resume: bool) -> str:
        """Create the MLflow run, or continue the one `mlflow_run.json` names (resume=true); log the config in the
        run dir (config.yaml) as params, and record the run's id in `mlflow_run.json`. Returns the id."""
        self.store.check()
        client = self.store.client()
        run_id = _run_of(self.output_dir, self.store) if resume else None
        continued = run_id is not None
        if not continued:
            run_id = client.create_run(self.store.experiment_id(client), run_name=_run_name(self.output_dir),
                                       tags=_tags_at_start()).info.run_id
        self.run_id, self.parent = run_id, client.get_run(run_id).data.tags.get("mlflow.parentRunId")
        _start(client, run_id, self.output_dir, resumed=continued)
        return run_id

    def end(self, record: dict[str, Any]) -> None:
        """Log the run dir's results (for a completed run) and end the MLflow run with `record`'s status (as
        `status.json` says it); a sweep's run ends too when one of its jobs did not finish. An MLflow failure is
        logged, not raised: tracking must not turn a finished run into a failed one (its files are there)."""
        try:
            self._end(record)
        except Exception as e:
            log.error("could not log %s to MLflow at %s: %s", self.output_dir, self.store.uri, first_line(e))

    def _end(self, record: dict[str, Any]) -> None:
        client, run_id, output_dir = self.store.client(), self.run_id, self.output_dir
        metrics = read_json(output_dir / "metrics.json") if record["status"] == "completed" else None
        if metrics:
            values = {k: float(v) for k, v in metrics.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
            _log_metrics(client, run_id, values, step=int(metrics.get("optimizer_steps") or 0))
            client.log_batch(run_id, tags=_tags(metrics))
            note = weights_note(metrics)
            if note:  # the run page's description: the first thing anyone reading its numbers sees
                client.set_tag(run_id, "mlflow.note.content", f"Note: {note}.")
            for name in ("metrics.json", "predictions.json", "na_probs.json", "config.yaml"):
                if (output_dir / name).is_file():
                    client.log_artifact(run_id, str(output_dir / name))
            model_dir = output_dir / "model"
            if self.store.log_model and model_dir.is_dir():
                client.log_artifacts(run_id, str(model_dir), "model")
            elif (model_dir / "README.md").is_file():  # the model card: where the model is and what it is
                client.log_artifact(run_id, str(model_dir / "README.md"), "model_card")
        status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(record["status"], "FAILED")
        _end(client, run_id, status, record.get("error"), record.get("traceback"))
        if status != "FINISHED" and self.parent:
            # The sweep ends non-zero (its launcher re-raises a failed job after the others ran; an interruption
            # ends it at once): so does its run.
            _end(client, self.parent, status, f"job {output_dir.name} {record['status']}: {record.get('error')}")


class MLflowLogger(MLFlowLogger):
    """Lightning's `MLFlowLogger` for one run dir (`output_dir`): the curves go into the MLflow run that the run's
    lifecycle opened (`mlflow_run.json`), which it also ends, with the run's results."""

    def __init__(self, output_dir: str, store_dir: str, tracking_uri: str | None = None,
                 experiment_name: str = "flan-squad", log_model: bool = False):
        self.store = Store(tracking_uri, store_dir, experiment_name, log_model)
        self.output_dir = Path(output_dir)
        record = read_json(self.output_dir / RUN_FILE)
        run_id = record["run_id"] if record and record.get("tracking_uri") == self.store.uri else None
        # log_model here is Lightning's (checkpoints): the model/ dir is logged at the end instead, if asked.
        super().__init__(experiment_name=experiment_name, run_name=_run_name(self.output_dir),
                         tracking_uri=self.store.uri, artifact_location=self.store.artifact_location,
                         run_id=run_id, log_model=False)

    def finalize(self, status: str = "success") -> None:
        pass  # a finished fit is not a finished run: `MLflowRun.end` ends it, with its results and status


class MLflowTracking(Callback):
    """The Hydra callback half of tracking: see the module's docstring. Does nothing unless the config's
    `logger` group holds `MLflowLogger`."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_or_exit(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        store = _check_or_exit(config)
        if store is None:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        client = store.client()
        params = config.hydra.sweeper.get("params")  # a preset's grid (hparams_search); none for `a=1,2` sweeps
        params = OmegaConf.to_container(params, resolve=False) if params else {}
        command = " ".join(["python -m", f"flan_squad.{config.hydra.job.name}", *config.hydra.overrides.task])
        parent = client.create_run(store.experiment_id(client), run_name=f"sweep {sweep_dir.name}", tags={
            "kind": "sweep", "sweep_dir": str(sweep_dir), "sweeper": config.hydra.sweeper._target_.split(".")[-1],
            "command": command,
            "mlflow.note.content": f"Sweep over {params or 'the command line'}; its jobs are the child runs."})
        if params:
            client.log_batch(parent.info.run_id, params=_params({"sweep": params}))
        write_json_atomic(sweep_dir / SWEEP_FILE, {"tracking_uri": store.uri, "run_id": parent.info.run_id})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # Reached only when every job completed (a sweep with a failed job raises before this).
        parent = _sweep_parent(config)
        if parent:
            _end(store_of(config).client(), parent, "FINISHED")


# --- the run's life ---------------------------------------------------------------------------------------


def _start(client, run_id: str, output_dir: Path, resumed: bool) -> None:
    """A run begins (or continues): record it, and log the composed config as params."""
    write_json_atomic(output_dir / RUN_FILE, {"tracking_uri": client.tracking_uri, "run_id": run_id})
    config = OmegaConf.load(output_dir / "config.yaml") if (output_dir / "config.yaml").is_file() else {}
    params = _params(OmegaConf.to_container(config, resolve=False) if config else {})
    params = [p for p in params if not p.value.startswith(str(output_dir))]
    if resumed:
        client.update_run(run_id, status="RUNNING")
        if "error" in client.get_run(run_id).data.tags:  # what stopped it is no longer its state
            client.delete_tag(run_id, "error")
        known = client.get_run(run_id).data.params
        params = [p for p in params if p.key not in known]  # MLflow params never change
    known_tags = {"init": "model.init", "model": "model.name", "dataset": "dataset.name", "model_note": "model.note"}
    tags = _tags({**{tag: OmegaConf.select(config, key) for tag, key in known_tags.items() if config},
                  "output_dir": str(output_dir)})
    for i in range(0, max(len(params), 1), 100):  # MLflow takes at most 100 params per call
        client.log_batch(run_id, params=params[i:i + 100], tags=tags if i == 0 else [])


def _end(client, run_id: str, status: str, error: str | None = None, trace: str | None = None) -> None:
    if error:
        client.set_tag(run_id, "error", error[:5000])
        client.set_tag(run_id, "mlflow.note.content", f"{status}: {error[:5000]}")
    if trace:
        client.log_text(run_id, trace, "error.txt")
    client.set_terminated(run_id, status)


def _run_of(output_dir: Path, store: Store) -> str | None:
    """The MLflow run this run dir continues (resume=true), if it was tracked in this store."""
    record = read_json(output_dir / RUN_FILE)
    if not record:
        return None
    if record.get("tracking_uri") != store.uri:
        log.warning("%s was tracked at %s, not %s: this resumed run gets a new MLflow run", output_dir,
                    record.get("tracking_uri"), store.uri)
        return None
    return record["run_id"]


def _sweep_parent(config: DictConfig) -> str | None:
    """The parent run of a multirun's jobs (`on_multirun_start` made it), or None for a single run. `config`:
    what Hydra hands its callbacks, the `hydra` node included."""
    hydra_cfg, store = OmegaConf.select(config, "hydra"), store_of(config)
    if hydra_cfg is None or store is None or not in_multirun(hydra_cfg):
        return None
    record = read_json(Path(hydra_cfg.sweep.dir) / SWEEP_FILE)
    return record["run_id"] if record and record.get("tracking_uri") == store.uri else None


def _check_or_exit(config: DictConfig) -> Store | None:
    store = store_of(config)
    if store is not None:
        try:
            store.check()
        except ConfigError as e:
            print_error(e)  # as `errors.exit_on_error` does, before Hydra starts the job
            sys.exit(2)
    return store


# --- what a run records -----------------------------------------------------------------------------------

def _run_name(output_dir: Path) -> str:
    if in_multirun():
        return f"{output_dir.parent.name}/{output_dir.name}"  # <sweep>/<job number>
    return output_dir.name


def _tags_at_start() -> dict[str, str]:
    """What Hydra knows of the run before it starts: the option of each config group, the sweep and job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    tags = {"kind": hydra_cfg.job.name, "strategy": choices.get("strategy"), "experiment": choices.get("experiment"),
            "command": command_line()}
    if in_multirun(hydra_cfg):
        tags.update({"sweep_dir": hydra_cfg.sweep.dir, "job_num": hydra_cfg.job.num})
        parent = read_json(Path(hydra_cfg.sweep.dir) / SWEEP_FILE)
        if parent:
            tags["mlflow.parentRunId"] = parent["run_id"]
    return {k: str(v) for k, v in tags.items() if v is not None}


def _tags(values: dict[str, Any]):
    from mlflow.entities import RunTag

    tags = {k: values[k] for k in TAG_KEYS if values.get(k) is not None}
    note = weights_note(values)  # "random-init weights: ..." or the model's own note (a self-trained base)
    if note:
        tags["model_note"] = note
    return [RunTag(k, str(v)) for k, v in tags.items()]


def _params(config: dict[str, Any], prefix: str = "") -> list:
    """The config flattened to MLflow params: strategy.lr, strategy.rank, model.name, dataset.batch_size, ..."""
    from mlflow.entities import Param

    params = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if not prefix and key in NOT_PARAMS:
            continue
        if isinstance(value, dict) and value:
            params.extend(_params(value, f"{name}."))
        else:
            params.append(Param(name, json.dumps(value) if isinstance(value, (list, dict)) else str(value)))
    return params


def _log_metrics(client, run_id: str, values: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v in values.items()]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
