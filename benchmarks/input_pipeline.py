"""How fast is the CIFAR input pipeline? Images/s of padkd's in-memory batched augmentation against the
usual per-image torchvision pipeline, on the same CIFAR-format files.

Both variants read the same generated `cifar-100-python/` pickles (written to a temporary folder) and
produce normalised float batches with random crop (padding 4) and horizontal flip:

- padkd: the `cifar100` data set (uint8 items, `stack_collate`) and its `device_transforms["train"]`
  applied per batch by the engine's `DeviceLoader` (here on the CPU, or on the GPU with --device cuda);
- torchvision: PIL image per item through `RandomCrop(32, 4)`, `RandomHorizontalFlip`, `ToTensor`,
  `Normalize` (the pipeline of RepDistiller/CRD and torchvision's CIFAR examples).

The variants are timed in rounds whose order is shuffled, in one process, with the same DataLoader
settings (batch size, workers, threads); the median over rounds is reported.

    python benchmarks/input_pipeline.py [--images 20000] [--batch 64] [--rounds 5] [--workers 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from padkd.batch import stack_collate
from padkd.data import DATASETS
from padkd.engine.loaders import DeviceLoader


def write_cifar100(root: Path, n_train: int, n_test: int, seed: int) -> None:
    """CIFAR-100 python-pickle files (`train`, `test`) of random images, in the authors' layout."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "fine_labels": rng.integers(0, 100, size=n).tolist(),
                 "coarse_labels": rng.integers(0, 20, size=n).tolist(),
                 "filenames": [f"{k}.png" for k in range(n)], "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))


class PerImageCifar(Dataset):
    """The classic per-image pipeline: HWC uint8 arrays → PIL → torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i]), i


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000, help="training images per round")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (both variants)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both variants)")
    parser.add_argument("--device", default="cpu", help="where padkd's batched transform runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    from torchvision import transforms as T

    with tempfile.TemporaryDirectory() as tmp:
        write_cifar100(Path(tmp), args.images, 100, args.seed)
        data = DATASETS.create("cifar100", {"root": tmp, "val_size": 0}, "data")
    mean, std = data.normalization
    per_image = PerImageCifar(
        data.train.images.permute(0, 2, 3, 1).numpy(), data.train.labels.numpy(),
        T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]))

    def loader(dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=args.batch, sampler=RandomSampler(dataset), drop_last=True,
                          collate_fn=stack_collate, num_workers=args.workers,
                          persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")

    variants = {
        "padkd batched (uint8 + device transform)": DeviceLoader(loader(data.train), device,
                                                                 data.device_transforms["train"]),
        "torchvision per-image (PIL transforms)": DeviceLoader(loader(per_image), device, None),
    }

    def images_per_s(name: str) -> float:
        start = time.perf_counter()
        n = 0
        for batch in variants[name]:
            n += len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - start)

    for name in variants:  # warm-up: worker start, first-call allocations
        images_per_s(name)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffle = random.Random(args.seed)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        for name in order:
            rates[name].append(images_per_s(name))
    cpu = f"{cpu_name()} ({os.cpu_count()} cores visible)"
    print(f"CIFAR input pipeline: {args.images} images/round, batch {args.batch}, {args.workers} workers, "
          f"{args.threads} torch thread(s), transform on {device}, {args.rounds} shuffled rounds; CPU {cpu}, "
          f"torch {torch.__version__}")
    print(f"{'variant':44s} {'images/s (median)':>18s} {'min':>10s} {'max':>10s}")
    for name, values in rates.items():
        print(f"{name:44s} {statistics.median(values):18.0f} {min(values):10.0f} {max(values):10.0f}")
    names = list(variants)
    ratio = statistics.median(rates[names[0]]) / statistics.median(rates[names[1]])
    print(f"padkd / torchvision: {ratio:.1f}x")


if __name__ == "__main__":
    main()
