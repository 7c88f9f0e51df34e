"""The study's factors: one function per factor, each varying one thing around the base setting and adding its
runs to the Plan; its rows pair a treatment arm with its control by seed. `build_plan` plans the chosen factors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from padkd.errors import PadkdError
from padkd.study.plan import (
    DIGITS,
    FITNET_WEIGHT,
    HINT_WEIGHT,
    PAD,
    PAD_REFERENCE,
    PROBE_STUDENT,
    PROBE_TEACHER,
    Mode,
    Plan,
    config_key,
    digits_teacher,
    hint,
    mnist_teacher,
    single_stage,
    two_stage,
)


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
    """One factor of the study: its comparisons (rows), the arms to report, the axis label of its figure."""

    name: str
    title: str
    question: str
    rows: list[Row] = field(default_factory=list)
    #: Run keys of the arms to render with `padkd report` (label → keys per seed).
    report: dict[str, dict[int, str]] = field(default_factory=dict)
    xlabel: str = ""


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


def stage1_hint_loss(root: Path, key: str) -> float:
    """The hint term's mean training loss in the last epoch of stage 1 (weight × mean discrepancy)."""
    from padkd.engine.logging import read_metrics

    epochs = [e for e in read_metrics(root / key) if e.get("event") == "epoch" and e["stage"] == 0]
    return float(epochs[-1]["train"]["hint"])


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
        arms[label] = {s: plan.add(single_stage(s, teacher, terms=[term], epochs=epochs,
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


#: The per-sample weightings the `weightings` factor crosses with its base methods, each at the control's scale
#: (weights of mean 1 in the batch): PAD by `preserve_scale` and without its warm-up ramp (which would scale the
#: term too), EA-KD and WSLD by `normalize`; the others are mean 1 by construction.
CROSSED: dict[str, dict[str, Any]] = {
    "pad": {**PAD, "preserve_scale": True, "warmup_steps": 0},
    "variance_memory": {"name": "variance_memory"},
    "inverse_discrepancy": {"name": "inverse_discrepancy"},
    "entropy": {"name": "entropy", "normalize": True},
    "wsld": {"name": "wsld", "normalize": True},
    "focal": {"name": "focal"},
    "ohem": {"name": "ohem"},
}
#: Weightings whose records carry a learned log σ²: their arms also record the training split.
LEARNED = ("pad", "variance_memory")
#: The base terms of the `weightings` factor (KD as in `base`, the hint at its base weight).
BASES: dict[str, dict[str, Any]] = {"hint": hint(HINT_WEIGHT),
                                    "kd": {"name": "kd", "method": {"name": "kd", "temperature": 4.0}, "weight": 1.0}}
#: The logit methods against plain KD over one schedule: (label, term, control term), both at the method
#: recipe's cross-entropy weight 0.1 (recipes/methods), so that each row changes one thing.
LOGIT_METHODS: tuple[tuple[str, dict[str, Any], dict[str, Any]], ...] = (
    ("KD + LS (T 2, w 9)",
     {"name": "kd", "method": {"name": "kd", "temperature": 2.0, "standardize": True}, "weight": 9.0},
     {"name": "kd", "method": {"name": "kd", "temperature": 2.0}, "weight": 9.0}),
    ("CTKD (global, cosine)", {"name": "ctkd", "method": {"name": "ctkd", "mode": "global", "curriculum": "cosine",
                                                          "curriculum_epochs": 10}, "weight": 0.9},
     {"name": "kd", "method": {"name": "kd", "temperature": 4.0}, "weight": 0.9}),
    ("MLKD", {"name": "mlkd", "method": {"name": "mlkd", "temperatures": [2.0, 3.0, 4.0, 5.0, 6.0], "mask": "code"},
              "weight": 0.9}, {"name": "kd", "method": {"name": "kd", "temperature": 4.0}, "weight": 0.9}),
)


def _weighted(term: dict[str, Any], weighting: dict[str, Any]) -> dict[str, Any]:
    return {**copy.deepcopy(term), "weighting": copy.deepcopy(weighting)}


def _stage2_arm(plan: Plan, mode: Mode, source: str, base: dict[str, Any], stage2: list[dict[str, Any]], seeds: int,
                learned: bool, kw: dict[str, Any]) -> dict[int, str]:
    """Stage 1 with `base`, stage 2 with `stage2`, per seed; `learned`: also record the training split (σ²), with
    the control's stage-1 run."""
    records = ("test", "train") if learned else ("test",)
    return {s: plan.add(two_stage(s, source, stage1=[base], stage2=stage2, mode=mode, records=records, **kw),
                        fork=True, records={"splits": ["test"]}) for s in range(seeds)}


def factor_weightings(plan: Plan, mode: Mode, teacher: str, mnist: tuple[str, str] | None) -> Factor:
    f = Factor("weightings", "Is it the head or the principle? Every per-sample weighting, its lever and its ceiling",
               "Each per-sample weighting at the control's scale (mean-1 weights; PAD with `preserve_scale` and no "
               "ramp) on KD and the L2 hint: in stage 2 against uniform continued (epoch-matched, paired seeds), "
               "beside an arm that drops the term in stage 2 (the lever: if it too matches the control, stage 2 "
               "cannot show a weighting's effect); from the first step of a single stage (45 epochs, SGD 0.05, "
               "cosine) against uniform; the hint on 1,000 MNIST images (the probe's LeNet teacher), where the "
               "term is worth far more; and LS, CTKD and MLKD against plain KD over one schedule. "
               "`inverse_discrepancy` (w ∝ 1/d) and `variance_memory` (one free σ² per training sample) are PAD's "
               "optimum without a head: its ceiling.", xlabel="weighting")
    settings: list[tuple[str, str, dict[str, Any], int, tuple[str, ...]]] = [
        ("digits", teacher, {}, mode.ceiling_seeds, ("hint", "kd"))]
    if mnist is not None:
        root, mteacher = mnist
        data = {"name": "mnist", "root": root, "val_size": 1000, "train_subset": 1000, "batch_size": 64}
        # 15 steps per epoch: half the data factor's epochs (about 250 + 125 steps), for time
        settings.append(("MNIST 1000", mteacher, {"data": data, "e1": max(2, mode.e1 // 2 + 2),
                                                   "e2": max(1, mode.e2 // 2), "teacher_model": PROBE_TEACHER},
                         min(mode.seeds, 5), ("hint",)))
    for where, source, kw, seeds, methods in settings:
        for method in methods:
            base = BASES[method]
            control = _stage2_arm(plan, mode, source, base, [base], seeds, False, kw)
            label = f"{where}, {method}, stage 2: − uniform"
            dropped = _stage2_arm(plan, mode, source, base, [], seeds, False, kw)
            f.rows.append(Row("weightings", "no term", label, dropped, control))
            for name, weighting in CROSSED.items():
                arm = _stage2_arm(plan, mode, source, base, [_weighted(base, weighting)], seeds, name in LEARNED, kw)
                f.rows.append(Row("weightings", name, label, arm, control))
    sgd, cosine = {"name": "sgd", "lr": 0.05}, {"name": "cosine"}

    def single(term: dict[str, Any] | None, learned: bool = False, task_weight: float | None = None
               ) -> dict[int, str]:
        """A single stage with `term` (None: no term, the student alone) per seed."""
        records = ("test", "train") if learned else ("test",)
        terms = [] if term is None else [term]
        return {s: plan.add(single_stage(s, teacher, terms=terms, epochs=mode.e1 + mode.e2, optimizer=sgd,
                                         scheduler=cosine, records=records, task_weight=task_weight))
                for s in range(mode.seeds)}

    for method, base in BASES.items():
        control = single(base)
        if method == "hint":  # the term's worth over the single stage: the student alone (the same for KD)
            f.rows.append(Row("weightings", "no term", "digits, hint, single stage: − uniform", single(None), control))
        for name, weighting in CROSSED.items():
            f.rows.append(Row("weightings", name, f"digits, {method}, single stage: − uniform",
                              single(_weighted(base, weighting), name in LEARNED), control))
    for label, term, control_term in LOGIT_METHODS:
        f.rows.append(Row("weightings", label, "digits, single stage (CE 0.1): − KD", single(term, task_weight=0.1),
                          single(control_term, task_weight=0.1)))
    return f


#: In the order they are planned and trained (the most telling first, so a cut-short study has them).
FACTORS = ("base", "form", "corrupt", "stall", "single", "head", "gap", "stage2", "weight", "data", "methods",
           "weightings")


def build_plan(mode: Mode, data_root: str | None, only: list[str] | None) -> tuple[Plan, list[Factor]]:
    """The plan of every run the chosen factors (`only`, default all) need, and the factors; the MNIST parts
    only in the full mode with a `data_root`."""
    plan = Plan()
    teacher = digits_teacher(plan, mode)
    mnist = None
    if data_root is not None and mode.name == "full":
        mnist = (data_root, mnist_teacher(plan, data_root))
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
        elif name == "weightings":
            factors.append(factor_weightings(plan, mode, teacher, mnist))
        else:
            factors.append(globals()[f"factor_{name}"](plan, mode, teacher))
    return plan, factors


