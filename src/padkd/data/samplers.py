"""Training samplers (a registry: `data.sampler: {name: ...}`) and the exact evaluation sharding.

A training sampler yields dataset indices for this rank; consecutive `batch_size` blocks form the
batches. It must be resumable: `set_epoch(key, start)` selects the epoch's order and skips the first
`start` indices of this rank, and the order depends only on (seed, epoch key), never on the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Sampler

from padkd.registry import Registry

SAMPLERS: Registry[Sampler[int]] = Registry("sampler")


class EpochSampler(Sampler[int]):
    """Per-epoch permutation seeded by (seed, epoch key), sharded across ranks, able to start at an offset.

    The order depends only on the seed and the epoch, never on the global RNG, so a run resumed
    mid-epoch sees exactly the samples an uninterrupted run would have seen next.
    """

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.shuffle, self.seed, self.rank, self.world = size, shuffle, seed, rank, world
        self.epoch_key = 0
        self.start = 0

    def set_epoch(self, epoch_key: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first `start` samples of this rank."""
        self.epoch_key, self.start = epoch_key, start

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch_key)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.world > 1:
            total = math.ceil(self.size / self.world) * self.world
            order = (order + order[: total - self.size])[self.rank :: self.world]
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.start :])

    def __len__(self) -> int:
        return max(0, math.ceil(self.size / self.world) - self.start)


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r reads samples r, r+W, ... (exact metric sums)."""

    def __init__(self, size: int, rank: int = 0, world: int = 1) -> None:
        self.indices = list(range(rank, size, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@SAMPLERS.register("random")
def random_order(size: int, seed: int, rank: int, world: int, batch_size: int,
                 targets: Tensor | None) -> EpochSampler:
    """A seeded random permutation of the training split per epoch, sharded across ranks."""
    return EpochSampler(size, shuffle=True, seed=seed, rank=rank, world=world)
