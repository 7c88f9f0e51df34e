"""`padkd study`: where PAD helps or hurts on the real data we have, and why (issue 10).

Every comparison pits a PAD arm against its epoch-matched control — the same stage 1, and the same
stage 2 with the base loss continued — paired by seed: a seed fixes the student's initialisation and
the data order, and the arms of one seed share their stage-1 run bit for bit (stage 2 is trained from
a copy of the stage-1 run's end-of-stage checkpoint, which resuming makes equal to an uninterrupted
two-stage run). Each factor is varied alone around one base setting in which the L2 hint itself
helps: scikit-learn digits, teacher `cnn [32, 64, 128]`, student `cnn [4, 32]`, hint on the pooled
embeddings at weight 30, 30 epochs (SGD 0.05, cosine) then 15 (SGD 0.005, constant).

Runs go to `OUT/runs/<config hash>/s<seed>` (a rerun reuses finished runs, so an interrupted study
continues), tables and figures to `OUT/study.md` and `OUT/figures/`, every number to
`OUT/results.json`, and `padkd report`'s reports of selected comparisons to `OUT/reports/`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import multiprocessing
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from padkd.errors import PadkdError

QUIET_LOG = {"tensorboard": False, "progress": "none"}
DIGITS = {"name": "digits", "batch_size": 64}
TEACHER = {"name": "cnn", "widths": [32, 64, 128]}
STUDENT = {"name": "cnn", "widths": [4, 32]}
HINT_WEIGHT = 30.0
#: FitNet between the students' and the teacher's second blocks: at the CRD benchmark's weight 100 it cost the
#: student about 11 points in a scouting run (6 seeds), at 10 about 1.5.
FITNET_WEIGHT = 10.0
#: The probe's networks (shared/probes/mnist_pad_probe_v2.py): LeNet-style, no BatchNorm.
PROBE_TEACHER = {"name": "lenet", "channels": [32, 64], "hidden": 128}
PROBE_STUDENT = {"name": "lenet", "channels": [2, 4], "hidden": 16}
#: The weightings the issue names (padkd's `polynomial` is left out of the study to save time).
WEIGHTINGS = ("uniform", "pad", "focal", "ohem", "softmax_hard", "softmax_easy", "discard_hardest")
#: A test top-1 below this (%) counts as stuck at chance (10 classes).
CHANCE = 20.0


def hint(weight: float = HINT_WEIGHT, weighting: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The L2 hint on the pooled embeddings (fc inputs), as a term config."""
    return {"name": "hint", "method": {"name": "hint"}, "student": "fc:in", "teacher": "fc:in", "weight": weight,
            "weighting": weighting or {"name": "uniform"}, **extra}


PAD = {"name": "pad"}
PAD_REFERENCE = {"name": "pad", "init": "reference", "log_var_floor": None, "warmup_steps": 0}


@dataclass(frozen=True)
class Mode:
    """How much of the study runs: seeds, schedule and which values of each factor."""

    name: str
    seeds: int
    headline_seeds: int
    method_seeds: int
    e1: int
    e2: int
    widths: tuple[tuple[int, ...], ...]
    weights: tuple[float, ...]
    subsets: tuple[int | None, ...]
    stage2: tuple[tuple[int, float], ...]
    head_lr: tuple[float, ...]
    methods: tuple[str, ...]
    weightings: tuple[str, ...]
    corruptions: tuple[tuple[str, float], ...]
    mnist_subsets: tuple[int, ...]
    stall_seeds: int
    teacher_epochs: int = 20


MODES = {
    "quick": Mode("quick", seeds=3, headline_seeds=3, method_seeds=3, e1=10, e2=5,
                  widths=((4, 8), (4, 32)), weights=(1.0, 30.0), subsets=(150, None),
                  stage2=((5, 0.005), (5, 0.05)), head_lr=(1.0, 100.0), methods=("hint", "kd"),
                  weightings=("uniform", "pad", "ohem", "softmax_easy"), corruptions=(("noise", 0.1),),
                  mnist_subsets=(), stall_seeds=0),
    "full": Mode("full", seeds=6, headline_seeds=10, method_seeds=5, e1=30, e2=15,
                 widths=((4, 8), (4, 16), (4, 32), (8, 64)), weights=(1.0, 10.0, 30.0, 100.0),
                 subsets=(150, 400, None), stage2=((5, 0.005), (15, 0.005), (45, 0.005), (15, 0.0005), (15, 0.05)),
                 head_lr=(1.0, 10.0, 100.0), methods=("hint", "fitnet", "kd", "rkd", "crd"), weightings=WEIGHTINGS,
                 corruptions=(("noise", 0.1), ("labels", 0.1)), mnist_subsets=(1000, 5000), stall_seeds=6),
}


# ------------------------------------------------------------------------------------------ configs
def _stage(name: str, epochs: int, lr: float, terms: list[dict[str, Any]], scheduler: str) -> dict[str, Any]:
    return {"name": name, "epochs": epochs, "optimizer": {"name": "sgd", "lr": lr},
            "scheduler": {"name": scheduler}, "terms": copy.deepcopy(terms)}


