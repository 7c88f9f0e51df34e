"""padkd: Prime-Aware Adaptive Distillation and a knowledge-distillation toolkit.

The one idea: a distillation term is *what is matched* (a method returning per-sample
discrepancies) times *how samples count* (a weighting reducing them: uniform, PAD, hard mining).
"""

from padkd.batch import Batch
from padkd.context import BuildContext, DataInfo
from padkd.discrepancy import Discrepancy
from padkd.distiller import Distiller, DistillOutput, Term
from padkd.methods import KD, METHODS, FitNet, Hint, Method
from padkd.tasks import TASKS, Classification, Evaluator, Task
from padkd.weighting import (
    OHEM,
    PAD,
    WEIGHTINGS,
    DiscardHardest,
    Focal,
    Polynomial,
    SampleWeighting,
    SoftmaxEasy,
    SoftmaxHard,
    Uniform,
    WeightedLoss,
    Weighting,
)

__version__ = "0.1.0"

__all__ = [
    "Batch", "BuildContext", "DataInfo", "Task", "TASKS", "Evaluator", "Classification", "Discrepancy",
    "DistillOutput", "Distiller", "Term", "Method", "METHODS", "KD", "Hint", "FitNet",
    "Weighting", "WeightedLoss", "WEIGHTINGS", "PAD", "Uniform", "SampleWeighting", "Focal", "OHEM",
    "SoftmaxHard", "SoftmaxEasy", "Polynomial", "DiscardHardest",
]
