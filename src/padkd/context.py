"""What a method or weighting may know when it builds its modules: example features, the data set, the world.

CRD sizes its memory bank from `data.n_train` and draws "exact" negatives from `data.train_targets`;
a method may reuse a teacher head through `teacher_model`. Nothing here is trainable or mutable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from padkd.batch import Batch

#: A tapped value: a tensor, or a list/dict of tensors (several layers, FPN levels).
Features = Any


@dataclass(frozen=True)
class DataInfo:
    """Facts about the training data: its size, the number of classes and the labels in dataset order
    (None where the task has no class labels)."""

    n_train: int
    num_classes: int | None = None
    train_targets: Tensor | None = None


@dataclass(frozen=True)
class BuildContext:
    """Everything `Method.build` and `Weighting.build` receive (one per term).

    `student`/`teacher` are the term's tapped values on `batch`, a seeded random sample of the
    training split (never its first batch: on class-sorted folders that is a single class).
    The models are for reading only (their shapes, a teacher head to reuse).
    """

    student: Features
    teacher: Features
    batch: Batch
    data: DataInfo
    world_size: int
    student_model: nn.Module
    teacher_model: nn.Module | None
