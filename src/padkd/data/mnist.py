"""MNIST from the original IDX files (the layout torchvision reads: ROOT/MNIST/raw/*-ubyte[.gz])."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from padkd.data import DATASETS, DataSplits, TensorData
from padkd.data.corrupt import check_fractions, corrupt
from padkd.errors import PadkdError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# MNIST's normalisation constants (mean, std of the training pixels in [0, 1]).
MEAN, STD = 0.1307, 0.3081


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (big-endian header: magic with dtype code and rank, then the dims)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:  # a truncated or non-gzip .gz
        raise PadkdError(f"{path}: cannot be read ({type(err).__name__}: {err}); replace the file") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise PadkdError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise PadkdError(f"{path}: unknown IDX data type 0x{data[2]:02x}")
    rank = data[3]
    if len(data) < 4 + 4 * rank:
        raise PadkdError(f"{path}: file ends inside its IDX header (truncated download?); replace the file")
    dims = np.frombuffer(data, dtype=">u4", count=rank, offset=4).astype(int)
    array = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * rank)
    if array.size != int(np.prod(dims)):
        raise PadkdError(f"{path}: header says {tuple(dims)} but holds {array.size} values (truncated file?)")
    return array.reshape(tuple(dims))


def _find(root: Path, name: str) -> Path:
    for candidate in (root / "MNIST" / "raw" / name, root / name):
        for path in (candidate, candidate.with_name(candidate.name + ".gz")):
            if path.is_file():
                return path
    raise PadkdError(
        f"data.root: MNIST file '{name}' not found under '{root}' (looked in {root}/MNIST/raw and {root}); "
        "point data.root at a folder holding MNIST/raw/*-ubyte as torchvision lays it out"
    )


def _check_pair(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """The images are `[N, H, W]`, N > 0, with one label in 0..9 each."""
    name = FILES[f"{split}_images"]
    if images.ndim != 3:
        raise PadkdError(f"{root}: MNIST {split} images must be a rank-3 IDX array [N, H, W], got shape "
                         f"{images.shape} in {name}; replace the file")
    if len(images) == 0:
        raise PadkdError(f"{root}: MNIST {split} images hold no image ({name}); replace the file")
    if labels.ndim != 1 or len(labels) != len(images):
        raise PadkdError(f"{root}: MNIST {split} has {len(images)} images but labels of shape {labels.shape}; "
                         "the image and label files must come from the same release")
    if labels.min() < 0 or labels.max() > 9:
        raise PadkdError(f"{root}: MNIST {split} labels must be 0..9, found {int(labels.min())}..{int(labels.max())}; "
                         "replace the label file")


@DATASETS.register("mnist")
def mnist(root: str, val_size: int = 5000, train_subset: int | None = None, split_seed: int = 0,
          noise_fraction: float = 0.0, label_noise: float = 0.0, corrupt_seed: int = 0) -> DataSplits:
    """MNIST from local IDX files; `val_size` training images (fixed by `split_seed`) become the
    validation split; `train_subset` keeps only that many training images (quick experiments);
    `noise_fraction` of the training images are replaced by pixel noise and `label_noise` of the others
    get a wrong label (fixed by `corrupt_seed`; validation and test stay clean, see data/corrupt.py)."""
    check_fractions(noise_fraction, label_noise)
    base = Path(root).expanduser()
    if not base.is_dir():
        raise PadkdError(f"data.root: '{base}' is not a directory; set data.root to your MNIST folder")
    arrays = {key: read_idx(_find(base, name)) for key, name in FILES.items()}
    for split in ("train", "test"):
        _check_pair(base, split, arrays[f"{split}_images"], arrays[f"{split}_labels"])
    if not 0 <= val_size < len(arrays["train_labels"]):
        raise PadkdError(f"data.val_size {val_size} must be at least 0 and smaller than the "
                         f"{len(arrays['train_labels'])} training images")
    if train_subset is not None and train_subset < 1:
        raise PadkdError(f"data.train_subset must be a positive number of images, got {train_subset}")

    def pixels(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 255.0

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x - MEAN) / STD

    train_x, train_y = pixels(arrays["train_images"]), torch.tensor(arrays["train_labels"], dtype=torch.long)
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    train = corrupt(train_x[train_idx], train_y[train_idx], 10, noise_fraction, label_noise, corrupt_seed, normalize)
    return DataSplits(
        train=train,
        val=TensorData(normalize(train_x[val_idx]), train_y[val_idx]),
        test=TensorData(normalize(pixels(arrays["test_images"])),
                        torch.tensor(arrays["test_labels"], dtype=torch.long)),
        num_classes=10,
        in_channels=1,
        normalization=((MEAN,), (STD,)),
        train_targets=train.labels,
    )
