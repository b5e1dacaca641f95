"""The evaluation comparison: `flan_squad.evaluate`'s answering path against `Seq2SeqTrainer.predict`.

- `project`: `flan_squad.evaluate.validate`, the very code `python -m flan_squad.evaluate` runs, and the
  validation that `flan_squad.train` runs inside fit: `SquadQAModule` in a Lightning `Trainer.validate`.
  Every context window is answered (long contexts give several model inputs), with the validation loss and,
  on SQuAD v2, the likelihood of "unanswerable"; each question gets its best window's answer, snapped to
  the context, and the split is scored with the official rules.
- `hf`: `Seq2SeqTrainer.predict(..., predict_with_generate=True)` as transformers' `run_seq2seq_qa.py`
  predicts: the same prompts, one input per question truncated to `max_source_length`, in dataset order,
  labels included (it computes a loss too), greedy answers of up to `eval.max_new_tokens` tokens.

Both answer the same questions with the same weights (each loads its own copy: the Trainer's mixed
precision wraps a model's `forward` in place), the same batch size and the same precision: fp32 against
fp32, or Lightning's `bf16-mixed` against the Trainer's `bf16=True`. Throughput is questions per second:
the project's extra windows are part of its cost.

Random weights never produce the end-of-answer token, so every answer decodes `max_new_tokens` tokens;
a trained model stops after a few. `train_planted` makes such a model in a minute or two: the benchmark's
architecture, fully fine-tuned from random weights on facts planted in real SQuAD contexts
(`dataset=planted_v1`, flan_squad/data/planted.py), which teaches it to answer with a word or two and stop.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from benchmarks.runs import HF_BF16, LIGHTNING_PRECISION, Spec  # noqa: E402
from flan_squad.data.prompts import answer_to_prediction  # noqa: E402
from flan_squad.evaluate import validate  # noqa: E402
from flan_squad.runs.restore import restore  # noqa: E402
from flan_squad.utils.config import compose  # noqa: E402


def _compose(config_name: str, spec: Spec, output_dir: str | Path, overrides: list[str]):
    """conf/<config_name>.yaml as its entry point composes it, on `spec`'s device and data."""
    overrides = [*overrides, f"trainer={'gpu' if spec.device == 'cuda' else 'cpu'}", f"paths.output_dir={output_dir}",
                 *([f"paths.shared_dir={spec.shared_dir}"] if spec.shared_dir else [])]
    return compose(config_name, overrides)


def eval_config(spec: Spec, output_dir: str, model_dir: str | Path | None = None):
    """What `python -m flan_squad.evaluate` runs on `spec`'s questions, in `spec`'s precision.

    The model: `spec.model` with random weights, or `model_dir`: a `flan_squad.train` run dir (config.yaml +
    model/), or a Hugging Face model dir (e.g. a full fine-tuning run's model/)."""
    if model_dir is None:
        model = [f"model={spec.model}", "model.init=random", "model.tokenizer=${paths.tokenizer_dir}"]
    elif (Path(model_dir) / "config.yaml").is_file():
        model = [f"run_dir={Path(model_dir).resolve()}"]
    else:
        model_dir = Path(model_dir).resolve()
        tokenizer = model_dir if (model_dir / "tokenizer_config.json").is_file() else "${paths.tokenizer_dir}"
        model = [f"model={spec.model}", "model.init=pretrained", f"model.name_or_path={model_dir}",
                 f"model.tokenizer={tokenizer}"]
    return _compose("evaluate", spec, output_dir, [
        *model, f"dataset={spec.dataset}", f"dataset.eval_batch_size={spec.batch_size}",
        f"dataset.max_source_length={spec.max_source_length}", f"dataset.limit_val={spec.eval_questions}",
        f"trainer.precision={LIGHTNING_PRECISION[spec.precision]}",
    ])


def train_planted(spec: Spec, steps: int, run_dir: str | Path, lr: float = 1e-3) -> Path:
    """Fully fine-tune `spec.model` from random weights on `steps` batches of planted facts with
    `flan_squad.train` (one epoch, no checkpoints, the automatic precision): answers that stop after a word."""
    from flan_squad.train import train  # noqa: PLC0415

    planted = "planted_v2" if spec.dataset.endswith("v2") else "planted_v1"  # the prompt it is evaluated with
    cfg = _compose("train", spec, run_dir, [
        f"model={spec.model}", "model.init=random", "model.tokenizer=${paths.tokenizer_dir}",
        "strategy=full", f"strategy.lr={lr}", f"dataset={planted}", f"dataset.batch_size={spec.batch_size}",
        f"dataset.limit_train={steps * spec.batch_size}", f"dataset.limit_val={spec.batch_size}",
        "trainer.max_epochs=1", "+trainer.enable_checkpointing=false", "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false", "logger=none", "callbacks=none",
    ])
    with contextlib.redirect_stdout(sys.stderr):  # the bench's stdout is its tables; train() prints a summary
        train(cfg)
    return Path(run_dir)