def two_stage(seed: int, teacher: str | None, *, stage1: list[dict[str, Any]], stage2: list[dict[str, Any]],
              mode: Mode, student: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
              teacher_model: dict[str, Any] | None = None, e1: int | None = None, e2: int | None = None,
              lr2: float = 0.005, records: tuple[str, ...] = ("test",)) -> dict[str, Any]:
    """The reference two-stage recipe: stage 1 (SGD 0.05, cosine), then stage 2 (SGD `lr2`, constant)."""
    cfg: dict[str, Any] = {
        "name": "study", "output_dir": "", "seed": seed, "data": copy.deepcopy(data or DIGITS),
        "student": {"model": copy.deepcopy(student or STUDENT)}, "records": {"splits": list(records)},
        "log": dict(QUIET_LOG),
        "stages": [_stage("stage1", e1 or mode.e1, 0.05, stage1, "cosine"),
                   _stage("stage2", e2 or mode.e2, lr2, stage2, "constant")],
    }
    if teacher is not None:
        cfg["teacher"] = {"model": copy.deepcopy(teacher_model or TEACHER), "checkpoint": teacher}
    return cfg


def single_stage(seed: int, teacher: str, *, terms: list[dict[str, Any]], epochs: int,
                 optimizer: dict[str, Any], scheduler: dict[str, Any], data: dict[str, Any],
                 student: dict[str, Any], teacher_model: dict[str, Any]) -> dict[str, Any]:
    return {"name": "study", "output_dir": "", "seed": seed, "data": copy.deepcopy(data),
            "student": {"model": copy.deepcopy(student)}, "records": {"splits": ["test"]}, "log": dict(QUIET_LOG),
            "teacher": {"model": copy.deepcopy(teacher_model), "checkpoint": teacher},
            "stages": [{"name": "single", "epochs": epochs, "optimizer": copy.deepcopy(optimizer),
                        "scheduler": copy.deepcopy(scheduler), "terms": copy.deepcopy(terms)}]}


def teacher_config(data: dict[str, Any], model: dict[str, Any], epochs: int,
                   optimizer: dict[str, Any]) -> dict[str, Any]:
    return {"name": "study-teacher", "output_dir": "", "seed": 0, "data": copy.deepcopy(data),
            "student": {"model": copy.deepcopy(model)}, "records": {"splits": []}, "log": dict(QUIET_LOG),
            "stages": [{"name": "train", "epochs": epochs, "optimizer": copy.deepcopy(optimizer)}]}


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class Spec:
    """One run of the plan: its config, the stage-1 run it continues (fork), what must finish first, and
    optionally a function that completes the config from finished runs (e.g. a weight measured in stage 1)."""

    raw: dict[str, Any]
    fork: str | None = None
    deps: tuple[str, ...] = ()
    resolve: Callable[[Path, dict[str, Any]], dict[str, Any]] | None = None


def config_key(raw: dict[str, Any]) -> str:
    """`<hash of the config without seed, name and output_dir>/s<seed>`: identical runs are shared."""
    body = {k: v for k, v in raw.items() if k not in ("seed", "name", "output_dir")}
    digest = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
    return f"{digest}/s{raw['seed']}"


@dataclass
class Plan:
    specs: dict[str, Spec] = field(default_factory=dict)

    def add(self, raw: dict[str, Any], fork: bool = False, deps: tuple[str, ...] = (),
            resolve: Callable[[Path, dict[str, Any]], dict[str, Any]] | None = None) -> str:
        """Add a run (once per distinct config); `fork`: train its stage 2 from its own stage-1 run."""
        key = config_key(raw)
        if key in self.specs:
            return key
        teacher = (raw.get("teacher") or {}).get("checkpoint")
        needs = tuple(d for d in (teacher,) if d) + deps
        parent = None
        if fork and len(raw["stages"]) > 1:
            first = copy.deepcopy(raw)
            first["stages"] = first["stages"][:1]
            parent = self.add(first, deps=deps)
            needs += (parent,)
        self.specs[key] = Spec(raw, parent, needs, resolve)
        return key


# ------------------------------------------------------------------------------------------ execution
def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def execute(run_dir: str, raw: dict[str, Any], fork_dir: str | None) -> dict[str, Any]:
    """Train one run (stage 2 from `fork_dir`'s end-of-stage-1 checkpoint when given); its final metrics."""
    from padkd.config import dump_config, parse_config
    from padkd.engine.trainer import Trainer

    out = Path(run_dir)
    raw = {**raw, "output_dir": str(out)}
    cfg = parse_config(raw)
    shutil.rmtree(out, ignore_errors=True)
    if fork_dir is None:
        return Trainer(cfg, quiet=True).run().final
    shutil.copytree(fork_dir, out, ignore=shutil.ignore_patterns(".padkd.lock", "final.json"))
    (out / "config.yaml").write_text(dump_config(cfg))
    return Trainer(cfg, resume=True, quiet=True).run().final


