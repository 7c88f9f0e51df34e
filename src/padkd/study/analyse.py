"""Reading the study's runs back: paired comparisons with their intervals, what PAD's head learned, the tables,
figures and `padkd report` pages, written to study.md and results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from padkd.study.factors import Factor, Row

#: A test top-1 below this (%) counts as stuck at chance (10 classes).
CHANCE = 20.0


# ------------------------------------------------------------------------------------------ reading runs
def read_final(root: Path, key: str) -> float | None:
    """A run's last test top-1 (%), or None while it has not finished."""
    path = root / key / "final.json"
    if not path.is_file():
        return None
    return float(json.loads(path.read_text())["last"]["top1"])


def read_records(root: Path, key: str, split: str = "test") -> dict[str, np.ndarray] | None:
    """The last stage's per-sample records of `split`, as arrays."""
    from padkd.engine.records import read_csv

    paths = sorted((root / key / "records").glob(f"*-{split}.csv"), key=lambda p: int(p.name.split("-")[0]))
    if not paths:
        return None
    return {k: np.asarray(v) for k, v in read_csv(paths[-1]).items()}


def read_elements(root: Path, key: str, term: str = "hint", split: str = "test") -> dict[str, np.ndarray] | None:
    from padkd.engine.records import read_csv

    paths = sorted((root / key / "records").glob(f"*-{split}.{term}.elements.csv"),
                   key=lambda p: int(p.name.split("-")[0]))
    if not paths:
        return None
    return {k: np.asarray(v) for k, v in read_csv(paths[-1]).items()}


def head_stats(records: dict[str, np.ndarray] | None, term: str | None = "hint") -> dict[str, float]:
    """What a PAD head (or variance memory) learned: spread of log d and log σ², ρ(σ², d), mean d, over the
    samples with a learned σ². `term` None: the records' first term."""
    from padkd.report.stats import spearman

    if records is not None and term is None:
        term = next((k.rsplit(".", 1)[0] for k in records if k.endswith(".discrepancy")), None)
    if records is None or f"{term}.discrepancy" not in records:
        return {}
    d = records[f"{term}.discrepancy"]
    out = {"mean_d": float(d.mean()), "sd_log_d": float(np.log(d[d > 0]).std())}
    if f"{term}.log_var" in records:
        v = records[f"{term}.log_var"]
        known = np.isfinite(v)  # a variance memory has no σ² for a sample it never saw
        v, d = v[known], d[known]
        out |= {"sd_log_var": float(v.std()), "rho": spearman(v, d), "mean_log_var": float(v.mean())}
    return out


def learned_records(root: Path, key: str) -> dict[str, np.ndarray] | None:
    """The records that hold a run's learned σ²: the test split's, or the training split's where only those
    do (a variance memory knows training samples only)."""
    test = read_records(root, key)
    if test is not None and not any(k.endswith(".log_var") for k in test):
        train = read_records(root, key, "train")
        if train is not None and any(k.endswith(".log_var") for k in train):
            return train
    return test


# ------------------------------------------------------------------------------------------ analysis
def compare(root: Path, row: Row) -> dict[str, Any]:
    """Paired difference of one row's arms over the seeds where both finished."""
    from padkd.report.stats import mean_std, paired_ci, verdict

    t = {s: read_final(root, k) for s, k in row.treatment.items()}
    c = {s: read_final(root, k) for s, k in row.control.items()}
    seeds = [s for s in t if t[s] is not None and c.get(s) is not None]
    out: dict[str, Any] = {"factor": row.factor, "value": row.value, "label": row.label, "n": len(seeds),
                           "seeds": seeds, "treatment": [t[s] for s in seeds], "control": [c[s] for s in seeds]}
    if not seeds:
        return out | {"verdict": "n/a"}
    out["treatment_mean"], out["treatment_std"] = mean_std(out["treatment"])
    out["control_mean"], out["control_std"] = mean_std(out["control"])
    diff, low, high = paired_ci(out["treatment"], out["control"])
    out |= {"diff": diff, "low": low, "high": high, "verdict": verdict(low, high)}
    stats = [head_stats(learned_records(root, row.treatment[s]), None) for s in seeds]
    for key in ("mean_d", "sd_log_d", "sd_log_var", "rho", "mean_log_var"):
        vals = [st[key] for st in stats if key in st and st[key] is not None and not math.isnan(st[key])]
        if vals:
            out[key] = float(np.mean(vals))
    return out