def _answer_tokens(sequences: list[list[int]], eos_token_id: int, max_new_tokens: int) -> list[int]:
    """Tokens of each greedy answer before its end-of-sequence (`max_new_tokens` when it never ended)."""
    lengths = []
    for row in sequences:
        generated = row[1:]  # after the decoder start token
        lengths.append(generated.index(eos_token_id) if eos_token_id in generated else max_new_tokens)
    return lengths


def eval_run(spec: Spec, repeats: int, model_dir: str | Path | None = None,
             keep_predictions: bool = False) -> dict[str, Any]:
    """The same questions answered `repeats` times by each pipeline, alternating: speed, agreement, lengths
    (and, with `keep_predictions`, both pipelines' answers)."""
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as output_dir:
        cfg = eval_config(spec, output_dir, model_dir)
        device = torch.device(spec.device)
        project_model = restore(cfg, device)
        hf_model = restore(cfg, device).model
        tokenizer, max_new_tokens = project_model.tokenizer, cfg.eval.max_new_tokens

        # The baseline's inputs: the project's prompts for the same (seeded) questions, truncated, no windows.
        dm = instantiate(cfg.dataset, tokenizer=tokenizer, eval_stride=None, val_split=cfg.split,
                         **project_model.base.question_format)
        dm.setup("validate")
        enc = dm.encoded_val
        features = [{"input_ids": x, "attention_mask": [1] * len(x), "labels": y}
                    for x, y in zip(enc.input_ids, enc.labels)]
        args = Seq2SeqTrainingArguments(
            output_dir=output_dir, per_device_eval_batch_size=spec.batch_size, predict_with_generate=True,
            report_to="none", disable_tqdm=True, use_cpu=spec.device == "cpu", bf16=HF_BF16[spec.precision],
            dataloader_num_workers=0,
        )
        trainer = Seq2SeqTrainer(
            model=hf_model, args=args,
            data_collator=DataCollatorForSeq2Seq(tokenizer, model=hf_model, label_pad_token_id=-100))
        # predict() passes max_new_tokens beside the generation config's max_length and warns every batch.
        hf_logging.set_verbosity_error()

        def baseline() -> tuple[dict[str, str], list[int]]:
            output = trainer.predict(features, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
            tokens = output.predictions
            tokens[tokens == -100] = tokenizer.pad_token_id  # predictions are padded with -100 across batches
            texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
            lengths = _answer_tokens(tokens.tolist(), tokenizer.eos_token_id, max_new_tokens)
            return dict(zip(enc.ids, map(answer_to_prediction, texts))), lengths

        seconds: dict[str, list[float]] = {"project": [], "hf": []}
        for _ in range(repeats):  # alternate, so that machine noise hits both alike
            validation = validate(cfg, restored=project_model, progress_bar=False)
            seconds["project"].append(validation.seconds)
            start = time.perf_counter()
            hf_answers, lengths = baseline()
            if spec.device == "cuda":
                torch.cuda.synchronize()
            seconds["hf"].append(time.perf_counter() - start)

    module = validation.module
    questions = [q.id for q in validation.datamodule.val_questions]
    windows: dict[str, list] = {}
    for (qid, _), answer in module.windows.items():
        windows.setdefault(qid, []).append(answer)
    single = [q for q in questions if len(windows[q]) == 1]
    n = len(questions)
    return {
        "precision": spec.precision,
        "lightning_precision": str(validation.trainer.precision),  # as the Trainer ran, not as asked
        "hf_bf16": bool(trainer.args.bf16),
        "model": str(model_dir) if model_dir else f"{spec.model} (random init)",
        "questions": n,
        "model_inputs": {"project": len(module.windows), "hf": len(features)},
        "seconds": {k: [round(t, 3) for t in v] for k, v in seconds.items()},
        "examples_per_s": {k: n / statistics.median(v) for k, v in seconds.items()},
        # The same generation: on questions answered from one window, the project's answer before snapping.
        "single_window_questions": len(single),
        "answer_agreement": (sum(windows[q][0].text == hf_answers[q] for q in single) / len(single)
                             if single else None),
        # What the project's choices (best of several windows, snapping) change: its final predictions.
        "prediction_agreement": sum(module.predictions[q] == hf_answers[q] for q in questions) / n,
        "snapped_answers": module.answer_stats.get("snapped_answers"),
        "answer_tokens_mean": statistics.mean(lengths),
        "answers_at_max_new_tokens": sum(t >= max_new_tokens for t in lengths) / len(lengths),
        "max_new_tokens": max_new_tokens,
        "f1": module.scores.get("f1"),
        "sample_answers": [module.predictions[q] for q in questions[:3]],
        **({"predictions": module.predictions, "hf_answers": hf_answers} if keep_predictions else {}),
    }
