"""`padkd demo --task detection`: detection distillation on SYNTHETIC shapes in the COCO format, on the CPU.

Writes a small COCO-format data set of coloured shapes on textured backgrounds (`OUT/data`, read back by the
`coco` data set), trains a Faster R-CNN teacher (small CNN backbone with FPN), then per seed three students
with a narrower backbone over the same schedule:
  none      the detector's own losses only
  fgfi      + FGFI masked imitation of the FPN levels, uniform (weight 0.01, the FGFI authors')
  pad_fgfi  + the same FGFI discrepancies weighted by PAD per location (conv1x1 variance head), weight 0.3
Only the distillation term differs. PAD's effective weight on a location is weight/σ², and σ² tracks the
discrepancy, which falls from about 150 per imitated location to about 33 here as the adapters learn: weight
0.3 ≈ 0.01 × 33 gives PAD-FGFI about FGFI's effective weight once the imitation has settled, so PAD mostly
redistributes it over locations. (With PAD's usual weight 1, three times that, the student of a first run,
one seed, was worse than the one trained without distillation.)
Writes results.json and report.md (COCO mAP with paired intervals, every COCO stat, learning curves of the
training loss, detections drawn on validation images for the teacher and the students, what PAD's variance
shows) and prints the table. Every number is measured on SYNTHETIC data and says nothing about real images.
Runs on one CPU thread (`padkd.demos.single_thread`), as the retrieval demo does.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from padkd.demos import begin, command, single_thread
from padkd.demos.shapes import CATEGORIES, write_shapes_coco

SYNTHETIC = "SYNTHETIC data (shapes pasted on textures): these numbers say nothing about real images"
COMMON = {"name": "fasterrcnn", "backbone": "cnn", "min_size": 64, "max_size": 64, "anchor_size": 8,
          "proposals": 100, "box_batch_size_per_image": 64, "detections_per_image": 20}
TEACHER = {**COMMON, "widths": [16, 32, 64, 128], "fpn_channels": 64, "representation_size": 256}
STUDENT = {**COMMON, "widths": [8, 16, 32, 64], "fpn_channels": 32, "representation_size": 128}
FGFI = {"name": "fgfi", "method": {"name": "fgfi"}, "student": ["fpn", "gt"], "teacher": "fpn"}
TERMS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "fgfi": [FGFI],
    "pad_fgfi": [{**FGFI, "weight": 0.3, "embedding": "fpn", "weighting": {"name": "pad", "head": "conv1x1"}}],
}
LABELS = {"none": "no distillation", "fgfi": "FGFI (uniform)", "pad_fgfi": "PAD-FGFI (per location)"}


#: COCO stats shown in the report's table of every metric (the runs record all twelve). Every shape is small
#: (under 32² pixels on 64×64 images), so COCO gives APm and APl as −1 (no such objects) and they are left out.
METRIC_NAMES = ["mAP", "AP50", "AP75", "APs", "AR@1", "AR@10", "AR@100"]
#: Validation images the report draws detections on, and the score from which a detection is drawn (low: the
#: quick students' scores rarely reach 0.5).
N_DRAWN, DRAW_SCORE = 4, 0.3


def schedule(quick: bool) -> dict[str, int]:
    """Images per split and epochs of the teacher and of each student. `quick` is a small schedule that
    learns something visible (one seed: teacher mAP 0.197, students 0.030-0.089, 218 s on a shared 2-core
    machine; docs/detection.md); 96 images and 6 teacher epochs left the teacher at mAP 0.023."""
    if quick:
        return {"train": 256, "val": 32, "teacher_epochs": 8, "student_epochs": 6}
    return {"train": 400, "val": 100, "teacher_epochs": 10, "student_epochs": 8}


def _config(name: str, run_dir: Path, data: Path, model: dict[str, Any], epochs: int, seed: int,
            terms: list[dict[str, Any]], teacher: Path | None) -> dict[str, Any]:
    """One run: the synthetic COCO data (evaluated on its val split at the end), AdamW."""
    raw: dict[str, Any] = {
        "name": name, "output_dir": str(run_dir), "seed": seed, "device": "cpu",
        "data": {"name": "coco", "root": str(data), "train": "train", "val": None, "test": "val", "batch_size": 8},
        "task": {"name": "detection"}, "student": {"model": model}, "records": {"splits": ["test"]},
        "log": {"tensorboard": False, "progress": "none"},
        "stages": [{"name": "train", "epochs": epochs, "terms": copy.deepcopy(terms),
                    "optimizer": {"name": "adamw", "lr": 0.002, "weight_decay": 1e-4}}],
    }
    if teacher is not None:
        raw["teacher"] = {"model": TEACHER, "checkpoint": str(teacher)}
    return raw


def _load(run_dir: Path, model: dict[str, Any], data: Any, task: Any) -> torch.nn.Module:
    """The trained detector of `run_dir` (its best checkpoint, else its last), in eval mode."""
    from padkd.assemble import make_model
    from padkd.config import Component, ModelRef

    return make_model(ModelRef(model=Component(**model), checkpoint=str(run_dir)), data, task, "model").eval()


@torch.no_grad()
def detections_figure(out: Path, results: dict[str, Any]) -> dict[str, str]:
    """The first N_DRAWN validation images with their ground-truth boxes (dashed) and the detections scored
    at least DRAW_SCORE (solid, labelled) of the teacher and of seed 0 of every student; the report's entry."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from padkd.assemble import make_data, make_task
    from padkd.config import parse_config
    from padkd.report.plots import save

    cfg = parse_config(_config("figure", out / "unused", out / "data", STUDENT, 1, 0, [], None))
    data, task = make_data(cfg), make_task(cfg.task)
    models = [("teacher", _load(out / "teacher", TEACHER, data, task))] + [
        (results["labels"][m], _load(out / "seed0" / m, STUDENT, data, task)) for m in results["methods"]]
    shown = min(N_DRAWN, len(data.test))
    fig = Figure(figsize=(2.2 * len(models), 2.3 * shown), layout="constrained")
    axes = fig.subplots(shown, len(models), squeeze=False)
    colours = ("tab:red", "tab:blue", "tab:green", "tab:orange")
    for i in range(shown):
        image, target, _ = data.test[i]
        for j, (name, model) in enumerate(models):
            ax = axes[i, j]
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for x1, y1, x2, y2 in target["boxes"].tolist():
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linestyle="--",
                                       linewidth=1))
            found = model([image])[0]
            keep = found["scores"] >= DRAW_SCORE
            for (x1, y1, x2, y2), label, score in zip(found["boxes"][keep].tolist(), found["labels"][keep].tolist(),
                                                       found["scores"][keep].tolist(), strict=True):
                colour = colours[(label - 1) % len(colours)]
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5))
                name_of = CATEGORIES[label - 1] if 0 < label <= len(CATEGORIES) else str(label)
                ax.text(x1, y1, f"{name_of} {score:.2f}", color="white", fontsize=5, va="bottom",
                        bbox={"facecolor": colour, "alpha": 0.7, "pad": 0.5, "linewidth": 0})
            if i == 0:
                ax.set_title(name, fontsize=8)
    save(fig, out / "plots" / "detections.png", dpi=110)
    return {"title": "Detections on validation images", "path": "plots/detections.png", "caption": (
        f"The first {shown} synthetic validation images; dashed white: ground-truth boxes; solid: detections "
        f"scored at least {DRAW_SCORE}, labelled with class and score, for the teacher and seed 0 of every "
        "student (columns).")}


