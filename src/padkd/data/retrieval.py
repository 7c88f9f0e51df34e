"""Metric-learning data sets with the class split of the RKD protocol: train on the first half of the
classes, test retrieval on the other half. No validation split exists (`val=None`).

- `cub200`: CUB-200-2011 (`images.txt`, `image_class_labels.txt`, `images/`): classes 1–100 / 101–200.
- `cars196`: Stanford Cars (`cars_annos.mat`, `car_ims/`): classes 1–98 / 99–196 (the file's own
  train/test flag is ignored, as in the protocol).
- `sop`: Stanford Online Products (`Ebay_train.txt`, `Ebay_test.txt`): its own split, 11,318 / 11,316
  products.
- `digits_retrieval`, `mnist_retrieval`: the same protocol on scikit-learn's digits and on MNIST (train
  on digits 0–4, retrieve among 5–9), for the embedded demo and CPU runs.

Labels are the data set's class ids minus one (CUB's test classes are 100–199), so records name
the real class. Images: train `Resize(resize)` (shorter side) + `RandomResizedCrop(crop)` + flip;
test `Resize(resize)` + `CenterCrop(crop)`; ImageNet normalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from padkd.data import DATASETS, DataSplits, TensorData
from padkd.errors import PadkdError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageList(Dataset):
    """Images read from `paths` with PIL (converted to RGB), with integer `labels`; items `(image, label, i)`."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: Callable[[Any], Tensor]) -> None:
        self.paths = list(paths)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), self.labels[i], i


def transforms(resize: int, crop: int) -> tuple[Callable[[Any], Tensor], Callable[[Any], Tensor]]:
    """(train, test) transforms of the retrieval protocol."""
    from torchvision import transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.Resize(resize), T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    test = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), normalize])
    return train, test


def class_split(paths: Sequence[Path], labels: Sequence[int], train_classes: set[int], resize: int,
                crop: int) -> DataSplits:
    """DataSplits from one list of images: labels in `train_classes` train, the rest are the test split."""
    train_tf, test_tf = transforms(resize, crop)
    is_train = [label in train_classes for label in labels]
    train_paths = [p for p, t in zip(paths, is_train, strict=True) if t]
    train_labels = [y for y, t in zip(labels, is_train, strict=True) if t]
    test_paths = [p for p, t in zip(paths, is_train, strict=True) if not t]
    test_labels = [y for y, t in zip(labels, is_train, strict=True) if not t]
    return _splits(train_paths, train_labels, test_paths, test_labels, train_tf, test_tf)


def _splits(train_paths: list[Path], train_labels: list[int], test_paths: list[Path], test_labels: list[int],
            train_tf: Callable[[Any], Tensor], test_tf: Callable[[Any], Tensor]) -> DataSplits:
    if not train_paths or not test_paths:
        raise PadkdError(f"the data set has {len(train_paths)} training and {len(test_paths)} test images after "
                         "the class split; check data.root and the annotation files")
    train = ImageList(train_paths, train_labels, train_tf)
    return DataSplits(train=train, val=None, test=ImageList(test_paths, test_labels, test_tf), in_channels=3,
                      num_classes=len(set(train_labels)), normalization=(IMAGENET_MEAN, IMAGENET_STD),
                      train_targets=train.labels, eval_train=ImageList(train_paths, train_labels, test_tf))


def _folder(root: str, marker: str, subfolder: str, name: str) -> Path:
    """The folder holding `marker`: `root` itself or `root/subfolder`; a one-line error otherwise."""
    base = Path(root).expanduser()
    for folder in (base, base / subfolder):
        if (folder / marker).is_file():
            return folder
    raise PadkdError(f"data.root: {name} file '{marker}' not found in '{base}' or '{base / subfolder}'; point "
                     f"data.root at the folder that holds it")


def _read_pairs(path: Path) -> dict[int, str]:
    """`<id> <value>` lines (CUB's annotation files) as {id: value}."""
    pairs = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise PadkdError(f"{path}:{number}: expected '<image id> <value>', got {line!r}")
        pairs[int(parts[0])] = parts[1].strip()
    return pairs


@DATASETS.register("cub200")
def cub200(root: str, resize: int = 256, crop: int = 224) -> DataSplits:
    """CUB-200-2011 with the metric-learning class split (classes 1–100 train, 101–200 test)."""
    folder = _folder(root, "images.txt", "CUB_200_2011", "CUB-200-2011")
    if not (folder / "image_class_labels.txt").is_file():
        raise PadkdError(f"data.root: CUB-200-2011 file 'image_class_labels.txt' not found in '{folder}'")
    images = _read_pairs(folder / "images.txt")
    classes = _read_pairs(folder / "image_class_labels.txt")
    missing = sorted(set(images) - set(classes))
    if missing:
        raise PadkdError(f"{folder / 'image_class_labels.txt'}: no class for image id {missing[0]}")
    ids = sorted(images)
    return class_split([folder / "images" / images[i] for i in ids], [int(classes[i]) - 1 for i in ids],
                       set(range(100)), resize, crop)


