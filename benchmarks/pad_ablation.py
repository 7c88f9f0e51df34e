"""Why does (or doesn't) PAD-L2 beat L2? Stage-2 variants of the demo's two-stage recipe on digits.

Every variant shares the demo's data, teacher, student and schedule; stage 1 (uniform L2) is
bitwise identical across variants for a given seed, so the paired differences isolate the
stage-2 weighting. Besides test top-1 it reports what the PAD head learned on the test split:
the spread of log σ² across samples (0 = PAD is a uniform rescaling of L2) and the Spearman
correlation of σ² with the sample's discrepancy d (the head's optimum is σ² = d).

    python benchmarks/pad_ablation.py [--seeds 5] [--widths 4 8] [--out runs/bench-pad-ablation]
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from padkd.config import parse_config
from padkd.demos.classification import student_config, teacher_config
from padkd.engine.records import read_csv
from padkd.engine.trainer import Trainer
from padkd.report.stats import mean_std, paired_ci, spearman

#: The hint of the demo as it was when docs/pad.md's measurement 2 was taken (weight 1, 8-d student embedding).
HINT = {"name": "hint", "method": {"name": "hint"}, "student": "fc:in", "teacher": "fc:in", "weight": 1.0}
PAD = {"name": "pad"}
#: stage-2 hint term overrides: (weighting, extra term keys)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "l2 (uniform)": ({"name": "uniform"}, {}),
    "pad": (PAD, {}),
    "pad, head lr x10": (PAD, {"lr_scale": 10.0}),
    "pad, head lr x100": (PAD, {"lr_scale": 100.0}),
    "pad per_sample": ({"name": "pad", "mode": "per_sample"}, {}),
    "pad per_sample, lr x100": ({"name": "pad", "mode": "per_sample"}, {"lr_scale": 100.0}),
    "pad reference form": ({"name": "pad", "init": "reference", "log_var_floor": None}, {}),
}


def variant_config(out: Path, name: str, seed: int, widths: list[int]) -> dict[str, Any]:
    weighting, extra = VARIANTS[name]
    cfg = student_config("l2", seed, out / f"v{list(VARIANTS).index(name)}", quick=False)
    cfg["student"]["model"] = {"name": "cnn", "widths": widths}
    cfg["teacher"]["checkpoint"] = str(out / "teacher")
    cfg["stages"][0]["terms"] = [copy.deepcopy(HINT)]
    cfg["stages"][1]["terms"] = [{**copy.deepcopy(HINT), "weighting": weighting, **extra}]
    return cfg


def head_stats(run_dir: Path) -> tuple[float, float, float]:
    """From the stage-2 test records: std over samples of log d, of log σ², and Spearman ρ(σ², d)."""
    table = read_csv(run_dir / "records" / "1-stage2-test.csv")
    d = table["hint.discrepancy"]
    spread_d = statistics.pstdev([math.log(x) for x in d])
    if "hint.log_var" not in table:
        return spread_d, math.nan, math.nan
    log_var = table["hint.log_var"]
    return spread_d, statistics.pstdev(log_var), spearman(log_var, d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--out", default="runs/bench-pad-ablation")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    Trainer(parse_config(teacher_config(out, quick=False)), quiet=True).run()
    results: dict[str, list[float]] = {}
    stats: dict[str, list[tuple[float, float, float]]] = {}
    for name in VARIANTS:
        for seed in range(args.seeds):
            cfg = parse_config(variant_config(out, name, seed, args.widths))
            results.setdefault(name, []).append(Trainer(cfg, quiet=True).run().final["last"]["top1"])
            stats.setdefault(name, []).append(head_stats(Path(cfg.output_dir)))
    base = results["l2 (uniform)"]
    print(f"digits, student cnn {args.widths}, teacher cnn [32, 64, 128]; stage 1 L2 (30 ep), stage 2 (15 ep, "
          f"lr 0.005) as below; seeds 0..{args.seeds - 1}")
    print(f"{'stage-2 variant':26s} {'test top-1':>15s} {'minus L2 [95% CI]':>26s} {'sd log d':>9s} "
          f"{'sd log σ²':>10s} {'ρ(σ², d)':>9s}")
    for name, values in results.items():
        mean, std = mean_std(values)
        diff, low, high = paired_ci(values, base)
        ci = f"{diff:+.2f} [{low:+.2f}, {high:+.2f}]" if low is not None else f"{diff:+.2f}"
        spread_d, spread, rho = (statistics.mean(column) for column in zip(*stats[name], strict=True))
        print(f"{name:26s} {mean:8.2f} ± {std:4.2f} {ci:>26s} {spread_d:9.3f} {spread:10.3f} {rho:9.3f}")
    print(f"({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
