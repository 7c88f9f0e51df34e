"""padkd: Prime-Aware Adaptive Distillation and a knowledge-distillation toolkit.

The one idea: a distillation term is *what is matched* (a method returning per-sample
discrepancies) times *how samples count* (a weighting reducing them: uniform, PAD, hard mining).
The public names below are imported on first use, so `padkd --version` and config parsing do not
load torch's model code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name → the module that defines it.
_EXPORTS = {
    "Batch": "padkd.batch",
    "BuildContext": "padkd.context", "DataInfo": "padkd.context", "StageClock": "padkd.context",
    "Discrepancy": "padkd.discrepancy",
    "Distiller": "padkd.distiller", "DistillOutput": "padkd.distiller", "Term": "padkd.distiller",
    "Method": "padkd.methods", "METHODS": "padkd.methods", "KD": "padkd.methods", "Hint": "padkd.methods",
    "FitNet": "padkd.methods",
    "load_student": "padkd.models.convert", "set_threads": "padkd.engine.cpu",
    "Task": "padkd.tasks", "TASKS": "padkd.tasks", "Evaluator": "padkd.tasks", "Classification": "padkd.tasks",
    **{name: "padkd.weightings" for name in (
        "Weighting", "WeightedLoss", "WEIGHTINGS", "PAD", "Uniform", "SampleWeighting", "Focal", "OHEM",
        "SoftmaxHard", "SoftmaxEasy", "Polynomial", "DiscardHardest")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'padkd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
