"""SQuAD questions as model inputs: the prompt around each context (`flan_squad.data.prompts`; only the context is ever
cut, so the model always sees the whole instruction and question), tokenized, truncated for training or split into
overlapping windows for evaluation, and padded per batch.

Reading order: `encode` -> `Features` (a Dataset over the encoded questions) -> `collate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flan_squad.data.prompts import around_context, no_answer_target
from flan_squad.data.squad import DataError, Question


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0  # context cut to fit max_source_length
    answer_lost: int = 0  # ... and no gold answer survives in what was kept
    answer_not_in_context: int = 0  # gold answer text not found in the context at all (data problem)
    windowed: int = 0  # questions whose context was split into several windows (evaluation only)
    windows: int = 0  # model inputs made (one per question, or one per window)

    def as_dict(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}_{k}": v for k, v in self.__dict__.items()}


@dataclass
class Encoded:
    ids: list[str]
    input_ids: list[list[int]]
    labels: list[list[int]]
    stats: EncodeStats = field(default_factory=EncodeStats)
    windows: list[int] = field(default_factory=list)  # window number within its question (0 when not split)


def _answer_end(question: Question) -> int | None:
    """End offset in the context of the earliest-ending gold answer, or None if none is found."""
    ends = []
    for text, start in zip(question.answers, question.answer_starts or [-1] * len(question.answers)):
        if not (0 <= start and question.context[start : start + len(text)] == text):
            start = question.context.find(text)  # reconstructed files have some approximate offsets
        if start >= 0:
            ends.append(start + len(text))
    return min(ends) if ends else None


def encode(
    questions: Sequence[Question],
    tokenizer,
    version: str,
    max_source_length: int,
    max_target_length: int,
    source: str = "",
    stride: int | None = None,
    prompt: str = "flan",
    no_answer: str = "format",
) -> Encoded:
    """Tokenize prompts (in the `prompt` format) and targets (`no_answer`: model.no_answer); `source` names the data in
    errors.

    A context too long for `max_source_length` is truncated (stride=None, for training), or split into
    overlapping windows that share `stride` tokens (at most half a window), one model input per window
    (for evaluation, so that no part of the context goes unread).
    """
    contexts = list(dict.fromkeys(q.context for q in questions))  # paragraphs repeat ~5x: encode once
    context_enc = tokenizer(contexts, add_special_tokens=False, return_offsets_mapping=True)
    context_index = {c: i for i, c in enumerate(contexts)}
    before, after = zip(*(around_context(prompt, version, q.question) for q in questions))
    pieces = list(dict.fromkeys(before + after))  # FLAN's instruction is in every prompt: tokenize it once
    piece_ids = dict(zip(pieces, tokenizer(pieces, add_special_tokens=False).input_ids))
    unanswerable = no_answer_target(prompt, no_answer)
    targets = [(q.answers[0] if q.answers else unanswerable) for q in questions]
    labels = tokenizer(targets, max_length=max_target_length, truncation=True).input_ids

    out = Encoded(ids=[], input_ids=[], labels=[], stats=EncodeStats(examples=len(questions)))
    for q, head_text, tail_text, q_labels in zip(questions, before, after, labels):
        head, tail = piece_ids[head_text], piece_ids[tail_text]
        c = context_index[q.context]
        c_ids, offsets = context_enc.input_ids[c], context_enc.offset_mapping[c]
        budget = max_source_length - len(head) - len(tail) - 1  # 1 for </s>
        if budget < 1:
            raise DataError(
                f"{source}: question {q.id!r} with the prompt around it is {len(head) + len(tail)} tokens: it "
                f"leaves no room for the context in dataset.max_source_length={max_source_length}; raise it"
            )
        answer_end = _answer_end(q) if q.answers else None
        if q.answers and answer_end is None:
            out.stats.answer_not_in_context += 1
        starts = [0]
        if len(c_ids) > budget and stride is not None:
            step = budget - min(stride, budget // 2)
            starts = list(range(0, len(c_ids) - budget, step)) + [len(c_ids) - budget]
            out.stats.windowed += 1
        elif len(c_ids) > budget:
            out.stats.truncated += 1
            kept_chars = offsets[budget - 1][1]
            if answer_end is not None and answer_end > kept_chars:
                out.stats.answer_lost += 1
        for w, start in enumerate(starts):
            out.ids.append(q.id)
            out.windows.append(w)
            out.labels.append(q_labels)
            out.input_ids.append(head + c_ids[start : start + budget] + tail + [tokenizer.eos_token_id])
    out.stats.windows = len(out.ids)
    return out


def collate(features: list[dict], pad_token_id: int) -> dict[str, Any]:
    """Pad a batch to its own longest input and target (labels padded with -100)."""
    width = max(len(f["input_ids"]) for f in features)
    label_width = max(len(f["labels"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), label_width), -100, dtype=torch.long)
    for i, f in enumerate(features):
        input_ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        attention_mask[i, : len(f["input_ids"])] = 1
        labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
    return {"ids": [f["id"] for f in features], "windows": [f.get("window", 0) for f in features],
            "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Features(torch.utils.data.Dataset):
    """The encoded questions (in `order`, default as encoded) as the dicts `collate` pads into a batch."""

    def __init__(self, encoded: Encoded, order: Sequence[int] | None = None):
        self.encoded = encoded
        self.order = list(order) if order is not None else list(range(len(encoded.ids)))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        j = self.order[i]
        return {"id": self.encoded.ids[j], "window": self.encoded.windows[j], "input_ids": self.encoded.input_ids[j],
                "labels": self.encoded.labels[j]}