def run_plan(plan: Plan, root: Path, jobs: int, say: Callable[[str], None], budget_s: float | None = None
             ) -> dict[str, str]:
    """Train every run of the plan not finished yet, `jobs` at a time (dependencies first). Returns the
    runs that failed, with the reason. `budget_s`: start no run after that many seconds (the running ones
    finish); a later invocation continues where this one stopped."""
    done = {k for k in plan.specs if (root / k / "final.json").is_file()}
    failed: dict[str, str] = {}
    todo = [k for k in plan.specs if k not in done]
    total, completed, start = len(todo), 0, time.perf_counter()
    say(f"[study] {len(done)} runs already finished, {total} to train with {jobs} job(s)")
    running: dict[Future[dict[str, Any]], str] = {}
    executor = None if jobs <= 1 else ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                          initializer=_worker_init)

    def launch(key: str) -> None:
        spec = plan.specs[key]
        raw = copy.deepcopy(spec.resolve(root, spec.raw) if spec.resolve else spec.raw)
        teacher = raw.get("teacher")
        if teacher and teacher.get("checkpoint") in plan.specs:  # a run of the plan: its directory
            teacher["checkpoint"] = str((root / teacher["checkpoint"]).resolve())
        fork = str(root / spec.fork) if spec.fork else None
        if executor is None:
            future: Future[dict[str, Any]] = Future()
            try:
                future.set_result(execute(str(root / key), raw, fork))
            except Exception as err:  # noqa: BLE001  (recorded and reported; the study goes on)
                future.set_exception(err)
        else:
            future = executor.submit(execute, str(root / key), raw, fork)
        running[future] = key

    try:
        while todo or running:
            for key in list(todo):
                if budget_s is not None and time.perf_counter() - start >= budget_s:
                    say(f"[study] time budget of {budget_s / 60:g} min reached: {len(todo)} runs not started; "
                        "rerun the same command to continue (finished runs are reused)")
                    todo.clear()
                    break
                deps = plan.specs[key].deps
                if any(d in failed for d in deps):
                    failed[key] = f"depends on a failed run ({next(d for d in deps if d in failed)})"
                    todo.remove(key)
                elif all(d in done for d in deps) and (executor is None or len(running) < 2 * jobs):
                    todo.remove(key)
                    launch(key)
            if not running:
                if todo:
                    raise PadkdError(f"study plan: runs wait for runs that are not in the plan: {todo[:3]}")
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                key = running.pop(future)
                err = future.exception()
                if err is None:
                    done.add(key)
                else:
                    failed[key] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    (root / key).mkdir(parents=True, exist_ok=True)
                    (root / key / "study-error.txt").write_text(
                        "".join(traceback.format_exception(type(err), err, err.__traceback__)))
                completed += 1
                failure = f" FAILED {key}" if err else ""
                say(f"[study] {completed}/{total} runs ({time.perf_counter() - start:.0f}s){failure}")
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    return failed


# ------------------------------------------------------------------------------------------ reading runs
def read_final(root: Path, key: str) -> float | None:
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


def stage1_hint_loss(root: Path, key: str) -> float:
    """The hint term's mean training loss in the last epoch of stage 1 (weight × mean discrepancy)."""
    from padkd.engine.logging import read_metrics

    epochs = [e for e in read_metrics(root / key) if e.get("event") == "epoch" and e["stage"] == 0]
    return float(epochs[-1]["train"]["hint"])


def head_stats(records: dict[str, np.ndarray] | None, term: str = "hint") -> dict[str, float]:
    """What a PAD head learned on the test split: spread of log d and log σ², ρ(σ², d), mean d."""
    from padkd.report.stats import spearman

    if records is None or f"{term}.discrepancy" not in records:
        return {}
    d = records[f"{term}.discrepancy"]
    out = {"mean_d": float(d.mean()), "sd_log_d": float(np.log(d[d > 0]).std())}
    if f"{term}.log_var" in records:
        v = records[f"{term}.log_var"]
        out |= {"sd_log_var": float(v.std()), "rho": spearman(v, d), "mean_log_var": float(v.mean())}
    return out


# ------------------------------------------------------------------------------------------ factors
@dataclass
class Row:
    """One comparison: `treatment` − `control` paired by seed (run keys per seed)."""

    factor: str
    value: str
    label: str
    treatment: dict[int, str]
    control: dict[int, str]
    note: str = ""


@dataclass
class Factor:
    name: str
    title: str
    question: str
    rows: list[Row] = field(default_factory=list)
    #: Run keys of the arms to render with `padkd report` (label → keys per seed).
    report: dict[str, dict[int, str]] = field(default_factory=dict)
    xlabel: str = ""


def _digits_teacher(plan: Plan, mode: Mode) -> str:
    return plan.add(teacher_config(DIGITS, TEACHER, mode.teacher_epochs, {"name": "sgd", "lr": 0.05}))


