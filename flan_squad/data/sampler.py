"""The training order: length-grouped batches (little padding) in an order fixed by (seed, epoch), and a loader
that resumes mid-epoch where an interrupted run stopped."""

from __future__ import annotations

import random
from collections.abc import Sequence

from torch.utils.data import DataLoader, Sampler


class LengthGroupedSampler(Sampler[int]):
    """Training order in which each run of `batch_size` indices has similar lengths: little padding.

    Every epoch yields every index exactly once, in an order fixed by `seed` and the epoch: shuffle all
    indices, cut them into groups of `group_batches` batches, sort each group by length, cut it into
    batches, and shuffle the batches (the one holding the longest example first, so an out-of-memory
    shows up at once; a short last batch stays last, so a `BatchSampler` cuts exactly these batches).
    Batch composition changes every epoch, as with a random sampler; only the padding goes away.
    Under DDP the datamodule deals its indices to the processes in turn (a non-shuffling DistributedSampler), so a
    step of n processes trains on the batches that one process accumulating n batches would.
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
