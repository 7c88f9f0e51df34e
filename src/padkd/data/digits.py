"""scikit-learn's bundled digits: 1,797 real 8x8 grayscale images, 10 classes. The embedded default."""

from __future__ import annotations

import torch

from padkd.data import DATASETS, DataSplits, TensorData, stratified_split
from padkd.data.corrupt import check_fractions, corrupt
from padkd.errors import PadkdError


@DATASETS.register("digits")
def digits(val_fraction: float = 0.2, test_fraction: float = 0.2, split_seed: int = 0,
           train_subset: int | None = None, noise_fraction: float = 0.0, label_noise: float = 0.0,
           corrupt_seed: int = 0) -> DataSplits:
    """scikit-learn `load_digits` (no download), stratified train/val/test split fixed by `split_seed`.

    `train_subset` keeps that many training images (a random subset fixed by `split_seed`);
    `noise_fraction` of the training images are replaced by pixel noise and `label_noise` of the others
    get a wrong label (fixed by `corrupt_seed`; validation and test stay clean, see data/corrupt.py)."""
    from sklearn.datasets import load_digits

    if not (0.01 <= val_fraction < 1 and 0.01 <= test_fraction < 1 and val_fraction + test_fraction <= 0.8):
        raise PadkdError(f"data: val_fraction {val_fraction} and test_fraction {test_fraction} must each be in "
                         "[0.01, 1) (every class in every split) and leave at least 20% of the images for training")
    check_fractions(noise_fraction, label_noise)

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train, val, test = stratified_split(labels, (1 - val_fraction - test_fraction, val_fraction, test_fraction),
                                        split_seed)
    if train_subset is not None:
        if not 1 <= train_subset <= len(train):
            raise PadkdError(f"data.train_subset must be between 1 and the {len(train)} training images, "
                             f"got {train_subset}")
        picks = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed))[:train_subset]
        train = train[picks.sort().values]
    # Statistics of the clean training images, so corrupting some changes no other split's inputs.
    mean, std = float(images[train].mean()), float(images[train].std())

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    train_data = corrupt(images[train], labels[train], 10, noise_fraction, label_noise, corrupt_seed, normalize)
    return DataSplits(
        train=train_data,
        val=TensorData(normalize(images[val]), labels[val]),
        test=TensorData(normalize(images[test]), labels[test]),
        num_classes=10,
        in_channels=1,
        normalization=((mean,), (std,)),
        train_targets=train_data.labels,
    )
