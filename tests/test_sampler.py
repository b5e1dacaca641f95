"""The length-grouped training order: every example once per epoch, seeded, and little padding."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DistributedSampler

from conftest import DEV_V1, SQUAD
from flan_squad.data.datamodule import SquadDataModule
from flan_squad.data.sampler import LengthGroupedSampler


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 600), min_size=0, max_size=300), batch_size=st.integers(1, 17),
       group_batches=st.integers(1, 6), seed=st.integers(0, 10), epoch=st.integers(0, 5))
def test_every_index_exactly_once_and_batches_align(lengths, batch_size, group_batches, seed, epoch):
    sampler = LengthGroupedSampler(lengths, batch_size, seed, group_batches)
    sampler.set_epoch(epoch)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    assert len(sampler) == len(lengths)
    # Only the last batch may be short, so a BatchSampler over this order cuts exactly these batches.
    batches = sampler.batches()
    assert all(len(b) == batch_size for b in batches[:-1])


def test_seeded_reproducible_and_new_each_epoch():
    lengths = [random.Random(0).randint(20, 500) for _ in range(400)]
    a, b = LengthGroupedSampler(lengths, 8, seed=1), LengthGroupedSampler(lengths, 8, seed=1)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b)
    epochs = []
    for epoch in range(3):
        a.set_epoch(epoch)
        epochs.append(list(a))
    assert epochs[0] != epochs[1] != epochs[2]
    # The order depends on (seed, epoch) alone: a resumed run that sets the epoch replays it.
    c = LengthGroupedSampler(lengths, 8, seed=1)
    assert list(c) == list(c) == epochs[0]
    other_seed = LengthGroupedSampler(lengths, 8, seed=2)
    other_seed.set_epoch(0)
    assert epochs[0] != list(other_seed)
    # Batch composition changes across epochs too, not only the order of fixed batches.
    first = {tuple(sorted(x)) for x in (epochs[0][i : i + 8] for i in range(0, 400, 8))}
    second = {tuple(sorted(x)) for x in (epochs[1][i : i + 8] for i in range(0, 400, 8))}
    assert len(first & second) < 10


def test_batches_are_length_homogeneous_on_real_prompts(tokenizer):
    dm = SquadDataModule(tokenizer, "squad_v1", "v1", "rajpurkar/squad", str(SQUAD / "v1.1" / "dev-v1.1.json"),
                         str(DEV_V1), batch_size=8, limit_train=800, limit_val=8, seed=3)
    dm.setup("fit")
    lengths = [len(x) for x in dm.encoded_train.input_ids]

    def padded(batches):  # padded tokens per real token
        return sum(max(lengths[i] for i in b) * len(b) for b in batches) / sum(lengths)

    sampler = LengthGroupedSampler(lengths, 8, seed=3)
    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    random_batches = [shuffled[i : i + 8] for i in range(0, len(shuffled), 8)]
    assert padded(sampler.batches()) < 1.05 < 1.3 < padded(random_batches)
    first = sampler.batches()[0]
    assert max(lengths[i] for i in first) == max(lengths)  # the longest batch first: OOM shows at once

    # The data module trains in this order: every question once, batch widths = longest in the batch.
    loader = dm.train_dataloader()
    _set_sampler_epoch(loader, 1)  # what Lightning calls before each epoch
    assert loader.sampler.epoch == 1
    batches = list(loader)
    assert Counter(i for b in batches for i in b["ids"]) == Counter(dm.encoded_train.ids)
    assert all(len(b["ids"]) == 8 for b in batches)
    widths = [b["input_ids"].shape[1] for b in batches]
    real = [int(b["attention_mask"].sum()) for b in batches]
    assert sum(w * 8 for w in widths) / sum(real) < 1.05


def test_ddp_processes_take_the_order_in_turn(tokenizer):
    # Lightning shuffles the indices of a training sampler that it wraps for DDP; the data module deals them in turn
    # itself: a step of 2 processes x 1 question trains on the 2 questions one process accumulates (batches 2k, 2k+1).
    dm = SquadDataModule(tokenizer, "squad_v1", "v1", "rajpurkar/squad", str(DEV_V1), str(DEV_V1), batch_size=1,
                         limit_train=12, limit_val=2, seed=3)
    dm.setup("fit")
    one_process = [b["ids"][0] for b in dm.train_dataloader()]
    assert len(one_process) == 12
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)  # Lightning wraps only a sampler that is not one
        _set_sampler_epoch(loader, 0)
        assert [b["ids"][0] for b in loader] == one_process[rank::2]


def test_dataset_group_batches_sets_the_training_orders_groups(tokenizer):
    # dataset.group_batches=1: each batch is a run of the shuffled order (random batches); the default groups 50
    # batches' worth of questions by length, so its batches carry less padding.
    def batches(group_batches: int) -> list[list[int]]:
        dm = SquadDataModule(tokenizer, "squad_v1", "v1", None, train_file=str(DEV_V1), validation_file=str(DEV_V1),
                             limit_train=800, limit_val=1, batch_size=8, seed=3, group_batches=group_batches)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert loader.sampler.group_batches == group_batches
        lengths = [len(x) for x in dm.encoded_train.input_ids]
        return lengths, loader.sampler.batches()

    lengths, grouped = batches(50)
    _, random_batches = batches(1)
    padding = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)  # noqa: E731
    assert sorted(i for b in random_batches for i in b) == list(range(800))
    assert padding(grouped) < 0.5 * padding(random_batches)
