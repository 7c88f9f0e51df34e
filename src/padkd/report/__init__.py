"""Reports on runs: accuracy over seeds, paired differences against a baseline (with the effect drawn
against the setting's value when one config key differs), learning curves, and what PAD's learned
variance says about the samples (against d and the teacher) and about the feature dimensions.

`write_report(out_dir)` reads a results.json (written by `padkd demo`, or by `report_runs` for any run
directories, as `padkd report RUN_DIR...` does) and each run's metrics.jsonl and records CSVs, so a
report can be regenerated at any time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from padkd import files
from padkd.config import MAX_CONFIG_BYTES, DataConfig, read_yaml
from padkd.data import DATASETS
from padkd.engine.logging import read_metrics
from padkd.engine.records import read_csv, read_header
from padkd.errors import PadkdError
from padkd.report import plots
from padkd.report.markdown import Figure, VarianceSummary, format_table, render
from padkd.report.runs import relative as _rel
from padkd.report.runs import results_from_runs
from padkd.report.stats import QUICK, digits_for, mean_std, paired_ci, spearman, verdict

__all__ = ["format_table", "report_runs", "results_from_runs", "summarize", "write_report"]

N_IMAGES = 8
#: Data sets whose test images the report draws: bundled with scikit-learn, so no download is triggered.
IMAGE_DATASETS = ("digits",)
#: Records splits in the order the report prefers them.
SPLITS = ("test", "val", "train")
_RECORDS = re.compile(r"^(\d+)-(.+)-(test|val|train)\.csv$")
_TITLES = {"sigma_vs_error": "Learned σ² vs discrepancy",
           "sigma_by_teacher": "Learned σ² and the teacher", "prime_images": "Most and least prime test images",
           "sigma_per_dimension": "Learned σ² per feature dimension", "factor": "Effect against the setting"}
VARIANCE_FIGURES = ("sigma_vs_error", "sigma_by_teacher", "sigma_per_dimension", "prime_images")


class _Skipped(Exception):
    """A figure or summary that cannot be produced from this demo directory; the message says why."""


@dataclass(frozen=True)
class PadRecords:
    """Per-sample test records of one PAD term; the teacher's columns where the task records them
    (classification: prediction and confidence; retrieval: whether its nearest neighbour shares the class)."""

    path: Path
    index: np.ndarray
    discrepancy: np.ndarray
    log_var: np.ndarray
    split: str = "test"
    target: np.ndarray | None = None
    teacher_pred: np.ndarray | None = None
    teacher_confidence: np.ndarray | None = None
    teacher_correct: np.ndarray | None = None
    #: Per feature dimension (from the elements CSV, when the term has one): mean d, mean log σ².
    dim_discrepancy: np.ndarray | None = None
    dim_log_var: np.ndarray | None = None

    @property
    def sigma2(self) -> np.ndarray:
        return np.exp(self.log_var)


def _per_seed(table: dict[str, Any], seeds: list[str]) -> dict[str, float]:
    """A method's value per seed, in the demo's seed order, for the seeds that have one."""
    return {s: float(table[s]) for s in seeds if table.get(s) is not None}


#: results.json keys of reports written before the primary metric was generic (the study still writes them).
_LEGACY = {"test_top1": "last", "best_test_top1": "best"}


def normalised(results: dict[str, Any]) -> dict[str, Any]:
    """`results` with the primary-metric keys every report reads: `metric`, `higher_is_better`, `last`,
    `best` (method → seed → value) and `teacher_metrics`; results in the older top-1 layout are mapped."""
    out = dict(results)
    for old, new in _LEGACY.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    if "teacher_test_top1" in out:
        top1 = out.pop("teacher_test_top1")
        out.setdefault("teacher_metrics", None if top1 is None else {"top1": top1})
    out.setdefault("metric", "top1")
    out.setdefault("higher_is_better", True)
    missing = [k for k in ("methods", "seeds", "last") if k not in out]
    if missing:
        raise PadkdError(f"results.json lacks {', '.join(missing)}: it was not written by `padkd demo` or "
                         "`padkd report`; run one of them again")
    return out


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: the test primary metric over seeds (last epoch and best-val checkpoint) and the
    paired difference of the last-epoch value to the baseline with its 95% t interval and verdict (better
    means higher, or lower where the task's metric is lower-is-better). Quick runs get no verdict."""
    results = normalised(results)
    seeds = [str(s) for s in results["seeds"]]
    labels = results.get("labels", {})
    baseline = results.get("baseline")
    higher = results["higher_is_better"]
    base = _per_seed(results["last"].get(baseline, {}), seeds)
    rows = []
    for method in results["methods"]:
        last = _per_seed(results["last"].get(method, {}), seeds)
        best = _per_seed(results.get("best", {}).get(method, {}), seeds)
        mean, std = mean_std(list(last.values())) if last else (None, None)
        best_mean, best_std = mean_std(list(best.values())) if best else (None, None)
        pairs = [s for s in last if s in base]
        diff: float | None = None
        low: float | None = None
        high: float | None = None
        if method == baseline:
            judged = "baseline"
        elif pairs:
            diff, low, high = paired_ci([last[s] for s in pairs], [base[s] for s in pairs])
            judged = QUICK if results.get("quick") else verdict(low, high, higher)
        else:
            judged = "n/a"
        rows.append({"method": method, "label": labels.get(method, method), "seeds": list(last),
                     "values": list(last.values()), "mean": mean, "std": std, "n": len(last),
                     "best_seeds": list(best), "best_values": list(best.values()), "best_mean": best_mean,
                     "best_std": best_std, "n_pairs": len(pairs) if method != baseline else 0,
                     "diff_mean": diff, "ci_low": low, "ci_high": high, "verdict": judged,
                     "metric": results["metric"], "digits": digits_for(results["last"])})
    return rows


