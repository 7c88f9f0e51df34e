"""Small statistics for the report: seed means, paired differences with t intervals, rank correlation.

Seeds are few (typically 3), so differences between methods are paired by seed and judged with a
Student's t interval rather than eyeballed from overlapping mean ± std.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

BETTER, WORSE, UNCLEAR, NO_CI = "better", "worse", "not distinguishable", "n/a"
#: The verdict of every comparison in a quick run: its few epochs make a smoke test, not evidence.
QUICK = "not judged (quick run)"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); the std of a single value is 0.0."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def paired_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean of the paired differences a−b and its Student's t interval (n−1 dof); bounds are None if n<2."""
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"paired_ci needs two equally long, non-empty sequences (got {len(a)} and {len(b)})")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean = float(d.mean())
    if d.size < 2:
        return mean, None, None
    half = float(sps.t.ppf(0.5 + level / 2, d.size - 1)) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def verdict(low: float | None, high: float | None, higher_is_better: bool = True) -> str:
    """"better"/"worse" when the interval of a difference (method − baseline) excludes 0, on the side that the
    metric's direction calls better; else "not distinguishable"; "n/a" without an interval."""
    if low is None or high is None:
        return NO_CI
    if low > 0:
        return BETTER if higher_is_better else WORSE
    if high < 0:
        return WORSE if higher_is_better else BETTER
    return UNCLEAR


def digits_for(table: dict[str, dict[str, float | None]]) -> int:
    """Decimals to show a metric with: 3 for values within [−1, 1] (mAP, NMI), else 2 (percentages, perplexity)."""
    values = [abs(v) for by_seed in table.values() for v in by_seed.values() if v is not None and math.isfinite(v)]
    return 3 if values and max(values) <= 1.0 else 2


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation over the pairs where both values are finite; nan if undefined."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    if xa.size < 2 or np.all(xa == xa[0]) or np.all(ya == ya[0]):
        return math.nan
    return float(sps.spearmanr(xa, ya).statistic)
