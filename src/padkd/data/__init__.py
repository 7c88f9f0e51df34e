"""Dataset registry. A factory returns `DataSplits`: train/(val)/test datasets whose items are
`(input, target, index)`, the index being the sample's position in its split (records, memory banks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from padkd.context import DataInfo
from padkd.registry import Registry

#: A transform of a whole batch on its device (batched augmentation of in-memory uint8 images).
BatchTransform = Callable[[Any], Any]


@dataclass
class DataSplits:
    """The splits of a data set and what models and methods need to know about it.

    `val` may be None (retrieval protocols have no validation split: then no epoch is "best").
    `eval_train` is the training split with evaluation transforms (records of the train split), when
    it differs from `train`. `device_transforms` maps "train"/"eval" to batched transforms that the
    engine applies after moving a batch to its device (augmentation as tensor ops, on the GPU when
    there is one). `normalization` is the per-channel (mean, std) the inputs were normalised with.
    `tokenizer` is the text data sets' tokenizer (`padkd.data.text`; then `num_classes` is its vocabulary
    size and `in_channels` 0), None for other data.
    """

    train: Dataset
    val: Dataset | None
    test: Dataset
    in_channels: int
    num_classes: int | None = None
    normalization: tuple[tuple[float, ...], tuple[float, ...]] = ((0.0,), (1.0,))
    train_targets: Tensor | None = None
    eval_train: Dataset | None = None
    device_transforms: dict[str, BatchTransform] = field(default_factory=dict)
    tokenizer: Any = None

    def split(self, name: str, augment: bool = False) -> Dataset:
        """A split by name; the training split without augmentation unless `augment`."""
        if name == "train":
            return self.train if augment or self.eval_train is None else self.eval_train
        dataset = {"val": self.val, "test": self.test}[name]
        if dataset is None:
            raise ValueError(f"this data set has no '{name}' split")
        return dataset

    def info(self) -> DataInfo:
        """What methods may know about the training data (`BuildContext.data`)."""
        return DataInfo(n_train=len(self.train), num_classes=self.num_classes,  # type: ignore[arg-type]
                        train_targets=self.train_targets)


class TensorData(Dataset):
    """In-memory images `[N, C, H, W]` (float) and integer labels `[N]`."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.images[i], self.labels[i], i


def stratified_split(labels: Tensor, fractions: tuple[float, float, float], seed: int) -> list[Tensor]:
    """Indices of train/val/test, stratified by label, fixed by `seed` (independent of training seeds)."""
    g = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[], [], []]
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = round(fractions[1] * len(idx))
        n_test = round(fractions[2] * len(idx))
        n_train = len(idx) - n_val - n_test
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train:n_train + n_val])
        parts[2].append(idx[n_train + n_val:])
    return [torch.cat(p).sort().values for p in parts]


def holdout_split(n: int, val_size: int, train_subset: int | None, seed: int, what: str) -> tuple[Tensor, Tensor]:
    """Sorted train and val indices of `n` items: a permutation fixed by `seed` holds out its first `val_size`
    items; `train_subset` keeps a random subset of the rest. `what` names the items in errors."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in 0..{n - 1} ({what} hold {n} images), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if train_subset is not None:
        if not 1 <= train_subset <= len(train_idx):
            raise ValueError(f"train_subset must be in 1..{len(train_idx)}, got {train_subset}")
        train_idx = train_idx[:train_subset]
    return train_idx.sort().values, val_idx.sort().values


DATASETS: Registry[DataSplits] = Registry("dataset")

from padkd.data import (  # noqa: E402,F401  (register the built-in datasets and samplers)
    cifar,
    coco,
    digits,
    folder,
    mnist,
    retrieval,
    samplers,
    text,
)
