"""The measured training runs, each described by a `Spec` (the evaluation comparison: `evaluation.py`).

`bench.py` runs each training configuration in its own process (peak RSS never goes down within one)
through `python -m benchmarks.runs SPEC_JSON OUT_JSON`, or in-process for a quick look and the tests.

Pipelines:
- `project`: the real training path: the strategy's `build()` inside `SquadQAModule`, the data module's
  length-grouped batches padded per batch, AdamW + linear warm-up/decay, the Lightning fit loop (logging,
  checkpointing and validation off).
- `hf`: `Seq2SeqTrainer` as transformers' `examples/pytorch/question-answering/run_seq2seq_qa.py` sets it
  up: `DataCollatorForSeq2Seq` (dynamic padding, labels padded with -100), the default random sampler,
  the same model built by the same strategy, the same optimizer (AdamW, fused: the Trainer's default),
  schedule, clipping and steps.
- `hf_pad`: the same Trainer with every input padded to `max_source_length` and every target to
  `max_target_length`, as the reference notebooks tokenise (`padding="max_length"`).
Both pipelines train on the very same encoded examples (`SquadDataModule`'s encoding), each once per epoch,
in the same precision (`Spec.precision`): fp32, or Lightning's `bf16-mixed` against the Trainer's `bf16=True`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback  # noqa: E402

from benchmarks.flops import train_flops  # noqa: E402
from flan_squad.models.base import count_parameters  # noqa: E402
from flan_squad.runs.cost import PeakMemory  # noqa: E402
from flan_squad.runs.restore import build_parts  # noqa: E402
from flan_squad.utils.config import compose  # noqa: E402
from flan_squad.utils.files import write_json_atomic  # noqa: E402

PIPELINES = ("project", "hf", "hf_pad")
# The bench's precisions as Lightning's `trainer.precision` and as the Trainer's `bf16` flag (both autocast in bf16).
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}
HF_BF16 = {"fp32": False, "bf16": True}


@dataclass
class Spec:
    pipeline: str = "project"  # project | hf | hf_pad (training); eval runs compare project and hf
    model: str = "flan_t5_small"  # a conf/model option, always built with random weights
    strategy: str | None = None  # a conf/strategy option; None: conf/train.yaml's default
    gradient_checkpointing: bool = False
    steps: int = 10  # optimizer steps per epoch; the run trains on steps * batch_size questions
    epochs: int = 3  # one throughput measurement per epoch; the median is reported
    batch_size: int = 8
    max_source_length: int = 512
    eval_questions: int = 256
    device: str = "cpu"
    dataset: str = "squad_v1"
    shared_dir: str | None = None  # None: the config's default (../shared or FLAN_SQUAD_SHARED)
    precision: str = "fp32"  # fp32 | bf16, both pipelines alike
    compile: bool = False  # the project's model.compile (training steps through torch.compile)


def compose_config(spec: Spec, output_dir: str):
    """The run's config, composed from conf/ as a training run would be (no Hydra run dir)."""
    overrides = [
        f"model={spec.model}", "model.init=random", "model.tokenizer=${paths.tokenizer_dir}",
        *([f"strategy={spec.strategy}"] if spec.strategy else []),
        f"strategy.gradient_checkpointing={spec.gradient_checkpointing}", f"dataset={spec.dataset}",
        f"dataset.batch_size={spec.batch_size}", f"dataset.eval_batch_size={spec.batch_size}",
        f"dataset.max_source_length={spec.max_source_length}",
        f"dataset.limit_train={spec.steps * spec.batch_size}", f"dataset.limit_val={spec.eval_questions}",
        f"trainer={'gpu' if spec.device == 'cuda' else 'cpu'}",
        f"trainer.precision={LIGHTNING_PRECISION[spec.precision]}", f"model.compile={spec.compile}",
        "logger=none", "callbacks=none",
        f"paths.output_dir={output_dir}",
    ] + ([f"paths.shared_dir={spec.shared_dir}"] if spec.shared_dir else [])
    return compose("train", overrides)


class _Setup:
    """Config, base model, tokenizer, data module and strategy of a spec (data read and encoded once)."""

    def __init__(self, spec: Spec, output_dir: str):
        self.cfg = cfg = compose_config(spec, output_dir)
        parts = build_parts(cfg)
        self.base, self.strategy, self.tokenizer = parts.base, parts.strategy, parts.tokenizer
        self.datamodule = instantiate(cfg.dataset, tokenizer=self.tokenizer, seed=cfg.seed,
                                      **self.base.question_format)
        self.device = torch.device(spec.device)


# --- training -----------------------------------------------------------------------------------------


class _LightningEpochs(L.Callback):
    def __init__(self):
        self.seconds: list[float] = []
        self.ids: list[list[str]] = []
        self.padded: list[int] = []  # source tokens per epoch as batched, padding included

    def on_train_epoch_start(self, trainer, pl_module):
        self.ids.append([])
        self.padded.append(0)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ids[-1] += batch["ids"]
        self.padded[-1] += batch["input_ids"].numel()

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


class _HFEpochs(TrainerCallback):
    def __init__(self, ids_seen: list[list[str]], padded: list[int]):
        self.seconds: list[float] = []
        self.ids, self.padded = ids_seen, padded

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.ids.append([])
        self.padded.append(0)
        self._start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


