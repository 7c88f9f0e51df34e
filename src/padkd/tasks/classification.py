"""Classification: cross-entropy, top-1/top-5 accuracy, predictions and confidences per sample."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.data import DataSplits
from padkd.distributed import all_reduce_sum
from padkd.tasks.base import TASKS, Evaluator, Task


def correct_at(output: Tensor, targets: Tensor, k: int) -> Tensor:
    """`[B]` bool: is the target among the top-k predictions."""
    k = min(k, output.shape[1])
    return (output.topk(k, dim=1).indices == targets.unsqueeze(1)).any(dim=1)


class AccuracyEvaluator(Evaluator):
    """Top-1/top-5 accuracy (percent) and mean cross-entropy, from sums reduced across ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}

    def update(self, output: Tensor, batch: Batch) -> None:
        counts = {
            "top1": correct_at(output, batch.targets, 1).sum().float(),
            "top5": correct_at(output, batch.targets, 5).sum().float(),
            "loss": F.cross_entropy(output.float(), batch.targets, reduction="sum"),
            "count": torch.tensor(float(len(batch.targets)), device=output.device),
        }
        for key, value in counts.items():
            self.sums[key] = self.sums.get(key, 0) + value

    def compute(self) -> dict[str, float]:
        sums = all_reduce_sum(self.sums)
        n = max(float(sums.get("count", 0.0)), 1.0)
        return {"top1": 100.0 * float(sums.get("top1", 0.0)) / n, "top5": 100.0 * float(sums.get("top5", 0.0)) / n,
                "loss": float(sums.get("loss", 0.0)) / n}


@TASKS.register("classification")
class Classification(Task):
    """Image classification: cross-entropy (optional label smoothing); top-1 selects the best checkpoint."""

    primary_metric = "top1"
    weighting_inputs = frozenset({"student_logits", "teacher_logits", "targets"})
    model_fields = frozenset({"in_channels", "num_classes"})

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def model_kwargs(self, data: DataSplits) -> dict[str, Any]:
        if data.num_classes is None:
            raise ValueError("classification needs a data set with class labels (num_classes)")
        return {"in_channels": data.in_channels, "num_classes": data.num_classes}

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(output.float(), batch.targets, label_smoothing=self.label_smoothing)

    def evaluator(self) -> Evaluator:
        return AccuracyEvaluator()

    def record_columns(self, student: Tensor, teacher: Tensor | None, batch: Batch) -> dict[str, Tensor]:
        s_prob = student.float().softmax(1)
        s_pred = s_prob.argmax(1)
        row = {"target": batch.targets, "student_pred": s_pred, "student_correct": (s_pred == batch.targets).int(),
               "student_confidence": s_prob.max(1).values}
        if teacher is not None:
            t_prob = teacher.float().softmax(1)
            t_pred = t_prob.argmax(1)
            row |= {"teacher_pred": t_pred, "teacher_correct": (t_pred == batch.targets).int(),
                    "teacher_confidence": t_prob.max(1).values,
                    "teacher_true_prob": t_prob.gather(1, batch.targets[:, None]).squeeze(1)}
        return row
