"""Dataset registry. A factory returns `DataSplits`: train/val/test datasets whose items are
`(input, target, index)`, the index being the sample's position in its split (for records)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from padkd.registry import Registry


@dataclass
class DataSplits:
    """The three splits of a data set and what models need to know about it."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    #: (mean, std) used to normalise inputs: the report undoes it to show images.
    normalization: tuple[float, float] = (0.0, 1.0)

    def split(self, name: str) -> Dataset:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


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


DATASETS: Registry[DataSplits] = Registry("dataset")

from padkd.data import digits, mnist  # noqa: E402,F401  (register the built-in datasets)
