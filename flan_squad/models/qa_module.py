"""The LightningModule: trains a model with teacher forcing and validates by generation (greedy, or beam search with
`eval.num_beams`), scored with the official SQuAD rules.

`BaseModel` (`flan_squad.models.base`) says which weights to start from; a strategy
(`flan_squad.models.strategies`) turns them into a trainable model; `SquadQAModule` trains it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from flan_squad.data.prompts import no_answer_target
from flan_squad.evaluation.inference import generate_windows, run_encoder
from flan_squad.evaluation.squad_metric import SquadAnswers
from flan_squad.models.base import BaseModel, count_parameters, unwrapped_name
from flan_squad.utils.errors import ConfigError, TrainingError
from flan_squad.utils.rng import capture_rng_states, restore_rng_states

log = logging.getLogger(__name__)


class SquadQAModule(L.LightningModule):
    """Fine-tunes a seq2seq model on SQuAD prompts; validates by generation + official scoring.

    The model itself comes from `strategy.build(base, device)` in `configure_model`, so it is created on
    the device the Trainer chose (needed for 4-bit weights) and the module never branches on strategy.
    """

    def __init__(self, base: BaseModel, strategy, tokenizer, version: str, optimizer: Callable | None = None,
                 scheduler: Callable | None = None, max_new_tokens: int = 32, snap_to_context: bool = True,
                 model: nn.Module | None = None, num_beams: int = 1):
        super().__init__()
        if not max_new_tokens >= 1:
            raise ConfigError(f"eval.max_new_tokens={max_new_tokens}: must be a whole number >= 1")
        if not (isinstance(num_beams, int) and num_beams >= 1):
            raise ConfigError(f"eval.num_beams={num_beams}: must be a whole number >= 1 (1: greedy)")
        self.base, self.strategy, self.tokenizer, self.version = base, strategy, tokenizer, version
        # conf/module: partials completed with the trainable parameters / the optimizer and its number of steps
        self.optimizer, self.scheduler = optimizer, scheduler
        self.max_new_tokens, self.snap_to_context, self.num_beams = max_new_tokens, snap_to_context, num_beams
        self.model: nn.Module | None = model  # given: evaluate a model as it is (flan_squad.evaluate)
        self.strict_loading = False  # checkpoints hold the trainable parameters only (see on_save_checkpoint)
        self.validation_answers = SquadAnswers(tokenizer, version, max_new_tokens, snap_to_context)
        self.windows: dict[tuple[str, int], Any] = {}  # (question id, window) -> WindowAnswer, of the last validation
        self.predictions: dict[str, str] = {}
        self.na_probs: dict[str, float] | None = None  # SQuAD v2: see flan_squad.evaluation.inference
        self.answer_stats: dict[str, int] = {}
        self.scores: dict[str, float] = {}
        self._compiled: tuple[nn.Module, Callable] | None = None  # (model, its compiled forward): not a submodule

    # --- model -----------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is None:
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            self.model = self.strategy.build(self.base, device)
            self.model.train()  # from_pretrained returns eval mode, and Lightning keeps a module's mode

    def training_forward(self) -> Callable:
        """The model as training steps call it: through torch.compile with model.compile=true (compiled on the first
        step; dynamic shapes, since batches differ in length), else as it is. Validation and generation stay eager."""
        if not self.base.compile:
            return self.model
        if self._compiled is None or self._compiled[0] is not self.model:
            self._compiled = (self.model, torch.compile(self.model, dynamic=True))
        return self._compiled[1]

    def parameter_counts(self) -> dict[str, int]:
        return count_parameters(self.model)

    # --- training ----------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.training_forward()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       labels=batch["labels"]).loss
        if not torch.isfinite(loss):
            # Stop before this step's update: the checkpoints on disk all predate the bad step.
            raise TrainingError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step} (epoch {self.current_epoch},"
                f" batch {batch_idx}); checkpoints up to the previous step are kept. Lower strategy.lr or set"
                f" trainer.gradient_clip_val, then continue with resume=true"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["ids"]))
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Free the gradients at once: Lightning zeroes them only after the next forward pass, which keeps a
        # whole model's gradients alive through it (+300 MB peak for full fine-tuning of flan-t5-small).
        optimizer.zero_grad(set_to_none=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision, Precision
        from lightning.pytorch.utilities import GradClipAlgorithmType

        plugin = self.trainer.precision_plugin
        if isinstance(plugin, FSDPPrecision) and gradient_clip_val and gradient_clip_algorithm != "value":
            # Lightning's FSDP plugin raises on norm clipping (it has no handle on the root module); the root's own
            # clip_grad_norm_ takes the norm over every rank's shards, as a plain clip_grad_norm_ would not.
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        if type(plugin) is MixedPrecision and plugin.scaler is None:
            # bf16-mixed has no gradient scaler: the gradients are true-scale, also for the fused optimizer, which
            # Lightning refuses to clip under any mixed precision (for fear of a scaler unscaling inside step()).
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val or 0.0,
                                     GradClipAlgorithmType(gradient_clip_algorithm or "norm"))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optimizer = self.optimizer([p for p in self.model.parameters() if p.requires_grad])
        scheduler = self.scheduler(optimizer, total_steps=max(1, int(self.trainer.estimated_stepping_batches)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- validation --------------------------------------------------------------------------------

    # One answering path for training validation and `flan_squad.evaluate` (see flan_squad.evaluation.inference):
    # every context window is answered; the metric (flan_squad.evaluation.squad_metric) gathers them from every
    # process and gives each question its best window's answer, snapped to the context, and (v2) a no-answer
    # probability.

    def on_validation_epoch_start(self) -> None:
        self.validation_answers.reset()
        self.validation_answers.set_questions(self.trainer.datamodule.val_questions)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        encoder_outputs = run_encoder(self.model, batch["input_ids"], batch["attention_mask"])
        loss = self.model(encoder_outputs=encoder_outputs, attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
        self.log("val/loss", loss, batch_size=len(batch["ids"]), sync_dist=True)
        generated = generate_windows(self.model, self.tokenizer, batch["input_ids"], batch["attention_mask"],
                                     self.max_new_tokens,
                                     no_answer=(no_answer_target(self.base.prompt, self.base.no_answer)
                                                if self.version == "v2" else None),
                                     encoder_outputs=encoder_outputs, num_beams=self.num_beams)
        self.validation_answers.update(batch["ids"], batch["windows"], *generated)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        result = self.validation_answers.compute()  # gathered from every process: the same on each
        skipped = len(self.trainer.datamodule.val_questions) - len(result.questions)
        if skipped:
            log.warning("validation covered %d of %d questions (trainer.limit_val_batches?): scoring those only",
                        len(result.questions), len(result.questions) + skipped)
        self.windows, self.scores = result.windows, result.scores
        answers = result.answers
        self.predictions, self.na_probs, self.answer_stats = answers.predictions, answers.na_probs, answers.stats
        for key, value in self.scores.items():  # identical on every process: no sync needed
            self.log(f"val/{key}", float(value), prog_bar=key in ("exact", "f1"))

    # --- checkpoints: trainable parameters only ------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = capture_rng_states()  # dropout continues exactly after a resume
        parameters = dict(self.named_parameters())
        if all(p.requires_grad for p in parameters.values()):
            return  # full fine-tuning: the whole state is needed
        # A frozen base is reloadable from its id; saving it would make every checkpoint base-sized. Under FSDP the
        # names carry its wrappers' prefix, the checkpoint's keys (a full state dict) do not.
        trainable = {unwrapped_name(name) for name, p in parameters.items() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # (FSDP's strategy loads the weights itself and hands this hook the rest of the checkpoint)
        unknown = set(checkpoint.get("state_dict", {})) - set(self.state_dict())
        if unknown:
            raise ConfigError(f"checkpoint does not match this model/strategy: unknown keys {sorted(unknown)[:3]}")
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])
