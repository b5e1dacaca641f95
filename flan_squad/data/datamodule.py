"""The LightningDataModules: SQuAD v1.1 / v2.0 questions (official-format files, your own records, or a hub dataset)
and the planted task.

Reading order: `read_data_file` / `read_hub` (`flan_squad.data.records`) -> `sample` -> `encode`
(`flan_squad.data.encoding`) -> batches (`flan_squad.data.sampler`) -> `SquadDataModule`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import lightning as L
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DataLoader

import flan_squad.data.planted as planted
from flan_squad.data.encoding import Encoded, Features, collate, encode
from flan_squad.data.prompts import VERSIONS, check_question_format
from flan_squad.data.records import Columns, read_data_file, read_hub
from flan_squad.data.sampler import LengthGroupedSampler, LoaderPosition, ResumableDataLoader
from flan_squad.data.squad import DataError, Question
from flan_squad.utils.errors import ConfigError

log = logging.getLogger(__name__)


# --- reading ----------------------------------------------------------------------------------------


def sample(questions: Sequence[Question], limit: int | None, seed: int) -> list[Question]:
    """A seeded random sample of `limit` questions, kept in file order (None: all of them)."""
    if limit is None or limit >= len(questions):
        return list(questions)
    if limit <= 0:
        raise DataError(f"a limit of {limit} questions leaves nothing to train or validate on")
    keep = sorted(random.Random(seed).sample(range(len(questions)), limit))
    return [questions[i] for i in keep]


# --- the LightningDataModule -------------------------------------------------------------------------


class SquadDataModule(L.LightningDataModule):
    """SQuAD v1.1 or v2.0 questions from local files (official SQuAD JSON, or records mapped by `columns`) or a hub
    dataset (`hub_id`, `hub_config`, mapped by `columns`), tokenized for one tokenizer.

    `val_questions` (in file order) and `version` are what scoring needs after validation.
    """

    def __init__(
        self,
        tokenizer,
        name: str,
        version: str,
        hub_id: str | None,
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
        prompt: str = "flan",
        no_answer: str = "format",
        group_batches: int = 50,
        columns: dict | None = None,
        hub_config: str | None = None,
    ):
        super().__init__()
        if version not in VERSIONS:
            raise ConfigError(f"dataset.version={version!r}: expected 'v1' or 'v2'")
        check_question_format(prompt, no_answer)
        for option, value in [("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                              ("max_source_length", max_source_length), ("max_target_length", max_target_length),
                              ("group_batches", group_batches)]:
            if value is None or value <= 0:
                raise ConfigError(f"dataset.{option}={value}: must be a positive whole number")
        if eval_stride is not None and not eval_stride >= 1:
            raise ConfigError(f"eval.stride={eval_stride}: must be a whole number >= 1 (tokens that consecutive "
                              f"context windows share), or null to truncate long contexts instead")
        for option, value in [("limit_train", limit_train), ("limit_val", limit_val)]:
            if value is not None and value < 0:
                raise ConfigError(f"dataset.{option}={value}: must be >= 1, or null for all questions")
        self.tokenizer = tokenizer
        self.name, self.version, self.hub_id, self.hub_config = name, version, hub_id, hub_config
        # which column holds each field of records and hub rows (official SQuAD JSON has its own names)
        self.columns = Columns.from_config(columns) if columns is not None else None
        self.train_file, self.validation_file = train_file, validation_file
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.limit_train, self.limit_val, self.seed = limit_train, limit_val, seed
        self.num_workers = num_workers
        self.eval_stride = eval_stride  # validation splits long contexts into windows (None: truncates)
        self.val_split = val_split  # the hub split validated on when validation_file is None
        self.prompt, self.no_answer = prompt, no_answer  # the model's format (model.prompt, model.no_answer)
        self.group_batches = group_batches  # batches per length-sorted group of the training order (1: random)
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
        option = f"dataset.{'train' if split == 'train' else 'validation'}_file"
        if file:
            file_version, questions = read_data_file(file, self.columns, option=option)
            if file_version not in (None, self.version):
                log.warning("%s is SQuAD %s data but dataset.version=%s: scoring with %s rules",
                            file, file_version, self.version, self.version)
            source = str(file)
        elif self.hub_id:
            questions = read_hub(self.hub_id, self.hub_config, split, self.columns)
            source = f"{self.hub_id}[{split}]"
        else:
            raise DataError(f"{option} is not set, nor dataset.hub_id: name a data file (SQuAD JSON, JSONL, CSV or "
                            f"Parquet) or a hub dataset")
        if self.version == "v1" and any(not q.answers for q in questions):
            raise DataError(f"{source}: has unanswerable questions; use dataset=squad_v2 (or dataset.version=v2)")
        try:
            return sample(questions, limit, self.seed), source
        except DataError as e:
            raise DataError(f"{source}: {e}") from None

    def _encode(self, questions: list[Question], source: str, prefix: str, stride: int | None = None) -> Encoded:
        encoded = encode(questions, self.tokenizer, self.version, self.max_source_length,
                         self.max_target_length, source, stride, self.prompt, self.no_answer)
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

    @property
    def encoded_train(self) -> Encoded:
        """The training split as `setup("fit")` encoded it (what the benchmarks feed the baseline pipeline)."""
        if self._train is None:
            raise RuntimeError("the training split is encoded by setup('fit'): call it first")
        return self._train

    @property
    def encoded_val(self) -> Encoded:
        """The validation split as `setup()` encoded it: every context window of every question."""
        if self._val is None:
            raise RuntimeError("the validation split is encoded by setup(): call it first")
        return self._val

    def train_dataloader(self) -> DataLoader:
        # Batches grouped by length, padded per batch: the same examples once per epoch as a random
        # sampler, without the ~1.6x padding that random batches of 8 SQuAD prompts carry.
        lengths = [len(ids) for ids in self._train.input_ids]
        sampler = LengthGroupedSampler(lengths, self.batch_size, self.seed, self.group_batches)
        ranks = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if ranks:
            # Several processes take the order's indices in turn (Lightning's own wrapper would shuffle them first):
            # a step of n processes trains on the n batches that one process accumulating n batches would.
            sampler = DistributedSamplerWrapper(sampler, shuffle=False, **ranks)
        return ResumableDataLoader(
            Features(self._train), batch_size=self.batch_size, sampler=sampler,
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
            Features(self._val, order), batch_size=self.eval_batch_size, shuffle=False,
            num_workers=self.num_workers, collate_fn=self._collate, persistent_workers=self.num_workers > 0,
            # A generator of its own too: each pass over it (a validation, or Lightning fast-forwarding past one on a
            # resume) would otherwise draw from the global RNG, and how often a run validates would change dropout.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _collate(self, features: list[dict]) -> dict:
        return collate(features, self.tokenizer.pad_token_id)


class PlantedDataModule(SquadDataModule):
    """The planted-facts task (`flan_squad.data.planted`): official-format files that `prepare_data` generates
    (seeded) under `cache_dir` on first use, then read like any SQuAD file. `task=decoy` (v2 only) is the decoy
    variant, whose `val_split=tune` is where learning rates are chosen (dev: where results are reported)."""

    def __init__(self, cache_dir: str, shared_dir: str, version: str, task: str = "planted", **kwargs):
        if task not in ("planted", "decoy") or (task == "decoy" and version != "v2"):
            raise ConfigError(f"dataset.task={task!r}: expected 'planted' or, with version v2, 'decoy'")
        self.task, self.shared_dir = task, shared_dir
        self.planted_dir = planted.directory(cache_dir) / ("decoy" if task == "decoy" else "")
        files = self.planted_dir / ("" if task == "decoy" else version)
        split = kwargs.get("val_split", "validation")
        if split not in ("validation", "tune") or (split == "tune" and task != "decoy"):
            raise ConfigError(f"dataset.val_split={split!r}: the {task} task has 'validation'"
                              + (" and 'tune'" if task == "decoy" else ""))
        kwargs.setdefault("train_file", None)
        kwargs.setdefault("validation_file", None)
        kwargs["train_file"] = kwargs["train_file"] or str(files / "train.json")
        kwargs["validation_file"] = (kwargs["validation_file"]
                                     or str(files / ("tune.json" if split == "tune" else "dev.json")))
        super().__init__(version=version, **kwargs)

    def prepare_data(self) -> None:  # writes only the files that are missing
        if self.task == "decoy":
            planted.build_decoy_task(self.planted_dir, self.shared_dir)
        else:
            planted.build(self.planted_dir, self.shared_dir)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # callers outside a Trainer (evaluate, benchmarks) set up without prepare_data
        super().setup(stage)
