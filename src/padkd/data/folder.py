"""ImageNet-style class folders (`ROOT/train/<class>/*.JPEG`, `ROOT/val/<class>/*`) through torchvision's
ImageFolder, with the standard ImageNet transforms (He et al., 2016; the torchvision reference recipe).

The folder's `val` split is the *test* split (the protocol of the ImageNet tables: accuracy on the
50,000 validation images); a held-out part of `train` (`val_size`) is the validation split, none by
default. Images are decoded and cropped in the loader's worker processes (`data.num_workers`) and
come out as uint8 tensors; conversion to float and normalisation run batched on the device (a quarter
of the bytes through pinned memory and the host-to-device copy).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from padkd.data import DATASETS, DataSplits, holdout_split
from padkd.data.augment import ImageBatchTransform
from padkd.errors import PadkdError

# The per-channel statistics of the ImageNet training images, as every torchvision model uses them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUT = "ROOT/train/<class>/*.JPEG and ROOT/val/<class>/* (ImageNet-style class folders)"


class FolderImages(Dataset):
    """Images listed as `(path, class index)` under one transform; items are `(image, target, i)`."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable[[Any], Any],
                 loader: Callable[[str], Any]) -> None:
        self.samples = samples
        self.transform = transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        path, target = self.samples[i]
        return self.transform(self.loader(path)), target, i


def _scan(directory: Path, allow_empty: bool) -> Any:
    """torchvision's ImageFolder over `directory` (class folders sorted by name → indices 0..C-1)."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(directory), allow_empty=allow_empty)
    except FileNotFoundError as err:
        detail = " ".join(str(err).split())
        if "class folder" in detail:
            raise PadkdError(f"data.root: '{directory}' holds no class folders; expected {LAYOUT} (the ImageNet "
                             "validation archive unpacks flat: sort its images into val/<wnid>/ folders first)"
                             ) from None
        raise PadkdError(f"data.root: '{directory}': {detail}; expected {LAYOUT}") from None


def transforms(image_size: int, resize_size: int, augment: bool) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(train, eval) PIL → uint8 `[3, S, S]` transforms: RandomResizedCrop + horizontal flip for
    training, resize of the shorter side to `resize_size` + center crop for evaluation."""
    from torchvision import transforms as T

    evaluation = T.Compose([T.Resize(resize_size), T.CenterCrop(image_size), T.PILToTensor()])
    if not augment:
        return evaluation, evaluation
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.PILToTensor()])
    return train, evaluation


@DATASETS.register("imagenet")
def imagenet(root: str, image_size: int = 224, resize_size: int | None = None, val_size: int = 0,
             train_subset: int | None = None, split_seed: int = 0, augment: bool = True,
             mean: tuple[float, float, float] = IMAGENET_MEAN,
             std: tuple[float, float, float] = IMAGENET_STD) -> DataSplits:
    """ImageNet-style class folders ROOT/train and ROOT/val (the test split) through ImageFolder.

    Training: RandomResizedCrop(`image_size`) + horizontal flip (`augment: false`: the evaluation
    transform); evaluation: resize of the shorter side to `resize_size` (default image_size / 0.875)
    + center crop. `val_size` training images (fixed by `split_seed`) form the validation split (0:
    none); `train_subset` keeps a random subset of that many of the rest."""
    from torchvision.datasets.folder import default_loader

    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    resize_size = resize_size or round(image_size / 0.875)  # 224 → 256, the standard evaluation ratio
    if resize_size < image_size:
        raise ValueError(f"resize_size ({resize_size}) must be at least image_size ({image_size})")
    base = Path(root).expanduser()
    for part in ("train", "val"):
        if not (base / part).is_dir():
            raise PadkdError(f"data.root: '{base}' holds no {part}/ folder; expected {LAYOUT}; ImageNet "
                             "(ILSVRC2012) comes from https://image-net.org/download.php")
    train_scan = _scan(base / "train", allow_empty=False)
    val_scan = _scan(base / "val", allow_empty=True)
    unknown = sorted(set(val_scan.classes) - set(train_scan.classes))
    if unknown:
        raise PadkdError(f"data.root: '{base / 'val'}' has class folders that train/ lacks: {unknown[:5]}; "
                         "train and val must use the same class folder names")
    if not val_scan.samples:
        raise PadkdError(f"data.root: '{base / 'val'}' holds no images in its class folders; expected {LAYOUT}")
    # val's labels are train's indices of the same folder names (val may lack classes).
    test_samples = [(path, train_scan.class_to_idx[val_scan.classes[t]]) for path, t in val_scan.samples]

    samples: list[tuple[str, int]] = train_scan.samples
    # A fixed held-out permutation; train_subset is a random subset of the rest (the scan is sorted by class, so
    # a prefix would hold only the first classes).
    train_idx, val_idx = holdout_split(len(samples), val_size, train_subset, split_seed, "train/'s folders")
    train_samples = [samples[i] for i in train_idx.tolist()]
    val_samples = [samples[i] for i in val_idx.tolist()]

    train_tf, eval_tf = transforms(image_size, resize_size, augment)
    normalise = ImageBatchTransform(mean, std)
    return DataSplits(
        train=FolderImages(train_samples, train_tf, default_loader),
        val=FolderImages(val_samples, eval_tf, default_loader) if val_size else None,
        test=FolderImages(test_samples, eval_tf, default_loader),
        in_channels=3,
        num_classes=len(train_scan.classes),
        normalization=(tuple(mean), tuple(std)),
        train_targets=torch.tensor([t for _, t in train_samples], dtype=torch.long),
        eval_train=FolderImages(train_samples, eval_tf, default_loader),
        device_transforms={"train": normalise, "eval": normalise},
    )
