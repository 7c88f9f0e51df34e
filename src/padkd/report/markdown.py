"""Text output: report.md for a demo directory and a fixed-width table for the terminal."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from padkd.report.stats import BETTER, NO_CI, QUICK, UNCLEAR, WORSE, mean_std, paired_ci

#: The banner of a quick run's report and table: its numbers are not evidence.
QUICK_NOTE = ("QUICK RUN: a smoke test of a few epochs. Its numbers show that the pipeline runs, not how the "
              "methods compare; no difference below is a finding, and none is judged.")

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
    #: Whether the records say per sample if the teacher is right (classification, retrieval).
    teacher: bool = True


def signed(x: float, digits: int = 2) -> str:
    """`+0.31` / `−0.20`: an explicit sign and a typographic minus."""
    text = f"{x:+.{digits}f}"
    return text.replace("-", MINUS)


def number(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}".replace("-", MINUS)


def mean_pm_std(mean: float | None, std: float | None, digits: int = 2) -> str:
    return "n/a" if mean is None or std is None else f"{number(mean, digits)} ± {std:.{digits}f}"


def interval(low: float | None, high: float | None, digits: int = 2) -> str:
    return "n/a" if low is None or high is None else f"[{signed(low, digits)}, {signed(high, digits)}]"


def per_seed(seeds: Sequence[str], values: Sequence[float], digits: int = 2) -> str:
    return ", ".join(f"{s}: {v:.{digits}f}" for s, v in zip(seeds, values, strict=True)) or "n/a"


def verdict_line(row: dict[str, Any], baseline_label: str, higher_is_better: bool = True) -> str:
    """Plain-language reading of one method's paired difference against the baseline."""
    head = f"{row['label']} {MINUS} {baseline_label}"
    if row["diff_mean"] is None:
        return f"{head}: no seed has results for both methods."
    digits = row.get("digits", 2)
    text = f"{head} = {signed(row['diff_mean'], digits)} {row.get('metric', 'top1')} over {row['n_pairs']} paired " \
           f"seed(s), 95% CI {interval(row['ci_low'], row['ci_high'], digits)}"
    side = "" if higher_is_better else f" ({row.get('metric', 'the metric')} is better lower)"
    reading = {BETTER: f"better{side} (the interval excludes zero)", WORSE: f"worse{side} (the interval excludes zero)",
               UNCLEAR: "not distinguishable from zero", NO_CI: "one paired seed gives no interval, so no verdict",
               QUICK: "not judged: a quick run is a smoke test, not evidence"}
    return f"{text}: {reading[row['verdict']]}."