def _curve(events: list[dict[str, Any]], metric: str, part: str = "val") -> tuple[dict[int, float], list[int]]:
    """`events`' `part` (val, or train) `metric` by global epoch (epochs counted across stages), and the
    epochs where stages end. An epoch without the value (`"val": null`: no validation split) is left out."""
    epochs = sorted((e["stage"], e["epoch"], float(e[part][metric])) for e in events
                    if e["event"] == "epoch" and isinstance((e.get(part) or {}).get(metric), int | float))
    lengths: dict[int, int] = {}
    for stage, epoch, _ in epochs:
        lengths[stage] = max(lengths.get(stage, 0), epoch)
    offsets: dict[int, int] = {}
    total = 0
    for stage in sorted(lengths):
        offsets[stage] = total
        total += lengths[stage]
    return {offsets[s] + e: v for s, e, v in epochs}, [offsets[s] for s in sorted(lengths)[1:]]


def _learning_curves(results: dict[str, Any], out_dir: Path, plot_dir: Path) -> Figure:
    """The validation primary metric over training; the training loss where no run has a validation split."""
    metric = results["metric"]
    events = {(m, s): read_metrics(out_dir / run) for m in results["methods"] for s in results["seeds"]
              if (run := results.get("runs", {}).get(m, {}).get(str(s))) is not None}
    part, key = "val", metric
    if not any(_curve(e, metric)[0] for e in events.values()):
        part, key = "train", "total"
    curves: dict[str, dict[int, list[float]]] = {}
    boundaries: set[int] = set()
    for (method, _), run_events in events.items():
        curve, ends = _curve(run_events, key, part)
        boundaries.update(ends)
        for epoch, value in curve.items():
            curves.setdefault(method, {}).setdefault(epoch, []).append(value)
    title = f"Validation {metric} over training" if part == "val" else "Training loss over training"
    if not curves:
        return Figure(title, "", note=f"no run's metrics.jsonl holds epoch events with a validation {metric} or a "
                                      "training loss.")
    teacher_run = results.get("teacher_run")
    teacher_curve = _curve(read_metrics(out_dir / teacher_run), key, part)[0] if teacher_run else {}
    teacher_value = teacher_curve[max(teacher_curve)] if teacher_curve else None
    path = plot_dir / "learning_curves.png"
    ylabel = f"validation {metric}" if part == "val" else "training loss (all terms)"
    plots.learning_curves(curves, results.get("labels", {}), sorted(boundaries), path, teacher_value, ylabel=ylabel)
    caption = ("Mean over seeds with a ±1 std band; epochs are counted across stages and dashed lines mark where "
               "a stage ends." + (f" The dotted line is the teacher's {ylabel} after its last epoch."
                                  if teacher_value is not None else "")
               + ("" if part == "val" else " The runs have no validation split, so the curve is the training "
                  "loss (the sum of the task loss and the weighted terms), not a metric."))
    return Figure(title, caption, _rel(path, out_dir))


