"""SQuAD v1.1 / v2.0 for a seq2seq model: read, flatten, prompt, tokenize, batch.

Reading order: `read_squad_file` (`flan_squad.data.squad`) / `read_squad_hub` -> `sample` -> `encode` ->
`SquadDataModule`.
The prompt puts the context between a fixed instruction and the question, and only the context is ever
truncated, so the model always sees the whole instruction and question.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

import flan_squad.data.planted as planted
from flan_squad.utils.errors import ConfigError
from flan_squad.data.squad import INSTRUCTIONS, UNANSWERABLE, DataError, Question, read_squad_file

log = logging.getLogger(__name__)


# --- reading ----------------------------------------------------------------------------------------


def read_squad_hub(hub_id: str, split: str) -> list[Question]:
    """Load a split from the Hugging Face hub (`rajpurkar/squad`, `rajpurkar/squad_v2`)."""
    import datasets

    try:
        rows = datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # offline, unknown id, no such split: all need the same advice
        raise DataError(
            f"could not load {hub_id!r} split {split!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Without hub access, point at local files in "
            f"the official SQuAD format: dataset.train_file=... dataset.validation_file=..."
        ) from None
    return [
        Question(
            str(r["id"]), r["question"], r["context"], tuple(r["answers"]["text"]),
            tuple(r["answers"]["answer_start"]), r.get("title", ""),
        )
        for r in rows
    ]


def sample(questions: Sequence[Question], limit: int | None, seed: int) -> list[Question]:
    """A seeded random sample of `limit` questions, kept in file order (None: all of them)."""
    if limit is None or limit >= len(questions):
        return list(questions)
    if limit <= 0:
        raise DataError(f"a limit of {limit} questions leaves nothing to train or validate on")
    keep = sorted(random.Random(seed).sample(range(len(questions)), limit))
    return [questions[i] for i in keep]


# --- prompts and tokenization ----------------------------------------------------------------------


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
) -> Encoded:
    """Tokenize prompts and targets; `source` names the data in errors.

    A context too long for `max_source_length` is truncated (stride=None, for training), or split into
    overlapping windows that share `stride` tokens (at most half a window), one model input per window
    (for evaluation, so that no part of the context goes unread).
    """
    instruction_ids = tokenizer(INSTRUCTIONS[version], add_special_tokens=False).input_ids
    contexts = list(dict.fromkeys(q.context for q in questions))  # paragraphs repeat ~5x: encode once
    context_enc = tokenizer(contexts, add_special_tokens=False, return_offsets_mapping=True)
    context_index = {c: i for i, c in enumerate(contexts)}
    question_ids = tokenizer([q.question for q in questions], add_special_tokens=False).input_ids
    targets = [(q.answers[0] if q.answers else UNANSWERABLE) for q in questions]
    labels = tokenizer(targets, max_length=max_target_length, truncation=True).input_ids

    out = Encoded(ids=[], input_ids=[], labels=[], stats=EncodeStats(examples=len(questions)))
    for q, q_ids, q_labels in zip(questions, question_ids, labels):
        c = context_index[q.context]
        c_ids, offsets = context_enc.input_ids[c], context_enc.offset_mapping[c]
        budget = max_source_length - len(instruction_ids) - len(q_ids) - 1  # 1 for </s>
        if budget < 1:
            raise DataError(
                f"{source}: question {q.id!r} is {len(q_ids)} tokens: with the instruction it leaves no room "
                f"for the context in dataset.max_source_length={max_source_length}; raise it"
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
            out.input_ids.append(instruction_ids + c_ids[start : start + budget] + q_ids + [tokenizer.eos_token_id])
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


class LengthGroupedSampler(Sampler[int]):
    """Training order in which each run of `batch_size` indices has similar lengths: little padding.

    Every epoch yields every index exactly once, in an order fixed by `seed` and the epoch: shuffle all
    indices, cut them into groups of `group_batches` batches, sort each group by length, cut it into
    batches, and shuffle the batches (the one holding the longest example first, so an out-of-memory
    shows up at once; a short last batch stays last, so a `BatchSampler` cuts exactly these batches).
    Batch composition changes every epoch, as with a random sampler; only the padding goes away.
    Under DDP Lightning wraps it in a non-shuffling DistributedSampler that deals consecutive indices to
    the ranks in turn, so each rank's batches stay length-grouped.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_batches: int = 50):
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"batch_size={batch_size}, group_batches={group_batches}: both must be >= 1")
        self.lengths, self.batch_size, self.seed, self.group_batches = list(lengths), batch_size, seed, group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before every training epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        group = self.batch_size * self.group_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), group):
            chunk = sorted(order[start : start + group], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        short = [b for b in batches if len(b) < self.batch_size]  # at most one: the last group's tail
        full = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(full)
        if full:
            longest = max(range(len(full)), key=lambda b: self.lengths[full[b][0]])
            full[0], full[longest] = full[longest], full[0]
        return full + short

    def __iter__(self):
        # No epoch bump here: the order depends on (seed, epoch) alone, so a resumed run replays it.
        return (i for batch in self.batches() for i in batch)


class _Features(torch.utils.data.Dataset):
    def __init__(self, encoded: Encoded, order: Sequence[int] | None = None):
        self.encoded = encoded
        self.order = list(order) if order is not None else list(range(len(encoded.ids)))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        j = self.order[i]
        return {"id": self.encoded.ids[j], "window": self.encoded.windows[j], "input_ids": self.encoded.input_ids[j],
                "labels": self.encoded.labels[j]}


class LoaderPosition:
    """How far into its epoch the training loader is: saved in every checkpoint, restored on resume.

    Shared by a `SquadDataModule` and its training loader (and any copy Lightning makes of that loader), because
    the datamodule's state is restored before the loader exists, and Lightning's own restoring of a loader's state
    comes too late once `trainer.estimated_stepping_batches` (which the learning-rate schedule needs in
    `configure_optimizers`) has built the loader: the epoch would then restart from its first batch.
    """

    def __init__(self):
        self.epoch: int | None = None  # the sampler's epoch being iterated
        self.yielded = 0  # batches of it handed out (each one trained on before the next is asked for)
        self.resume_at: tuple[int | None, int] | None = None  # (epoch, batches) trained on before a resume

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at = (state.get("epoch"), int(state.get("batches_yielded", 0)))

    def start(self, epoch: int | None) -> int:
        """An iteration over `epoch` begins: how many of its batches to skip."""
        resume_at, self.resume_at = self.resume_at, None
        # A checkpoint written after an epoch's last batch resumes with the next epoch: nothing of it to skip.
        skip = resume_at[1] if resume_at and resume_at[0] in (epoch, None) else 0
        self.epoch, self.yielded = epoch, skip
        return skip


class ResumableDataLoader(DataLoader):
    """A DataLoader that can resume mid-epoch: its `LoaderPosition` goes into each checkpoint, and after a resume
    the epoch skips the batches that were already trained on.

    Needs a sampler whose order is fixed per epoch (`LengthGroupedSampler`, or Lightning's DistributedSampler).
    A sized loader is not prefetched by Lightning, so the count is of batches really consumed.
    """

    def __init__(self, *args, position: LoaderPosition | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.position = position or LoaderPosition()

    def __iter__(self):
        skip = self.position.start(getattr(self.sampler, "epoch", None))  # Lightning has set the sampler's epoch
        batches = super().__iter__()
        for index, batch in enumerate(batches):
            if index < skip:
                continue  # already trained on before the interruption
            self.position.yielded += 1
            yield batch

    def state_dict(self) -> dict:  # also saved by Lightning's fit loop, which then does not warn on resume
        return self.position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position.load_state_dict(state)


# --- the LightningDataModule -------------------------------------------------------------------------


class SquadDataModule(L.LightningDataModule):
    """SQuAD v1.1 or v2.0 from local official-format files or the hub, tokenized for one tokenizer.

    `val_questions` (in file order) and `version` are what scoring needs after validation.
    """

    def __init__(
        self,
        tokenizer,
        name: str,
        version: str,
        hub_id: str,
        train_file: str | None = None,
        validation_file: str | None = None,
        max_source_length: int = 512,
        max_target_length: int = 32,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        limit_train: int | None = None,
        limit_val: int | None = None,
        seed: int = 42,
        num_workers: int = 0,
        eval_stride: int | None = None,
        val_split: str = "validation",
    ):
        super().__init__()
        if version not in INSTRUCTIONS:
            raise ConfigError(f"dataset.version={version!r}: expected 'v1' or 'v2'")
        for option, value in [("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                              ("max_source_length", max_source_length), ("max_target_length", max_target_length)]:
            if value is None or value <= 0:
                raise ConfigError(f"dataset.{option}={value}: must be a positive whole number")
        if eval_stride is not None and not eval_stride >= 1:
            raise ConfigError(f"eval.stride={eval_stride}: must be a whole number >= 1 (tokens that consecutive "
                              f"context windows share), or null to truncate long contexts instead")
        for option, value in [("limit_train", limit_train), ("limit_val", limit_val)]:
            if value is not None and value < 0:
                raise ConfigError(f"dataset.{option}={value}: must be >= 1, or null for all questions")
        self.tokenizer = tokenizer
        self.name, self.version, self.hub_id = name, version, hub_id
        self.train_file, self.validation_file = train_file, validation_file
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.limit_train, self.limit_val, self.seed = limit_train, limit_val, seed
        self.num_workers = num_workers
        self.eval_stride = eval_stride  # validation splits long contexts into windows (None: truncates)
        self.val_split = val_split  # the hub split validated on when validation_file is None
        self.train_questions: list[Question] = []
        self.val_questions: list[Question] = []
        self.stats: dict[str, int] = {}
        self._train: Encoded | None = None
        self._val: Encoded | None = None
        self.train_position = LoaderPosition()

    def state_dict(self) -> dict:  # Lightning saves it in every checkpoint and restores it first on resume
        return {"train_loader": self.train_position.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.train_position.load_state_dict(state.get("train_loader", {}))

    def _read(self, file: str | None, split: str, limit: int | None) -> tuple[list[Question], str]:
        if file:
            file_version, questions = read_squad_file(file)
            if file_version != self.version:
                log.warning("%s is SQuAD %s data but dataset.version=%s: scoring with %s rules",
                            file, file_version, self.version, self.version)
            source = str(file)
        else:
            questions, source = read_squad_hub(self.hub_id, split), f"{self.hub_id}[{split}]"
        if self.version == "v1" and any(not q.answers for q in questions):
            raise DataError(f"{source}: has unanswerable questions; use dataset=squad_v2 for it")
        try:
            return sample(questions, limit, self.seed), source
        except DataError as e:
            raise DataError(f"{source}: {e}") from None

    def _encode(self, questions: list[Question], source: str, prefix: str, stride: int | None = None) -> Encoded:
        encoded = encode(questions, self.tokenizer, self.version, self.max_source_length,
                         self.max_target_length, source, stride)
        s = encoded.stats
        log.info("%s: %d questions, %d contexts truncated to %d tokens (%d lost their gold answer), "
                 "%d split into windows (%d inputs)", source, s.examples, s.truncated, self.max_source_length,
                 s.answer_lost, s.windowed, s.windows)
        if s.answer_not_in_context:
            log.warning("%s: %d questions have no gold answer text inside their context",
                        source, s.answer_not_in_context)
        self.stats.update(s.as_dict(prefix))
        return encoded

    def setup(self, stage: str | None = None) -> None:
        if self._val is None:
            self.val_questions, source = self._read(self.validation_file, self.val_split, self.limit_val)
            self._val = self._encode(self.val_questions, source, "val", self.eval_stride)
        if stage in (None, "fit") and self._train is None:
            self.train_questions, source = self._read(self.train_file, "train", self.limit_train)
            self._train = self._encode(self.train_questions, source, "train")

    def train_dataloader(self) -> DataLoader:
        # Batches grouped by length, padded per batch: the same examples once per epoch as a random
        # sampler, without the ~1.6x padding that random batches of 8 SQuAD prompts carry.
        lengths = [len(ids) for ids in self._train.input_ids]
        return ResumableDataLoader(
            _Features(self._train), batch_size=self.batch_size,
            sampler=LengthGroupedSampler(lengths, self.batch_size, self.seed),
            num_workers=self.num_workers, collate_fn=self._collate, persistent_workers=self.num_workers > 0,
            # Worker seeds from a generator of their own, not the global RNG: the global RNG then drives
            # dropout alone, and a resumed run draws the same masks as an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed), position=self.train_position,
        )

    def val_dataloader(self) -> DataLoader:
        # Longest first: generation batches of similar length waste little on padding, and an
        # out-of-memory shows up on the first batch. Scoring maps answers back by question id.
        order = sorted(range(len(self._val.ids)), key=lambda i: -len(self._val.input_ids[i]))
        return DataLoader(
            _Features(self._val, order), batch_size=self.eval_batch_size, shuffle=False,
            num_workers=self.num_workers, collate_fn=self._collate, persistent_workers=self.num_workers > 0,
        )

    def _collate(self, features: list[dict]) -> dict:
        return collate(features, self.tokenizer.pad_token_id)


class PlantedDataModule(SquadDataModule):
    """The planted-facts task (`flan_squad.data.planted`): official-format files that `prepare_data` generates
    (seeded) under `cache_dir` on first use, then read like any SQuAD file."""

    def __init__(self, cache_dir: str, shared_dir: str, version: str, **kwargs):
        self.planted_dir, self.shared_dir = planted.directory(cache_dir), shared_dir
        kwargs.setdefault("train_file", None)
        kwargs.setdefault("validation_file", None)
        kwargs["train_file"] = kwargs["train_file"] or str(self.planted_dir / version / "train.json")
        kwargs["validation_file"] = kwargs["validation_file"] or str(self.planted_dir / version / "dev.json")
        super().__init__(version=version, **kwargs)

    def prepare_data(self) -> None:
        planted.build(self.planted_dir, self.shared_dir)  # writes only the files that are missing

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # callers outside a Trainer (evaluate, benchmarks) set up without prepare_data
        super().setup(stage)
