"""`padkd demo`: the embedded default on scikit-learn's digits (real data, no download).

Trains one teacher, then five students per seed over the same two-stage schedule (stage 1 then a
low-LR stage 2, so every student gets the same epochs and LR schedule):
  none     cross-entropy only
  kd       + Hinton KD in both stages
  l2       + uniform L2 hint (weight 30) in both stages (the epoch-matched control of PAD-L2)
  pad_l2   + uniform L2 hint in stage 1, PAD-L2 (fresh head, weight 1) in stage 2: the reference recipe
  ohem_l2  + uniform L2 hint in stage 1, OHEM-weighted L2 (weight 30) in stage 2 (hard mining)
Only the stage-2 term differs between l2, pad_l2 and ohem_l2. The setting is one where the L2 hint
itself helps (a 32-d student embedding and the hint at weight 30; docs/evidence.md): with an 8-d
embedding and weight 1 it did not, which left PAD nothing to refine. Writes results.json and a report.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from padkd.demos import begin, command, single_thread

TEACHER = {"name": "cnn", "widths": [32, 64, 128]}
STUDENT = {"name": "cnn", "widths": [4, 32]}
LABELS = {
    "none": "no distillation",
    "kd": "KD (T=4)",
    "l2": "L2 hint (epoch-matched)",
    "pad_l2": "PAD-L2 (two-stage)",
    "ohem_l2": "OHEM-L2 (hard mining, stage 2)",
}
#: The L2 hint's weight: at 1 (the MSE's own scale) it did not beat plain training here, at 30 it did.
HINT_WEIGHT = 30.0
HINT = {"name": "hint", "method": {"name": "hint"}, "student": "fc:in", "teacher": "fc:in", "weight": HINT_WEIGHT}
KD_TERM = {"name": "kd", "method": {"name": "kd", "temperature": 4.0}, "weight": 1.0}


def _stage2_hint(weighting: str, weight: float = HINT_WEIGHT) -> list[dict[str, Any]]:
    return [{**HINT, "weight": weight, "weighting": {"name": weighting}}]


TERMS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "none": ([], []),
    "kd": ([KD_TERM], [KD_TERM]),
    "l2": ([HINT], [HINT]),
    # the reference recipe weighs PAD 1.0 next to CE: its learned 1/σ² sets the scale (docs/pad.md)
    "pad_l2": ([HINT], _stage2_hint("pad", 1.0)),
    "ohem_l2": ([HINT], _stage2_hint("ohem")),
}


def schedule(quick: bool) -> dict[str, int]:
    e1, e2 = (2, 1) if quick else (30, 15)
    return {"stage1": e1, "stage2": e2, "total": e1 + e2}


def teacher_config(out: Path, quick: bool) -> dict[str, Any]:
    return {
        "name": "demo-teacher", "output_dir": str(out / "teacher"), "seed": 0,
        "data": {"name": "digits", "batch_size": 64},
        "student": {"model": TEACHER},
        "stages": [{"name": "train", "epochs": 3 if quick else 20, "optimizer": {"name": "sgd", "lr": 0.05}}],
        "log": {"tensorboard": False, "progress": "none"},
    }


def student_config(method: str, seed: int, out: Path, quick: bool) -> dict[str, Any]:
    """The run config of one student: the same data, schedule and optimizer for every method."""
    epochs = schedule(quick)
    stage1, stage2 = TERMS[method]
    cfg: dict[str, Any] = {
        "name": f"demo-{method}-seed{seed}", "output_dir": str(out / f"seed{seed}" / method), "seed": seed,
        "data": {"name": "digits", "batch_size": 64},
        "student": {"model": STUDENT},
        "records": {"splits": ["test"]},
        "log": {"tensorboard": False, "progress": "none"},
        "stages": [
            {"name": "stage1", "epochs": epochs["stage1"], "optimizer": {"name": "sgd", "lr": 0.05},
             "scheduler": {"name": "cosine"}, "terms": copy.deepcopy(stage1)},
            {"name": "stage2", "epochs": epochs["stage2"], "optimizer": {"name": "sgd", "lr": 0.005},
             "scheduler": {"name": "constant"}, "terms": copy.deepcopy(stage2)},
        ],
    }
    if method != "none":
        cfg["teacher"] = {"model": TEACHER, "checkpoint": str(out / "teacher")}
    return cfg


def run_demo(out: Path, seeds: int = 8, quick: bool = False, quiet: bool = False, overwrite: bool = False,
             resume: bool = False) -> dict[str, Any]:
    """Train the teacher and every student over `seeds` paired seeds; write results.json and the report.
    `resume`: reuse the finished runs in `out` and continue the interrupted one. One CPU thread unless
    `--threads` says otherwise (`padkd.demos.single_thread`)."""
    with single_thread():
        return _run(Path(out), seeds, quick, quiet, overwrite, resume)


def _run(out: Path, seeds: int, quick: bool, quiet: bool, overwrite: bool, resume: bool) -> dict[str, Any]:
    from padkd.report import format_table, summarize, write_report

    say, runs, shown_seeds, start = begin("classification", out, seeds, 8, quick, quiet, overwrite, resume)

    say(f"[demo] training the teacher {TEACHER['widths']} on digits")
    teacher_final = runs.train(teacher_config(out, quick))
    results: dict[str, Any] = {
        "dataset": "digits", "task": "classification", "metric": "top1", "higher_is_better": True,
        "methods": list(TERMS), "labels": LABELS, "baseline": "l2", "pad": "pad_l2", "pad_term": "hint",
        "seeds": list(range(seeds)), "runs": {m: {} for m in TERMS}, "teacher_run": "teacher",
        "last": {m: {} for m in TERMS}, "best": {m: {} for m in TERMS}, "metrics": {m: {} for m in TERMS},
        "metric_names": ["top1", "top5", "loss"], "teacher_metrics": teacher_final["last"],
        "epochs": schedule(quick), "student": STUDENT, "teacher": TEACHER, "quick": quick,
    }
    for seed in range(seeds):
        for method in TERMS:
            t0 = time.perf_counter()
            final = runs.train(student_config(method, seed, out, quick))
            results["runs"][method][str(seed)] = f"seed{seed}/{method}"
            results["last"][method][str(seed)] = final["last"]["top1"]
            results["best"][method][str(seed)] = final["best"]["top1"]
            results["metrics"][method][str(seed)] = final["last"]
            say(f"[demo] seed {seed} {method:8s} test top-1 {final['last']['top1']:.2f} "
                f"({time.perf_counter() - t0:.1f}s)")
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["reused_runs"] = runs.reused
    results["command"] = command("classification", ".", shown_seeds, quick)
    report = write_report(out, results)
    print(format_table(summarize(results), quick))
    print(f"\nreport: {report}  ({results['seconds']:.0f}s)")
    return results
