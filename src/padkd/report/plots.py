"""Report figures. Each function draws one PNG with matplotlib's Agg canvas.

Figures are built as `matplotlib.figure.Figure` objects on an explicit Agg canvas rather than through
pyplot, so writing a report neither switches the caller's backend nor leaves figures open. Panels are laid
out by matplotlib's constrained layout, so a label never runs into the next panel. A distribution of fewer
than MIN_BOX values is drawn as its points (a strip), never as a box whose quartiles three points would
pretend to know.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from padkd import files
from padkd.report.stats import mean_std

CORRECT_COLOR, WRONG_COLOR = "tab:blue", "tab:red"
#: The fewest values a box plot summarises; fewer are drawn as points.
MIN_BOX = 10
#: The longest method label the learning curves' legend holds inside the axes.
LEGEND_INSIDE = 40


def save(fig: Figure, path: Path, dpi: int = 120) -> None:
    """Write `fig` as a PNG, whole (`padkd.files.atomic_write`), and release it."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    fig.clear()
    files.atomic_write(path, lambda f: f.write(buffer.getvalue()))


def distributions(ax: Axes, groups: Sequence[np.ndarray], names: Sequence[str]) -> None:
    """One distribution per group at x = 1, 2, ...: a box plot from MIN_BOX values on, else the values as
    points spread sideways (a strip) with their mean as a bar; each tick names the group and its n."""
    rng = np.random.default_rng(0)
    for x, group in enumerate(groups, 1):
        group = np.asarray(group, dtype=float)
        group = group[np.isfinite(group)]
        if group.size >= MIN_BOX:
            ax.boxplot([group], positions=[x], widths=0.5, showfliers=False)
        elif group.size:
            ax.scatter(x + rng.uniform(-0.12, 0.12, group.size), group, s=16, alpha=0.8,
                       color="tab:gray")
            ax.hlines(group.mean(), x - 0.2, x + 0.2, color="black", linewidth=1.5)
    ax.set_xticks(range(1, len(groups) + 1), [f"{n}\n(n={np.isfinite(np.asarray(g, float)).sum()})"
                                              for n, g in zip(names, groups, strict=True)], fontsize=8)
    ax.set_xlim(0.4, len(groups) + 0.6)


