"""hparams_search=optuna's sweeper: hydra-optuna-sweeper's, continuing a study from the jobs in its sweep dir.

Run again with the same command and `hydra.sweep.dir`, a search goes on where it stopped: each job dir already
there is a trial of the study (its parameters from `.hydra/overrides.yaml`, its value from `metrics.json`, failed if
its `status.json` says so) and counts towards `n_trials`; a trial that was running when the sweep was killed is
tried again from the start with the same parameters; new trials' job dirs follow the existing ones. The sweep dir
is the study's storage: optuna 2.x's SQL storage does not run on SQLAlchemy 2 (what MLflow needs), and the job dirs
hold everything a trial is. With `storage` set, or in a new sweep dir, it is hydra-optuna-sweeper's sweeper as is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import OmegaConf

from flan_squad.utils.files import read_json

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        if impl.storage is None and Path(impl.sweep_dir).is_dir():
            impl.storage = self._study_from_job_dirs(impl, arguments)
        return impl.sweep(arguments)

    @staticmethod
    def _study_from_job_dirs(impl, arguments: list[str]) -> Any:
        import optuna
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
        from optuna.trial import TrialState, create_trial

        impl._process_searchspace_config()
        space, _ = create_params_from_overrides([*impl._parse_sweeper_params_config(), *arguments])
        storage = optuna.storages.InMemoryStorage()
        study = optuna.create_study(study_name=impl.study_name, storage=storage, sampler=impl.sampler,
                                    directions=impl._get_directions())
        metric = impl.config.get("optimized_metric", "f1")
        jobs = sorted((int(p.name), p) for p in Path(impl.sweep_dir).iterdir() if p.is_dir() and p.name.isdigit())
        done, killed = 0, []
        for _, job in jobs:
            if (params := _params(job, space)) is None:
                continue  # not a trial of this search
            metrics, status = read_json(job / "metrics.json"), (read_json(job / "status.json") or {}).get("status")
            value = float(metrics[metric]) if metrics is not None and metric in metrics else None
            # Each trial asked again, in order, of the same seeded sampler: it proposes what it proposed then (a trial
            # that re-ran a killed one is given its parameters again), so the search goes on as if never stopped.
            if params in killed:
                killed.remove(params)
                study.enqueue_trial(params)
            trial = study.ask()
            impl._configure_trials([trial], space, {})
            if trial.params != params:  # another seed or search space: the proposal never ran; the job counts as is
                study.tell(trial, state=TrialState.FAIL)
                log.warning("%s: not what this search proposes at trial %d; counted with its own parameters", job,
                            trial.number)
                study.add_trial(create_trial(params=params, distributions=space, value=value,
                                             state=TrialState.COMPLETE if value is not None else TrialState.FAIL))
            else:
                study.tell(trial, value, state=TrialState.COMPLETE if value is not None else TrialState.FAIL)
            if value is None and status != "failed":
                killed.append(params)  # killed while running: tried again, as the next trial
            else:
                done += 1
        for params in killed:
            study.enqueue_trial(params)
        log.info("Optuna study %s continues from %s: %d of %d trials done, %d killed while running tried again",
                 impl.study_name, impl.sweep_dir, done, impl.n_trials, len(killed))
        impl.n_trials = max(0, impl.n_trials - done)
        impl.job_idx = jobs[-1][0] + 1 if jobs else 0  # new trials' job dirs follow the existing ones
        return storage


def _params(job: Path, space: dict) -> dict[str, Any] | None:
    """The job's value of each searched parameter (from the overrides it ran with), or None if it is not a trial of
    this search."""
    overrides = job / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return None
    given = dict(str(o).split("=", 1) for o in OmegaConf.load(overrides) if "=" in str(o))
    params = {}
    for name, distribution in space.items():
        if name not in given:
            return None
        choices = getattr(distribution, "choices", None)
        if choices is not None:
            value = next((c for c in choices if str(c) == given[name]), None)
        else:
            value = int(given[name]) if "Int" in type(distribution).__name__ else float(given[name])
        if value is None or not distribution._contains(distribution.to_internal_repr(value)):
            return None
        params[name] = value
    return params
