"""Training steps per second at 1 thread, 2 threads and torch's default, on an idle and on a busy machine.

The question behind padkd's thread policy (padkd.engine.threads): on a CPU, how many intra-op threads
should a small training step use? Two small steps are timed:
- `own_loop`: examples/own_loop.py's step (full-batch MLP + PAD on scikit-learn's digits, 1,078 x 64);
- `demo`: the digits demo's distillation step (teacher cnn [32, 64, 128], student cnn [4, 32], KD, batch 64).
"Busy" runs one CPU-bound hog process per core beside the measurement (what other jobs on a shared
machine do). Every round times each (step, machine, threads) cell once, in a shuffled order; ratios are
taken within a round, against 1 thread, and their median over rounds is printed with the min and max.

    python benchmarks/threads.py [--rounds 5] [--steps 40]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from padkd import KD, PAD, Batch, Classification, Distiller, Term, Uniform
from padkd.data import DATASETS
from padkd.models import MODELS


def _hog(stop: mp.synchronize.Event) -> None:  # type: ignore[name-defined]
    """Burn one core until told to stop."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def own_loop_step() -> Callable[[], None]:
    data = DATASETS.create("digits")
    x, y = data.train.images, data.train.labels
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU()).eval()
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 32))
    head, pad = nn.Linear(32, 10), PAD(32)
    opt = torch.optim.Adam([*student.parameters(), *head.parameters(), *pad.parameters()], lr=1e-2)

    def step() -> None:
        emb = student(x)
        with torch.no_grad():
            target = teacher(x)
        loss = F.cross_entropy(head(emb), y) + pad((emb - target).pow(2), emb).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def demo_step() -> Callable[[], None]:
    data = DATASETS.create("digits")
    teacher = MODELS.create("cnn", {"widths": [32, 64, 128]}, "teacher", in_channels=1, num_classes=10)
    student = MODELS.create("cnn", {"widths": [4, 32]}, "student", in_channels=1, num_classes=10)
    distiller = Distiller(student, teacher, [Term("kd", KD(), Uniform())], task=Classification())
    generator = torch.Generator().manual_seed(0)

    def batch() -> Batch:
        index = torch.randint(len(data.train), (64,), generator=generator)
        return Batch(data.train.images[index], data.train.labels[index], index)

    distiller.prepare(batch())
    opt = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9)

    def step() -> None:
        out = distiller(batch())
        opt.zero_grad()
        out.total.backward()
        opt.step()

    return step


STEPS = {"own_loop": own_loop_step, "demo": demo_step}


def rate(step: Callable[[], None], threads: int, n: int) -> float:
    torch.set_num_threads(threads)
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per cell")
    parser.add_argument("--seed", type=int, default=0, help="seeds the shuffled order")
    args = parser.parse_args()
    default = torch.get_num_threads()
    cores = os.cpu_count() or 1
    print(f"{cores} cores, torch {torch.__version__}, default intra-op threads {default}, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    torch.manual_seed(0)
    steps = {name: make() for name, make in STEPS.items()}
    counts = sorted({1, 2, default})
    cells = [(s, m, t) for s in steps for m in ("idle", "busy") for t in counts]
    order = random.Random(args.seed)
    ratios: dict[tuple[str, str, int], list[float]] = {c: [] for c in cells}
    rates: dict[tuple[str, str, int], list[float]] = {c: [] for c in cells}
    for _ in range(args.rounds):
        machines = ["idle", "busy"]
        order.shuffle(machines)
        measured: dict[tuple[str, str, int], float] = {}
        for machine in machines:  # the busy cells of a round share one set of hogs, in a shuffled order
            group = [c for c in cells if c[1] == machine]
            order.shuffle(group)
            stop = mp.Event()
            hogs = [mp.Process(target=_hog, args=(stop,), daemon=True)
                    for _ in range(cores if machine == "busy" else 0)]
            for hog in hogs:
                hog.start()
            for name, _, threads in group:
                measured[(name, machine, threads)] = rate(steps[name], threads, args.steps)
            stop.set()
            for hog in hogs:
                hog.join()
        for cell, value in measured.items():
            rates[cell].append(value)
            ratios[cell].append(value / measured[(cell[0], cell[1], 1)])
    print(f"{'step':9s} {'machine':7s} {'threads':>12s} {'steps/s':>12s}   vs 1 thread: median [min, max]")
    for cell in cells:
        r = ratios[cell]
        label = f"{cell[2]}{' (default)' if cell[2] == default else ''}"
        print(f"{cell[0]:9s} {cell[1]:7s} {label:>12s} {statistics.median(rates[cell]):12.1f} "
              f"{statistics.median(r):14.2f}x [{min(r):.2f}, {max(r):.2f}]")


if __name__ == "__main__":
    main()