def factor_base(plan: Plan, mode: Mode, teacher: str) -> Factor:
    f = Factor("base", "Does the base term help at all, and PAD on top of it?",
               "Student alone, KD, FitNet and the L2 hint over the same two-stage schedule; then PAD-L2 "
               "(stage 2) against the L2 hint continued (its epoch-matched control).", xlabel="comparison")
    arms: dict[str, dict[int, str]] = {k: {} for k in ("none", "l2", "pad", "kd", "fitnet")}
    fitnet = {"name": "fitnet", "method": {"name": "fitnet"}, "student": "features.1", "teacher": "features.1",
              "weight": FITNET_WEIGHT}
    kd = {"name": "kd", "method": {"name": "kd", "temperature": 4.0}, "weight": 1.0}
    for seed in range(mode.headline_seeds):
        arms["none"][seed] = plan.add(two_stage(seed, teacher, stage1=[], stage2=[], mode=mode), fork=True)
        arms["l2"][seed] = plan.add(two_stage(seed, teacher, stage1=[hint()], stage2=[hint()], mode=mode), fork=True)
        arms["pad"][seed] = plan.add(two_stage(seed, teacher, stage1=[hint()], stage2=[hint(1.0, PAD)], mode=mode),
                                     fork=True)
        arms["kd"][seed] = plan.add(two_stage(seed, teacher, stage1=[kd], stage2=[kd], mode=mode), fork=True)
        arms["fitnet"][seed] = plan.add(two_stage(seed, teacher, stage1=[fitnet], stage2=[fitnet], mode=mode),
                                        fork=True)
    f.rows = [Row("base", "L2 − none", "L2 hint (w 30) − student alone", arms["l2"], arms["none"]),
              Row("base", "FitNet − none", f"FitNet (features.1, w {FITNET_WEIGHT:g}) − student alone", arms["fitnet"],
                  arms["none"]),
              Row("base", "KD − none", "KD (T 4) − student alone", arms["kd"], arms["none"]),
              Row("base", "PAD − L2", "PAD-L2 (stage 2, w 1) − L2 continued", arms["pad"], arms["l2"])]
    f.report = {"L2 hint (epoch-matched control)": arms["l2"], "PAD-L2 (two-stage)": arms["pad"],
                "student alone": arms["none"], "KD": arms["kd"], "FitNet": arms["fitnet"]}
    return f


def hint_arms(plan: Plan, teacher: str, seeds: int, factor: str, value: str, weight: float = HINT_WEIGHT,
              **kw: Any) -> tuple[list[Row], dict[int, str], dict[int, str]]:
    """The student alone, the L2 hint (weight `weight` in both stages) and PAD-L2 (stage 2, w 1) over `seeds`
    paired seeds of one setting (`kw` for `two_stage`); the rows "L2 − none" and "PAD − L2", and the L2 and PAD
    arms."""
    none, l2, pad = {}, {}, {}
    for seed in range(seeds):
        none[seed] = plan.add(two_stage(seed, teacher, stage1=[], stage2=[], **kw), fork=True)
        l2[seed] = plan.add(two_stage(seed, teacher, stage1=[hint(weight)], stage2=[hint(weight)], **kw), fork=True)
        pad[seed] = plan.add(two_stage(seed, teacher, stage1=[hint(weight)], stage2=[hint(1.0, PAD)], **kw),
                             fork=True)
    return [Row(factor, value, "L2 − none", l2, none), Row(factor, value, "PAD − L2", pad, l2)], l2, pad


def factor_weight(plan: Plan, mode: Mode, teacher: str) -> Factor:
    f = Factor("weight", "The L2 hint's weight", "Stage 1 trains the hint at weight w; stage 2 continues it (control) "
               "or switches to PAD (w 1, as in the reference recipe). Also the hint's own gain over the student alone.",
               xlabel="hint weight w in stage 1")
    for w in mode.weights:
        f.rows += hint_arms(plan, teacher, mode.seeds, "weight", f"{w:g}", w, mode=mode)[0]
    return f


def factor_gap(plan: Plan, mode: Mode, teacher: str) -> Factor:
    f = Factor("gap", "Teacher–student gap (student width)", "Student `cnn` widths (the last is its embedding "
               "width, mapped onto the teacher's 128 by the hint's connector); teacher fixed.",
               xlabel="student widths")
    for widths in mode.widths:
        student = {"name": "cnn", "widths": list(widths)}
        f.rows += hint_arms(plan, teacher, mode.seeds, "gap", "-".join(map(str, widths)), mode=mode,
                            student=student)[0]
    return f


def factor_data(plan: Plan, mode: Mode, teacher: str, mnist: tuple[str, str] | None) -> Factor:
    f = Factor("data", "Training-set size", "digits with a random subset of its 1,078 training images (epochs "
               "multiplied by 1078/size, at most 2x); MNIST subsets with the probe's LeNet teacher (validation 1,000 "
               "images, epochs set for about as many steps as on digits).", xlabel="training images")
    for subset in mode.subsets:
        data = {**DIGITS, **({"train_subset": subset} if subset else {})}
        # fewer images, fewer steps per epoch: more epochs (at most 2x, so that per-epoch evaluation stays cheap)
        scale = 1 if subset is None else min(2, max(1, round(1078 / subset)))
        e1, e2 = mode.e1 * scale, mode.e2 * scale
        f.rows += hint_arms(plan, teacher, mode.seeds, "data", f"digits {subset or 1078}", mode=mode, data=data,
                            e1=e1, e2=e2)[0]
    if mnist is not None:
        root, mteacher = mnist
        for subset in mode.mnist_subsets:
            data = {"name": "mnist", "root": root, "val_size": 1000, "train_subset": subset, "batch_size": 64}
            steps = subset // 64
            e1 = max(2, round(mode.e1 * 17 / steps))  # digits: 17 steps per epoch
            e2 = max(1, round(mode.e2 * 17 / steps))
            f.rows += hint_arms(plan, mteacher, min(mode.seeds, 5), "data", f"MNIST {subset}", mode=mode, data=data,
                                e1=e1, e2=e2, teacher_model=PROBE_TEACHER)[0]
    return f


