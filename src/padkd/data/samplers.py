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


class ClassBalancedSampler(Sampler[int]):
    """P×K batches: each batch holds `batch_size / samples_per_class` = P classes × K samples of each.

    A pass shuffles each class's samples and cuts them into groups of K (a class with fewer than K
    samples makes one group, filled up by drawing from it again), then deals the groups into batches
    of P distinct classes, every group at most once: each batch takes the classes that must go now (as
    many groups left as batches left) and draws the rest with probability proportional to their groups
    left. The number of batches per pass depends only on the class sizes (a class cannot fill more
    batches than exist; a few surplus groups are left out at random). An epoch is `batches_per_epoch`
    batches per rank (default: one pass divided among the ranks); global batch b goes to rank
    b mod world, so within a pass no two ranks share a sample. The order depends only on (seed, epoch key).
    """

    def __init__(self, targets: Tensor, batch_size: int, samples_per_class: int, seed: int, rank: int = 0,
                 world: int = 1, batches_per_epoch: int | None = None) -> None:
        k = samples_per_class
        if k < 1 or batch_size % k != 0:
            raise ValueError(f"m_per_class: samples_per_class ({k}) must divide data.batch_size ({batch_size})")
        labels = targets.long().flatten()
        classes = labels.unique(sorted=True)
        self.per_batch = batch_size // k
        if len(classes) < self.per_batch:
            raise ValueError(f"m_per_class: a batch needs {self.per_batch} classes ({batch_size}/{k}) but the "
                             f"training split has {len(classes)}; lower data.batch_size or raise samples_per_class")
        self.members = [(labels == c).nonzero().flatten() for c in classes]
        self.k, self.batch_size, self.seed, self.rank, self.world = k, batch_size, seed, rank, world
        # Groups each class can contribute to a pass: no more than there are batches (one group per batch).
        self.caps = torch.tensor([max(len(m) // k, 1) for m in self.members])
        self.pass_batches = int(self.caps.sum()) // self.per_batch
        while int(self.caps.max()) > self.pass_batches:
            self.caps = self.caps.clamp_max(self.pass_batches)
            self.pass_batches = int(self.caps.sum()) // self.per_batch
        self.batches = batches_per_epoch or self.pass_batches // world
        if self.batches < 1:
            raise ValueError(f"m_per_class: one pass over the data makes fewer than {world} batch(es) of "
                             f"{batch_size}; set batches_per_epoch or lower data.batch_size")
        self.epoch_key = 0
        self.start = 0

    def set_epoch(self, epoch_key: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first `start` samples of this rank."""
        self.epoch_key, self.start = epoch_key, start

    def _one_pass(self, g: torch.Generator) -> list[Tensor]:
        """The batches of one pass over the data (each a `[P·K]` index tensor)."""
        stacks: list[list[Tensor]] = []
        for members, cap in zip(self.members, self.caps.tolist(), strict=True):
            order = members[torch.randperm(len(members), generator=g)]
            if len(order) < self.k:
                order = torch.cat([order, members[torch.randint(len(members), (self.k - len(order),), generator=g)]])
            stacks.append(list(order[: cap * self.k].view(cap, self.k).unbind()))
        left = self.caps.clone()
        surplus = int(left.sum()) - self.per_batch * self.pass_batches
        if surplus:
            left[torch.multinomial(left.float(), surplus, replacement=False, generator=g)] -= 1
        batches = []
        for remaining in range(self.pass_batches, 0, -1):
            forced = (left == remaining).nonzero().flatten()  # would not fit into the batches left
            free = torch.where(left == remaining, 0, left).float()
            drawn = self.per_batch - len(forced)
            picked = torch.cat([forced, torch.multinomial(free, drawn, replacement=False, generator=g)]) \
                if drawn else forced
            batches.append(torch.cat([stacks[c].pop() for c in picked.tolist()]))
            left[picked] -= 1
        return batches

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch_key)
        batches: list[Tensor] = []
        while len(batches) < self.batches * self.world:
            batches += self._one_pass(g)
        mine = batches[self.rank : self.batches * self.world : self.world]
        return torch.cat(mine).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.start :])

    def __len__(self) -> int:
        return max(0, self.batches * self.batch_size - self.start)


@SAMPLERS.register("m_per_class")
def m_per_class(size: int, seed: int, rank: int, world: int, batch_size: int, targets: Tensor | None,
                samples_per_class: int = 4, batches_per_epoch: int | None = None) -> ClassBalancedSampler:
    """Class-balanced P×K batches (P = batch_size / samples_per_class classes, K samples each), for metric learning."""
    if targets is None:
        raise ValueError("m_per_class needs the training labels, and this data set gives none (train_targets)")
    if len(targets) != size:
        raise ValueError(f"m_per_class: {len(targets)} training labels for {size} training samples")
    if batches_per_epoch is not None and batches_per_epoch < 1:
        raise ValueError(f"m_per_class: batches_per_epoch must be >= 1, got {batches_per_epoch}")
    return ClassBalancedSampler(targets, batch_size, samples_per_class, seed, rank, world, batches_per_epoch)
