"""Evaluate without training: `python -m flan_squad.evaluate [run_dir=...] dataset=squad_v2`.

A base model as it is (the "before fine-tuning" baseline), or a finished run restored exactly as trained,
answered through the very validation path of training (`SquadQAModule`: context windows, no-answer
probabilities, snapping) and scored with the official rules. Writes `predictions.json`, `na_probs.json`
(v2), `metrics.json` and `config.yaml` into its own run dir. `validate` is that answering path on its own:
`benchmarks/evaluation.py` times it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig

from flan_squad.models.base import count_parameters
from flan_squad.runs.cost import PeakMemory
from flan_squad.runs.lifecycle import Run
from flan_squad.runs.previous import EVALUATION_FILES
from flan_squad.runs.restore import Restored, restore, run_config
from flan_squad.runs.results import framed
from flan_squad.utils.config import register_resolvers
from flan_squad.utils.errors import exit_on_error
from flan_squad.utils.files import read_json

if TYPE_CHECKING:
    from flan_squad.data.datamodule import SquadDataModule
    from flan_squad.models.qa_module import SquadQAModule

log = logging.getLogger(__name__)


@dataclass
class ValidationPass:
    """One pass of the validation path over a split."""

    module: SquadQAModule  # predictions, na_probs, scores, answer_stats, and every window's answer
    datamodule: SquadDataModule
    restored: Restored
    trainer: L.Trainer
    seconds: float  # trainer.validate: answering and scoring (the data is read and encoded before)
    peak_memory_mb: float
    peak_memory_kind: str
    memory_before_model_mb: float | None  # what the process held before the model was loaded: not the evaluation's own


def validate(cfg: DictConfig, restored: Restored | None = None, progress_bar: bool = True) -> ValidationPass:
    """Answer and score cfg's validation split through training's validation path (`SquadQAModule` in a
    Lightning `Trainer.validate`): what `evaluate` runs, and what `benchmarks/evaluation.py` times.
    `restored`: a model already loaded (default: `restore(cfg, device)`)."""
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[TQDMProgressBar()] if progress_bar else [],
                                     enable_checkpointing=False, enable_progress_bar=progress_bar)
    device = trainer.strategy.root_device
    peak = PeakMemory(device)
    peak.reset()
    before = peak.current_mb()
    restored = restored or restore(cfg, device)
    datamodule = instantiate(cfg.dataset, tokenizer=restored.tokenizer, val_split=cfg.split,
                             **restored.base.question_format)
    if restored.version != datamodule.version:
        log.warning("%s was trained on SQuAD %s prompts; evaluating with %s (dataset=%s)",
                    restored.source, restored.version, datamodule.version, datamodule.name)
    datamodule.setup("validate")  # reading and encoding are not answering: outside the timed part
    module = instantiate(cfg.module)(base=restored.base, strategy=restored.strategy, tokenizer=restored.tokenizer,
                                     version=datamodule.version, model=restored.model)
    started = time.perf_counter()
    trainer.validate(module, datamodule=datamodule, verbose=False)
    seconds = time.perf_counter() - started
    return ValidationPass(module, datamodule, restored, trainer, seconds, round(peak.read_mb(), 1), peak.kind,
                      None if before is None else round(before, 1))


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    # The eval dir's life (runs/lifecycle.py), as a training run's: held by this process alone; a failure puts the
    # previous evaluation's files back (or records status.json "failed"); the MLflow run ends with the same status.
    with Run(cfg, files=EVALUATION_FILES, resumable=False) as run:
        output_dir = run.output_dir
        run.start(overwrite=True)  # a new evaluation replaces the previous one here, kept until it has finished
        if cfg.get("run_dir"):
            run_config(cfg.run_dir)  # a bad run_dir fails at once, before the Trainer and the model start
        L.seed_everything(cfg.seed)

        v = validate(cfg)
        module, datamodule, restored, seconds = v.module, v.datamodule, v.restored, v.seconds
        metrics = {
            **module.scores,
            **module.answer_stats,
            "evaluated": restored.source,
            "run_dir": str(cfg.run_dir) if cfg.get("run_dir") else None,
            "strategy": restored.strategy.name,  # for a base model: the strategy that loaded it (e.g. 4-bit for qlora)
            "approach": restored.approach,  # a base model's is the "before fine-tuning" row of a comparison report
            "model": restored.base.name,
            "init": restored.base.init,
            "model_note": restored.base.note,
            "dataset": datamodule.name,
            "squad_version": datamodule.version,
            "split": str(datamodule.validation_file or f"{datamodule.hub_id}[{cfg.split}]"),
            "val_examples": len(datamodule.val_questions),
            **_parameter_counts(cfg, restored),
            "eval_time_s": round(seconds, 3),
            "eval_questions_per_s": round(len(datamodule.val_questions) / max(seconds, 1e-9), 3),
            "peak_memory_mb": v.peak_memory_mb,
            "peak_memory_kind": v.peak_memory_kind,
            "memory_before_model_mb": v.memory_before_model_mb,
            "own_peak_memory_mb": None if v.memory_before_model_mb is None
            else round(v.peak_memory_mb - v.memory_before_model_mb, 1),
            "max_new_tokens": cfg.eval.max_new_tokens,
            "num_beams": cfg.eval.num_beams,
            "stride": cfg.eval.stride,
            "snap_to_context": cfg.eval.snap_to_context,
            "precision": str(v.trainer.precision),
            "device": str(v.trainer.strategy.root_device),
            **datamodule.stats,
            "output_dir": str(output_dir),
        }
        run.complete(metrics, module.predictions, module.na_probs, _summary(metrics))
    return metrics


def _parameter_counts(cfg: DictConfig, restored: Restored) -> dict[str, Any]:
    """The model's size; for a run, what it trained and at which lr (as its metrics.json says: evaluation loads
    adapters frozen). A base model trained nothing: no trainable count, no lr, as the report's base row shows."""
    # a run copied without its metrics.json: its counts are unknown, not an error
    trained = (read_json(Path(cfg.run_dir) / "metrics.json") or {}) if cfg.get("run_dir") else {}
    return {**count_parameters(restored.model), "trainable_params": trained.get("trainable_params"),
            "lr": trained.get("lr")}


def _summary(m: dict[str, Any]) -> str:
    return framed([
        f"flan-squad evaluate · {m['evaluated']} · {m['dataset']} ({m['split']})",
        f"  scores     exact {m['exact']:.2f}  f1 {m['f1']:.2f}  on {m['total']} questions"
        + (f"  (best_f1 {m['best_f1']:.2f} at na_prob > {m['best_f1_thresh']:.3g})" if "best_f1" in m else ""),
        f"  answering  {m['multi_window_questions']} questions needed >1 window, {m['snapped_answers']} answers "
        f"snapped to the context, {m['eval_time_s']:.1f} s ({m['eval_questions_per_s']:.2f} questions/s)",
        f"  artefacts  {m['output_dir']}",
    ], m)


register_resolvers()  # conf/ uses them; Hydra resolves the config inside main


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    with exit_on_error():
        return evaluate(cfg)["f1"]


if __name__ == "__main__":
    main()