def factor_stage2(plan: Plan, mode: Mode, teacher: str) -> Factor:
    f = Factor("stage2", "Stage-2 length and learning rate", "Stage 2 of PAD and of its control for E epochs at a "
               "constant LR (stage 1 unchanged).", xlabel="stage 2: epochs @ LR")
    for epochs, lr in mode.stage2:
        l2, pad = {}, {}
        for seed in range(mode.seeds):
            kw = {"mode": mode, "e2": epochs, "lr2": lr}
            l2[seed] = plan.add(two_stage(seed, teacher, stage1=[hint()], stage2=[hint()], **kw), fork=True)
            pad[seed] = plan.add(two_stage(seed, teacher, stage1=[hint()], stage2=[hint(1.0, PAD)], **kw), fork=True)
        f.rows.append(Row("stage2", f"{epochs} @ {lr:g}", "PAD − L2", pad, l2))
    return f


def _base_pair(plan: Plan, mode: Mode, teacher: str, stage2: list[dict[str, Any]], seed: int) -> str:
    return plan.add(two_stage(seed, teacher, stage1=[hint()], stage2=stage2, mode=mode), fork=True)


def factor_head(plan: Plan, mode: Mode, teacher: str) -> Factor:
    f = Factor("head", "The variance head: its learning rate and its input", "`head_lr_scale` multiplies the head's "
               "LR only (not the connector's); the head reads the student embedding (fc input, the default) or the "
               "hint's connector output (the probe's choice), with its gradient into the student or detached.",
               xlabel="PAD head")
    control = {s: _base_pair(plan, mode, teacher, [hint()], s) for s in range(mode.seeds)}
    variants: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        (f"lr x{x:g}", {**PAD, "head_lr_scale": x} if x != 1 else PAD, {}) for x in mode.head_lr]
    variants += [("embedding, detached", {**PAD, "detach_input": True}, {}),
                 ("connector", PAD, {"embedding": "connector"}),
                 ("connector, detached", {**PAD, "detach_input": True}, {"embedding": "connector"})]
    for label, weighting, extra in variants:
        arm = {s: _base_pair(plan, mode, teacher, [hint(1.0, weighting, **extra)], s) for s in range(mode.seeds)}
        f.rows.append(Row("head", label, "PAD − L2", arm, control))
    return f


def _matched_weight(stage1_key: str) -> Callable[[Path, dict[str, Any]], dict[str, Any]]:
    """Stage 2's uniform hint at λ = 1/mean d, d measured in the last epoch of stage 1: the scale PAD's
    weights 1/σ² take on average when σ² ≈ d (at PAD's term weight 1)."""

    def resolve(root: Path, raw: dict[str, Any]) -> dict[str, Any]:
        mean_d = stage1_hint_loss(root, stage1_key) / HINT_WEIGHT
        out = copy.deepcopy(raw)
        out["stages"][1]["terms"][0]["weight"] = 1.0 / max(mean_d, 1e-12)
        return out

    return resolve


def factor_form(plan: Plan, mode: Mode, teacher: str) -> Factor:
    f = Factor("form", "What PAD changes: scale, per-dimension and per-sample weighting", "At σ² ≈ d PAD weighs "
               "element e of sample i by about 1/d_ie, which rescales the term by about 1/mean d and reweights "
               "dimensions and samples. Arms: the reference PAD-L2 (per element, head, w 1); one σ² per sample "
               "(head); one σ² per dimension shared by all samples (no head); PAD at the control's weight 30; PAD "
               "at weight 30 with its weights normalised to mean 1 (`preserve_scale`: the reweighting alone at L2's "
               "scale); L2 at the matched weight λ = 1/mean d (the rescaling alone); PAD's unmodified published "
               "form (random head init, no floor, no warm-up).", xlabel="stage-2 arm")
    control = {s: _base_pair(plan, mode, teacher, [hint()], s) for s in range(mode.seeds)}
    variants = [("per element (reference)", hint(1.0, PAD)),
                ("per sample", hint(1.0, {**PAD, "mode": "per_sample"})),
                ("per dimension, no head", hint(1.0, {**PAD, "mode": "per_dimension"})),
                ("per element, w 30", hint(HINT_WEIGHT, PAD)),
                ("preserve_scale, w 30", hint(HINT_WEIGHT, {**PAD, "preserve_scale": True})),
                ("per dimension, preserve_scale, w 30",
                 hint(HINT_WEIGHT, {**PAD, "mode": "per_dimension", "preserve_scale": True})),
                ("published form (no init/floor/warm-up)", hint(1.0, PAD_REFERENCE))]
    for label, term in variants:
        arm = {s: _base_pair(plan, mode, teacher, [term], s) for s in range(mode.seeds)}
        f.rows.append(Row("form", label, "PAD − L2", arm, control))
    matched = {}
    for seed in range(mode.seeds):
        raw = two_stage(seed, teacher, stage1=[hint()], stage2=[hint(-1.0)], mode=mode)  # weight filled in later
        first = copy.deepcopy(raw)
        first["stages"] = first["stages"][:1]
        stage1 = config_key(first)
        matched[seed] = plan.add(raw, fork=True, resolve=_matched_weight(stage1))
    f.rows.append(Row("form", "L2 at λ = 1/mean d", "− L2 (w 30)", matched, control))
    return f


