"""The study's plan: how much runs (modes), the base setting, config builders, and the Plan of runs keyed by config
hash (identical configs are one run, shared by every comparison that needs it)."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUIET_LOG = {"tensorboard": False, "progress": "none"}
DIGITS = {"name": "digits", "batch_size": 64}
TEACHER = {"name": "cnn", "widths": [32, 64, 128]}
STUDENT = {"name": "cnn", "widths": [4, 32]}
HINT_WEIGHT = 30.0
#: FitNet between the students' and the teacher's second blocks: at the CRD benchmark's weight 100 it cost the
#: student about 11 points in a scouting run (6 seeds), at 10 about 1.5.
FITNET_WEIGHT = 10.0
#: The MNIST probe's networks (docs/pad.md §3b): LeNet-style, no BatchNorm.
PROBE_TEACHER = {"name": "lenet", "channels": [32, 64], "hidden": 128}
PROBE_STUDENT = {"name": "lenet", "channels": [2, 4], "hidden": 16}
#: The weightings the issue names (padkd's `polynomial` is left out of the study to save time).
WEIGHTINGS = ("uniform", "pad", "focal", "ohem", "softmax_hard", "softmax_easy", "discard_hardest")


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
    #: Seeds of the `weightings` factor's stage-2 comparisons on digits (its intervals are the narrowest asked for).
    ceiling_seeds: int = 8


MODES = {
    "quick": Mode("quick", seeds=3, headline_seeds=3, method_seeds=3, e1=10, e2=5,
                  widths=((4, 8), (4, 32)), weights=(1.0, 30.0), subsets=(150, None),
                  stage2=((5, 0.005), (5, 0.05)), head_lr=(1.0, 100.0), methods=("hint", "kd"),
                  weightings=("uniform", "pad", "ohem", "softmax_easy"), corruptions=(("noise", 0.1),),
                  mnist_subsets=(), stall_seeds=0, ceiling_seeds=3),
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
                 optimizer: dict[str, Any], scheduler: dict[str, Any], data: dict[str, Any] | None = None,
                 student: dict[str, Any] | None = None, teacher_model: dict[str, Any] | None = None,
                 records: tuple[str, ...] = ("test",), task_weight: float | None = None) -> dict[str, Any]:
    """One stage of `epochs` with its own optimizer and schedule; data and networks default to the base setting.
    `task_weight`: the cross-entropy's weight beside the terms (None: the default 1)."""
    stage = {"name": "single", "epochs": epochs, "optimizer": copy.deepcopy(optimizer),
             "scheduler": copy.deepcopy(scheduler), "terms": copy.deepcopy(terms)}
    if task_weight is not None:
        stage["task_weight"] = task_weight
    return {"name": "study", "output_dir": "", "seed": seed, "data": copy.deepcopy(data or DIGITS),
            "student": {"model": copy.deepcopy(student or STUDENT)}, "records": {"splits": list(records)},
            "log": dict(QUIET_LOG),
            "teacher": {"model": copy.deepcopy(teacher_model or TEACHER), "checkpoint": teacher},
            "stages": [stage]}


def teacher_config(data: dict[str, Any], model: dict[str, Any], epochs: int,
                   optimizer: dict[str, Any]) -> dict[str, Any]:
    """A teacher's run: `model` trained alone on `data` (no records, one stage)."""
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
    """The runs to train, by key (config hash and seed), in the order they were added."""

    specs: dict[str, Spec] = field(default_factory=dict)

    def add(self, raw: dict[str, Any], fork: bool = False, deps: tuple[str, ...] = (),
            resolve: Callable[[Path, dict[str, Any]], dict[str, Any]] | None = None,
            records: dict[str, Any] | None = None) -> str:
        """Add a run (once per distinct config); `fork`: train its stage 2 from its own stage-1 run, whose
        records are `records` where given (an arm that records more in stage 2 then shares its control's stage 1)."""
        key = config_key(raw)
        if key in self.specs:
            return key
        teacher = (raw.get("teacher") or {}).get("checkpoint")
        needs = tuple(d for d in (teacher,) if d) + deps
        parent = None
        if fork and len(raw["stages"]) > 1:
            first = copy.deepcopy(raw)
            first["stages"] = first["stages"][:1]
            if records is not None:
                first["records"] = copy.deepcopy(records)
            parent = self.add(first, deps=deps)
            needs += (parent,)
        self.specs[key] = Spec(raw, parent, needs, resolve)
        return key


# ------------------------------------------------------------------------------------------ the teachers
def digits_teacher(plan: Plan, mode: Mode) -> str:
    """The digits teacher's run (every digits comparison distils from it)."""
    return plan.add(teacher_config(DIGITS, TEACHER, mode.teacher_epochs, {"name": "sgd", "lr": 0.05}))


def mnist_teacher(plan: Plan, root: str) -> str:
    """The probe's LeNet teacher on MNIST under `root`."""
    data = {"name": "mnist", "root": root, "val_size": 1000, "batch_size": 128}
    return plan.add(teacher_config(data, PROBE_TEACHER, 5, {"name": "adamw", "lr": 0.001, "weight_decay": 0.0}))


def describe(mode: Mode, digits_top1: str, mnist_top1: str | None) -> list[str]:
    """The study header's lines on the setting: the teachers (with their test top-1, formatted), the base
    setting and the seeds; the MNIST teacher's line only when it was planned (`mnist_top1` given)."""
    lines = [f"- Teacher (digits): cnn {TEACHER['widths']}, test top-1 {digits_top1} %",
             f"- Base setting: digits, student cnn {STUDENT['widths']}, L2 hint on the pooled embeddings at weight "
             f"{HINT_WEIGHT:g}, stage 1 {mode.e1} epochs (SGD 0.05, cosine), stage 2 {mode.e2} epochs (SGD "
             "0.005, constant); PAD-L2 = stage 2 with PAD (w 1, padkd's defaults) instead of uniform.",
             f"- Seeds: {mode.seeds} per comparison ({mode.headline_seeds} for `base`, {mode.method_seeds} for "
             "`methods`); differences are paired by seed (same initialisation, data order and stage 1), 95% t "
             "intervals; test top-1 in %."]
    if mnist_top1 is not None:
        lines.append(f"- Teacher (MNIST): the probe's LeNet (32/64 channels, 128-d), test top-1 {mnist_top1} %")
    return lines
