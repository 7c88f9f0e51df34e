"""Report figures. Each function draws one PNG with matplotlib's Agg canvas.

Figures are built as `matplotlib.figure.Figure` objects on an explicit Agg canvas rather than through
pyplot, so writing a report neither switches the caller's backend nor leaves figures open.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from padkd.report.stats import mean_std

CORRECT_COLOR, WRONG_COLOR = "tab:blue", "tab:red"


def _save(fig: Figure, path: Path) -> None:
    """Write `fig` as a PNG and release it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    fig.clear()


def learning_curves(curves: Mapping[str, Mapping[int, Sequence[float]]], labels: Mapping[str, str],
                    boundaries: Sequence[int], path: Path, teacher_top1: float | None = None) -> None:
    """Validation top-1 against global epoch: mean over seeds with a ±std band, one line per method.

    `curves[method][epoch]` holds that epoch's value for every seed that reached it; `boundaries` are the
    global epochs after which a new stage starts (dashed lines)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for method, by_epoch in curves.items():
        epochs = sorted(by_epoch)
        stats = np.array([mean_std(by_epoch[e]) for e in epochs])
        line, = ax.plot(epochs, stats[:, 0], label=labels.get(method, method))
        ax.fill_between(epochs, stats[:, 0] - stats[:, 1], stats[:, 0] + stats[:, 1], color=line.get_color(),
                        alpha=0.2, linewidth=0)
    for i, epoch in enumerate(boundaries):
        ax.axvline(epoch, color="gray", linestyle="--", linewidth=1, label="stage boundary" if i == 0 else None)
    if teacher_top1 is not None:
        ax.axhline(teacher_top1, color="black", linestyle=":", linewidth=1, label="teacher (final val)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (all stages)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Learning curves: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def sigma_vs_error(sigma2: np.ndarray, discrepancy: np.ndarray, teacher_correct: np.ndarray, rho: float,
                   path: Path) -> None:
    """Learned σ² against the per-sample discrepancy d (log-log), with σ² = d, the loss's optimum.

    Samples with σ² ≤ 0 or d ≤ 0 cannot sit on log axes and are left out; the legend counts the points drawn."""
    keep = (sigma2 > 0) & (discrepancy > 0)
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    for mask, color, name in ((teacher_correct, CORRECT_COLOR, "teacher correct"),
                              (~teacher_correct, WRONG_COLOR, "teacher wrong")):
        sel = keep & mask
        ax.scatter(discrepancy[sel], sigma2[sel], s=12, alpha=0.6, color=color, label=f"{name} (n={sel.sum()})")
    if keep.any():
        lo = min(discrepancy[keep].min(), sigma2[keep].min())
        hi = max(discrepancy[keep].max(), sigma2[keep].max())
        ax.plot([lo, hi], [lo, hi], color="black", linestyle="--", linewidth=1, label="σ² = d (optimum)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("per-sample discrepancy d")
    ax.set_ylabel("learned σ² = exp(log σ²)")
    ax.set_title(f"Learned variance vs discrepancy (Spearman ρ = {rho:.3f})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def sigma_by_teacher(log_var: np.ndarray, teacher_confidence: np.ndarray, teacher_correct: np.ndarray,
                     path: Path) -> None:
    """Two panels: log σ² for teacher-correct vs teacher-wrong samples; log σ² against teacher confidence."""
    fig = Figure(figsize=(10, 4.2))
    box, scatter = fig.subplots(1, 2)
    groups = [log_var[teacher_correct], log_var[~teacher_correct]]
    box.boxplot(groups, showfliers=True)
    box.set_xticks([1, 2], [f"teacher correct\n(n={groups[0].size})", f"teacher wrong\n(n={groups[1].size})"])
    box.set_ylabel("log σ²")
    box.set_title("Learned log σ² by teacher correctness")
    box.grid(alpha=0.3, axis="y")
    for mask, color, name in ((teacher_correct, CORRECT_COLOR, "teacher correct"),
                              (~teacher_correct, WRONG_COLOR, "teacher wrong")):
        scatter.scatter(teacher_confidence[mask], log_var[mask], s=12, alpha=0.6, color=color, label=name)
    scatter.set_xlabel("teacher confidence (max softmax probability)")
    scatter.set_ylabel("log σ²")
    scatter.set_title("Learned log σ² vs teacher confidence")
    scatter.grid(alpha=0.3)
    scatter.legend(fontsize=8)
    _save(fig, path)


def prime_images(rows: Sequence[tuple[str, Sequence[tuple[np.ndarray, str]]]], path: Path) -> None:
    """A grid of images, one row per `(row_name, [(image, title), ...])`; images are `[H, W]` or `[H, W, 3]`.

    All images share one intensity scale so that faint, low-contrast inputs look faint."""
    pixels = np.concatenate([img.ravel() for _, items in rows for img, _ in items])
    lo, hi = float(pixels.min()), float(pixels.max())
    span = hi - lo if hi > lo else 1.0
    ncols = max(len(items) for _, items in rows)
    fig = Figure(figsize=(1.5 * ncols, 2.0 * len(rows)))
    axes = np.asarray(fig.subplots(len(rows), ncols, squeeze=False))
    for r, (row_name, items) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(items):
                image, title = items[c]
                ax.imshow((image - lo) / span, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                ax.set_title(title, fontsize=7)
        axes[r, 0].text(-0.15, 0.5, row_name, transform=axes[r, 0].transAxes, rotation=90, va="center",
                        ha="right", fontsize=9)
    _save(fig, path)


def sigma_per_dimension(dim_log_var: np.ndarray, dim_discrepancy: np.ndarray, sample_log_var: np.ndarray,
                        sample_discrepancy: np.ndarray, path: Path) -> None:
    """Two panels: per dimension, mean log σ² against log mean d; and the spread of log σ² and log d across
    dimensions beside their spread across samples."""
    fig = Figure(figsize=(10, 4.2))
    scatter, spread = fig.subplots(1, 2)
    keep = dim_discrepancy > 0
    log_d = np.log(dim_discrepancy[keep])
    scatter.scatter(log_d, dim_log_var[keep], s=14, alpha=0.7)
    if keep.any():
        lo, hi = min(log_d.min(), dim_log_var.min()), max(log_d.max(), dim_log_var.max())
        scatter.plot([lo, hi], [lo, hi], color="black", linestyle="--", linewidth=1, label="σ² = d")
        scatter.legend(fontsize=8)
    scatter.set_xlabel("log of the dimension's mean discrepancy d")
    scatter.set_ylabel("dimension's mean log σ²")
    scatter.set_title(f"Per dimension ({int(keep.sum())} dimensions)")
    scatter.grid(alpha=0.3)
    sample_d = sample_discrepancy[sample_discrepancy > 0]
    groups = [dim_log_var - dim_log_var.mean(), log_d - log_d.mean() if log_d.size else log_d,
              sample_log_var - sample_log_var.mean(), np.log(sample_d) - np.log(sample_d).mean()]
    spread.boxplot(groups, showfliers=False)
    spread.set_xticks([1, 2, 3, 4], ["log σ²\nacross dims", "log d\nacross dims", "log σ²\nacross samples",
                                     "log d\nacross samples"], fontsize=8)
    spread.set_ylabel("value minus its mean")
    spread.set_title("Spread: dimensions vs samples")
    spread.grid(alpha=0.3, axis="y")
    _save(fig, path)


def effect_vs_factor(values: Sequence[str], diffs: Sequence[float], lows: Sequence[float | None],
                     highs: Sequence[float | None], path: Path, xlabel: str, title: str,
                     ylabel: str = "paired difference (points)") -> None:
    """Mean paired differences with their 95% intervals (where there is one) against a factor's values."""
    fig = Figure(figsize=(max(4.5, 0.9 * len(values) + 2), 4))
    ax = fig.add_subplot()
    x = np.arange(len(values))
    for i, (diff, low, high) in enumerate(zip(diffs, lows, highs, strict=True)):
        if low is not None and high is not None:
            ax.errorbar([i], [diff], yerr=[[diff - low], [high - diff]], fmt="o", color="tab:blue", capsize=4)
        else:
            ax.plot([i], [diff], "o", color="tab:gray")
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set_xticks(x, list(values), rotation=20 if max((len(v) for v in values), default=0) > 8 else 0,
                  ha="right" if max((len(v) for v in values), default=0) > 8 else "center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