def corruption_stats(root: Path, row: Row) -> dict[str, Any]:
    """σ², d and PAD's relative weight of the corrupted training samples against the clean ones (stage-2 train
    records, per seed; then mean and 95% interval over seeds of the corrupted − clean differences)."""
    import yaml

    from padkd.data import DATASETS
    from padkd.report.stats import paired_ci, spearman

    per_seed: dict[str, list[float]] = {"d_log_var": [], "d_log_d": [], "weight_corrupt": [], "rho": []}
    for key in row.treatment.values():
        records = read_records(root, key, "train")
        config = root / key / "config.yaml"
        if records is None or "hint.log_var" not in records or not config.is_file():
            continue
        data_cfg = yaml.safe_load(config.read_text())["data"]
        options = {k: v for k, v in data_cfg.items() if k not in ("name", "batch_size", "eval_batch_size",
                                                                   "num_workers", "pin_memory", "persistent_workers",
                                                                   "prefetch_factor", "sampler")}
        train = DATASETS.create(data_cfg["name"], options, "data").train
        bad = (train.noisy | train.flipped).numpy()[records["index"].astype(int)]
        if not bad.any():
            continue
        v, d, w = records["hint.log_var"], records["hint.discrepancy"], records["hint.weight"]
        per_seed["d_log_var"].append(float(v[bad].mean() - v[~bad].mean()))
        per_seed["d_log_d"].append(float(np.log(d[bad]).mean() - np.log(d[~bad]).mean()))
        per_seed["weight_corrupt"].append(float(w[bad].mean() / w.mean()))
        per_seed["rho"].append(spearman(v, d))
    out: dict[str, Any] = {"n": len(per_seed["d_log_var"])}
    for key, values in per_seed.items():
        if values:
            mean, low, high = paired_ci(values, [0.0] * len(values))
            out[key] = {"mean": mean, "low": low, "high": high}
    return out


def dimension_stats(root: Path, keys: dict[int, str]) -> dict[str, Any]:
    """Per-element PAD: the spread of log σ² across dimensions (each averaged over test samples) against its
    spread across samples (each averaged over dimensions), and ρ(σ², d) across dimensions; mean over seeds."""
    from padkd.report.stats import spearman

    rows = []
    for key in keys.values():
        el, rec = read_elements(root, key), read_records(root, key)
        if el is None or rec is None or "log_var" not in el:
            continue
        rows.append({"sd_dims": float(el["log_var"].std()), "sd_samples": float(rec["hint.log_var"].std()),
                     "sd_log_d_dims": float(np.log(el["discrepancy"]).std()),
                     "sd_log_d_samples": float(np.log(rec["hint.discrepancy"]).std()),
                     "rho_dims": spearman(el["log_var"], el["discrepancy"]),
                     "rho_samples": spearman(rec["hint.log_var"], rec["hint.discrepancy"])})
    if not rows:
        return {}
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} | {"n": len(rows)}


def stall_stats(root: Path, keys: dict[int, str]) -> dict[str, Any]:
    """How many runs ended at chance, and the training cross-entropy after the first epoch per seed."""
    from padkd.engine.logging import read_metrics

    top1 = {s: read_final(root, k) for s, k in keys.items()}
    ce = {}
    for s, k in keys.items():
        epochs = [e for e in read_metrics(root / k) if e.get("event") == "epoch"] if (root / k).is_dir() else []
        if epochs:
            ce[s] = [round(float(e["train"]["task"]), 3) for e in epochs]
    finished = [v for v in top1.values() if v is not None]
    return {"runs": len(finished), "stuck": sum(v < CHANCE for v in finished),
            "top1": {str(s): v for s, v in top1.items()}, "train_ce": {str(s): v for s, v in ce.items()}}