def _records_in(run_dir: Path, term: str | None) -> tuple[Path, str] | None:
    """The per-sample records CSV with a `{term}.log_var` column (any term when None): the highest stage,
    then the preferred split; with the term found."""
    candidates = []
    for path in (run_dir / "records").glob("*.csv"):
        match = _RECORDS.match(path.name)
        if match and path.is_file():
            candidates.append((-int(match.group(1)), SPLITS.index(match.group(3)), path))
    for *_, path in sorted(candidates):
        header = read_header(path)
        found = [c[: -len(".log_var")] for c in header if c.endswith(".log_var")]
        if term is None and found:
            return path, found[0]
        if term is not None and term in found:
            return path, term
    return None


def _pad_records(results: dict[str, Any], out_dir: Path) -> PadRecords:
    """Records of the PAD term for the first seed: of the named PAD method (results `pad`, `pad_term`), else
    of the first setting whose run has a `.log_var` column; the highest stage, test split preferred."""
    seed = str(results["seeds"][0])
    pad, term = results.get("pad"), results.get("pad_term")
    settings = [pad] if pad else list(results["methods"])
    found = None
    run = None
    for setting in settings:
        run = results.get("runs", {}).get(setting, {}).get(seed)
        if run is not None and (found := _records_in(out_dir / run, term)) is not None:
            break
    if found is None:
        if pad and run is None:
            raise _Skipped(f"results.json names no PAD run for seed {seed}.")
        what = f"a `{term}.log_var` column" if term else "a `.log_var` column (no run is weighted by PAD)"
        where = f" under {run}/records" if pad else ""
        raise _Skipped(f"no records CSV (test, val or train split) with {what}{where}.")
    path, term = found
    results["pad_term"] = term
    table = read_csv(path)
    needed = ["index", f"{term}.discrepancy", f"{term}.log_var"]
    missing = [c for c in needed if c not in table]
    if missing:
        raise _Skipped(f"{_rel(path, out_dir)} lacks the column(s) {', '.join(missing)}.")
    if not table["index"]:
        raise _Skipped(f"{_rel(path, out_dir)} holds no samples.")
    for column in ("index", "target", "teacher_pred", "teacher_correct"):
        values = np.asarray(table.get(column, []))
        if not (np.isfinite(values).all() and (values == np.round(values)).all()):
            raise _Skipped(f"{_rel(path, out_dir)}: column `{column}` holds values that are not whole numbers.")
    split = _RECORDS.match(path.name).group(3)  # type: ignore[union-attr]
    dims = path.with_name(f"{path.stem}.{term}.elements.csv")
    dim_d = dim_v = None
    if dims.is_file():
        per_dim = read_csv(dims)
        if "log_var" in per_dim:
            dim_d, dim_v = np.asarray(per_dim["discrepancy"]), np.asarray(per_dim["log_var"])

    def column(name: str, dtype: type = float) -> np.ndarray | None:
        return np.asarray(table[name], dtype=dtype) if name in table else None

    target, teacher_pred = column("target", int), column("teacher_pred", int)
    correct = column("teacher_correct", int)
    if correct is None and target is not None and teacher_pred is not None:
        correct = (teacher_pred == target).astype(int)
    return PadRecords(path, np.asarray(table["index"], dtype=int), np.asarray(table[f"{term}.discrepancy"]),
                      np.asarray(table[f"{term}.log_var"]), split, target, teacher_pred,
                      column("teacher_confidence"), None if correct is None else correct.astype(bool), dim_d, dim_v)


