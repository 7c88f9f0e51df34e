"""Batched augmentation and normalisation of uint8 image batches, as tensor ops on the batch's device.

In-memory data sets (CIFAR) keep their images as uint8 `[N, C, H, W]`; the loader moves a uint8 batch
to the device (a quarter of the bytes of float) and `ImageBatchTransform` crops, flips, converts and
normalises the whole batch there, on the GPU when there is one. Random draws use the default
generator of the batch's device (seeded by the trainer and saved in its checkpoints), one draw per
sample, with no per-image Python.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from padkd.batch import Batch


def random_crop_flip(images: Tensor, padding: int, flip: bool) -> Tensor:
    """Per-sample random crop of the original size from the zero-padded images, and a horizontal flip
    with probability 1/2 (torchvision's `RandomCrop(size, padding)` + `RandomHorizontalFlip()` on
    every image of the batch).

    `images`: `[B, C, H, W]` of any dtype; the padding value is 0 before normalisation (black), as
    torchvision pads the PIL image. Offsets are uniform in `0..2·padding` per axis.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = images.shape
    device = images.device
    if padding == 0 and not flip:
        return images
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    offsets = torch.randint(0, 2 * padding + 1, (2, b), device=device)
    rows = offsets[0, :, None] + torch.arange(h, device=device)  # [B, H]
    cols = offsets[1, :, None] + torch.arange(w, device=device)  # [B, W]
    if flip:
        flipped = torch.rand(b, device=device) < 0.5
        mirrored = offsets[1, :, None] + torch.arange(w - 1, -1, -1, device=device)
        cols = torch.where(flipped[:, None], mirrored, cols)
    # One gather over the flattened padded planes: the source pixel of each output pixel.
    source = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, source).reshape(b, c, h, w)


class ImageBatchTransform:
    """`Batch → Batch`: optional random crop with `padding` and horizontal `flip` (training), then
    float conversion and per-channel normalisation of `batch.inputs` (`[B, C, H, W]`)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], padding: int = 0, flip: bool = False) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {list(std)}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.padding, self.flip = padding, flip
        # Per device and input dtype: building them per batch would copy from the host each step (and
        # a blocking host-to-GPU copy synchronises the stream).
        self._constants: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (0..255) or float (0..1) images → float32 `(x - mean[c]) / std[c]`, one fused op."""
        key = (images.device, images.dtype)
        if key not in self._constants:
            unit = 255.0 if images.dtype == torch.uint8 else 1.0
            scale = torch.tensor([1.0 / (unit * s) for s in self.std]).view(1, -1, 1, 1)
            shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std, strict=True)]).view(1, -1, 1, 1)
            self._constants[key] = (scale.to(images.device), shift.to(images.device))
        scale, shift = self._constants[key]
        return torch.addcmul(shift, images, scale)  # uint8 promotes to float32 inside the op

    def images(self, images: Tensor) -> Tensor:
        """Transform a `[B, C, H, W]` image tensor."""
        return self.normalize(random_crop_flip(images, self.padding, self.flip))

    def __call__(self, batch: Batch) -> Batch:
        return batch.replace(inputs=self.images(batch.inputs))

    def __repr__(self) -> str:
        return (f"ImageBatchTransform(mean={self.mean}, std={self.std}, padding={self.padding}, "
                f"flip={self.flip})")
