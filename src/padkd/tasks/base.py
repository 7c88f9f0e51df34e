"""The task contract: the one place that knows how a model is called and what its output means."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from padkd.batch import Batch, stack_collate
from padkd.data import DataSplits
from padkd.registry import Registry

TASKS: Registry[Task] = Registry("task")


class Evaluator:
    """Accumulates a split batch by batch (`update`), then `compute()` gives the metrics over the whole
    split, gathered across ranks (so Recall@K and mAP, which need every sample, fit as well as accuracy)."""

    def attach(self, dataset: Any) -> None:
        """Called with the evaluated split's dataset before the first `update`, for evaluators that score
        against split-level ground truth (COCO's annotation file); the default needs none."""

    def update(self, output: Any, batch: Batch) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class Task:
    """Base class of tasks. Subclasses set `primary_metric` and implement `loss`, `evaluator` and
    `record_columns`; the defaults call models as `model(batch.inputs)`."""

    #: The evaluator metric that selects the best checkpoint.
    primary_metric: str = ""
    #: Whether a larger primary metric is better.
    higher_is_better: bool = True
    #: Keyword arguments a model factory receives from the task (filled in from the data), beside its options.
    model_fields: frozenset[str] = frozenset({"in_channels"})
    #: True when some forwards leave some model parameters unused (DDP must be told).
    find_unused_parameters: bool = False
    #: How dataset items `(input, target, index)` become a Batch.
    collate: Callable[[list[Any]], Batch] = staticmethod(stack_collate)
    #: Student tap paths that `teacher_forward` reads (the Distiller taps them whenever the teacher runs),
    #: e.g. a detector's `transform`, whose resized and padded images the teacher's backbone takes.
    student_taps: frozenset[str] = frozenset()
    #: The task-dependent `padkd.discrepancy.WeightingInputs` fields its outputs supply to weightings
    #: (`student_logits`/`teacher_logits`: the models' outputs are class logits `[B, C]`; `targets`: class indices).
    weighting_inputs: frozenset[str] = frozenset()

    def model_kwargs(self, data: DataSplits) -> dict[str, Any]:
        """The `model_fields` values for this data set."""
        return {"in_channels": data.in_channels}

    def forward(self, model: nn.Module, batch: Batch, *, training: bool) -> Any:
        """The student's (or an evaluated model's) output on `batch`."""
        return model(batch.inputs)

    def teacher_forward(self, teacher: nn.Module, batch: Batch, student_values: dict[str, Any]) -> Any:
        """The teacher's output, under no_grad. It runs before the student unless the task declares
        `student_taps`; then after it, reading those values (a detector teacher runs its backbone on the
        student's transformed images, or its ROI head on the student's proposals)."""
        return teacher(batch.inputs)

    def loss(self, output: Any, batch: Batch) -> Tensor:
        """The task loss of the student's output (a scalar)."""
        raise NotImplementedError

    def evaluator(self) -> Evaluator:
        raise NotImplementedError

    def record_columns(self, student: Any, teacher: Any | None, batch: Batch) -> dict[str, Tensor]:
        """Per-sample columns of the records (`[B]` each) from the evaluated outputs."""
        raise NotImplementedError

    def use_teacher(self, teacher: nn.Module | None, data: DataSplits | None = None) -> None:
        """Give the task the run's teacher and data, for an evaluator that compares the student with the teacher
        or a task that reads the teacher from an offline cache (default: unused)."""

    def element_rows(self, student: Any, teacher: Any | None, batch: Batch,
                     elements: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """Rows of an extra per-element table of the records (the language task: one row per token of a few
        sequences), from the outputs and each term's masked per-element values `[B, E]` (the discrepancy,
        its mask, PAD's log σ²); every column has one entry per row. Default: no table."""
        return {}

    def finish_records(self, table: dict[str, Tensor]) -> dict[str, Tensor]:
        """Columns that need the whole split (a query's nearest neighbours), made once from the collected
        table (rows in index order, every `record_columns` key concatenated); default: the table as it is."""
        return table

    def summary(self, metrics: dict[str, float]) -> str:
        """A short text of the metrics for the per-epoch line."""
        return f"{self.primary_metric}={metrics[self.primary_metric]:.4g}"
