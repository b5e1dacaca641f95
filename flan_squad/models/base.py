"""The base model: which weights a run starts from (pretrained FLAN-T5, or its architecture with random weights).

`BaseModel` comes first in the layers: a strategy (`flan_squad.models.strategies`) turns it into the model that
trains, and the LightningModule (`flan_squad.models.qa_module`) trains that. Nothing here imports either.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flan_squad.data.prompts import check_question_format
from flan_squad.utils.errors import ConfigError, FlanSquadError, first_line
from flan_squad.utils.files import write_dir_atomic

log = logging.getLogger(__name__)

# What every FLAN-T5 size shares (from the published configs); sizes add d_model, layers, heads, d_ff.
FLAN_T5_ARCHITECTURE = dict(
    vocab_size=32128, d_kv=64, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, initializer_factor=1.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    tie_word_embeddings=False,
)


class ModelLoadError(FlanSquadError, OSError):
    """A model or tokenizer that cannot be loaded; the message says how to point at local files."""


def _hub_hint(what: str, name: str, error: Exception) -> ModelLoadError:
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        # A local path that is missing (transformers would call it a malformed hub id): the shared data folder
        # is not where paths.shared_dir looks, or a base trained here has not been built yet.
        return ModelLoadError(
            f"the {what} directory {name} does not exist. Offline runs read the FLAN-T5 tokenizer and SQuAD "
            f"files from paths.shared_dir (../shared beside the checkout): put that folder there, or set "
            f"FLAN_SQUAD_SHARED=/path/to/shared. A base trained here is built first: model=t5_mid_planted by "
            f"`make base-cpu` (python -m flan_squad.train experiment=base_cpu)."
        )
    return ModelLoadError(
        f"could not load the {what} {name!r}: {first_line(error)}\n"
        f"Without Hugging Face hub access, use a local directory (model.name_or_path=/path/to/flan-t5 "
        f"or model.tokenizer=/path/to/tokenizer), or model.init=random to build the architecture with "
        f"random weights (the tokenizer is still needed: model.tokenizer=../shared/models/flan-t5-small-tokenizer)."
    )


@dataclass
class BaseModel:
    """Which weights a run starts from.

    init=pretrained loads `name_or_path` (a hub id or a local dir). init=random builds the same
    architecture (`architecture`, on top of the FLAN-T5 defaults) with random weights, seeded by
    `init_seed`, and saves it once under `cache_dir`, so that every strategy, reload and export starts
    from the very same weights through the same `from_pretrained` path as a real checkpoint.

    `prompt` is the format the model reads questions in and answers "no answer" in (`flan_squad.data.prompts`):
    `flan` for FLAN-T5 (what it was instruction-tuned on), `t5` for models trained here from random weights
    (conf/model/t5_tiny.yaml: they learn unanswerable questions better with it, docs/learning.md); `no_answer` can
    teach the other format's no-answer answer instead. A run dir's model is asked in the format it was trained with
    (its config.yaml).
    """

    name: str
    name_or_path: str
    init: str = "pretrained"
    tokenizer: str | None = None
    architecture: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    cache_dir: str = "outputs/.cache"
    note: str | None = None  # what a result from these weights must say, e.g. "self-trained base, not FLAN-T5"
    random_init_tokenizer: str | None = None  # init=random without `tokenizer`: e.g. FLAN-T5's (all sizes share it)
    prompt: str = "flan"
    no_answer: str = "format"  # its answer when the context does not say: the format's own, "empty" or "unanswerable"
    compile: bool = False  # training's forward and backward through torch.compile (docs/performance.md: off by default)

    def __post_init__(self):
        if self.init not in ("pretrained", "random"):
            raise ConfigError(f"model.init={self.init!r}: expected 'pretrained' or 'random'")
        check_question_format(self.prompt, self.no_answer)
        if not isinstance(self.compile, bool):
            raise ConfigError(f"model.compile={self.compile!r}: expected true or false")
        if self.init == "pretrained" and not self.name_or_path:
            raise ConfigError(f"model {self.name!r} has no pretrained weights (model.name_or_path is empty): "
                              f"use model.init=random or set model.name_or_path")

    @property
    def question_format(self) -> dict[str, str]:
        """How questions are put to it and what it answers when the context does not say: the keyword arguments
        of the datamodule, `encode` and `answer_questions`."""
        return {"prompt": self.prompt, "no_answer": self.no_answer}

    @property
    def label(self) -> str:
        return f"{self.name} ({self.note or ('random init' if self.init == 'random' else 'pretrained')})"

    def weights_path(self) -> str:
        """A path or hub id that `from_pretrained` can load: for random init, the weights built and saved on the first
        call (under `cache_dir`, keyed by architecture and seed)."""
        return self.name_or_path if self.init == "pretrained" else str(self._random_checkpoint())

    def load(self, **from_pretrained_kwargs) -> nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        try:
            return AutoModelForSeq2SeqLM.from_pretrained(self.weights_path(), **from_pretrained_kwargs)
        except OSError as e:
            raise _hub_hint("model", self.weights_path(), e) from None

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        name = self.tokenizer or (self.random_init_tokenizer if self.init == "random" else None) or self.name_or_path
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise _hub_hint("tokenizer", name, e) from None

    def config(self):
        from transformers import T5Config

        return T5Config(**{**FLAN_T5_ARCHITECTURE, **self.architecture})

    def _random_checkpoint(self) -> Path:
        from transformers import T5ForConditionalGeneration

        spec = json.dumps({**FLAN_T5_ARCHITECTURE, **self.architecture, "seed": self.init_seed,
                           "torch": torch.__version__, "lm_head_std": "d_model**-0.5"}, sort_keys=True)
        directory = Path(self.cache_dir) / "random_init" / f"{self.name}-{hashlib.sha1(spec.encode()).hexdigest()[:10]}"
        directory.parent.mkdir(parents=True, exist_ok=True)
        # One builder at a time (DDP ranks, parallel sweep jobs): the others wait, then load what it wrote.
        with open(directory.parent / f".{directory.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (directory / "config.json").exists():
                log.info("Building %s with random weights (seed %d) into %s", self.name, self.init_seed, directory)
                with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
                    torch.random.default_generator.manual_seed(self.init_seed)  # the CPU's: the model is built there
                    model = T5ForConditionalGeneration(self.config())
                    # transformers ties lm_head to the embedding when building from a config, whatever the
                    # config says; FLAN-T5 has its own lm_head. T5 initialises an untied one with std 1, which
                    # gives logits of std ~sqrt(d_model) (initial loss ~40 where uniform is ln(32128) = 10.4)
                    # and wastes hundreds of steps; std d_model**-0.5 starts near uniform, as a tied T5 does.
                    std = model.config.initializer_factor * model.config.d_model ** -0.5
                    model.lm_head.weight = nn.Parameter(torch.randn_like(model.shared.weight) * std)
                    model.config.tie_word_embeddings = False  # saved as the published FLAN-T5 configs say

                def save(staging: Path) -> None:
                    model.save_pretrained(staging)
                    if not (staging / "config.json").exists():  # transformers writes on distributed rank 0 only
                        raise RuntimeError(f"building {directory} inside a distributed process group wrote nothing: "
                                           f"call BaseModel.weights_path() before the process group starts")

                write_dir_atomic(directory, save)  # a crash mid-save leaves no half-written checkpoint behind
        return directory


def unwrapped_name(name: str) -> str:
    """A parameter's name as the model has it outside FSDP, whose wrappers add `_fsdp_wrapped_module.` to the names
    of the parameters they hold (a full state dict's keys, and checkpoints', do not have it)."""
    return name.replace("_fsdp_wrapped_module.", "")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters, counting a 4-bit weight by its logical (unpacked) size."""
    trainable = total = in_4bit = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)
        n = quant_state.shape.numel() if quant_state is not None else p.numel()
        total += n
        in_4bit += n if quant_state is not None else 0
        trainable += n if p.requires_grad else 0
    return {"trainable_params": trainable, "total_params": total, "params_4bit": in_4bit}
