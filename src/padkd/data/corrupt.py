"""Corrupted training sets for the evidence study: some images replaced by noise, some labels flipped.

Only the training split is corrupted (validation and test stay clean), so a teacher trained on the
clean data set and a student trained on the corrupted one are evaluated on the same clean images.
The corrupted samples are drawn without overlap (an image is noise or mislabelled, never both), and
which samples they are is kept on the split (`CorruptedData.noisy`, `.flipped`), so per-sample
records (by dataset index) can be compared between clean and corrupted samples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from padkd.data import TensorData
from padkd.errors import PadkdError


class CorruptedData(TensorData):
    """Training images and labels of which some were corrupted: `noisy[i]` image i was replaced by
    pixel noise, `flipped[i]` its label was changed to another class; `clean_labels` the originals."""

    def __init__(self, images: Tensor, labels: Tensor, noisy: Tensor, flipped: Tensor, clean_labels: Tensor) -> None:
        super().__init__(images, labels)
        self.noisy = noisy
        self.flipped = flipped
        self.clean_labels = clean_labels


def check_fractions(noise_fraction: float, label_noise: float) -> None:
    """Both fractions in [0, 1) and together below 1 (the two sets of samples do not overlap)."""
    if not (0 <= noise_fraction < 1 and 0 <= label_noise < 1 and noise_fraction + label_noise < 1):
        raise PadkdError(f"data: noise_fraction {noise_fraction} and label_noise {label_noise} must each be in [0, 1) "
                         "and add up to less than 1 (a sample is either noise or mislabelled)")


def corrupt(images: Tensor, labels: Tensor, num_classes: int, noise_fraction: float, label_noise: float,
            seed: int, normalize: Callable[[Tensor], Tensor]) -> TensorData:
    """The training split from raw `images` (pixels in [0, 1], `[N, C, H, W]`) and `labels`, with
    `round(noise_fraction·N)` images replaced by uniform pixel noise in [0, 1] and `round(label_noise·N)`
    other samples given a label drawn uniformly from the other classes (draws fixed by `seed`), then
    `normalize`d like the clean images. Plain TensorData when nothing is corrupted."""
    check_fractions(noise_fraction, label_noise)
    n = len(labels)
    n_noise, n_flip = round(noise_fraction * n), round(label_noise * n)
    if n_noise == 0 and n_flip == 0:
        return TensorData(normalize(images), labels)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    noisy = torch.zeros(n, dtype=torch.bool)
    flipped = torch.zeros(n, dtype=torch.bool)
    noisy[order[:n_noise]] = True
    flipped[order[n_noise:n_noise + n_flip]] = True
    images = images.clone()
    images[noisy] = torch.rand(images[noisy].shape, generator=g, dtype=images.dtype)
    new_labels = labels.clone()
    # An offset in 1..K-1 added modulo K: uniform over the K-1 other classes.
    offset = torch.randint(1, num_classes, (n_flip,), generator=g)
    new_labels[flipped] = (labels[flipped] + offset) % num_classes
    return CorruptedData(normalize(images), new_labels, noisy, flipped, labels.clone())
