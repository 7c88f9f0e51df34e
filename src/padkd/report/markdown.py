"""Text output: report.md for a demo directory and a fixed-width table for the terminal."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from padkd.report.stats import BETTER, NO_CI, UNCLEAR, WORSE

MINUS = "\u2212"


@dataclass(frozen=True)
class Figure:
    """One report figure: a PNG path relative to report.md, or a note saying why it was not drawn."""

    title: str
    caption: str
    path: str | None = None
    note: str = ""


@dataclass(frozen=True)
class VarianceSummary:
    """What PAD's learned log σ² correlates with on the test split of one run."""

    source: str
    term: str
    n: int
    rho_discrepancy: float
    rho_confidence: float
    mean_log_var_correct: float | None
    n_correct: int
    mean_log_var_wrong: float | None
    n_wrong: int
    split: str = "test"
    #: Standard deviations across samples of log d and of the learned log σ².
    sd_log_d: float = math.nan
    sd_log_var: float = math.nan
    #: Per feature dimension (each averaged over samples): how many, the spreads, and ρ(σ², d) across them.
    n_dims: int = 0
    sd_log_d_dims: float = math.nan
    sd_log_var_dims: float = math.nan
    rho_dims: float = math.nan


def signed(x: float, digits: int = 2) -> str:
    """`+0.31` / `−0.20`: an explicit sign and a typographic minus."""
    text = f"{x:+.{digits}f}"
    return text.replace("-", MINUS)


def number(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}".replace("-", MINUS)


def mean_pm_std(mean: float | None, std: float | None) -> str:
    return "n/a" if mean is None or std is None else f"{mean:.2f} ± {std:.2f}"


def interval(low: float | None, high: float | None) -> str:
    return "n/a" if low is None or high is None else f"[{signed(low)}, {signed(high)}]"


def per_seed(seeds: Sequence[str], values: Sequence[float]) -> str:
    return ", ".join(f"{s}: {v:.2f}" for s, v in zip(seeds, values, strict=True)) or "n/a"


