"""Config → objects: data, models, terms, distiller. The only place that reads registries for a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from padkd.config import Component, Config, ModelRef, StageConfig
from padkd.data import DATASETS, DataSplits
from padkd.distiller import Distiller, Term
from padkd.errors import PadkdError
from padkd.methods import METHODS
from padkd.models import MODELS
from padkd.registry import Registry, check_options, validate_options
from padkd.tasks import Classification
from padkd.weighting import WEIGHTINGS

_MODEL_FIXED = frozenset({"in_channels", "num_classes"})


def _check(registry: Registry[Any], comp: Component, where: str, fixed: frozenset[str] = frozenset()) -> None:
    factory = registry.get(comp.name, f"{where}.name")
    also = frozenset(type(comp).model_fields) - {"name"}
    check_options(factory, comp.options, where, set(fixed), also)
    validate_options(factory, comp.options, where)


def check_components(cfg: Config) -> None:
    """Resolve every registered name and option of every stage now, not when stage 2 starts."""
    _check(DATASETS, cfg.data, "data")
    _check(MODELS, cfg.student.model, "student.model", _MODEL_FIXED)
    if cfg.teacher is not None:
        _check(MODELS, cfg.teacher.model, "teacher.model", _MODEL_FIXED)
    for i, stage in enumerate(cfg.stages):
        if stage.terms and cfg.teacher is None:
            raise PadkdError(f"stages[{i}].terms: distillation terms need a teacher; add a 'teacher:' section")
        for j, term in enumerate(stage.terms):
            _check(METHODS, term.method, f"stages[{i}].terms[{j}].method")
            _check(WEIGHTINGS, term.weighting, f"stages[{i}].terms[{j}].weighting")
    for split in cfg.records.splits:
        if split == "test" and not cfg.eval_test:
            raise PadkdError("records.splits: 'test' needs eval_test: true")


def build_data(cfg: Config) -> DataSplits:
    return DATASETS.build(cfg.data.name, cfg.data.options, "data")


def build_model(ref: ModelRef, data: DataSplits, where: str) -> nn.Module:
    """Instantiate a network and load `ref.checkpoint` into it when given."""
    model = MODELS.build(ref.model.name, ref.model.options, f"{where}.model",
                         in_channels=data.in_channels, num_classes=data.num_classes)
    if ref.checkpoint is not None:
        from padkd.engine.checkpoint import load_model_weights

        load_model_weights(model, Path(ref.checkpoint), ref.model, where)
    return model


def build_distiller(cfg: Config, stage: StageConfig, student: nn.Module, teacher: nn.Module | None,
                    task: Classification, where: str) -> Distiller:
    """A fresh Distiller for one stage: new method modules and weightings (e.g. a new PAD head)."""
    terms = []
    for j, (name, term) in enumerate(zip(cfg.term_names(stage), stage.terms, strict=True)):
        at = f"{where}.terms[{j}]"
        method = METHODS.build(term.method.name, term.method.options, f"{at}.method")
        weighting = WEIGHTINGS.build(term.weighting.name, term.weighting.options, f"{at}.weighting")
        terms.append(Term(name, method, weighting, student=term.student, teacher=term.teacher,
                          weight=term.weight, embedding=term.embedding))
    return Distiller(student, teacher, terms, task_loss=task.loss, task_weight=stage.task_weight,
                     embedding=cfg.distill.embedding, teacher_train_bn=cfg.distill.teacher_train_bn)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PadkdError("device: cuda requested but no GPU is visible; use device=cpu or device=auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