def factor_single(plan: Plan, mode: Mode, teacher: str) -> Factor:
    f = Factor("single", "Single stage, with and without the safe defaults", "One stage of e1 + e2 epochs (SGD 0.05, "
               "cosine) with the hint weighted from the first step; PAD at w 1 with padkd's defaults (data init, "
               "floor, 100-step warm-up), without the warm-up, and in its published form.", xlabel="single-stage arm")
    epochs = mode.e1 + mode.e2
    arms: dict[str, dict[int, str]] = {}
    variants = {"L2": hint(), "PAD defaults": hint(1.0, PAD), "PAD, no warm-up": hint(1.0, {**PAD, "warmup_steps": 0}),
                "PAD published form": hint(1.0, PAD_REFERENCE)}
    for label, term in variants.items():
        arms[label] = {s: plan.add(single_stage(s, teacher, terms=[term], epochs=epochs, data=DIGITS,
                                                student=STUDENT, teacher_model=TEACHER,
                                                optimizer={"name": "sgd", "lr": 0.05}, scheduler={"name": "cosine"}))
                       for s in range(mode.seeds)}
    for label in list(variants)[1:]:
        f.rows.append(Row("single", label, "− L2 (single stage)", arms[label], arms["L2"]))
    f.rows.append(Row("single", "defaults vs published", "PAD defaults − published", arms["PAD defaults"],
                      arms["PAD published form"]))
    f.report = {label: arms[label] for label in variants}
    return f


def _method_term(method: str, weighting: dict[str, Any]) -> dict[str, Any]:
    terms = {
        "hint": hint(HINT_WEIGHT),
        "fitnet": {"name": "fitnet", "method": {"name": "fitnet"}, "student": "features.1", "teacher": "features.1",
                   "weight": FITNET_WEIGHT},
        "kd": {"name": "kd", "method": {"name": "kd", "temperature": 4.0}, "weight": 1.0},
        "rkd": {"name": "rkd", "method": {"name": "rkd"}, "student": "fc:in", "teacher": "fc:in", "weight": 1.0},
        "crd": {"name": "crd", "method": {"name": "crd", "memory": "queue", "queue_size": 512}, "student": "fc:in",
                "teacher": "fc:in", "weight": 0.8},
    }
    return {**terms[method], "weighting": weighting}


def factor_methods(plan: Plan, mode: Mode, teacher: str) -> Factor:
    f = Factor("methods", "Base method × weighting", "Stage 1 trains each base method with uniform weighting; stage 2 "
               "continues it under each weighting at the same term weight (PAD too, so PAD-L2 here is at w 30), "
               "against uniform continued. PAD is per element (KD has one element per sample).",
               xlabel="weighting")
    for method in mode.methods:
        control = {s: plan.add(two_stage(s, teacher, stage1=[_method_term(method, {"name": "uniform"})],
                                         stage2=[_method_term(method, {"name": "uniform"})], mode=mode), fork=True)
                   for s in range(mode.method_seeds)}
        for weighting in mode.weightings:
            if weighting == "uniform":
                continue
            arm = {s: plan.add(two_stage(s, teacher, stage1=[_method_term(method, {"name": "uniform"})],
                                         stage2=[_method_term(method, {"name": weighting})], mode=mode), fork=True)
                   for s in range(mode.method_seeds)}
            f.rows.append(Row("methods", weighting, f"{method}: − uniform", arm, control))
    return f


def factor_corrupt(plan: Plan, mode: Mode, teacher: str) -> Factor:
    f = Factor("corrupt", "Corrupted and mislabelled training samples", "A fraction of the student's training images "
               "replaced by uniform pixel noise, or a fraction of its labels flipped to another class; the teacher is "
               "the clean one. Stage-2 records of the training split give each sample's learned σ².",
               xlabel="training-set corruption")
    for kind, fraction in mode.corruptions:
        data = {**DIGITS, ("noise_fraction" if kind == "noise" else "label_noise"): fraction}
        value = f"{fraction:.0%} {'noise images' if kind == 'noise' else 'flipped labels'}"
        rows, l2, pad = hint_arms(plan, teacher, mode.seeds, "corrupt", value, mode=mode, data=data,
                                  records=("test", "train"))
        f.rows += rows
        f.report[f"L2 ({value})"] = l2
        f.report[f"PAD ({value})"] = pad
    return f


