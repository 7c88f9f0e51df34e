"""Is single-stage PAD safe from step one? Tiny students on digits, PAD from the first step.

Compares, over paired seeds, a 2/4-channel CNN student trained with CE + an L2 hint weighted by:
uniform (plain L2), PAD in its published form (random head, no floor), and PAD with padkd's safe
defaults (data-initialised head, log σ² floor), plus CE alone. Prints test top-1 (mean ± std, the
worst seed) and the CE of the first epoch, so a stuck-at-chance run (CE ≈ ln 10 = 2.30) shows.

    python benchmarks/pad_safety.py [--seeds 5] [--epochs 15] [--out runs/bench-pad-safety]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from padkd.config import parse_config
from padkd.demo import teacher_config
from padkd.engine.logging import read_metrics
from padkd.engine.trainer import Trainer

HINT = {"name": "hint", "method": {"name": "hint"}, "student": "fc:in", "teacher": "fc:in"}
VARIANTS = {
    "ce_only": None,
    "uniform_l2": {"name": "uniform"},
    "pad_reference": {"name": "pad", "init": "reference", "log_var_floor": None},
    "pad_safe": {"name": "pad"},
    "pad_safe_warmup": {"name": "pad", "warmup_steps": 160},
}


def student(out: Path, variant: str, seed: int, epochs: int, widths: list[int], lr: float) -> dict:
    weighting = VARIANTS[variant]
    terms = [] if weighting is None else [{**HINT, "weighting": weighting}]
    return {
        "name": f"{variant}-{seed}", "output_dir": str(out / f"{variant}-s{seed}"), "seed": seed,
        "data": {"name": "digits", "batch_size": 64}, "eval_test": True, "records": {"splits": []},
        "teacher": {"model": {"name": "cnn", "widths": [32, 64, 128]}, "checkpoint": str(out / "teacher")},
        "student": {"model": {"name": "cnn", "widths": widths}},
        "log": {"tensorboard": False, "progress": "none"},
        "stages": [{"name": "single", "epochs": epochs, "optimizer": {"name": "adamw", "lr": lr, "weight_decay": 0.0},
                    "scheduler": {"name": "cosine"}, "terms": terms}],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default="runs/bench-pad-safety")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    Trainer(parse_config(teacher_config(out, quick=False)), quiet=True).run()
    print(f"student cnn {args.widths}, AdamW lr {args.lr}, {args.epochs} epochs, seeds 0..{args.seeds - 1}")
    print(f"{'variant':16s} {'test top-1 mean ± std':>22s} {'worst':>7s} {'epoch-1 CE (max over seeds)':>28s}")
    for variant in VARIANTS:
        top1, ce1 = [], []
        for seed in range(args.seeds):
            cfg = parse_config(student(out, variant, seed, args.epochs, args.widths, args.lr))
            final = Trainer(cfg, quiet=True).run().final
            top1.append(final["last"]["top1"])
            first = next(e for e in read_metrics(Path(cfg.output_dir)) if e["event"] == "epoch")
            ce1.append(first["train"]["task"])
        std = statistics.stdev(top1) if len(top1) > 1 else 0.0
        print(f"{variant:16s} {statistics.mean(top1):14.2f} ± {std:5.2f} {min(top1):7.2f} {max(ce1):28.3f}")
    print(f"({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
