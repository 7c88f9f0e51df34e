"""Evaluation of a model on a split through its task's evaluator (whole split, gathered across ranks)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from padkd.batch import Batch
from padkd.tasks.base import Task


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, loader: Iterable[Batch]) -> dict[str, float]:
    """The task's metrics of `model` (in eval mode) over every batch of `loader`, reduced over ranks."""
    was_training = model.training
    model.eval()
    evaluator = task.evaluator()
    evaluator.attach(getattr(loader, "dataset", None))
    try:
        for batch in loader:
            evaluator.update(task.forward(model, batch, training=False), batch)
    finally:
        model.train(was_training)
    return evaluator.compute()