def verdict_line(row: dict[str, Any], baseline_label: str) -> str:
    """Plain-language reading of one method's paired difference against the baseline."""
    head = f"{row['label']} {MINUS} {baseline_label}"
    if row["diff_mean"] is None:
        return f"{head}: no seed has results for both methods."
    text = f"{head} = {signed(row['diff_mean'])} points over {row['n_pairs']} paired seed(s), 95% CI " \
           f"{interval(row['ci_low'], row['ci_high'])}"
    reading = {BETTER: "better (the interval excludes zero)", WORSE: "worse (the interval excludes zero)",
               UNCLEAR: "not distinguishable from zero", NO_CI: "one paired seed gives no interval, so no verdict"}
    return f"{text}: {reading[row['verdict']]}."


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width text table of `summarize` rows, for the terminal."""
    header = ["method", "test top-1 (last)", "test top-1 (best val)", "n", "Δ vs baseline", "95% CI", "verdict"]
    body = [[r["label"], mean_pm_std(r["mean"], r["std"]), mean_pm_std(r["best_mean"], r["best_std"]), str(r["n"]),
             "" if r["diff_mean"] is None else signed(r["diff_mean"]),
             "" if r["diff_mean"] is None else interval(r["ci_low"], r["ci_high"]), r["verdict"]] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(line) + " |" for line in body)]


def _figure(fig: Figure) -> list[str]:
    if fig.path is None:
        return [f"### {fig.title}", "", f"_Not drawn: {fig.note}_", ""]
    return [f"### {fig.title}", "", f"![{fig.title}]({fig.path})", "", fig.caption, ""]


def _variance(v: VarianceSummary) -> list[str]:
    dims = [] if not v.n_dims else [
        f"- Across its {v.n_dims} feature dimensions (each averaged over the samples): log σ² spreads by "
        f"{number(v.sd_log_var_dims)} (standard deviation) and log d by {number(v.sd_log_d_dims)}; Spearman ρ "
        f"between them {number(v.rho_dims, 3)}. Across samples (each averaged over dimensions) log σ² spreads by "
        f"{number(v.sd_log_var)} and log d by {number(v.sd_log_d)}.",
    ]
    return [
        f"From `{v.source}`: term `{v.term}`, {v.n} {v.split} samples of the first seed's PAD run.",
        "",
        f"- Spearman ρ between learned σ² and the per-sample discrepancy d: **{number(v.rho_discrepancy, 3)}** "
        "(PAD's loss d/σ² + log σ² is minimised at σ² = d, so a well-fitted head ranks samples like d).",
        f"- Spearman ρ between learned σ² and the teacher's confidence: **{number(v.rho_confidence, 3)}**.",
        f"- Mean log σ²: teacher correct {number(v.mean_log_var_correct)} (n = {v.n_correct}), "
        f"teacher wrong {number(v.mean_log_var_wrong)} (n = {v.n_wrong}).",
        *dims,
        "",
        "**Caveat: prime means easy to mimic, not clean or correct.** The variance head learns how closely the "
        "student can reproduce the teacher on each input, whatever the label. Small σ² (more weight) goes to "
        "inputs whose teacher signal is simple to copy; a bland or even pure-noise input can qualify, and a "
        "mislabelled sample the teacher handles smoothly is not flagged. Large σ² marks inputs the student "
        "cannot yet copy, which are not necessarily wrong or noisy. Read the numbers above as evidence about "
        "imitation difficulty, not data quality.",
        "",
    ]


def render(results: dict[str, Any], rows: Sequence[dict[str, Any]], figures: dict[str, Figure],
           variance: VarianceSummary | None, variance_note: str) -> str:
    """The whole report.md. `figures` is keyed by plot name; `variance_note` explains a missing summary."""
    labels = results.get("labels", {})
    baseline = results.get("baseline")
    baseline_label = labels.get(baseline, baseline)
    epochs = results.get("epochs") or {}
    seconds = results.get("seconds")
    teacher = results.get("teacher_test_top1")
    lines = [
        f"# PAD distillation report: {results.get('dataset', 'unknown data set')}",
        "",
        f"- Command: `{results.get('command', 'n/a')}`",
        f"- Wall time: {'n/a' if seconds is None else f'{seconds:.1f} s'}",
        f"- Seeds: {', '.join(str(s) for s in results['seeds'])}",
        f"- Epochs: {', '.join(f'{k} {v}' for k, v in epochs.items()) or 'n/a'}",
        f"- Teacher test top-1: {'n/a' if teacher is None else f'{teacher:.2f} %'}",
        "",
        "## Results",
        "",
        "Student test top-1 (%) after the last epoch and of the checkpoint with the best validation top-1; "
        "mean ± sample std over seeds.",
        "",
        *_table(["Method", "Last epoch", "Best-val checkpoint", "n", "Per seed (last)", "Per seed (best val)"],
                [[r["label"], mean_pm_std(r["mean"], r["std"]), mean_pm_std(r["best_mean"], r["best_std"]),
                  str(r["n"]), per_seed(r["seeds"], r["values"]), per_seed(r["best_seeds"], r["best_values"])]
                 for r in rows]),
        "",
    ]
    compared = [r for r in rows if r["method"] != baseline]
    if baseline is not None and compared:
        lines += [
            f"## Paired differences vs {baseline_label}",
            "",
            "Last-epoch test top-1 minus the baseline's, paired by seed; 95% confidence interval from Student's t "
            "with n−1 degrees of freedom (none for a single pair). A method is called better or worse only "
            "when the interval excludes zero.",
            "",
            *_table(["Method", "Mean difference (points)", "95% CI", "Pairs", "Verdict"],
                    [[r["label"], "n/a" if r["diff_mean"] is None else signed(r["diff_mean"]),
                      interval(r["ci_low"], r["ci_high"]), str(r["n_pairs"]), r["verdict"]] for r in compared]),
            "",
            *(f"- {verdict_line(r, baseline_label)}" for r in compared),
            "",
        ]
    if "factor" in figures and (results.get("factor") or results.get("varying") is not None):
        lines += [*_figure(figures["factor"])]
    lines += ["## Learning curves", "", *_figure(figures["learning_curves"]),
              "## What the learned variance shows", ""]
    lines += _variance(variance) if variance is not None else [f"_No variance summary: {variance_note}_", ""]
    for name in ("sigma_vs_error", "sigma_by_teacher", "sigma_per_dimension", "prime_images"):
        if name in figures:
            lines += _figure(figures[name])
    return "\n".join(lines).rstrip() + "\n"
