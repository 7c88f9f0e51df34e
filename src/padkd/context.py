"""What a method or weighting may know when it builds its modules: example features, the data set, the world.

CRD sizes its memory bank from `data.n_train` and draws "exact" negatives from `data.train_targets`;
a method may reuse a teacher head through `teacher_model`. Nothing here is trainable or mutable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class StageClock:
    """Where a stage stands, in optimizer steps: the one clock that every warm-up ramp and schedule reads
    (the term ramps, CTKD's λ curriculum). `step` counts the optimizer steps completed in the stage;
    `steps_per_epoch` converts epochs to steps (None outside the trainer, where epochs are unknown)."""

    step: int = 0
    steps_per_epoch: int | None = None

    def steps(self, epochs: float, what: str) -> int:
        """`epochs` as a whole number of optimizer steps (ValueError when the epoch length is unknown)."""
        if epochs == 0:
            return 0
        if self.steps_per_epoch is None:
            raise ValueError(f"{what} is given in epochs, but the epoch length is unknown here: give the "
                             "Distiller steps_per_epoch, or the warm-up in steps")
        return round(epochs * self.steps_per_epoch)


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
    #: The stage's clock, for a module whose behaviour follows the training position (read, never set).
    clock: StageClock = field(default_factory=StageClock)