def format_table(rows: Sequence[dict[str, Any]], quick: bool = False) -> str:
    """Fixed-width text table of `summarize` rows, for the terminal (headed by QUICK_NOTE for a quick run)."""
    metric = rows[0].get("metric", "top1") if rows else "top1"
    with_best = any(r["best_values"] for r in rows)  # none without a validation split
    header = ["method", f"test {metric} (last)", *([f"test {metric} (best val)"] if with_best else []), "n",
              "Δ vs baseline", "95% CI", "verdict"]
    body = [[r["label"], mean_pm_std(r["mean"], r["std"], r.get("digits", 2)),
             *([mean_pm_std(r["best_mean"], r["best_std"], r.get("digits", 2))] if with_best else []), str(r["n"]),
             "" if r["diff_mean"] is None else signed(r["diff_mean"], r.get("digits", 2)),
             "" if r["diff_mean"] is None else interval(r["ci_low"], r["ci_high"], r.get("digits", 2)), r["verdict"]]
            for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(([QUICK_NOTE, ""] if quick else []) + lines)


def comparisons(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(method, baseline) pairs of the per-metric table: results `comparisons`, else each method vs the baseline."""
    given = results.get("comparisons")
    if given:
        return [(str(m), str(b)) for m, b in given]
    base = results.get("baseline")
    return [(m, base) for m in results["methods"] if m != base and base is not None]


def metric_tables(results: dict[str, Any]) -> list[str]:
    """Markdown: every recorded test metric of each method (mean ± std over seeds; the teacher's first),
    then per comparison the paired difference of each metric with its 95% t interval. Empty without
    per-seed metrics (results `metrics`: method → seed → {metric: value})."""
    scores = results.get("metrics") or {}
    seeds = [str(s) for s in results["seeds"]]
    names = results.get("metric_names") or sorted({k for by_seed in scores.values() for m in by_seed.values()
                                                   for k in m})
    if not names or not scores:
        return []

    def values(method: str, name: str) -> dict[str, float]:
        by_seed = scores.get(method, {})
        return {s: float(by_seed[s][name]) for s in seeds if by_seed.get(s, {}).get(name) is not None}

    digits = {n: 3 if all(abs(v) <= 1 for m in scores for v in values(m, n).values()) else 2 for n in names}
    teacher = results.get("teacher_metrics") or {}
    lines = ["## Every test metric", "", "Mean ± sample std over seeds (last epoch).", "",
             "| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    if teacher:
        lines.append("| teacher | " + " | ".join(number(teacher.get(n), digits[n]) for n in names) + " |")
    for method in results["methods"]:
        cells = [mean_pm_std(*mean_std(list(v.values())), digits[n]) if (v := values(method, n)) else "n/a"
                 for n in names]
        lines.append(f"| {results.get('labels', {}).get(method, method)} | " + " | ".join(cells) + " |")
    pairs = comparisons(results)
    if pairs:
        lines += ["", f"Paired differences per metric over the seeds both have (95% t interval; the verdicts above "
                      f"judge {results.get('metric', 'the primary metric')} only):", "",
                  "| comparison | " + " | ".join(f"Δ {n}" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
        labels = results.get("labels", {})
        for method, base in pairs:
            cells = []
            for n in names:
                a, b = values(method, n), values(base, n)
                common = [s for s in a if s in b]
                if not common:
                    cells.append("n/a")
                    continue
                diff, low, high = paired_ci([a[s] for s in common], [b[s] for s in common])
                cells.append(f"{signed(diff, digits[n])} {interval(low, high, digits[n])}")
            lines.append(f"| {labels.get(method, method)} {MINUS} {labels.get(base, base)} | " + " | ".join(cells)
                         + " |")
    return [*lines, ""]


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(line) + " |" for line in body)]


def _figure(fig: Figure) -> list[str]:
    if fig.path is None:
        return [f"### {fig.title}", "", f"_Not drawn: {fig.note}_", ""]
    return [f"### {fig.title}", "", f"![{fig.title}]({fig.path})", "", fig.caption, ""]


def _resumed(results: dict[str, Any]) -> list[str]:
    """Which runs were resumed, where, and with which config changes (recorded by their resume events)."""
    lines = []
    labels = results.get("labels", {})
    for method, by_seed in (results.get("resumed") or {}).items():
        for seed, events in by_seed.items():
            for e in events:
                changes = ", ".join(f"`{k}` {c.get('was')!r} → {c.get('now')!r}" for k, c in e["changes"].items())
                lines.append(f"- {labels.get(method, method)}, seed {seed}: resumed at stage {e['stage']} epoch "
                             f"{e['epoch']} batch {e['batch']}" + (f", changing {changes}" if changes else
                                                                   ", with the same config") + ".")
    if not lines:
        return []
    return ["## Resumed runs", "", "Each is one run of its setting (its seed's value above), continued from a "
            "checkpoint:", "", *lines, ""]


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
        *([] if math.isnan(v.rho_confidence) else [
            f"- Spearman ρ between learned σ² and the teacher's confidence: **{number(v.rho_confidence, 3)}**."]),
        *([f"- Mean log σ²: teacher correct {number(v.mean_log_var_correct)} (n = {v.n_correct}), "
           f"teacher wrong {number(v.mean_log_var_wrong)} (n = {v.n_wrong})."] if v.teacher else []),
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
           variance: VarianceSummary | None, variance_note: str, extra: Sequence[Figure] = ()) -> str:
    """The whole report.md. `figures` is keyed by plot name; `variance_note` explains a missing summary;
    `extra` are the demo's own figures (nearest neighbours, detections)."""
    labels = results.get("labels", {})
    baseline = results.get("baseline")
    baseline_label = labels.get(baseline, baseline)
    metric, higher = results.get("metric", "top1"), results.get("higher_is_better", True)
    digits = rows[0].get("digits", 2) if rows else 2
    epochs = results.get("epochs") or {}
    epochs_text = epochs if isinstance(epochs, str | int) else ", ".join(f"{k} {v}" for k, v in epochs.items())
    seconds, reused = results.get("seconds"), results.get("reused_runs")
    teacher = (results.get("teacher_metrics") or {}).get(metric)
    task = results.get("task", "classification")
    direction = "higher is better" if higher else "lower is better"
    with_best = any(r["best_values"] for r in rows)
    lines = [f"# PAD distillation report: {results.get('dataset', 'unknown data set')} ({task})", ""]
    if results.get("quick"):
        lines += [f"> **{QUICK_NOTE}**", ""]
    lines += [f"> {note}" for note in results.get("notes", [])] + ([""] if results.get("notes") else [])
    lines += [
        f"- Command (run in this report's folder): `{results.get('command', 'n/a')}`",
        *([f"- Wall time: {seconds:.1f} s" + (f" (this invocation, which reused {reused} finished run(s))"
                                               if reused else "")] if seconds is not None else []),
        f"- Seeds: {', '.join(str(s) for s in results['seeds'])}",
        *([f"- Epochs: {epochs_text}"] if epochs_text else []),
        f"- Primary metric: {metric} ({direction}), on the test split",
        *([f"- Teacher test {metric}: {teacher:.{digits}f}"] if teacher is not None else []),
        "",
        "## Results",
        "",
        f"Student test {metric} after the last epoch" + (f" and of the checkpoint with the best validation {metric}"
                                                         if with_best else " (the runs have no validation split)")
        + "; mean ± sample std over seeds.",
        "",
        *_table(["Method", "Last epoch", *(["Best-val checkpoint"] if with_best else []), "n", "Per seed (last)",
                 *(["Per seed (best val)"] if with_best else [])],
                [[r["label"], mean_pm_std(r["mean"], r["std"], digits),
                  *([mean_pm_std(r["best_mean"], r["best_std"], digits)] if with_best else []), str(r["n"]),
                  per_seed(r["seeds"], r["values"], digits),
                  *([per_seed(r["best_seeds"], r["best_values"], digits)] if with_best else [])] for r in rows]),
        "",
    ]
    compared = [r for r in rows if r["method"] != baseline]
    if baseline is not None and compared:
        lines += [
            f"## Paired differences vs {baseline_label}",
            "",
            f"Last-epoch test {metric} minus the baseline's, paired by seed; 95% confidence interval from Student's "
            f"t with n−1 degrees of freedom (none for a single pair). {'Higher' if higher else 'Lower'} {metric} is "
            "better: a method is called better or worse only when the interval excludes zero"
            + (", and a quick run is not judged at all." if results.get("quick") else "."),
            "",
            *_table(["Method", "Mean difference", "95% CI", "Pairs", "Verdict"],
                    [[r["label"], "n/a" if r["diff_mean"] is None else signed(r["diff_mean"], digits),
                      interval(r["ci_low"], r["ci_high"], digits), str(r["n_pairs"]), r["verdict"]]
                     for r in compared]),
            "",
            *(f"- {verdict_line(r, baseline_label, higher)}" for r in compared),
            "",
        ]
    lines += metric_tables(results)
    lines += _resumed(results)
    if "factor" in figures and (results.get("factor") or results.get("varying") is not None):
        lines += [*_figure(figures["factor"])]
    lines += ["## Learning curves", "", *_figure(figures["learning_curves"])]
    if extra:
        lines += ["## Examples", ""]
        for fig in extra:
            lines += _figure(fig)
    lines += ["## What the learned variance shows", ""]
    lines += _variance(variance) if variance is not None else [f"_No variance summary: {variance_note}_", ""]
    for name in ("sigma_vs_error", "sigma_by_teacher", "sigma_per_dimension", "prime_images"):
        if name in figures:
            lines += _figure(figures[name])
    return "\n".join(lines).rstrip() + "\n"