def learning_curves(curves: Mapping[str, Mapping[int, Sequence[float]]], labels: Mapping[str, str],
                    boundaries: Sequence[int], path: Path, teacher: float | None = None,
                    ylabel: str = "validation top1") -> None:
    """A metric (`ylabel`) against global epoch: mean over seeds with a ±std band, one line per method.

    `curves[method][epoch]` holds that epoch's value for every seed that reached it; `boundaries` are the
    global epochs after which a new stage starts (dashed lines)."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for method, by_epoch in curves.items():
        epochs = sorted(by_epoch)
        stats = np.array([mean_std(by_epoch[e]) for e in epochs])
        line, = ax.plot(epochs, stats[:, 0], label=labels.get(method, method))
        ax.fill_between(epochs, stats[:, 0] - stats[:, 1], stats[:, 0] + stats[:, 1], color=line.get_color(),
                        alpha=0.2, linewidth=0)
    for i, epoch in enumerate(boundaries):
        ax.axvline(epoch, color="gray", linestyle="--", linewidth=1, label="stage boundary" if i == 0 else None)
    if teacher is not None:
        ax.axhline(teacher, color="black", linestyle=":", linewidth=1, label="teacher (last epoch)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (all stages)")
    ax.set_ylabel(ylabel)
    ax.set_title("Learning curves: mean ± std over seeds")
    ax.grid(alpha=0.3)
    if max((len(name) for name in labels.values()), default=0) <= LEGEND_INSIDE:
        ax.legend(fontsize=8)
    else:  # settings named by several config keys: below the axes, wrapped, so the axes keep their size
        handles, names = ax.get_legend_handles_labels()
        fig.legend(handles, [textwrap.fill(n, 100) for n in names], loc="outside lower center", fontsize=7)
    save(fig, path)


def sigma_vs_error(sigma2: np.ndarray, discrepancy: np.ndarray, teacher_correct: np.ndarray | None, rho: float,
                   path: Path) -> None:
    """Learned σ² against the per-sample discrepancy d (log-log), with σ² = d, the loss's optimum.

    Samples with σ² ≤ 0 or d ≤ 0 cannot sit on log axes and are left out; the legend counts the points drawn."""
    keep = (sigma2 > 0) & (discrepancy > 0)
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.add_subplot()
    groups = [(np.ones_like(keep), "tab:gray", "samples")] if teacher_correct is None else [
        (teacher_correct, CORRECT_COLOR, "teacher correct"), (~teacher_correct, WRONG_COLOR, "teacher wrong")]
    for mask, color, name in groups:
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
    save(fig, path)


def sigma_by_teacher(log_var: np.ndarray, teacher_confidence: np.ndarray | None,
                     teacher_correct: np.ndarray | None, path: Path) -> None:
    """log σ² for teacher-correct vs teacher-wrong samples (when known) and against the teacher's confidence
    (when recorded): one panel for each that the records hold."""
    panels = int(teacher_correct is not None) + int(teacher_confidence is not None)
    fig = Figure(figsize=(5 * panels, 4.2), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(1, panels)))
    if teacher_correct is not None:
        box = axes.pop(0)
        distributions(box, [log_var[teacher_correct], log_var[~teacher_correct]], ["teacher correct", "teacher wrong"])
        box.set_ylabel("log σ²")
        box.set_title("Learned log σ² by teacher correctness")
        box.grid(alpha=0.3, axis="y")
    if teacher_confidence is not None:
        scatter = axes.pop(0)
        groups = [(np.ones(len(log_var), bool), "tab:gray", "samples")] if teacher_correct is None else [
            (teacher_correct, CORRECT_COLOR, "teacher correct"), (~teacher_correct, WRONG_COLOR, "teacher wrong")]
        for mask, color, name in groups:
            scatter.scatter(teacher_confidence[mask], log_var[mask], s=12, alpha=0.6, color=color, label=name)
        scatter.set_xlabel("teacher confidence (max softmax probability)")
        scatter.set_ylabel("log σ²")
        scatter.set_title("Learned log σ² vs teacher confidence")
        scatter.grid(alpha=0.3)
        scatter.legend(fontsize=8)
    save(fig, path)


def prime_images(rows: Sequence[tuple[str, Sequence[tuple[np.ndarray, str]]]], path: Path) -> None:
    """A grid of images, one row per `(row_name, [(image, title), ...])`; images are `[H, W]` or `[H, W, 3]`.

    All images share one intensity scale so that faint, low-contrast inputs look faint."""
    pixels = np.concatenate([img.ravel() for _, items in rows for img, _ in items])
    lo, hi = float(pixels.min()), float(pixels.max())
    span = hi - lo if hi > lo else 1.0
    ncols = max(len(items) for _, items in rows)
    fig = Figure(figsize=(1.5 * ncols, 2.0 * len(rows)), layout="constrained")
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
    save(fig, path)


def sigma_per_dimension(dim_log_var: np.ndarray, dim_discrepancy: np.ndarray, sample_log_var: np.ndarray,
                        sample_discrepancy: np.ndarray, path: Path) -> None:
    """Write `per_dimension_figure` as a PNG."""
    save(per_dimension_figure(dim_log_var, dim_discrepancy, sample_log_var, sample_discrepancy), path)


def per_dimension_figure(dim_log_var: np.ndarray, dim_discrepancy: np.ndarray, sample_log_var: np.ndarray,
                         sample_discrepancy: np.ndarray) -> Figure:
    """Two panels: per dimension, mean log σ² against log mean d; and the spread of log σ² and log d across
    dimensions beside their spread across samples."""
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    fig.get_layout_engine().set(wspace=0.08)  # type: ignore[union-attr]
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
    distributions(spread, groups, ["log σ²\nacross dims", "log d\nacross dims", "log σ²\nacross samples",
                                   "log d\nacross samples"])
    spread.set_ylabel("value minus its mean")
    spread.set_title("Spread: dimensions vs samples")
    spread.grid(alpha=0.3, axis="y")
    return fig


def effect_vs_factor(values: Sequence[str], diffs: Sequence[float], lows: Sequence[float | None],
                     highs: Sequence[float | None], path: Path, xlabel: str, title: str,
                     ylabel: str = "paired difference (points)") -> None:
    """Mean paired differences with their 95% intervals (where there is one) against a factor's values."""
    fig = Figure(figsize=(max(4.5, 0.9 * len(values) + 2), 4), layout="constrained")
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
    save(fig, path)
