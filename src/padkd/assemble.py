"""Config → objects: data, task, models, terms, distiller. The one place that makes a run's objects from the
registries (`Registry.create`); `Method.build`/`Weighting.build` later size their modules from an example batch."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from padkd.checkpoint import load_model_weights
from padkd.config import Component, Config, ModelRef, StageConfig
from padkd.data import DATASETS, DataSplits
from padkd.distiller import Distiller, Term
from padkd.errors import PadkdError
from padkd.methods import METHODS
from padkd.models import MODELS
from padkd.taps import Taps
from padkd.tasks import TASKS, Task
from padkd.weightings import WEIGHTINGS

__all__ = ["make_data", "make_task", "make_model", "make_distiller", "resolve_device"]


def make_task(comp: Component) -> Task:
    """The configured task object (cheap; the config check uses it too)."""
    return TASKS.create(comp.name, comp.options, "task")


def make_data(cfg: Config) -> DataSplits:
    """The configured data set; an error about files under a relative `data.root` shows the path resolved."""
    try:
        return DATASETS.create(cfg.data.name, cfg.data.options, "data")
    except PadkdError as err:
        root = cfg.data.options.get("root")
        if not isinstance(root, str) or Path(root).is_absolute() or str(Path(root).absolute()) in str(err):
            raise
        raise PadkdError(f"{err} (data.root '{root}' is {Path(root).absolute()}: paths in a config are relative to "
                         "the current directory)") from None


def make_model(ref: ModelRef, data: DataSplits, task: Task, where: str) -> nn.Module:
    """Instantiate a network with the fields its task gives it, and load `ref.checkpoint` when given."""
    try:
        fixed = task.model_kwargs(data)
    except ValueError as err:
        raise PadkdError(f"{where}.model: {err}") from None
    model = MODELS.create(ref.model.name, ref.model.options, f"{where}.model", **fixed)
    if ref.checkpoint is not None:
        load_model_weights(model, Path(ref.checkpoint), ref.model, where)
    return model


def make_distiller(cfg: Config, stage: StageConfig, student: nn.Module, teacher: nn.Module | None,
                   task: Task, where: str, taps: tuple[Taps, Taps | None] | None = None,
                   steps_per_epoch: int | None = None) -> Distiller:
    """A fresh Distiller for one stage: new method modules and weightings (e.g. a new PAD head);
    `steps_per_epoch` (optimizer steps) converts warm-ups given in epochs."""
    terms = []
    for j, term in enumerate(stage.terms):  # each term's taps on the models, so an error names its term
        for role, model, paths in (("student", student, term.student), ("teacher", teacher, term.teacher)):
            if model is not None:
                try:
                    Taps(model, {paths} if isinstance(paths, str) else set(paths), role).close()
                except PadkdError as err:
                    raise PadkdError(f"{where}.terms[{j}]: {err}") from None
    for j, (name, term) in enumerate(zip(cfg.term_names(stage), stage.terms, strict=True)):
        at = f"{where}.terms[{j}]"
        method = METHODS.create(term.method.name, term.method.options, f"{at}.method")
        weighting = WEIGHTINGS.create(term.weighting.name, term.weighting.options, f"{at}.weighting")
        terms.append(Term(name, method, weighting, student=term.student, teacher=term.teacher,
                          weight=term.weight, embedding=term.embedding, carry=term.carry, lr_scale=term.lr_scale,
                          warmup_epochs=term.warmup_epochs, warmup_steps=term.warmup_steps,
                          signature=term.signature()))
    try:
        return Distiller(student, teacher, terms, task=task, task_weight=stage.task_weight,
                         embedding=cfg.distill.embedding, teacher_train_bn=cfg.distill.teacher_train_bn,
                         student_mode=stage.student_mode, taps=taps, steps_per_epoch=steps_per_epoch)
    except PadkdError as err:
        raise PadkdError(f"{where}: {err}") from None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PadkdError("device: cuda requested but no GPU is visible; use device=cpu or device=auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