def run_detection_demo(out: Path, seeds: int = 1, quick: bool = False, quiet: bool = False,
                       overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Generate the synthetic data, train the teacher and every student over `seeds` paired seeds, write
    results.json and the report, and print the table. `resume`: reuse the finished runs in `out` and
    continue the interrupted one."""
    with single_thread():
        return _run(Path(out), seeds, quick, quiet, overwrite, resume)


def _run(out: Path, seeds: int, quick: bool, quiet: bool, overwrite: bool, resume: bool) -> dict[str, Any]:
    from padkd.report import format_table, summarize, write_report

    say, runs, shown_seeds, start = begin("detection", out, seeds, 1, quick, quiet, overwrite, resume)
    plan = schedule(quick)

    say(f"[demo] {SYNTHETIC}")
    write_shapes_coco(out / "data", {"train": plan["train"], "val": plan["val"]}, size=64)
    say(f"[demo] wrote {plan['train']} + {plan['val']} synthetic 64x64 images in the COCO format to {out / 'data'}")
    t0 = time.perf_counter()
    teacher = runs.train(_config("demo-det-teacher", out / "teacher", out / "data", TEACHER, plan["teacher_epochs"],
                                 0, [], None))
    say(f"[demo] teacher mAP {teacher['last']['mAP']:.3f} AP50 {teacher['last']['AP50']:.3f} "
        f"({time.perf_counter() - t0:.0f}s, synthetic)")
    results: dict[str, Any] = {
        "dataset": "synthetic shapes (COCO format)", "task": "detection", "metric": "mAP", "higher_is_better": True,
        "data": SYNTHETIC, "synthetic": True, "notes": [f"**{SYNTHETIC}.**"], "quick": quick,
        "methods": list(TERMS), "labels": LABELS, "baseline": "none", "pad": "pad_fgfi", "pad_term": "fgfi",
        "seeds": list(range(seeds)), "runs": {m: {} for m in TERMS}, "teacher_run": "teacher",
        "last": {m: {} for m in TERMS}, "best": {m: {} for m in TERMS}, "metrics": {m: {} for m in TERMS},
        "metric_names": METRIC_NAMES, "teacher_metrics": teacher["last"],
        "epochs": {"teacher": plan["teacher_epochs"], "students": plan["student_epochs"]}, "schedule": plan,
        "teacher_model": TEACHER, "student_model": STUDENT,
    }
    for seed in range(seeds):
        for method, terms in TERMS.items():
            t0 = time.perf_counter()
            final = runs.train(_config(f"demo-det-{method}-seed{seed}", out / f"seed{seed}" / method, out / "data",
                                       STUDENT, plan["student_epochs"], seed, terms, out / "teacher"))
            results["runs"][method][str(seed)] = f"seed{seed}/{method}"
            results["metrics"][method][str(seed)] = final["last"]
            results["last"][method][str(seed)] = final["last"]["mAP"]
            results["best"][method][str(seed)] = (final.get("best") or {}).get("mAP")
            say(f"[demo] seed {seed} {method:8s} mAP {final['last']['mAP']:.3f} AP50 {final['last']['AP50']:.3f} "
                f"({time.perf_counter() - t0:.0f}s, synthetic)")
    results["figures"] = [detections_figure(out, results)]
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["reused_runs"] = runs.reused
    results["command"] = command("detection", ".", shown_seeds, quick)
    report = write_report(out, results)
    print(format_results(results))
    print(format_table(summarize(results), quick))
    print(f"\nreport: {report}  ({results['seconds']:.0f}s)")
    return results


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table of COCO mAP / AP50 per student (mean over seeds), headed by the synthetic-data warning."""
    lines = [f"Detection demo on {results['data']}.",
             f"teacher: mAP {results['teacher_metrics']['mAP']:.3f}  AP50 {results['teacher_metrics']['AP50']:.3f}",
             f"{'student':28s} {'mAP':>7s} {'AP50':>7s}  seeds"]
    for method, label in results["labels"].items():
        scores = list(results["metrics"][method].values())
        maps, ap50 = [m["mAP"] for m in scores], [m["AP50"] for m in scores]
        lines.append(f"{label:28s} {sum(maps) / len(maps):7.3f} {sum(ap50) / len(ap50):7.3f}  {len(maps)}")
    lines.append(f"({results['seconds']:.0f}s on the CPU; COCO metrics on the synthetic validation images)")
    return "\n".join(lines)
