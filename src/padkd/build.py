"""Config → objects: data, task, models, terms, distiller. The only place that builds a run from registries."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from padkd.config import Config, ModelRef, StageConfig
from padkd.data import DATASETS, DataSplits
from padkd.distiller import Distiller, Term
from padkd.engine.checkpoint import load_model_weights
from padkd.errors import PadkdError
from padkd.methods import METHODS
from padkd.models import MODELS
from padkd.taps import Taps
from padkd.tasks import Task
from padkd.validate import build_task
from padkd.weighting import WEIGHTINGS

__all__ = ["build_data", "build_task", "build_model", "build_distiller", "resolve_device"]


def build_data(cfg: Config) -> DataSplits:
    return DATASETS.build(cfg.data.name, cfg.data.options, "data")


def build_model(ref: ModelRef, data: DataSplits, task: Task, where: str) -> nn.Module:
    """Instantiate a network with the fields its task gives it, and load `ref.checkpoint` when given."""
    try:
        fixed = task.model_kwargs(data)
    except ValueError as err:
        raise PadkdError(f"{where}.model: {err}") from None
    model = MODELS.build(ref.model.name, ref.model.options, f"{where}.model", **fixed)
    if ref.checkpoint is not None:
        load_model_weights(model, Path(ref.checkpoint), ref.model, where)
    return model


def build_distiller(cfg: Config, stage: StageConfig, student: nn.Module, teacher: nn.Module | None,
                    task: Task, where: str, taps: tuple[Taps, Taps | None] | None = None) -> Distiller:
    """A fresh Distiller for one stage: new method modules and weightings (e.g. a new PAD head)."""
    terms = []
    for j, (name, term) in enumerate(zip(cfg.term_names(stage), stage.terms, strict=True)):
        at = f"{where}.terms[{j}]"
        method = METHODS.build(term.method.name, term.method.options, f"{at}.method")
        weighting = WEIGHTINGS.build(term.weighting.name, term.weighting.options, f"{at}.weighting")
        terms.append(Term(name, method, weighting, student=term.student, teacher=term.teacher,
                          weight=term.weight, embedding=term.embedding, carry=term.carry, lr_scale=term.lr_scale,
                          warmup_epochs=term.warmup_epochs, signature=term.signature()))
    return Distiller(student, teacher, terms, task=task, task_weight=stage.task_weight,
                     embedding=cfg.distill.embedding, teacher_train_bn=cfg.distill.teacher_train_bn,
                     student_mode=stage.student_mode, taps=taps)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PadkdError("device: cuda requested but no GPU is visible; use device=cpu or device=auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
