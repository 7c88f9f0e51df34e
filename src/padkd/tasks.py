"""The classification task: its loss and its evaluation metrics (top-1/top-5 accuracy)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from padkd.methods.base import Batch


class Classification:
    """Cross-entropy (optional label smoothing); metrics top-1 and top-5 accuracy in percent."""

    primary_metric = "top1"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(output.float(), batch.targets, label_smoothing=self.label_smoothing)

    @staticmethod
    def correct(output: Tensor, targets: Tensor, k: int) -> Tensor:
        """`[B]` bool: is the target among the top-k predictions."""
        k = min(k, output.shape[1])
        return (output.topk(k, dim=1).indices == targets.unsqueeze(1)).any(dim=1)

    def batch_counts(self, output: Tensor, batch: Batch) -> dict[str, Tensor]:
        """Sums for one batch (reduced across batches and ranks, then divided by `count`)."""
        return {
            "top1": self.correct(output, batch.targets, 1).sum().float(),
            "top5": self.correct(output, batch.targets, 5).sum().float(),
            "loss": F.cross_entropy(output.float(), batch.targets, reduction="sum"),
            "count": torch.tensor(float(len(batch.targets)), device=output.device),
        }

    @staticmethod
    def finalize(sums: dict[str, Tensor]) -> dict[str, float]:
        n = max(float(sums["count"]), 1.0)
        return {"top1": 100.0 * float(sums["top1"]) / n, "top5": 100.0 * float(sums["top5"]) / n,
                "loss": float(sums["loss"]) / n}
