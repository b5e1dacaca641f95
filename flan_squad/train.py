"""Fine-tune a FLAN-T5 model on SQuAD: `python -m flan_squad.train strategy=qlora dataset=squad_v2`.

Instantiates what the config describes, fits, validates the best checkpoint, and writes the run's
artefacts into its Hydra run dir: `metrics.json`, `predictions.json` (+ `na_probs.json` for v2),
`config.yaml`, `model/` (with its model card, README.md), `checkpoints/`, `tensorboard/` and `status.json`.
"""

from __future__ import annotations

import os
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from flan_squad.models.optimizers import describe_optimizer
from flan_squad.runs.cost import CostMonitor
from flan_squad.runs.lifecycle import Run
from flan_squad.runs.model_card import command_line, write_model_card
from flan_squad.runs.owed_validation import OwedValidation
from flan_squad.runs.restore import build_parts
from flan_squad.runs.results import summary
from flan_squad.runs.resume import requeued
from flan_squad.runs.signals import Interruption, interruptible
from flan_squad.runs.trainer import (
    full_model_on_rank_zero,
    rebuild_before_reload,
    refuse_what_fsdp_cannot_train,
    uses_batch_size_finder,
)
from flan_squad.utils.config import register_resolvers
from flan_squad.utils.errors import ConfigError, exit_on_error
from flan_squad.utils.files import write_dir_atomic
from flan_squad.utils.process import in_multirun


def _instantiate_group(group: DictConfig | None) -> list:
    # An entry without `_target_` is a preset's tweak of something `callbacks=none` (or `logger=none`) removed,
    # e.g. experiment=smoke's checkpoint interval: nothing to build.
    return [instantiate(c) for c in (group or {}).values() if "_target_" in c]


def train(cfg: DictConfig) -> dict[str, Any]:
    # The run dir's life (runs/lifecycle.py): held by this process alone from here to the end of `with`; on the way
    # out of it a failure puts the previous run's files back (or records status.json "failed"), an interruption
    # records "interrupted" and leaves the run resumable; the MLflow run (logger=mlflow) ends with the same status.
    with Run(cfg) as run:
        if (kept := run.finished_sweep_job(cfg.resume)) is not None:
            return kept  # a sweep run again with resume=true: this job finished with this config
        output_dir = run.output_dir
        # Refused if the dir holds results (unless overwrite: then set aside until `complete`), nothing to resume, or
        # a resume that changes what the run computes (unless resume=force); writes config.yaml and .hydra/, opens
        # the MLflow run. DDP children get the same checkpoint.
        ckpt_path = run.start(resume=cfg.resume or requeued(output_dir), ckpt_path=cfg.ckpt_path,
                              overwrite=cfg.overwrite)
        _refuse_ddp_in_local_multirun(cfg)
        L.seed_everything(cfg.seed, workers=True)

        parts = build_parts(cfg)
        base, strategy, tokenizer = parts.base, parts.strategy, parts.tokenizer
        base.weights_path()  # random-init weights are built now, before DDP starts (transformers saves on rank 0 only)
        datamodule = instantiate(cfg.dataset, tokenizer=tokenizer, **base.question_format)
        module = instantiate(cfg.module)(base=base, strategy=strategy, tokenizer=tokenizer, version=datamodule.version,
                                         optimizer=instantiate(cfg.optimizer))
        cost = CostMonitor()
        # OwedValidation: a resume first redoes the validation an interruption cut short; validation leaves the
        # random state (training's dropout masks) as it found it
        callbacks = _instantiate_group(cfg.get("callbacks")) + [cost, Interruption(), OwedValidation()]
        loggers = _instantiate_group(cfg.get("logger"))
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        refuse_what_fsdp_cannot_train(trainer, strategy, compile=base.compile)

        with interruptible(trainer, output_dir):  # SIGTERM / SIGINT: last.ckpt, then RunInterrupted (exit 143 / 130)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            # read now: validating the best checkpoint below restores the callbacks' states saved with it
            stopping = trainer.early_stopping_callback
            trained = {**describe_optimizer(trainer.optimizers[0]),  # its class, lr and state memory
                       "stopped_early": bool(stopping and stopping.stopped_epoch)}
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            if best:
                rebuild_before_reload(trainer, module)
            trainer.loggers = []  # the best checkpoint's scores go to metrics.json, not as a second point on the curves
            trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)

        with full_model_on_rank_zero(trainer):  # FSDP: every rank joins in gathering the weights
            parameters = module.parameter_counts()  # (outside, under FSDP: one shard's)
            if run.is_rank_zero:
                write_dir_atomic(output_dir / "model", lambda d: strategy.save(module.model, tokenizer, d))
        metrics = {
            **module.scores,
            **module.answer_stats,
            "num_beams": module.num_beams,  # how validation decoded its answers (eval.num_beams)
            "strategy": strategy.name,
            "approach": strategy.describe(),  # label and capacity, for reports (which import no strategy code)
            "model": base.name,
            "init": base.init,
            "model_note": base.note,
            "dataset": datamodule.name,
            "squad_version": datamodule.version,
            **parameters,
            **cost.as_dict(),
            "train_examples": len(datamodule.train_questions),
            "val_examples": len(datamodule.val_questions),
            "epochs": trainer.current_epoch,
            "optimizer_steps": trainer.global_step,
            "batch_size": datamodule.batch_size,
            "auto_batch_size": uses_batch_size_finder(trainer),  # then batch_size is the size the finder chose
            **trained,
            "seed": cfg.seed,
            "precision": str(trainer.precision),
            "device": str(trainer.strategy.root_device),
            **datamodule.stats,
            "best_checkpoint": os.path.relpath(best, output_dir) if best else None,
            "resumed_from": ckpt_path,
            **({"config_changes": run.config_changes} if run.config_changes else {}),  # resume=force: what changed
            "output_dir": str(output_dir),
        }
        if run.is_rank_zero:
            write_model_card(output_dir / "model", metrics, cfg, command_line())
        # metrics.json, predictions.json, na_probs.json (v2), status.json "completed"; the previous run's files go
        run.complete(metrics, module.predictions, module.na_probs, summary(metrics, output_dir))
    return metrics


def optimized_metric(cfg: DictConfig, metrics: dict[str, Any]) -> float:
    """The value a sweeper optimises: metrics.json's `optimized_metric` (f1 by default)."""
    key = cfg.get("optimized_metric", "f1")
    if not isinstance(metrics.get(key), (int, float)):
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise ConfigError(f"optimized_metric={key}: not a number in this run's metrics.json (it has: "
                          f"{', '.join(numeric[:12])}, ...); its results are written")
    return float(metrics[key])


def _refuse_ddp_in_local_multirun(cfg: DictConfig) -> None:
    several = cfg.trainer.get("devices", 1) not in (1, "1") or cfg.trainer.get("num_nodes", 1) != 1
    if several and in_multirun() and "BasicLauncher" in HydraConfig.get().launcher._target_:
        # Lightning starts the other DDP processes by re-running this command line: with -m, the whole sweep.
        raise ConfigError("several devices per job inside a local multirun (-m) is not supported: run each job "
                          "on its own, or sweep with hydra/launcher=slurm (one SLURM job per sweep job)")


register_resolvers()  # conf/ uses them; Hydra resolves the config inside main


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    with exit_on_error():
        return optimized_metric(cfg, train(cfg))


if __name__ == "__main__":
    main()
