"""Which samples each optimizer step trains on: a function of the seed, the epoch and the global
batch, never of the number of ranks.

Epoch ``e`` trains on a permutation of the whole train split drawn from ``(seed, e)`` alone (a
true global shuffle); its optimizer step ``s`` trains on ``perm[s*B : (s+1)*B]`` (``B``: the
global batch), so an epoch has ``N // B`` steps and the tail of fewer than ``B`` samples, a
different one each epoch, is left out. The ranks of a world of ``W`` split a step's batch into
``W`` contiguous parts in rank order, and each rank its part into ``grad_accum`` micro-batches in
order (``BatchLayout``). A run resumed on another number of ranks therefore trains every step on
the same samples; only how they are dealt changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


class LayoutError(ValueError):
    """A world size that cannot keep the run's global batch (one-line message)."""


@dataclass(frozen=True)
class BatchLayout:
    """How ``global_batch`` samples per optimizer step are dealt to ``world_size`` ranks, each
    running ``grad_accum`` micro-batches of ``micro_batch``."""

    global_batch: int
    world_size: int
    micro_batch: int
    grad_accum: int

    @classmethod
    def for_world(cls, global_batch: int, world_size: int, max_micro_batch: int) -> BatchLayout:
        """The layout of ``global_batch`` on ``world_size`` ranks with the fewest micro-batches
        that hold at most ``max_micro_batch`` samples (``train.batch_per_device``: what fits)."""
        if global_batch % world_size:
            raise LayoutError(f"a global batch of {global_batch} cannot be split over {world_size} ranks: use a "
                              f"number of ranks that divides {global_batch}")
        per_rank = global_batch // world_size
        accum = next(a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= max_micro_batch)
        return cls(global_batch, world_size, per_rank // accum, accum)

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world_size

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.world_size} rank(s) x {self.micro_batch} x "
                f"{self.grad_accum} accumulation step(s)")


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    return num_samples // global_batch


@lru_cache(maxsize=2)  # the epoch being read, and the next one while batches of both are prefetched
def epoch_permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_samples)


@dataclass(frozen=True)
class SampleOrder:
    """The train split's order for one rank of ``layout``: ``sample(...)`` is the global index of a
    sample of the split (picklable: DALI's reader processes hold one)."""

    num_samples: int
    seed: int
    layout: BatchLayout
    rank: int

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_samples, self.layout.global_batch)

    def micro_batch(self, epoch: int, step: int, micro: int) -> np.ndarray:
        """The samples of micro-batch ``micro`` of this rank in ``step`` of ``epoch``."""
        first = step * self.layout.global_batch + self.rank * self.layout.per_rank + micro * self.layout.micro_batch
        return epoch_permutation(self.seed, epoch, self.num_samples)[first:first + self.layout.micro_batch]

    def global_batch(self, epoch: int, step: int) -> np.ndarray:
        """Every rank's samples of ``step`` of ``epoch``, in rank order."""
        first = step * self.layout.global_batch
        return epoch_permutation(self.seed, epoch, self.num_samples)[first:first + self.layout.global_batch]

    def position(self, origin: tuple[int, int], micro_batches: int) -> tuple[int, int, int]:
        """(epoch, step, micro) of this rank's micro-batch number ``micro_batches`` counted from the
        start of step ``origin[1]`` of epoch ``origin[0]``."""
        steps, micro = divmod(micro_batches, self.layout.grad_accum)
        epochs, step = divmod(origin[1] + steps, self.steps_per_epoch)
        return origin[0] + epochs, step, micro