def factor_stall(plan: Plan, mode: Mode, mnist: tuple[str, str]) -> Factor:
    root, mteacher = mnist
    f = Factor("stall", "The single-stage stall of the MNIST probe", "The probe's exact setting in padkd: LeNet "
               "student (2/4 channels, 16-d embedding), a linear connector to the teacher's 128-d embedding, Adam "
               "1e-3 (AdamW without weight decay) for 4 epochs with the LR ×0.3 after epoch 2, batch 128, all "
               "but 1,000 MNIST training images (held out for validation); the hint at weight 1 from the first "
               "step, weighted uniformly, by PAD in its published form with the head on the connector output (the "
               "probe), or by PAD with padkd's defaults (same head input).", xlabel="single-stage arm")
    data = {"name": "mnist", "root": root, "val_size": 1000, "batch_size": 128}
    optimizer = {"name": "adamw", "lr": 0.001, "weight_decay": 0.0}
    scheduler = {"name": "multistep", "milestones": [2], "gamma": 0.3}
    variants = {"L2": hint(1.0), "PAD published, on connector": hint(1.0, PAD_REFERENCE, embedding="connector"),
                "PAD defaults, on connector": hint(1.0, PAD, embedding="connector")}
    # the question is how often a run stalls: more seeds for the two PAD arms than for the L2 reference
    seeds = {"L2": max(2, mode.stall_seeds // 2)}
    arms = {label: {s: plan.add(single_stage(s, mteacher, terms=[term], epochs=4, data=data, student=PROBE_STUDENT,
                                             teacher_model=PROBE_TEACHER, optimizer=optimizer, scheduler=scheduler))
                    for s in range(seeds.get(label, mode.stall_seeds))} for label, term in variants.items()}
    for label in list(variants)[1:]:
        f.rows.append(Row("stall", label, "− L2", arms[label], arms["L2"]))
    f.report = arms
    return f


def _mnist_teacher(plan: Plan, root: str) -> str:
    data = {"name": "mnist", "root": root, "val_size": 1000, "batch_size": 128}
    return plan.add(teacher_config(data, PROBE_TEACHER, 5, {"name": "adamw", "lr": 0.001, "weight_decay": 0.0}))


#: In the order they are planned and trained (the most telling first, so a cut-short study has them).
FACTORS = ("base", "form", "corrupt", "stall", "single", "head", "gap", "stage2", "weight", "data", "methods")


def build_plan(mode: Mode, data_root: str | None, only: list[str] | None) -> tuple[Plan, list[Factor]]:
    plan = Plan()
    teacher = _digits_teacher(plan, mode)
    mnist = None
    if data_root is not None and mode.name == "full":
        mnist = (data_root, _mnist_teacher(plan, data_root))
    chosen = list(only or FACTORS)
    unknown = [c for c in chosen if c not in FACTORS]
    if unknown:
        raise PadkdError(f"--only: unknown factor '{unknown[0]}'; choose from {', '.join(FACTORS)}")
    factors = []
    for name in chosen:
        if name == "stall":
            if mnist is not None and mode.stall_seeds:
                factors.append(factor_stall(plan, mode, mnist))
        elif name == "data":
            factors.append(factor_data(plan, mode, teacher, mnist))
        else:
            factors.append(globals()[f"factor_{name}"](plan, mode, teacher))
    return plan, factors


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
    stats = [head_stats(read_records(root, row.treatment[s])) for s in seeds]
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
def _fmt(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    text = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    return text.replace("-", "\u2212")


def _ci(r: dict[str, Any]) -> str:
    if r.get("low") is None:
        return "n/a"
    return f"[{_fmt(r['low'], sign=True)}, {_fmt(r['high'], sign=True)}]"


def _table(rows: list[dict[str, Any]], head_columns: bool) -> list[str]:
    header = ["value", "comparison", "n", "treatment", "control", "difference", "95% CI", "verdict"]
    if head_columns:
        header += ["mean d", "sd log d", "sd log σ²", "ρ(σ², d)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["value"], r["label"], str(r["n"]),
                 f"{_fmt(r.get('treatment_mean'))} ± {_fmt(r.get('treatment_std'))}",
                 f"{_fmt(r.get('control_mean'))} ± {_fmt(r.get('control_std'))}",
                 _fmt(r.get("diff"), sign=True), _ci(r), r.get("verdict", "n/a")]
        if head_columns:
            cells += [_fmt(r.get("mean_d"), 4), _fmt(r.get("sd_log_d")), _fmt(r.get("sd_log_var")),
                      _fmt(r.get("rho"), 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _factor_figure(factor: Factor, rows: list[dict[str, Any]], path: Path) -> bool:
    """One panel per comparison label: the paired difference with its interval against the factor's values."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    labels = list(dict.fromkeys(r["label"] for r in rows if r.get("diff") is not None))
    if not labels:
        return False
    fig = MplFigure(figsize=(min(4.5 * len(labels), 13), 3.8 + 0.3 * (len(labels) > 2)))
    axes = fig.subplots(1, len(labels), squeeze=False)[0]
    for ax, label in zip(axes, labels, strict=True):
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
    axes[0].set_ylabel("paired difference, test top-1 (points)", fontsize=8)  # one label: panels sit close
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


def analyse(root: Path, out: Path, factors: list[Factor], failed: dict[str, str], header: list[str],
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
                             "test top-1 per seed " + ", ".join(f"{_fmt(v)}" for v in st["top1"].values()))
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
        return _fmt(stat["mean"], digits, sign=True)
    return (f"{_fmt(stat['mean'], digits, sign=True)} [{_fmt(stat['low'], digits, sign=True)}, "
            f"{_fmt(stat['high'], digits, sign=True)}]")


def _corruption_line(value: str, stats: dict[str, Any]) -> str:
    if not stats.get("n"):
        return f"- {value}: no training-split records with PAD's σ²."
    weight = stats.get("weight_corrupt", {})
    return (f"- {value} ({stats['n']} seeds, stage-2 training records of PAD-L2): mean log σ² of the corrupted "
            f"samples minus the clean ones {_interval(stats.get('d_log_var'))}; mean log d, corrupted minus clean "
            f"{_interval(stats.get('d_log_d'))}; PAD's mean relative weight of a corrupted sample "
            f"{_fmt(weight.get('mean'), 3)} (1 = the batch average).")


def _dimension_line(d: dict[str, Any]) -> str:
    return (f"Per-element PAD, test records averaged over {d['n']} seeds: log σ² spreads by {_fmt(d['sd_dims'])} "
            f"across feature dimensions (each averaged over samples; log d by {_fmt(d['sd_log_d_dims'])}, ρ(σ², d) "
            f"{_fmt(d['rho_dims'], 3)}) and by {_fmt(d['sd_samples'])} across samples (each averaged over "
            f"dimensions; log d by {_fmt(d['sd_log_d_samples'])}, ρ {_fmt(d['rho_samples'], 3)}).")


def run_study(out: Path, mode: str = "quick", data_root: str | None = None, jobs: int = 2, seeds: int | None = None,
              only: list[str] | None = None, quiet: bool = False, train: bool = True,
              minutes: float | None = None) -> dict[str, Any]:
    """Plan, train (reusing finished runs) and analyse the study; returns the results written to results.json.
    `train=False` analyses the runs finished so far (comparisons then have fewer pairs, or none); `minutes`
    stops starting runs after that long and analyses what finished."""
    if mode not in MODES:
        raise PadkdError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    chosen = MODES[mode]
    if seeds is not None:
        if seeds < 2:
            raise PadkdError(f"--seeds must be at least 2 (a paired interval needs two pairs), got {seeds}")
        chosen = Mode(**{**chosen.__dict__, "seeds": seeds, "headline_seeds": max(seeds, 2),
                         "method_seeds": seeds, "stall_seeds": seeds if chosen.stall_seeds else 0})
    if jobs < 1:
        raise PadkdError(f"--jobs must be at least 1, got {jobs}")
    if minutes is not None and not minutes > 0:
        raise PadkdError(f"--minutes must be a positive number of minutes, got {minutes}")
    if data_root is not None and not (Path(data_root) / "MNIST" / "raw").is_dir() and not Path(data_root).is_dir():
        raise PadkdError(f"--data-root '{data_root}' is not a directory; give the folder that holds MNIST/raw")

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    out = Path(out)
    root = out / "runs"
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    plan, factors = build_plan(chosen, data_root, only)
    if mode == "full" and data_root is None:
        say("[study] no --data-root: the MNIST parts (data-size subsets, the probe's stall) are skipped")
    failed = run_plan(plan, root, jobs, say, None if minutes is None else 60 * minutes) if train else {}
    seconds = time.perf_counter() - start
    command = f"padkd study --mode {mode}" + (f" --data-root {data_root}" if data_root else "") + \
        (f" --seeds {seeds}" if seeds else "") + (f" --only {' '.join(only)}" if only else "") + \
        ("" if train else " --no-train")
    teachers = {"digits": _digits_teacher(Plan(), chosen),
                "mnist": _mnist_teacher(Plan(), data_root) if data_root else None}
    finished = sum((root / k / "final.json").is_file() for k in plan.specs)
    trained = f"this invocation trained for {seconds:.0f} s with {jobs} job(s)" if train else "analysis only"
    header = [f"- Command: `{command}` ({finished} of {len(plan.specs)} runs finished; {trained})",
              f"- Teacher (digits): cnn {TEACHER['widths']}, test top-1 {_fmt(read_final(root, teachers['digits']))} %",
              f"- Base setting: digits, student cnn {STUDENT['widths']}, L2 hint on the pooled embeddings at weight "
              f"{HINT_WEIGHT:g}, stage 1 {chosen.e1} epochs (SGD 0.05, cosine), stage 2 {chosen.e2} epochs (SGD "
              "0.005, constant); PAD-L2 = stage 2 with PAD (w 1, padkd's defaults) instead of uniform.",
              f"- Seeds: {chosen.seeds} per comparison ({chosen.headline_seeds} for `base`, {chosen.method_seeds} for "
              "`methods`); differences are paired by seed (same initialisation, data order and stage 1), 95% t "
              "intervals; test top-1 in %."]
    if teachers["mnist"]:
        header.append(f"- Teacher (MNIST): the probe's LeNet (32/64 channels, 128-d), test top-1 "
                      f"{_fmt(read_final(root, teachers['mnist']))} %")
    results = analyse(root, out, factors, failed, header, command, teachers)
    say(f"[study] {out / 'study.md'} ({time.perf_counter() - start:.0f}s)")
    return results