@DATASETS.register("cars196")
def cars196(root: str, resize: int = 256, crop: int = 224) -> DataSplits:
    """Stanford Cars 196 with the metric-learning class split (classes 1–98 train, 99–196 test)."""
    from scipy.io import loadmat

    folder = _folder(root, "cars_annos.mat", "cars196", "Cars196")
    annotations = loadmat(folder / "cars_annos.mat", squeeze_me=True).get("annotations")
    if annotations is None or annotations.dtype.names is None or \
            not {"relative_im_path", "class"} <= set(annotations.dtype.names):
        raise PadkdError(f"{folder / 'cars_annos.mat'}: no 'annotations' struct with fields relative_im_path and "
                         "class; use the cars_annos.mat of the Stanford Cars data set")
    annotations = np.atleast_1d(annotations)
    paths = [folder / str(p) for p in annotations["relative_im_path"]]
    labels = [int(c) - 1 for c in annotations["class"]]
    return class_split(paths, labels, set(range(98)), resize, crop)


def _read_ebay(path: Path) -> tuple[list[Path], list[int]]:
    """`Ebay_*.txt`: a header line, then `image_id class_id super_class_id path` per image."""
    lines = path.read_text().splitlines()
    if not lines or lines[0].split()[:2] != ["image_id", "class_id"]:
        raise PadkdError(f"{path}: expected the header 'image_id class_id super_class_id path'")
    paths, labels = [], []
    for number, line in enumerate(lines[1:], 2):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4 or not parts[1].isdigit():
            raise PadkdError(f"{path}:{number}: expected 'image_id class_id super_class_id path', got {line!r}")
        paths.append(path.parent / parts[3])
        labels.append(int(parts[1]) - 1)
    return paths, labels


@DATASETS.register("sop")
def sop(root: str, resize: int = 256, crop: int = 224) -> DataSplits:
    """Stanford Online Products with its own class split (Ebay_train.txt / Ebay_test.txt)."""
    folder = _folder(root, "Ebay_train.txt", "Stanford_Online_Products", "Stanford Online Products")
    if not (folder / "Ebay_test.txt").is_file():
        raise PadkdError(f"data.root: Stanford Online Products file 'Ebay_test.txt' not found in '{folder}'")
    train_paths, train_labels = _read_ebay(folder / "Ebay_train.txt")
    test_paths, test_labels = _read_ebay(folder / "Ebay_test.txt")
    return _splits(train_paths, train_labels, test_paths, test_labels, *transforms(resize, crop))


def _tensor_class_split(images: Tensor, labels: Tensor, train_classes: Sequence[int], test_classes: Sequence[int],
                        mean: float, std: float) -> DataSplits:
    """Normalised in-memory images split by class, `val=None`."""
    train = torch.isin(labels, torch.tensor(list(train_classes)))
    test = torch.isin(labels, torch.tensor(list(test_classes)))
    if not train.any() or not test.any():
        raise PadkdError(f"train_classes {list(train_classes)} / test_classes {list(test_classes)} select no "
                         "images; use class labels of the data set (0–9)")
    images = (images - mean) / std
    return DataSplits(train=TensorData(images[train], labels[train]), val=None,
                      test=TensorData(images[test], labels[test]), in_channels=1,
                      num_classes=len(labels[train].unique()), normalization=((mean,), (std,)),
                      train_targets=labels[train])


def _check_classes(train_classes: Sequence[int], test_classes: Sequence[int]) -> None:
    if set(train_classes) & set(test_classes):
        raise ValueError(f"train_classes and test_classes overlap: {sorted(set(train_classes) & set(test_classes))}")


@DATASETS.register("digits_retrieval")
def digits_retrieval(train_classes: tuple[int, ...] = (0, 1, 2, 3, 4),
                     test_classes: tuple[int, ...] = (5, 6, 7, 8, 9)) -> DataSplits:
    """scikit-learn's digits split by class: train on `train_classes`, retrieve among `test_classes`."""
    from sklearn.datasets import load_digits

    _check_classes(train_classes, test_classes)
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train = images[torch.isin(labels, torch.tensor(list(train_classes)))]
    return _tensor_class_split(images, labels, train_classes, test_classes, float(train.mean()), float(train.std()))


@DATASETS.register("mnist_retrieval")
def mnist_retrieval(root: str, train_classes: tuple[int, ...] = (0, 1, 2, 3, 4),
                    test_classes: tuple[int, ...] = (5, 6, 7, 8, 9), test_subset: int | None = None) -> DataSplits:
    """MNIST split by class: the training images of `train_classes` train, the test images of `test_classes`
    are the retrieval split (`test_subset` keeps its first N, for quick runs)."""
    from padkd.data.mnist import FILES, MEAN, STD, _find, read_idx

    _check_classes(train_classes, test_classes)
    base = Path(root).expanduser()
    if not base.is_dir():
        raise PadkdError(f"data.root: '{base}' is not a directory; set data.root to your MNIST folder")
    arrays = {key: torch.tensor(read_idx(_find(base, name))) for key, name in FILES.items()}
    train_keep = torch.isin(arrays["train_labels"].long(), torch.tensor(list(train_classes)))
    test_keep = torch.isin(arrays["test_labels"].long(), torch.tensor(list(test_classes))).nonzero().flatten()
    if test_subset is not None:
        test_keep = test_keep[:test_subset]
    images = torch.cat([arrays["train_images"][train_keep], arrays["test_images"][test_keep]]).float()
    labels = torch.cat([arrays["train_labels"][train_keep], arrays["test_labels"][test_keep]]).long()
    return _tensor_class_split(images.unsqueeze(1) / 255.0, labels, train_classes, test_classes, MEAN, STD)
