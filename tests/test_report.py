"""Report: statistics, verdicts, and a full report.md + PNGs from a synthetic demo directory."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps

from padkd.data import DATASETS
from padkd.errors import PadkdError
from padkd.report import format_table, summarize, write_report
from padkd.report.stats import mean_std, paired_ci, spearman

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("learning_curves", "sigma_vs_error", "sigma_by_teacher", "prime_images")
LABELS = {"l2": "L2 hint (epoch-matched)", "pad_l2": "PAD-L2 (two-stage)", "kd": "KD (T=4)"}
TOP1 = {"l2": {"0": 93.1, "1": 92.5}, "pad_l2": {"0": 94.0, "1": 93.6}, "kd": {"0": 91.0, "1": 92.9}}
BEST = {"l2": {"0": 93.4, "1": 92.8}, "pad_l2": {"0": 94.2, "1": 93.9}, "kd": {"0": 91.5, "1": 93.0}}


# ---------------------------------------------------------------------------------------------- stats
def test_mean_std_sample_std_and_single_value():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_paired_ci_student_t():
    mean, low, high = paired_ci([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])  # diffs 1, 2, 3
    assert mean == pytest.approx(2.0)
    assert low == pytest.approx(2.0 - 2.4841, abs=1e-4)
    assert high == pytest.approx(2.0 + 2.4841, abs=1e-4)
    assert paired_ci([3.0], [1.0]) == (2.0, None, None)
    with pytest.raises(ValueError):
        paired_ci([1.0, 2.0], [1.0])


def test_spearman_monotone_nan_safe_and_degenerate():
    x = np.arange(1.0, 11.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    assert spearman([*x, math.nan], [*x**3, 5.0]) == pytest.approx(1.0)
    assert math.isnan(spearman(x, np.ones_like(x)))


# ---------------------------------------------------------------------------------------------- verdicts
def results_for(top1: dict[str, dict[str, float]], seeds: list[int]) -> dict[str, Any]:
    return {"methods": list(top1), "labels": {m: m.upper() for m in top1}, "baseline": "base", "seeds": seeds,
            "test_top1": top1, "best_test_top1": top1}


def test_summarize_verdicts():
    base = {"0": 90.0, "1": 91.0, "2": 92.0}
    rows = summarize(results_for({
        "base": base,
        "up": {s: v + 1.0 + 0.1 * i for i, (s, v) in enumerate(base.items())},
        "down": {s: v - 1.0 - 0.1 * i for i, (s, v) in enumerate(base.items())},
        "noisy": {s: v + d for (s, v), d in zip(base.items(), [2.0, -2.0, 0.5], strict=True)},
    }, [0, 1, 2]))
    by = {r["method"]: r for r in rows}
    assert by["up"]["verdict"] == "better" and by["up"]["ci_low"] > 0
    assert by["down"]["verdict"] == "worse" and by["down"]["ci_high"] < 0
    assert by["noisy"]["verdict"] == "not distinguishable"
    assert by["base"]["verdict"] == "baseline" and by["base"]["diff_mean"] is None
    assert by["up"]["diff_mean"] == pytest.approx(1.1)
    assert by["up"]["mean"] == pytest.approx(92.1) and by["up"]["n"] == 3
    table = format_table(rows)
    assert all(m.upper() in table for m in by) and len(table.splitlines()) == len(rows) + 2


def test_summarize_single_seed_has_no_interval():
    rows = summarize(results_for({"base": {"0": 90.0}, "other": {"0": 95.0}}, [0]))
    other = rows[1]
    assert other["diff_mean"] == pytest.approx(5.0)
    assert other["ci_low"] is None and other["verdict"] == "n/a" and other["std"] == 0.0


# ---------------------------------------------------------------------------------------------- full report
def write_metrics(run_dir: Path, stages: list[tuple[str, int]], start: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines, step = [], 0
    for index, (name, epochs) in enumerate(stages):
        for epoch in range(1, epochs + 1):
            step += 10
            lines.append({"event": "epoch", "stage": index, "stage_name": name, "epoch": epoch, "global_step": step,
                          "lr": 0.01, "train": {"task": 0.5, "total": 0.5},
                          "val": {"top1": start + 2.0 * step / 10, "top5": 99.0, "loss": 0.3},
                          "time_s": 0.1, "samples_per_s": 1000.0})
    lines.append({"event": "final", "best_val_top1": lines[-1]["val"]["top1"]})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def write_records(path: Path, columns: dict[str, list[float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(columns))
        writer.writerows(zip(*columns.values(), strict=True))


@pytest.fixture(scope="module")
def test_labels() -> list[int]:
    return [int(label) for _, label, _ in DATASETS.create("digits").test]


def make_demo(root: Path, labels: list[int], dataset: str = "digits") -> dict[str, Any]:
    """A two-seed demo directory: baseline, PAD (two stages, with records) and KD; returns the PAD records."""
    seeds = [0, 1]
    runs = {m: {str(s): f"seed{s}/{m}" for s in seeds} for m in LABELS}
    results = {"dataset": dataset, "methods": list(LABELS), "labels": LABELS, "baseline": "l2", "pad": "pad_l2",
               "pad_term": "hint", "seeds": seeds, "runs": runs, "teacher_run": "teacher", "test_top1": TOP1,
               "best_test_top1": BEST, "teacher_test_top1": 98.9,
               "epochs": {"stage1": 3, "stage2": 2, "total": 5}, "seconds": 12.3, "command": "padkd demo --seeds 2"}
    (root / "results.json").write_text(json.dumps(results))
    write_metrics(root / "teacher", [("teacher", 5)], 90.0)
    for m in LABELS:
        for s in seeds:
            stages = [("l2", 3), ("pad", 2)] if m == "pad_l2" else [(m, 5)]
            write_metrics(root / runs[m][str(s)], stages, 80.0 + s)
    rng = np.random.default_rng(0)
    n = 30
    index = list(range(0, 10 * n, 10))
    target = [labels[i] for i in index]
    teacher_pred = [(t + 1) % 10 if k % 7 == 3 else t for k, t in enumerate(target)]
    discrepancy = np.exp(rng.uniform(-4.0, 1.0, n))
    log_var = np.log(discrepancy) + rng.normal(0.0, 0.1, n)
    columns = {"index": index, "target": target, "student_pred": target,
               "student_confidence": rng.uniform(0.5, 1.0, n).tolist(), "teacher_pred": teacher_pred,
               "teacher_confidence": rng.uniform(0.3, 1.0, n).tolist(),
               "teacher_true_prob": rng.uniform(0.3, 1.0, n).tolist(), "hint.discrepancy": discrepancy.tolist(),
               "hint.weight": np.exp(-log_var).tolist(), "hint.log_var": log_var.tolist()}
    pad_run = root / runs["pad_l2"]["0"]
    write_records(pad_run / "records" / "1-pad-test.csv", columns)
    # An earlier stage without the PAD column: must be passed over.
    write_records(pad_run / "records" / "0-l2-test.csv", {k: v for k, v in columns.items() if k != "hint.log_var"})
    return columns


def is_png(path: Path) -> bool:
    return path.stat().st_size > 100 and path.read_bytes()[:8] == PNG_SIGNATURE


def test_write_report_from_demo_dir(tmp_path: Path, test_labels: list[int]):
    columns = make_demo(tmp_path, test_labels)
    report = write_report(tmp_path)
    assert report == tmp_path / "report.md"
    text = report.read_text()
    for label in LABELS.values():
        assert label in text
    mean, std = np.mean(list(TOP1["pad_l2"].values())), np.std(list(TOP1["pad_l2"].values()), ddof=1)
    assert f"{mean:.2f} ± {std:.2f}" in text
    rho = sps.spearmanr(columns["hint.log_var"], columns["hint.discrepancy"]).statistic
    assert f"**{rho:.3f}**" in text
    rho_conf = sps.spearmanr(columns["hint.log_var"], columns["teacher_confidence"]).statistic
    assert f"{rho_conf:.3f}".replace("-", "\u2212") in text
    n_wrong = sum(p != t for p, t in zip(columns["teacher_pred"], columns["target"], strict=True))
    assert f"(n = {n_wrong})" in text and "records/1-pad-test.csv" in text
    assert "PAD-L2 (two-stage) \u2212 L2 hint (epoch-matched) = +1.00 top1 over 2 paired seed(s)" in text
    assert "padkd demo --seeds 2" in text and "Teacher test top1: 98.90" in text and "easy to mimic" in text
    assert "Wall time: 12.3 s" in text and "QUICK RUN" not in text
    for name in PLOTS:
        path = tmp_path / "plots" / f"{name}.png"
        assert is_png(path), name
        assert f"](plots/{name}.png)" in text


def test_report_skips_what_it_cannot_draw(tmp_path: Path, test_labels: list[int]):
    make_demo(tmp_path, test_labels, dataset="other")
    results = json.loads((tmp_path / "results.json").read_text())
    del results["seconds"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    assert "Wall time" not in text  # unknown: no line, never "n/a"
    assert "Not drawn: test images are drawn only for digits" in text
    assert not (tmp_path / "plots" / "prime_images.png").exists()
    assert is_png(tmp_path / "plots" / "sigma_vs_error.png")
    for csv_path in (tmp_path / "seed0" / "pad_l2" / "records").iterdir():
        csv_path.unlink()
    text = write_report(tmp_path).read_text()
    assert "No variance summary: no records CSV (test, val or train split) with a `hint.log_var` column" in text


def test_report_needs_results_json(tmp_path: Path):
    with pytest.raises(PadkdError, match="results.json"):
        write_report(tmp_path)


# ---------------------------------------------------------------------------------------------- any runs
def fake_run(root: Path, name: str, seed: int, weighting: str, top1: float, labels: list[int] | None = None,
             elements: bool = False) -> Path:
    """A finished two-stage run directory as `padkd train` writes it (config, final, metrics, records)."""
    run = root / name
    config = {"name": name, "output_dir": str(run), "seed": seed, "log": {"tensorboard": False},
              "data": {"name": "digits", "batch_size": 64},
              "student": {"model": {"name": "cnn", "widths": [4, 32]}},
              "stages": [{"name": "l2", "epochs": 3, "terms": [{"name": "hint", "weighting": {"name": "uniform"}}]},
                         {"name": "s2", "epochs": 2, "terms": [{"name": "hint", "weighting": {"name": weighting}}]}]}
    write_metrics(run, [("l2", 3), ("s2", 2)], 80.0 + seed)
    (run / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    (run / "final.json").write_text(json.dumps({"primary_metric": "top1", "last": {"top1": top1},
                                                "best": {"top1": top1 + 0.5}}))
    if weighting == "pad" and labels is not None:
        rng = np.random.default_rng(seed)
        n = 20
        d = np.exp(rng.uniform(-3.0, 0.0, n))
        log_var = np.log(d) * 0.5 + rng.normal(0.0, 0.05, n)
        write_records(run / "records" / "1-s2-test.csv", {
            "index": list(range(n)), "target": labels[:n], "teacher_pred": labels[:n],
            "teacher_confidence": rng.uniform(0.5, 1.0, n).tolist(), "hint.discrepancy": d.tolist(),
            "hint.weight": np.ones(n).tolist(), "hint.log_var": log_var.tolist()})
        if elements:
            e = 6
            dim_d = np.exp(np.linspace(-4.0, 1.0, e))
            write_records(run / "records" / "1-s2-test.hint.elements.csv", {
                "element": list(range(e)), "discrepancy": dim_d.tolist(), "log_var": (np.log(dim_d) * 0.9).tolist(),
                "inv_var": np.exp(-np.log(dim_d) * 0.9).tolist()})
    return run


def test_report_runs_groups_settings_and_pairs_by_seed(tmp_path: Path, test_labels: list[int]):
    from padkd.report import report_runs

    l2 = {0: 90.0, 1: 91.0, 2: 92.5}
    pad = {0: 91.0, 1: 91.5, 2: 93.0}
    runs = [fake_run(tmp_path, f"l2-{s}", s, "uniform", v) for s, v in l2.items()]
    runs += [fake_run(tmp_path, f"pad-{s}", s, "pad", v, test_labels, elements=(s == 0)) for s, v in pad.items()]
    out = tmp_path / "report"
    report = report_runs(runs, out)
    results = json.loads((out / "results.json").read_text())
    assert results["varying"] == ["stages.1.terms.0.weighting.name"]
    assert results["methods"] == ["weighting.name=uniform", "weighting.name=pad"]
    assert results["baseline"] == "weighting.name=uniform" and results["seeds"] == ["0", "1", "2"]
    diffs = [pad[s] - l2[s] for s in l2]
    mean = float(np.mean(diffs))
    half = float(sps.t.ppf(0.975, 2)) * float(np.std(diffs, ddof=1)) / math.sqrt(3)
    text = report.read_text()
    def signed(x: float) -> str:
        return f"{x:+.2f}".replace("-", "\u2212")

    assert f"[{signed(mean - half)}, {signed(mean + half)}]" in text and signed(mean) in text
    assert "](plots/factor.png)" in text and is_png(out / "plots" / "factor.png")
    assert "](plots/sigma_per_dimension.png)" in text and is_png(out / "plots" / "sigma_per_dimension.png")
    dim_d = np.exp(np.linspace(-4.0, 1.0, 6))
    assert f"log σ² spreads by {np.std(np.log(dim_d) * 0.9):.2f}" in text
    assert f"log d by {np.std(np.log(dim_d)):.2f}" in text
    assert is_png(out / "plots" / "learning_curves.png")
    # another baseline, by its label
    report_runs(runs, out, baseline="weighting.name=pad")
    assert json.loads((out / "results.json").read_text())["baseline"] == "weighting.name=pad"


def test_report_runs_refuses_what_is_not_a_set_of_finished_runs(tmp_path: Path):
    from padkd.report import report_runs

    a = fake_run(tmp_path, "a", 0, "uniform", 90.0)
    b = fake_run(tmp_path, "b", 0, "uniform", 91.0)
    with pytest.raises(PadkdError, match="same setting and seed"):
        report_runs([a, b], tmp_path / "r")
    (b / "final.json").unlink()
    with pytest.raises(PadkdError, match="has not finished"):
        report_runs([a, b], tmp_path / "r")
    with pytest.raises(PadkdError, match="no config.yaml"):
        report_runs([tmp_path], tmp_path / "r")
    with pytest.raises(PadkdError, match="--baseline 'x' names no setting"):
        report_runs([a], tmp_path / "r", baseline="x")


def test_padkd_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from padkd.cli import main

    runs = [fake_run(tmp_path, f"{w}-{s}", s, w, 90.0 + s + (w == "ohem")) for w in ("uniform", "ohem")
            for s in (0, 1)]
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "rep")]) == 0
    assert "report:" in capsys.readouterr().out
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "weighting.name=ohem" in text and "+1.00" in text and "No variance summary" in text


# ---------------------------------------------------------------------------------------------- every task
class _Perplexity:
    """A lower-is-better task as a plugin would register it (only its metadata is read by the report)."""

    primary_metric = "perplexity"
    higher_is_better = False


def task_run(root: Path, name: str, task: str, seed: int, metrics: dict[str, float], weighting: str,
             records: dict[str, list[float]] | None = None, val: bool = True) -> Path:
    """A finished one-stage run of `task` in the on-disk format of `padkd train`: config.yaml, metrics.jsonl
    (epoch events with `"val": null` when `val` is False, as runs without a validation split write),
    final.json (`best` only with a validation split) and a records CSV."""
    run = root / name
    run.mkdir(parents=True)
    primary = next(iter(metrics))
    config = {"name": name, "output_dir": str(run), "seed": seed, "task": {"name": task},
              "data": {"name": f"{task}-data", "batch_size": 8}, "student": {"model": {"name": "m"}},
              "stages": [{"name": "main", "epochs": 2, "terms": [
                  {"name": "hint", "method": {"name": "hint"}, "weighting": {"name": weighting}}]}]}
    (run / "config.yaml").write_text(json.dumps(config))
    events = [{"event": "epoch", "stage": 0, "stage_name": "main", "epoch": e, "global_step": 4 * e, "lr": 0.01,
               "train": {"task": 1.0 / e, "total": 1.5 / e},
               "val": {k: v * (0.9 + 0.05 * e) for k, v in metrics.items()} if val else None,
               "time_s": 0.1, "samples_per_s": 10.0} for e in (1, 2)]
    final = {"primary_metric": primary, "best_val": metrics[primary] if val else None,
             "best_stage_epoch": [0, 2] if val else None, "split": "test", "last": metrics}
    if val:
        final["best"] = metrics
    events.append({"event": "final", **final})
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "final.json").write_text(json.dumps(final))
    if records is not None:
        write_records(run / "records" / "0-main-test.csv", records)
    return run


def _pad_columns(n: int, seed: int) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    d = np.exp(rng.uniform(-3.0, 1.0, n))
    return {"hint.discrepancy": d.tolist(), "hint.weight": np.ones(n).tolist(),
            "hint.log_var": (np.log(d) + rng.normal(0.0, 0.1, n)).tolist()}


TASK_CASES = {
    # task: (primary metric, metrics per (weighting, seed), the task's own record columns, validation split)
    "classification": ("top1", lambda w, s: {"top1": 90.0 + s + (w == "pad"), "top5": 99.0, "loss": 0.3},
                       lambda n: {"index": list(range(n)), "target": [i % 3 for i in range(n)],
                                  "teacher_pred": [i % 3 if i % 4 else 0 for i in range(n)],
                                  "teacher_confidence": np.linspace(0.4, 1.0, n).tolist()}, True),
    "retrieval": ("recall@1", lambda w, s: {"recall@1": 80.0 + s + 2.0 * (w == "pad"), "nmi": 0.6},
                  lambda n: {"index": list(range(n)), "target": [i % 3 for i in range(n)],
                             "student_nn1": [(i + 1) % n for i in range(n)],
                             "teacher_correct": [int(i % 5 != 0) for i in range(n)]}, False),
    "detection": ("mAP", lambda w, s: {"mAP": 0.20 + 0.01 * s + 0.02 * (w == "pad"), "AP50": 0.4},
                  lambda n: {"index": list(range(n)), "gt_boxes": [2.0] * n, "detections": [1.0] * n,
                             "recall50": [0.5] * n, "precision50": [1.0] * n}, False),
    "lm_test": ("perplexity", lambda w, s: {"perplexity": 40.0 + s - 3.0 * (w == "pad"), "loss": 3.7},
                lambda n: {"index": list(range(n))}, True),
}


@pytest.mark.parametrize("task", list(TASK_CASES))
def test_report_runs_of_every_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str):
    """Runs of each task are reported by its primary metric and direction: PAD is better in every case (higher
    top1, recall@1 and mAP; lower perplexity), `"val": null` epochs make a training-loss curve, and neither
    report.md nor results.json names a path of this machine."""
    from padkd.report import report_runs
    from padkd.tasks import TASKS

    monkeypatch.setitem(TASKS._entries, "lm_test", _Perplexity)
    metric, scores, columns, val = TASK_CASES[task]
    runs = [task_run(tmp_path / "runs", f"{w}-{s}", task, s, scores(w, s), w,
                     {**columns(12), **_pad_columns(12, s)} if w == "pad" else None, val)
            for w in ("uniform", "pad") for s in (0, 1, 2)]
    out = tmp_path / "report"
    text = report_runs(runs, out).read_text()
    saved = (out / "results.json").read_text()
    results = json.loads(saved)
    assert results["task"] == task and results["metric"] == metric
    assert results["higher_is_better"] is (task != "lm_test")
    rows = {r["method"]: r for r in summarize(results)}
    pad = rows["weighting.name=pad"]
    assert pad["verdict"] == "better", pad
    expected = {"top1": 1.0, "recall@1": 2.0, "mAP": 0.02, "perplexity": -3.0}[metric]
    assert pad["diff_mean"] == pytest.approx(expected)
    assert f"Primary metric: {metric} ({'lower' if task == 'lm_test' else 'higher'} is better)" in text
    assert str(tmp_path) not in text and str(tmp_path) not in saved
    assert results["runs"]["weighting.name=pad"]["0"] == "../runs/pad-0"
    assert "all runs" not in text and "n/a %" not in text and "Wall time" not in text
    assert (f"Validation {metric} over training" if val else "Training loss over training") in text
    assert is_png(out / "plots" / "learning_curves.png") and is_png(out / "plots" / "sigma_vs_error.png")
    assert "## Every test metric" in text
    teacher_figure = task in ("classification", "retrieval")
    assert ("](plots/sigma_by_teacher.png)" in text) is teacher_figure
    assert ("Mean log σ²: teacher correct" in text) is teacher_figure


def test_report_runs_refuses_runs_of_different_tasks(tmp_path: Path):
    from padkd.report import report_runs

    a = task_run(tmp_path, "a", "classification", 0, {"top1": 90.0}, "uniform")
    b = task_run(tmp_path, "b", "detection", 1, {"mAP": 0.2}, "uniform", val=False)
    with pytest.raises(PadkdError, match=r"different tasks .*classification \(top1\), detection \(mAP\)"):
        report_runs([a, b], tmp_path / "r")
    c = task_run(tmp_path, "c", "unheard_of", 0, {"x": 1.0}, "uniform")
    with pytest.raises(PadkdError, match="task 'unheard_of', which is not registered"):
        report_runs([c], tmp_path / "r")


def test_a_single_setting_is_named_by_its_terms(tmp_path: Path):
    from padkd.report import report_runs

    runs = [task_run(tmp_path, f"r{s}", "classification", s, {"top1": 90.0 + s}, "pad") for s in (0, 1)]
    results = json.loads((report_runs(runs, tmp_path / "r").parent / "results.json").read_text())
    assert results["methods"] == ["hint (pad)"]


def test_a_resumed_run_stays_with_its_seeds(tmp_path: Path):
    """A resume may change how data are loaded (and the first start may have loaded them otherwise): the run
    is still a seed of its setting, and the report lists its resume."""
    from padkd.report import report_runs

    runs = [task_run(tmp_path, f"r{s}", "classification", s, {"top1": 90.0 + s}, "uniform") for s in (0, 1)]
    config = json.loads((runs[1] / "config.yaml").read_text())
    config["data"]["num_workers"] = 2
    (runs[1] / "config.yaml").write_text(json.dumps(config))
    resume = {"event": "resume", "stage": 0, "epoch": 1, "batch": 0, "global_step": 4, "checkpoint": "last.pt",
              "changes": {"data.num_workers": {"was": 2, "now": 0}}}
    lines = (runs[1] / "metrics.jsonl").read_text().splitlines(keepends=True)
    (runs[1] / "metrics.jsonl").write_text(lines[0] + json.dumps(resume) + "\n" + "".join(lines[1:]))
    text = report_runs(runs, tmp_path / "r").read_text()
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["methods"] == ["hint (uniform)"] and set(results["runs"]["hint (uniform)"]) == {"0", "1"}
    assert "seed 1: resumed at stage 0 epoch 1 batch 0, changing `data.num_workers` 2 → 0." in text


def test_a_failed_report_leaves_no_results_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from padkd.report import plots, report_runs

    runs = [task_run(tmp_path, f"r{s}", "classification", s, {"top1": 90.0 + s}, "uniform") for s in (0, 1)]
    out = tmp_path / "r"
    out.mkdir()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "learning_curves", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        report_runs(runs, out)
    assert not (out / "results.json").exists() and not (out / "report.md").exists()


def test_quick_reports_judge_nothing(tmp_path: Path):
    from padkd.report.markdown import QUICK_NOTE

    results = results_for({"base": {"0": 90.0, "1": 91.0, "2": 92.0}, "up": {"0": 95.0, "1": 96.5, "2": 97.0}},
                          [0, 1, 2])
    assert summarize(results)[1]["verdict"] == "better"
    results |= {"quick": True, "last": results["test_top1"]}
    rows = summarize(results)
    assert rows[1]["verdict"] == "not judged (quick run)" and rows[1]["diff_mean"] == pytest.approx(5.1666, abs=1e-3)
    assert format_table(rows, quick=True).startswith(QUICK_NOTE)
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    assert QUICK_NOTE in text and "| better |" not in text and "better (the interval" not in text


def test_distributions_draw_points_below_the_box_threshold():
    from matplotlib.figure import Figure

    from padkd.report.plots import MIN_BOX, distributions

    ax = Figure().add_subplot()
    distributions(ax, [np.arange(2.0), np.arange(float(MIN_BOX))], ["two", "ten"])
    assert len(ax.collections) == 2  # the two points (a scatter) and their mean bar
    assert len(ax.lines) == 6  # one box: box, median, two whiskers, two caps
    assert [t.get_text() for t in ax.get_xticklabels()] == ["two\n(n=2)", f"ten\n(n={MIN_BOX})"]


def test_per_dimension_panels_do_not_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from padkd.report.plots import per_dimension_figure

    rng = np.random.default_rng(0)
    fig = per_dimension_figure(rng.normal(size=40), np.exp(rng.normal(size=40)), rng.normal(size=200),
                               np.exp(rng.normal(size=200)))
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    left, right = fig.axes
    assert right.yaxis.label.get_window_extent(renderer).x0 > left.get_tightbbox(renderer).x1


def test_setting_names_show_paths_relative_to_the_report(tmp_path: Path):
    from padkd.report import report_runs

    runs = [task_run(tmp_path / "runs", f"r{s}", "classification", s, {"top1": 90.0 + s}, "uniform") for s in (0, 1)]
    for run, teacher in zip(runs, ("t1", "t2"), strict=True):
        config = json.loads((run / "config.yaml").read_text())
        config["teacher"] = {"model": {"name": "m"}, "checkpoint": str(tmp_path / teacher / "checkpoints" / "best.pt")}
        (run / "config.yaml").write_text(json.dumps(config))
    text = report_runs(runs, tmp_path / "runs" / "report").read_text()
    assert json.loads((tmp_path / "runs" / "report" / "results.json").read_text())["methods"] == [
        "teacher.checkpoint=../../t1/checkpoints/best.pt", "teacher.checkpoint=../../t2/checkpoints/best.pt"]
    assert str(tmp_path) not in text