# ------------------------------------------------------------------------------------------ output
def fmt(x: float | None, digits: int = 2, sign: bool = False) -> str:
    """A number as the tables print it: `n/a` for none or NaN, a true minus sign."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    text = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    return text.replace("-", "\u2212")


def _ci(r: dict[str, Any]) -> str:
    if r.get("low") is None:
        return "n/a"
    return f"[{fmt(r['low'], sign=True)}, {fmt(r['high'], sign=True)}]"


def _table(rows: list[dict[str, Any]], head_columns: bool) -> list[str]:
    header = ["value", "comparison", "n", "treatment", "control", "difference", "95% CI", "verdict"]
    if head_columns:
        header += ["mean d", "sd log d", "sd log σ²", "ρ(σ², d)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["value"], r["label"], str(r["n"]),
                 f"{fmt(r.get('treatment_mean'))} ± {fmt(r.get('treatment_std'))}",
                 f"{fmt(r.get('control_mean'))} ± {fmt(r.get('control_std'))}",
                 fmt(r.get("diff"), sign=True), _ci(r), r.get("verdict", "n/a")]
        if head_columns:
            cells += [fmt(r.get("mean_d"), 4), fmt(r.get("sd_log_d")), fmt(r.get("sd_log_var")),
                      fmt(r.get("rho"), 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _factor_figure(factor: Factor, rows: list[dict[str, Any]], path: Path) -> bool:
    """One panel per comparison label: the paired difference with its interval against the factor's values."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    labels = list(dict.fromkeys(r["label"] for r in rows if r.get("diff") is not None))
    if not labels:
        return False
    # more than four panels: rows of three, so that the panels keep their width
    cols = len(labels) if len(labels) <= 4 else 3
    rows_n = math.ceil(len(labels) / cols)
    fig = MplFigure(figsize=(min(4.5 * cols, 13), (3.8 + 0.3 * (len(labels) > 2)) * rows_n))
    grid = fig.subplots(rows_n, cols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(labels):]:
        ax.set_visible(False)
    for ax, label in zip(axes, labels, strict=False):
        chosen = [r for r in rows if r["label"] == label and r.get("diff") is not None]
        for i, r in enumerate(chosen):
            if r.get("low") is not None:
                ax.errorbar([i], [r["diff"]], yerr=[[r["diff"] - r["low"]], [r["high"] - r["diff"]]], fmt="o",
                            capsize=4, color="tab:red" if r["verdict"] == "worse" else
                            "tab:green" if r["verdict"] == "better" else "tab:blue")
            else:
                ax.plot([i], [r["diff"]], "o", color="tab:gray")
        ax.axhline(0.0, color="black", linewidth=1)
        names = [r["value"] for r in chosen]
        long = max((len(n) for n in names), default=0) > 8
        ax.set_xticks(range(len(chosen)), names, rotation=30 if long else 0, ha="right" if long else "center",
                      fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(factor.xlabel, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    for row in grid:  # one label per row: panels sit close
        row[0].set_ylabel("paired difference, test top-1 (points)", fontsize=8)
    fig.suptitle(factor.title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return True


def _report(root: Path, out: Path, factor: Factor, dataset: str, teacher: str | None, command: str) -> Path | None:
    """`padkd report` on a factor's arms (the first arm is the baseline), under `out/reports/<factor>`."""
    import yaml

    from padkd.report import write_report

    arms = {label: {str(s): str((root / k).resolve()) for s, k in keys.items() if (root / k / "final.json").is_file()}
            for label, keys in factor.report.items()}
    arms = {label: runs for label, runs in arms.items() if runs}
    if not arms:
        return None
    seeds = sorted({int(s) for runs in arms.values() for s in runs})
    first = next(iter(arms.values()))
    config = yaml.safe_load((Path(next(iter(first.values()))) / "config.yaml").read_text())
    results = {"dataset": dataset, "methods": list(arms), "labels": {k: k for k in arms}, "baseline": next(iter(arms)),
               "seeds": seeds, "runs": arms,
               "test_top1": {a: {s: read_final(Path(p).parent, Path(p).name) for s, p in r.items()}
                             for a, r in arms.items()},
               "best_test_top1": {a: {s: json.loads((Path(p) / "final.json").read_text())["best"]["top1"]
                                      for s, p in r.items()} for a, r in arms.items()},
               "teacher_run": str((root / teacher).resolve()) if teacher else None,
               "teacher_test_top1": read_final(root, teacher) if teacher else None,
               "epochs": {s["name"]: s["epochs"] for s in config["stages"]}, "command": command}
    target = out / "reports" / factor.name
    target.mkdir(parents=True, exist_ok=True)
    (target / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return write_report(target)


def write_analysis(root: Path, out: Path, factors: list[Factor], failed: dict[str, str], header: list[str],
            command: str, teachers: dict[str, str | None]) -> dict[str, Any]:
    """Read every finished run back; write results.json, the figures and study.md."""
    results: dict[str, Any] = {"header": header, "failed": failed, "factors": {}}
    lines = ["# The evidence study", "", *header, ""]
    if failed:
        lines += [f"**{len(failed)} run(s) failed** (their comparisons have fewer pairs): "
                  + "; ".join(f"`{k}`: {v}" for k, v in list(failed.items())[:5]), ""]
    for factor in factors:
        rows = [compare(root, row) for row in factor.rows]
        entry: dict[str, Any] = {"title": factor.title, "question": factor.question, "rows": rows}
        lines += [f"## {factor.title} (`{factor.name}`)", "", factor.question, ""]
        head_columns = factor.name not in ("base",) and any("rho" in r for r in rows)
        lines += _table(rows, head_columns) + [""]
        figure = out / "figures" / f"{factor.name}.png"
        if _factor_figure(factor, rows, figure):
            lines += [f"![{factor.title}](figures/{figure.name})", ""]
        if factor.name == "corrupt":
            entry["sigma"] = {}
            for row in factor.rows:
                if row.label == "PAD − L2":
                    stats = corruption_stats(root, row)
                    entry["sigma"][row.value] = stats
                    lines += [_corruption_line(row.value, stats)]
            lines.append("")
        if factor.name == "form":
            per_element = next((r for r in factor.rows if r.value.startswith("per element (reference)")), None)
            if per_element is not None:
                dims = dimension_stats(root, per_element.treatment)
                entry["dimensions"] = dims
                if dims:
                    lines += [_dimension_line(dims), ""]
        if factor.name == "stall":
            entry["stall"] = {label: stall_stats(root, keys) for label, keys in factor.report.items()}
            for label, st in entry["stall"].items():
                lines.append(f"- {label}: {st['stuck']} of {st['runs']} runs at chance (test top-1 < {CHANCE:g} %); "
                             "test top-1 per seed " + ", ".join(f"{fmt(v)}" for v in st["top1"].values()))
            lines.append("")
        if factor.report:
            teacher = teachers.get("mnist" if factor.name == "stall" else "digits")
            report = _report(root, out, factor, "mnist" if factor.name == "stall" else "digits", teacher, command)
            if report is not None:
                entry["report"] = str(report.relative_to(out))
                lines += [f"Learning curves and σ² diagnostics: [{entry['report']}]({entry['report']})", ""]
        results["factors"][factor.name] = entry
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "study.md").write_text("\n".join(lines).rstrip() + "\n")
    return results


def _interval(stat: dict[str, Any] | None, digits: int = 2) -> str:
    if not stat:
        return "n/a"
    if stat.get("low") is None:
        return fmt(stat["mean"], digits, sign=True)
    return (f"{fmt(stat['mean'], digits, sign=True)} [{fmt(stat['low'], digits, sign=True)}, "
            f"{fmt(stat['high'], digits, sign=True)}]")


def _corruption_line(value: str, stats: dict[str, Any]) -> str:
    if not stats.get("n"):
        return f"- {value}: no training-split records with PAD's σ²."
    weight = stats.get("weight_corrupt", {})
    return (f"- {value} ({stats['n']} seeds, stage-2 training records of PAD-L2): mean log σ² of the corrupted "
            f"samples minus the clean ones {_interval(stats.get('d_log_var'))}; mean log d, corrupted minus clean "
            f"{_interval(stats.get('d_log_d'))}; PAD's mean relative weight of a corrupted sample "
            f"{fmt(weight.get('mean'), 3)} (1 = the batch average).")


def _dimension_line(d: dict[str, Any]) -> str:
    return (f"Per-element PAD, test records averaged over {d['n']} seeds: log σ² spreads by {fmt(d['sd_dims'])} "
            f"across feature dimensions (each averaged over samples; log d by {fmt(d['sd_log_d_dims'])}, ρ(σ², d) "
            f"{fmt(d['rho_dims'], 3)}) and by {fmt(d['sd_samples'])} across samples (each averaged over "
            f"dimensions; log d by {fmt(d['sd_log_d_samples'])}, ρ {fmt(d['rho_samples'], 3)}).")


