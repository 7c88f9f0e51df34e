"""What does PAD cost per training step? Step time of CE + hint under each weighting, as ratios.

The variants are timed in interleaved rounds inside one process (so machine noise hits all of them
alike) and reported relative to uniform L2, with the median over rounds.

    python benchmarks/overhead.py [--batch 256] [--rounds 7] [--steps 20] [--widths 16 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from padkd import PAD, Batch, Distiller, Hint, Term, Uniform
from padkd.models import MODELS
from padkd.weighting import OHEM

VARIANTS = {
    "ce only": None,
    "l2 uniform": lambda: Uniform(),
    "l2 ohem": lambda: OHEM(0.5),
    "l2 pad per_element": lambda: PAD(mode="per_element"),
    "l2 pad per_sample": lambda: PAD(mode="per_sample"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--size", type=int, default=28, help="input height/width (1 channel)")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = MODELS.build("cnn", {"widths": [32, 64, 128]}, in_channels=1, num_classes=10)
    x = torch.randn(args.batch, 1, args.size, args.size)
    batch = Batch(x, torch.randint(0, 10, (args.batch,)), torch.arange(args.batch))
    setups = {}
    for name, make in VARIANTS.items():
        student = MODELS.build("cnn", {"widths": args.widths}, in_channels=1, num_classes=10)
        terms = [] if make is None else [Term("hint", Hint(), make(), student="fc:in", teacher="fc:in")]
        distiller = Distiller(student, teacher, terms, task_loss=lambda out, b: F.cross_entropy(out, b.targets))
        distiller.prepare(batch)
        setups[name] = (distiller, torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9))

    def step_time(name: str) -> float:
        distiller, optimizer = setups[name]
        distiller.train()
        start = time.perf_counter()
        for _ in range(args.steps):
            out = distiller(batch)
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            optimizer.step()
        return (time.perf_counter() - start) / args.steps

    for name in setups:  # warm-up round, not timed
        step_time(name)
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name in setups:
            times[name].append(step_time(name))
    base = statistics.median(times["l2 uniform"])
    print(f"batch {args.batch}, input 1x{args.size}x{args.size}, teacher cnn [32, 64, 128], student cnn "
          f"{args.widths}, {torch.get_num_threads()} threads; median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'variant':20s} {'ms/step':>8s} {'vs l2 uniform':>14s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:20s} {1000 * median:8.1f} {median / base:13.2f}x")


if __name__ == "__main__":
    main()
