"""Is single-stage PAD safe from step one? A tiny student on digits, PAD from the first step.

Compares, over paired seeds, a 2/4-channel CNN student trained with CE + an L2 hint weighted by:
uniform (plain L2), PAD in its published form (random head, no floor, no warm-up), PAD with a
data-initialised head but no warm-up, and PAD with padkd's defaults (data-initialised head, floor,
100-step warm-up), plus CE alone. Prints the student's training cross-entropy after each epoch
(mean over seeds: a run stuck at chance stays at ln 10 = 2.30) and the test top-1.

    python benchmarks/pad_safety.py [--seeds 3] [--epochs 6] [--out runs/bench-pad-safety]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from padkd.config import parse_config
from padkd.demos.classification import teacher_config
from padkd.engine.logging import read_metrics
from padkd.engine.trainer import Trainer

HINT = {"name": "hint", "method": {"name": "hint"}, "student": "fc:in", "teacher": "fc:in"}
VARIANTS = {
    "ce_only": None,
    "uniform_l2": {"name": "uniform"},
    "pad_reference": {"name": "pad", "init": "reference", "log_var_floor": None, "warmup_steps": 0},
    "pad_data_no_warmup": {"name": "pad", "warmup_steps": 0},
    "pad_default": {"name": "pad"},
}


def data_config(args: argparse.Namespace) -> dict:
    if args.mnist_root is None:
        return {"name": "digits", "batch_size": 64}
    return {"name": "mnist", "root": args.mnist_root, "train_subset": args.train_subset, "batch_size": 128}


def model(widths: list[int], pool_size: int | None) -> dict:
    return {"name": "cnn", "widths": widths, "pool_size": pool_size}


def student(out: Path, variant: str, seed: int, args: argparse.Namespace) -> dict:
    weighting = VARIANTS[variant]
    terms = [] if weighting is None else [{**HINT, "weighting": weighting}]
    return {
        "name": f"{variant}-{seed}", "output_dir": str(out / f"{variant}-s{seed}"), "seed": seed,
        "data": data_config(args), "eval_test": True, "records": {"splits": []},
        "teacher": {"model": model(args.teacher_widths, args.pool_size), "checkpoint": str(out / "teacher")},
        "student": {"model": model(args.widths, args.pool_size)},
        "log": {"tensorboard": False, "progress": "none"},
        "stages": [{"name": "single", "epochs": args.epochs,
                    "optimizer": {"name": "adamw", "lr": args.lr, "weight_decay": 0.0},
                    "scheduler": {"name": "constant"}, "terms": terms}],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--teacher-widths", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--pool-size", type=int, default=None, help="flatten a k x k map instead of average pooling")
    parser.add_argument("--mnist-root", default=None, help="run on MNIST from this folder instead of digits")
    parser.add_argument("--train-subset", type=int, default=None, help="MNIST training images to use")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="runs/bench-pad-safety")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    teacher = teacher_config(out, quick=False)
    teacher["data"] = data_config(args)
    teacher["student"]["model"] = model(args.teacher_widths, args.pool_size)
    teacher["stages"][0]["epochs"] = args.teacher_epochs  # default: weak and quick, as in the regression test
    if args.mnist_root is not None:
        teacher["stages"][0]["optimizer"] = {"name": "adamw", "lr": 0.002, "weight_decay": 0.0}
    teacher_top1 = Trainer(parse_config(teacher), quiet=True).run().final["last"]["top1"]
    print(f"{data_config(args)['name']}; teacher cnn {args.teacher_widths} (test top-1 {teacher_top1:.2f}); student "
          f"cnn {args.widths}; pool_size {args.pool_size}; AdamW lr {args.lr} constant, {args.epochs} epochs, "
          f"seeds 0..{args.seeds - 1}")
    print(f"{'variant':20s} {'train CE after each epoch (mean over seeds)':>46s} {'test top-1':>14s} {'worst':>6s}")
    for variant in args.variants:
        top1, ce = [], []
        for seed in range(args.seeds):
            cfg = parse_config(student(out, variant, seed, args))
            top1.append(Trainer(cfg, quiet=True).run().final["last"]["top1"])
            ce.append([e["train"]["task"] for e in read_metrics(Path(cfg.output_dir)) if e["event"] == "epoch"])
        curve = " ".join(f"{statistics.mean(c):.2f}" for c in zip(*ce, strict=True))
        std = statistics.stdev(top1) if len(top1) > 1 else 0.0
        print(f"{variant:20s} {curve:>46s} {statistics.mean(top1):7.1f} ± {std:4.1f} {min(top1):6.1f}")
    print(f"({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
