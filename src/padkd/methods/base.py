"""The method contract: `forward(student, teacher, batch)` → per-sample discrepancies `[B]` or `[B, E]`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from padkd.discrepancy import Discrepancy
from padkd.registry import Registry

METHODS: Registry[Method] = Registry("method")

#: A tapped feature, or a list of them for methods that read several layers.
Features = Tensor | list[Tensor]


@dataclass
class Batch:
    """One mini-batch: model `inputs`, task `targets` and the samples' dataset `index` (for
    per-sample records and memory-bank methods)."""

    inputs: Any
    targets: Any
    index: Tensor

    def __len__(self) -> int:
        return len(self.index)


class Method(nn.Module):
    """Base class of distillation methods. Subclasses never reduce over the batch dimension.

    `build(student, teacher)` creates shape-dependent modules (connectors, regressors) from an
    example batch before the optimizer exists; their parameters train with the student and are
    dropped on export.
    """

    def build(self, student: Features, teacher: Features) -> None:
        """Create modules whose shapes depend on the tapped features (default: none)."""

    def forward(self, student: Features, teacher: Features, batch: Batch) -> Tensor | Discrepancy:
        raise NotImplementedError
