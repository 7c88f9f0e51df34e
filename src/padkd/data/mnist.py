"""MNIST from the original IDX files (the layout torchvision reads: ROOT/MNIST/raw/*-ubyte[.gz])."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from padkd.data import DATASETS, DataSplits, TensorData
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
    with opener(path, "rb") as f:
        data = f.read()
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


@DATASETS.register("mnist")
def mnist(root: str, val_size: int = 5000, train_subset: int | None = None, split_seed: int = 0) -> DataSplits:
    """MNIST from local IDX files; `val_size` training images (fixed by `split_seed`) become the
    validation split; `train_subset` keeps only that many training images (quick experiments)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise PadkdError(f"data.root: '{base}' is not a directory; set data.root to your MNIST folder")
    arrays = {key: read_idx(_find(base, name)) for key, name in FILES.items()}

    def images(a: np.ndarray) -> torch.Tensor:
        return (torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 255.0 - MEAN) / STD

    train_x, train_y = images(arrays["train_images"]), torch.tensor(arrays["train_labels"], dtype=torch.long)
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    return DataSplits(
        train=TensorData(train_x[train_idx], train_y[train_idx]),
        val=TensorData(train_x[val_idx], train_y[val_idx]),
        test=TensorData(images(arrays["test_images"]), torch.tensor(arrays["test_labels"], dtype=torch.long)),
        num_classes=10,
        in_channels=1,
        normalization=((MEAN,), (STD,)),
        train_targets=train_y[train_idx],
    )