class _RecordIds:
    """Wraps a collator: notes which questions each batch holds and its padded size (the work done)."""

    def __init__(self, collator, ids_seen: list[list[str]], padded: list[int]):
        self.collator, self.ids, self.padded = collator, ids_seen, padded

    def __call__(self, features: list[dict]) -> dict:
        self.ids[-1] += [f["id"] for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != "id"} for f in features])
        self.padded[-1] += batch["input_ids"].numel()
        return batch


def _pad_to_max(max_source: int, max_target: int, pad_id: int):
    """The reference notebooks' batches: every input padded to max_source, every target to max_target."""

    def collate(features: list[dict]) -> dict:
        input_ids = torch.full((len(features), max_source), pad_id, dtype=torch.long)
        labels = torch.full((len(features), max_target), -100, dtype=torch.long)
        for i, f in enumerate(features):
            input_ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
        return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": labels}

    return collate


def _train_project(s: _Setup, spec: Spec) -> tuple[list[float], list[list[str]], list[int], dict]:
    cfg = s.cfg
    module = instantiate(cfg.module)(base=s.base, strategy=s.strategy, tokenizer=s.tokenizer,
                                     version=s.datamodule.version, optimizer=instantiate(cfg.optimizer))
    epochs = _LightningEpochs()
    trainer = instantiate(cfg.trainer, max_epochs=spec.epochs, logger=False, callbacks=[epochs],
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          limit_val_batches=0, default_root_dir=cfg.paths.output_dir)
    trainer.fit(module, datamodule=s.datamodule)
    return epochs.seconds, epochs.ids, epochs.padded, count_parameters(module.model)


def _train_hf(s: _Setup, spec: Spec) -> tuple[list[float], list[list[str]], list[int], dict]:
    cfg, dm = s.cfg, s.datamodule
    model = s.strategy.build(s.base, s.device)
    enc = dm.encoded_train
    features = [{"id": i, "input_ids": x, "attention_mask": [1] * len(x), "labels": y}
                for i, x, y in zip(enc.ids, enc.input_ids, enc.labels)]
    if spec.pipeline == "hf":
        collator = DataCollatorForSeq2Seq(s.tokenizer, model=model, label_pad_token_id=-100)
    else:
        collator = _pad_to_max(dm.max_source_length, dm.max_target_length, s.tokenizer.pad_token_id)
    ids_seen: list[list[str]] = []
    padded: list[int] = []
    epochs = _HFEpochs(ids_seen, padded)
    args = Seq2SeqTrainingArguments(
        output_dir=cfg.paths.output_dir, per_device_train_batch_size=spec.batch_size,
        num_train_epochs=spec.epochs, learning_rate=s.strategy.lr, weight_decay=cfg.optimizer.weight_decay,
        warmup_steps=cfg.module.scheduler.warmup_ratio, lr_scheduler_type="linear",  # default optim: fused AdamW
        max_grad_norm=cfg.trainer.gradient_clip_val, logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=spec.device == "cpu",
        bf16=HF_BF16[spec.precision], seed=cfg.seed, dataloader_num_workers=0, remove_unused_columns=False,
        predict_with_generate=True,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=features,
                             data_collator=_RecordIds(collator, ids_seen, padded), callbacks=[epochs])
    trainer.train()
    return epochs.seconds, ids_seen, padded, count_parameters(model)


def train_run(spec: Spec) -> dict[str, Any]:
    """Train `spec.epochs` epochs of `spec.steps` steps; throughput per epoch, peak memory, the work done."""
    with tempfile.TemporaryDirectory(prefix="bench-") as output_dir:
        s = _Setup(spec, output_dir)
        L.seed_everything(s.cfg.seed, workers=True, verbose=False)
        s.datamodule.setup("fit")
        peak = PeakMemory(s.device)
        held_mb = peak.current_mb()  # the stack and the data: the peak above it is the run's own
        peak.reset()
        run = _train_project if spec.pipeline == "project" else _train_hf
        seconds, ids_seen, padded, params = run(s, spec)
        peak_mb = peak.read_mb()

    enc = s.datamodule.encoded_train
    examples = len(enc.ids)
    tokens = sum(map(len, enc.input_ids)) + sum(map(len, enc.labels))  # real tokens, as CostMonitor counts
    flops = train_flops(s.base.config(), [(len(x), len(y)) for x, y in zip(enc.input_ids, enc.labels)],
                        frozen_base=params["trainable_params"] < params["total_params"])
    per_epoch = [examples / t for t in seconds]
    expected = Counter(enc.ids)
    return {
        "spec": asdict(spec),
        "examples_per_epoch": examples,
        "epoch_seconds": [round(t, 3) for t in seconds],
        "examples_per_s": statistics.median(per_epoch),
        "tokens_per_s": statistics.median(tokens / t for t in seconds),
        # Source tokens the model really ran on (padding included) per real one: what batching costs.
        "padded_over_real_source_tokens": round(statistics.mean(padded) / sum(map(len, enc.input_ids)), 3),
        "model_flops_per_step": flops / spec.steps,
        "model_flops_per_s": statistics.median(flops / t for t in seconds),
        "every_example_once_per_epoch": (all(Counter(ids) == expected for ids in ids_seen)
                                         and len(ids_seen) == spec.epochs),
        "peak_memory_mb": round(peak_mb, 1),
        "own_peak_memory_mb": None if held_mb is None else round(peak_mb - held_mb, 1),
        "peak_memory_kind": peak.kind,
        **params,
    }


if __name__ == "__main__":  # python -m benchmarks.runs SPEC_JSON OUT_JSON
    spec = Spec(**json.loads(sys.argv[1]))
    write_json_atomic(sys.argv[2], train_run(spec))