def _spread(x: np.ndarray) -> float:
    """Standard deviation of the natural log of the positive values (nan with fewer than two)."""
    x = x[np.isfinite(x) & (x > 0)]
    return float(np.log(x).std()) if x.size > 1 else math.nan


def _variance_summary(records: PadRecords, out_dir: Path, term: str) -> VarianceSummary:
    correct = records.teacher_correct
    groups = [records.log_var[correct], records.log_var[~correct]] if correct is not None else []
    means = [float(g.mean()) if g.size else None for g in groups] or [None, None]
    dims = records.dim_log_var is not None and records.dim_discrepancy is not None
    confidence = records.teacher_confidence
    return VarianceSummary(
        source=_rel(records.path, out_dir), term=term, n=len(records.index),
        rho_discrepancy=spearman(records.sigma2, records.discrepancy),
        rho_confidence=spearman(records.sigma2, confidence) if confidence is not None else math.nan,
        mean_log_var_correct=means[0], n_correct=int(groups[0].size) if groups else 0,
        mean_log_var_wrong=means[1], n_wrong=int(groups[1].size) if groups else 0, split=records.split,
        sd_log_d=_spread(records.discrepancy), sd_log_var=float(np.std(records.log_var)),
        n_dims=len(records.dim_log_var) if dims else 0,  # type: ignore[arg-type]
        sd_log_d_dims=_spread(records.dim_discrepancy) if dims else math.nan,  # type: ignore[arg-type]
        sd_log_var_dims=float(np.std(records.dim_log_var)) if dims else math.nan,
        rho_dims=spearman(records.dim_log_var, records.dim_discrepancy) if dims else math.nan,  # type: ignore[arg-type]
        teacher=correct is not None)


