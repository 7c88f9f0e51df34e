"""Data loaders that yield `Batch`es on the training device, transformed and ready for the models.

The training loader uses the registered sampler (seeded, sharded, resumable); evaluation loaders shard
exactly (no padding). Batched device transforms (augmentation of in-memory uint8 images) run after the
copy to the device, so they run on the GPU when there is one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from padkd.batch import Batch, tree_map
from padkd.config import Config
from padkd.data import DataSplits
from padkd.data.samplers import SAMPLERS, ShardSampler


class DeviceLoader:
    """Iterates a DataLoader of Batches, moving each to `device` and applying `transform` there."""

    def __init__(self, loader: DataLoader, device: torch.device, transform: Callable[[Batch], Batch] | None,
                 channels_last: bool = False) -> None:
        self.loader = loader
        self.device = device
        self.transform = transform
        self.channels_last = channels_last

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def prepare(self, batch: Batch) -> Batch:
        """Move a host batch to the device and apply the transforms (also used for the example batch)."""
        batch = batch.to(self.device, non_blocking=self.device.type == "cuda")
        if self.transform is not None:
            batch = self.transform(batch)
        if self.channels_last:
            batch = batch.replace(inputs=tree_map(_to_channels_last, batch.inputs))
        return batch

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            yield self.prepare(batch)


def _to_channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def make_loader(cfg: Config, data: DataSplits, split: str, *, train: bool, collate: Callable[[list[Any]], Batch],
                device: torch.device, rank: int = 0, world: int = 1) -> DeviceLoader:
    """The training loader of `split` (`train=True`: augmentation, the configured sampler, drop_last) or
    an evaluation loader (evaluation transforms, exact shards of this rank)."""
    dataset = data.split(split, augment=train)
    dc = cfg.data
    if train:
        sampler: Any = SAMPLERS.create(dc.sampler.name, dc.sampler.options, "data.sampler", size=len(dataset),
                                      seed=cfg.seed, rank=rank, world=world, batch_size=dc.batch_size,
                                      targets=data.train_targets)
        batch_size = dc.batch_size
    else:
        sampler = ShardSampler(len(dataset), rank, world)
        batch_size = dc.eval_batch_size or dc.batch_size
    # A private generator: starting an epoch's iterator must not draw on the global RNG, or a run
    # resumed mid-epoch (one more iterator) would continue with another random stream.
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train, collate_fn=collate,
                        num_workers=dc.num_workers, pin_memory=device.type == "cuda" and dc.pin_memory,
                        persistent_workers=dc.num_workers > 0 and dc.persistent_workers,
                        prefetch_factor=dc.prefetch_factor if dc.num_workers > 0 else None,
                        generator=torch.Generator().manual_seed(cfg.seed))
    transform = data.device_transforms.get("train" if train else "eval")
    return DeviceLoader(loader, device, transform, channels_last=cfg.engine.channels_last)


def example_batch(cfg: Config, data: DataSplits, collate: Callable[[list[Any]], Batch],
                  loader: DeviceLoader) -> Batch:
    """A seeded random sample of the training split, one batch in size, prepared like a training batch.

    Never the first batch: on class-sorted folders that is one class, which would skew PAD's data
    initialisation and any statistic a method sets on its first call."""
    dataset = data.split("train", augment=True)
    g = torch.Generator().manual_seed(cfg.seed)
    picks = torch.randperm(len(dataset), generator=g)[: cfg.data.batch_size].tolist()
    return loader.prepare(collate([dataset[i] for i in picks]))
