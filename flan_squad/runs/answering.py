"""Answer plain questions as a run's scores were computed: the one answering path of `predict` and `serve`.

`Answerer.from_config(cfg)` restores the model (`run_dir=...`, or a base model), on cfg's device and in its precision,
with the settings the run was scored with: its config.yaml's `eval` section (windows, generation length, beams,
snapping) and `dataset.max_source_length`, each unless the command line sets it. `Answerer.answer` goes through
`evaluation.inference.answer_questions`, validation's own choices (context windows, the best window, snapping, v2
no-answer probabilities), then applies the no-answer threshold that `no_answer_threshold` names:
- null: none, as metrics.json's `exact`/`f1` were scored ("" only where the model itself says there is no answer);
- best: the run's `best_f1_thresh` (metrics.json), as its `best_f1` was scored;
- a number in [0, 1]: "" wherever the no-answer probability is above it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from flan_squad.data.encoding import encode
from flan_squad.data.squad import Question
from flan_squad.evaluation.inference import Answers, answer_questions
from flan_squad.evaluation.metrics import apply_threshold
from flan_squad.runs.restore import Restored, restore, run_config
from flan_squad.runs.results import weights_note
from flan_squad.utils.errors import ConfigError
from flan_squad.utils.files import read_json
from flan_squad.utils.precision import check_precision

RUN_SETTINGS = ("eval", "dataset.max_source_length")  # what a run's config.yaml says about how it answered


def command_line_keys() -> set[str]:
    """The keys this job's command line sets (`eval.stride=64` -> "eval.stride"); none outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def with_run_settings(cfg: DictConfig, given: set[str]) -> DictConfig:
    """`cfg` with the answering settings of its `run_dir` (RUN_SETTINGS), except the keys in `given`."""
    if not cfg.get("run_dir"):
        return cfg
    run = run_config(cfg.run_dir)
    cfg = cfg.copy()
    with open_dict(cfg):
        for section in RUN_SETTINGS:
            value = OmegaConf.select(run, section)
            if isinstance(value, DictConfig):
                for key, item in value.items():
                    if f"{section}.{key}" not in given and section not in given:
                        OmegaConf.update(cfg, f"{section}.{key}", item, merge=False)
            elif value is not None and section not in given:
                OmegaConf.update(cfg, section, value, merge=False)
    return cfg


def no_answer_threshold(cfg: DictConfig, version: str) -> float | None:
    """The threshold `cfg.no_answer_threshold` asks for (see the module's docstring); None: none."""
    choice = cfg.get("no_answer_threshold")
    if choice is None:
        return None
    if version != "v2":
        raise ConfigError(f"no_answer_threshold={choice}: only SQuAD v2 runs answer with a no-answer probability")
    if choice == "best":
        if not cfg.get("run_dir"):
            raise ConfigError("no_answer_threshold=best: the threshold is a run's (metrics.json): give run_dir=...")
        metrics = read_json(Path(cfg.run_dir) / "metrics.json") or {}
        if not isinstance(metrics.get("best_f1_thresh"), (int, float)):
            raise ConfigError(f"no_answer_threshold=best: {Path(cfg.run_dir) / 'metrics.json'} has no best_f1_thresh")
        return float(metrics["best_f1_thresh"])
    if isinstance(choice, bool) or not isinstance(choice, (int, float)) or not 0.0 <= choice <= 1.0:
        raise ConfigError(f"no_answer_threshold={choice}: expected null, best, or a probability in [0, 1]")
    return float(choice)


@dataclass
class Answerer:
    """A restored model and the settings it answers with (see the module's docstring)."""

    restored: Restored
    device: torch.device
    precision: str
    max_source_length: int
    stride: int | None
    max_new_tokens: int
    snap_to_context: bool
    num_beams: int
    batch_size: int
    threshold: float | None
    _check_tokenizer: Any = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: DictConfig, given: set[str] | None = None) -> Answerer:
        """From a predict/serve config; `given`: the keys the user set (default: this job's command line)."""
        cfg = with_run_settings(cfg, command_line_keys() if given is None else given)
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                              else "cpu" if cfg.device == "auto" else cfg.device)
        precision = check_precision(cfg.precision, "precision")
        if precision not in ("bf16-mixed", "32-true", "32"):
            raise ConfigError(f"precision={precision}: expected bf16-mixed or 32-true")
        restored = restore(cfg, device)
        return cls(restored, device, precision, cfg.dataset.max_source_length, cfg.eval.stride,
                   cfg.eval.max_new_tokens, cfg.eval.snap_to_context, cfg.eval.num_beams, cfg.batch_size,
                   no_answer_threshold(cfg, restored.version))

    def check(self, question: Question) -> int:
        """How many model inputs (context windows) `question` makes; a `DataError` if it cannot be posed. Safe
        beside `answer` in another thread: a fast tokenizer is not (its truncation settings are shared state)."""
        if self._check_tokenizer is None:
            self._check_tokenizer = copy.deepcopy(self.restored.tokenizer)
        return len(encode([question], self._check_tokenizer, self.restored.version, self.max_source_length, 1,
                          stride=self.stride, **self.restored.base.question_format).ids)

    def answer(self, questions: Sequence[Question]) -> Answers:
        """Answers (and v2 no-answer probabilities), in question order, with the threshold applied."""
        # bf16-mixed as Lightning runs it in evaluation: autocast around the model, weights kept as loaded.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed"):
            answers = answer_questions(self.restored.model, self.restored.tokenizer, questions, self.restored.version,
                                       self.max_source_length, self.stride, self.batch_size, self.max_new_tokens,
                                       self.snap_to_context, num_beams=self.num_beams,
                                       **self.restored.base.question_format)
        if self.threshold is not None and answers.na_probs is not None:
            answers.predictions = apply_threshold(answers.predictions, answers.na_probs, self.threshold)
        return answers

    def describe(self) -> dict[str, Any]:
        """What answers and how, for the server's health route."""
        return {"model": self.restored.source, "squad_version": self.restored.version,
                **self.restored.base.question_format, "init": self.restored.base.init,
                "note": weights_note({"model_note": self.restored.base.note, "init": self.restored.base.init}),
                "device": str(self.device), "precision": self.precision,
                "max_source_length": self.max_source_length, "stride": self.stride,
                "max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                "snap_to_context": self.snap_to_context,
                "no_answer_threshold": self.threshold}