def _data_options(run_dir: Path, dataset: str) -> dict[str, Any]:
    """The data options the run was trained with (its config.yaml), so test indices match the same split."""
    config = run_dir / "config.yaml"
    if not config.exists():
        return {}
    raw = read_yaml(config, "run config")
    try:
        data = DataConfig.model_validate(raw["data"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):  # pydantic's ValidationError is a ValueError
        raise _Skipped(f"{config} holds no valid data section, so its test split cannot be rebuilt.") from None
    return data.options if data.name == dataset else {}


def _display(image: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """A normalised `[C, H, W]` tensor as a displayable `[H, W]` or `[H, W, 3]` array in input units."""
    array = np.asarray(image, dtype=float) * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]
    if array.ndim == 3 and array.shape[0] == 1:
        return array[0]
    if array.ndim == 3 and array.shape[0] == 3:
        return array.transpose(1, 2, 0)
    raise _Skipped(f"test images have shape {tuple(array.shape)}, not [1, H, W] or [3, H, W].")


def _prime_images(results: dict[str, Any], out_dir: Path, records: PadRecords, plot_dir: Path) -> Figure:
    dataset = results.get("dataset")
    if dataset not in IMAGE_DATASETS:
        raise _Skipped(f"test images are drawn only for {', '.join(IMAGE_DATASETS)} (bundled, no download); "
                       f"this demo used '{dataset}'.")
    if records.target is None or records.teacher_pred is None:
        raise _Skipped("the records hold no `target` and `teacher_pred` columns to caption the images with.")
    run_dir = records.path.parent.parent
    try:
        data = DATASETS.create(dataset, _data_options(run_dir, dataset), "data")
    except (PadkdError, ValueError, TypeError) as err:
        raise _Skipped(f"the test split cannot be rebuilt from the run's data options ({str(err)[:120]}).") from None
    mean, std = data.normalization
    images = data.split(records.split)
    order = np.argsort(records.log_var, kind="stable")
    k = min(N_IMAGES, order.size)
    rows = []
    for name, picks in (("smallest σ² (most prime)", order[:k]), ("largest σ²", order[::-1][:k])):
        items = []
        for j in picks:
            i = int(records.index[j])
            if not 0 <= i < len(images):
                raise _Skipped(f"record index {i} is outside the {records.split} split ({len(images)} samples).")
            image, label, _ = images[i]
            if int(label) != records.target[j]:
                raise _Skipped("the records' targets do not match the rebuilt test split (different data options?).")
            items.append((_display(image, mean, std),
                          f"y={int(label)} T={records.teacher_pred[j]}\nσ²={records.sigma2[j]:.3g}"))
        rows.append((name, items))
    path = plot_dir / "prime_images.png"
    plots.prime_images(rows, path)
    return Figure(_TITLES["prime_images"], f"The {k} {records.split} images with the smallest learned σ² (top; "
                  f"most weight) and the {k} with the largest (bottom), de-normalised and drawn on one intensity "
                  "scale; y = label, T = teacher prediction.", _rel(path, out_dir))


def _variance_figures(results: dict[str, Any], out_dir: Path, plot_dir: Path, records: PadRecords,
                      variance: VarianceSummary) -> dict[str, Figure]:
    """The three figures about the learned variance (the image grid only where the data can be drawn)."""
    path = plot_dir / "sigma_vs_error.png"
    plots.sigma_vs_error(records.sigma2, records.discrepancy, records.teacher_correct, variance.rho_discrepancy,
                         path)
    colour = (" Colour: whether the teacher is right on the sample (classification: its prediction; retrieval: "
              "its nearest neighbour's class)." if records.teacher_correct is not None else "")
    figures = {"sigma_vs_error": Figure(_TITLES["sigma_vs_error"], (
        f"Each point is a {records.split} sample (log-log axes); the dashed line σ² = d is where PAD's loss is "
        f"minimal for that sample.{colour}"), _rel(path, out_dir))}
    if records.teacher_correct is None and records.teacher_confidence is None:
        figures["sigma_by_teacher"] = Figure(_TITLES["sigma_by_teacher"], "", note=(
            "the task's records hold no teacher correctness or confidence per sample."))
    else:
        path = plot_dir / "sigma_by_teacher.png"
        plots.sigma_by_teacher(records.log_var, records.teacher_confidence, records.teacher_correct, path)
        figures["sigma_by_teacher"] = Figure(_TITLES["sigma_by_teacher"], (
            f"log σ² of {records.split} samples the teacher gets right vs wrong (a box where a group has at least "
            f"{plots.MIN_BOX} samples, else every sample as a point), and against the teacher's confidence where "
            "the task records it."), _rel(path, out_dir))
    if records.dim_log_var is not None and records.dim_discrepancy is not None:
        path = plot_dir / "sigma_per_dimension.png"
        plots.sigma_per_dimension(records.dim_log_var, records.dim_discrepancy, records.log_var,
                                  records.discrepancy, path)
        figures["sigma_per_dimension"] = Figure(_TITLES["sigma_per_dimension"], (
            "Left: per feature dimension, the mean over samples of log σ² against log of the mean discrepancy of "
            "that dimension (dashed: σ² = d). Right: how far log σ² spreads across dimensions (each averaged "
            "over samples) and across samples (each averaged over dimensions), beside the spread of log d. A "
            "wide spread across dimensions and a narrow one across samples means per-element PAD acts mainly "
            "as a learned per-dimension weighting (a diagonal Mahalanobis L2). Spreads over fewer than "
            f"{plots.MIN_BOX} values are drawn as points, not boxes."), _rel(path, out_dir))
    else:
        figures["sigma_per_dimension"] = Figure(_TITLES["sigma_per_dimension"], "", note=(
            "no per-element records (per-sample PAD, or a method whose elements are not fixed dimensions)."))
    try:
        figures["prime_images"] = _prime_images(results, out_dir, records, plot_dir)
    except _Skipped as why:
        figures["prime_images"] = Figure(_TITLES["prime_images"], "", note=str(why))
    return figures


def _factor_figure(results: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path, plot_dir: Path) -> Figure:
    """The paired difference to the baseline of every setting, against the value of the one differing key."""
    factor = results.get("factor")
    title = _TITLES["factor"]
    if not factor:
        varying = results.get("varying")
        why = ("the runs differ in more than one setting (" + ", ".join(varying) + ")") if varying else \
            "the runs differ in no setting but the seed"
        return Figure(title, "", note=f"{why}; the effect is drawn against a setting when exactly one differs.")
    values = factor["values"]
    by = {r["method"]: r for r in rows}
    points = [(values[m], by[m]["diff_mean"] if by[m]["diff_mean"] is not None else 0.0,
               by[m]["ci_low"], by[m]["ci_high"]) for m in results["methods"]]
    path = plot_dir / "factor.png"
    baseline_value = values.get(results.get("baseline"))
    plots.effect_vs_factor([str(p[0]) for p in points], [p[1] for p in points], [p[2] for p in points],
                           [p[3] for p in points], path, xlabel=factor["key"],
                           title=f"Paired difference to {factor['key']}={baseline_value}",
                           ylabel=f"paired difference in {results['metric']}")
    return Figure(title, (f"Mean paired difference (in {results['metric']}) of each value of `{factor['key']}` "
                          f"to the baseline value {baseline_value}, with its 95% t interval over seeds."),
                  _rel(path, out_dir))


def _extra_figures(results: dict[str, Any], out_dir: Path) -> list[Figure]:
    """The figures a demo drew itself (results `figures`: title, path relative to the report, caption)."""
    shown = []
    for item in results.get("figures", []):
        if isinstance(item, dict) and isinstance(item.get("path"), str) and (out_dir / item["path"]).is_file():
            shown.append(Figure(str(item.get("title", "")), str(item.get("caption", "")), item["path"]))
        elif isinstance(item, dict):
            shown.append(Figure(str(item.get("title", "")), "", note=str(item.get("note", "the file is missing."))))
    return shown


def write_report(out_dir: Path, results: dict[str, Any] | None = None) -> Path:
    """Write `out_dir/report.md` and its PNGs under `out_dir/plots/`: from `results` (then written to
    `out_dir/results.json` too, once the report is complete) or from the directory's results.json (`padkd
    demo`'s, or the one `report_runs` writes). Nothing is left half-written: each file is replaced whole."""
    out_dir = Path(out_dir)
    results_path = out_dir / "results.json"
    given = results is not None
    if results is None:
        if not results_path.exists():
            raise PadkdError(f"{results_path} not found; point the report at a directory written by `padkd demo`, "
                             "or run `padkd report RUN_DIR...`")
        results = files.read_json(results_path, 64 * MAX_CONFIG_BYTES, "report's results")
        if not isinstance(results, dict):
            raise PadkdError(f"{results_path} is not a report's results (not a JSON object); run the demo or "
                             "`padkd report` again")
    results = normalised(results)
    plot_dir = out_dir / "plots"
    rows = summarize(results)
    figures = {"learning_curves": _learning_curves(results, out_dir, plot_dir),
               "factor": _factor_figure(results, rows, out_dir, plot_dir)}
    variance, variance_note = None, ""
    try:
        records = _pad_records(results, out_dir)
    except _Skipped as why:
        variance_note = str(why)
        figures |= {name: Figure(_TITLES[name], "", note=variance_note) for name in VARIANCE_FIGURES}
    else:
        variance = _variance_summary(records, out_dir, results["pad_term"])
        figures |= _variance_figures(results, out_dir, plot_dir, records, variance)
    text = render(results, rows, figures, variance, variance_note, _extra_figures(results, out_dir))
    if given:
        files.atomic_write_text(results_path, json.dumps(results, indent=2) + "\n")
    report = out_dir / "report.md"
    files.atomic_write_text(report, text)
    return report


def report_runs(run_dirs: list[Path], out_dir: Path, labels: dict[str, str] | None = None,
                baseline: str | None = None, command: str = "padkd report") -> Path:
    """Report on any finished runs: group them into settings (`results_from_runs`), then write the report
    and `out_dir/results.json` (at the end, whole). Returns the report's path."""
    out_dir = Path(out_dir)
    results = results_from_runs([Path(r) for r in run_dirs], out_dir, labels, baseline, command)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_report(out_dir, results)
