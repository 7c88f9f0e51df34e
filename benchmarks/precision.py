"""bf16 against fp32 on the digits demo's setting, paired by seed: accuracy and time.

The same teacher (trained once, fp32) and, per seed, the same student trained twice, once with
`engine.precision=fp32` and once with `engine.precision=bf16` (autocast; losses and PAD in fp32), the two in
an order that alternates with the seed. Printed: the CPU and its bf16 support (the /proc/cpuinfo flags that
`precision: auto` reads), then per method the mean test top-1 of each precision, the paired difference
bf16 − fp32 with its 95% t-interval, and the median wall time of a run in each precision.

    python benchmarks/precision.py [--seeds 5] [--methods kd pad_l2] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from input_pipeline import cpu_name  # noqa: E402

from padkd.config import parse_config  # noqa: E402
from padkd.demos.classification import student_config, teacher_config  # noqa: E402
from padkd.engine.cpu import BF16_FLAGS, cpu_flags, native_bf16  # noqa: E402
from padkd.engine.trainer import Trainer  # noqa: E402


def train(raw: dict[str, Any], precision: str) -> tuple[float, float, int]:
    """Test top-1 of the last model, the wall time and the CPU threads of one run in `precision`."""
    raw = copy.deepcopy(raw)
    raw["engine"] = {**raw.get("engine", {}), "precision": precision}
    raw["output_dir"] = f"{raw['output_dir']}-{precision}"
    t0 = time.perf_counter()
    final = Trainer(parse_config(raw), quiet=True).run().final
    assert final["engine"]["precision"] == precision
    return float(final["last"]["top1"]), time.perf_counter() - t0, int(final["engine"]["threads"])


def interval(diffs: list[float]) -> str:
    """Mean and 95% t-interval of paired differences."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.2f}"
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["kd", "pad_l2"])
    parser.add_argument("--quick", action="store_true", help="the demo's quick schedule (a dry run)")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    flags = sorted(cpu_flags() & set(BF16_FLAGS))
    print(f"CPU {cpu_name()}; bf16 flags: {', '.join(flags) or 'none'}; native bf16 (precision: auto picks bf16): "
          f"{native_bf16(torch.device('cpu'))}; torch {torch.__version__}; CPU threads per run: padkd's policy "
          "(--threads / OMP_NUM_THREADS, else the idle cores), shown per method")
    with tempfile.TemporaryDirectory(prefix="padkd-precision-") as tmp:
        out = args.out or Path(tmp)
        teacher = teacher_config(out, args.quick)
        Trainer(parse_config({**teacher, "device": "cpu"}), quiet=True).run()
        print(f"{'method':8s} {'fp32 top-1':>10s} {'bf16 top-1':>10s}  {'bf16 - fp32 [95% CI]':26s} "
              f"{'fp32 s/run':>10s} {'bf16 s/run':>10s}  threads")
        for method in args.methods:
            top1: dict[str, list[float]] = {"fp32": [], "bf16": []}
            seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
            threads: set[int] = set()
            for seed in range(args.seeds):
                raw = {**student_config(method, seed, out, args.quick), "device": "cpu"}
                for precision in ("fp32", "bf16") if seed % 2 == 0 else ("bf16", "fp32"):
                    accuracy, wall, used = train(raw, precision)
                    threads.add(used)
                    top1[precision].append(accuracy)
                    seconds[precision].append(wall)
            diffs = [b - a for a, b in zip(top1["fp32"], top1["bf16"], strict=True)]
            print(f"{method:8s} {statistics.fmean(top1['fp32']):10.2f} {statistics.fmean(top1['bf16']):10.2f}  "
                  f"{interval(diffs):26s} {statistics.median(seconds['fp32']):10.1f} "
                  f"{statistics.median(seconds['bf16']):10.1f}  {'/'.join(map(str, sorted(threads)))}", flush=True)


if __name__ == "__main__":
    main()
