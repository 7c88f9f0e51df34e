"""scikit-learn's bundled digits: 1,797 real 8x8 grayscale images, 10 classes. The embedded default."""

from __future__ import annotations

import torch

from padkd.data import DATASETS, DataSplits, TensorData, stratified_split
from padkd.errors import PadkdError


@DATASETS.register("digits")
def digits(val_fraction: float = 0.2, test_fraction: float = 0.2, split_seed: int = 0) -> DataSplits:
    """scikit-learn `load_digits` (no download), stratified train/val/test split fixed by `split_seed`."""
    from sklearn.datasets import load_digits

    if not (0.01 <= val_fraction < 1 and 0.01 <= test_fraction < 1 and val_fraction + test_fraction <= 0.8):
        raise PadkdError(f"data: val_fraction {val_fraction} and test_fraction {test_fraction} must each be in "
                         "[0.01, 1) (every class in every split) and leave at least 20% of the images for training")

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train, val, test = stratified_split(labels, (1 - val_fraction - test_fraction, val_fraction, test_fraction),
                                        split_seed)
    mean, std = float(images[train].mean()), float(images[train].std())
    images = (images - mean) / std
    return DataSplits(
        train=TensorData(images[train], labels[train]),
        val=TensorData(images[val], labels[val]),
        test=TensorData(images[test], labels[test]),
        num_classes=10,
        in_channels=1,
        normalization=((mean,), (std,)),
        train_targets=labels[train],
    )
