"""CIFAR-10 and CIFAR-100 from the python-pickle files as the authors distribute them (Krizhevsky, 2009).

Layout: `ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch}` and `ROOT/cifar-100-python/{train, test}`;
each file is a pickled dict with `data` (uint8 `[n, 3072]`, rows in CHW order: 1024 red, 1024 green,
1024 blue values of a 32x32 image) and `labels` (CIFAR-10) or `fine_labels` (CIFAR-100). The files are
read by a restricted unpickler that only rebuilds numpy arrays (a pickle cannot run code here), and
without torchvision's MD5 checks, so any file in that format loads.

The images stay in memory as uint8 `[N, 3, 32, 32]`; items are uint8 tensors, and the standard
augmentation (random 32x32 crop of the 4-pixel zero-padded image, horizontal flip) plus normalisation
run batched on the device (`padkd.data.augment`).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from padkd.data import DATASETS, DataSplits, TensorData, holdout_split
from padkd.data.augment import ImageBatchTransform
from padkd.errors import PadkdError


@dataclass(frozen=True)
class CifarSpec:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    url: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


SPECS = {
    # CIFAR-10: per-channel statistics of the 50,000 training images.
    "cifar10": CifarSpec("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{k}" for k in range(1, 6)),
                         ("test_batch",), "labels", 10, "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                         (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # CIFAR-100: the constants of the CRD benchmark code (RepDistiller), whose numbers the recipes reproduce.
    "cifar100": CifarSpec("CIFAR-100", "cifar-100-python", ("train",), ("test",), "fine_labels", 100,
                          "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                          (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}

#: The globals a CIFAR pickle may name (numpy array reconstruction), old and new numpy module paths.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}'")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # numpy 2 moved numpy.core to numpy._core
        return super().find_class(module, name)


def read_batch(path: Path, label_key: str, num_classes: int, title: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file → uint8 images `[n, 3, 32, 32]` and int64 labels `[n]` (checked)."""
    hint = f"replace it with the file from the {title} python archive"
    try:
        with open(path, "rb") as f:
            # latin1: the files were pickled by Python 2 (str keys, array bytes as str).
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as err:  # any malformed byte stream (truncated, not a pickle, foreign globals)
        raise PadkdError(f"{path}: not a readable {title} python batch ({type(err).__name__}: {err}); {hint}") from None
    if not isinstance(entry, dict):
        raise PadkdError(f"{path}: holds a {type(entry).__name__}, not the dict of a {title} batch; {hint}")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    for key in ("data", label_key):
        if key not in entry:
            raise PadkdError(f"{path}: no '{key}' entry (has {sorted(map(str, entry))}); "
                             f"expected a {title} batch; {hint}")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise PadkdError(f"{path}: 'data' must be uint8 rows of 3072 values (3x32x32, CHW), got {got}; {hint}")
    try:
        labels = np.asarray(entry[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise PadkdError(f"{path}: '{label_key}' is not a list of integer labels; {hint}") from None
    if len(labels) != len(data):
        raise PadkdError(f"{path}: {len(data)} images but {len(labels)} labels; {hint}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise PadkdError(f"{path}: labels outside 0..{num_classes - 1} (found {labels.min()}..{labels.max()}); "
                         f"is this a {title} file?")
    return data.reshape(-1, 3, 32, 32), labels


def read_split(root: Path, spec: CifarSpec, files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch files of one split, concatenated in order, as uint8 `[N, 3, 32, 32]` and long `[N]`."""
    images, labels = [], []
    for name in files:
        path = root / spec.folder / name
        if not path.is_file():
            raise PadkdError(f"data.root: '{root}' holds no {spec.folder}/{name}; download {spec.title} "
                             f"(python version) from {spec.url} and extract it there")
        x, y = read_batch(path, spec.label_key, spec.num_classes, spec.title)
        images.append(x)
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar(name: str, root: str, val_size: int, train_subset: int | None, split_seed: int, augment: bool,
               crop_padding: int, flip: bool, mean: tuple[float, float, float] | None,
               std: tuple[float, float, float] | None) -> DataSplits:
    """The splits of CIFAR `name`: see `cifar10`/`cifar100` for the options."""
    spec = SPECS[name]
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise PadkdError(f"data.root: '{base}' is not a directory; set data.root to the folder holding "
                         f"{spec.folder}/ (download {spec.title} (python version) from {spec.url} and extract it)")
    train_x, train_y = read_split(base, spec, spec.train_files)
    test_x, test_y = read_split(base, spec, spec.test_files)
    # The held-out images are the validation split, the rest (or a subset) the training split; both keep the
    # files' order.
    train_idx, val_idx = holdout_split(len(train_y), val_size, train_subset, split_seed, "the training files")
    mean = mean or spec.mean
    std = std or spec.std
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {list(std)}")
    train = TensorData(train_x[train_idx], train_y[train_idx])
    return DataSplits(
        train=train,
        val=TensorData(train_x[val_idx], train_y[val_idx]) if val_size else None,
        test=TensorData(test_x, test_y),
        in_channels=3,
        num_classes=spec.num_classes,
        normalization=(tuple(mean), tuple(std)),
        train_targets=train.labels,
        device_transforms={
            "train": ImageBatchTransform(mean, std, padding=crop_padding if augment else 0, flip=flip and augment),
            "eval": ImageBatchTransform(mean, std),
        },
    )


@DATASETS.register("cifar10")
def cifar10(root: str, val_size: int = 5000, train_subset: int | None = None, split_seed: int = 0,
            augment: bool = True, crop_padding: int = 4, flip: bool = True,
            mean: tuple[float, float, float] | None = None,
            std: tuple[float, float, float] | None = None) -> DataSplits:
    """CIFAR-10 from the python pickles in ROOT/cifar-10-batches-py, crop + flip batched on the device.

    `val_size` training images (fixed by `split_seed`) form the validation split (0: none);
    `train_subset` keeps that many of the rest; `augment: false` or `crop_padding: 0` / `flip: false`
    switch the augmentation off; `mean`/`std` replace the normalisation constants."""
    return load_cifar("cifar10", root, val_size, train_subset, split_seed, augment, crop_padding, flip, mean, std)


@DATASETS.register("cifar100")
def cifar100(root: str, val_size: int = 5000, train_subset: int | None = None, split_seed: int = 0,
             augment: bool = True, crop_padding: int = 4, flip: bool = True,
             mean: tuple[float, float, float] | None = None,
             std: tuple[float, float, float] | None = None) -> DataSplits:
    """CIFAR-100 (fine labels) from the python pickles in ROOT/cifar-100-python, crop + flip on the device.

    Options as for `cifar10`; the CRD protocol reports test accuracy with `val_size: 0`."""
    return load_cifar("cifar100", root, val_size, train_subset, split_seed, augment, crop_padding, flip, mean, std)
