"""torch.distributed helpers: torchrun environment → process group, rank-0 checks, reductions, and a
seeded, sharded, resumable sampler. With one process everything degrades to plain local code."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler


def init_from_env(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum each tensor across ranks (in one collective); identity on a single process."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    flat = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, flat.unbind(), strict=True))


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


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (e.g. a set-up error message, so all ranks stop alike)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank: each rank's last training step
    updated its own, and what is evaluated must be the model rank 0 saves."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
