"""Methods on intermediate features: pooled-embedding hints and FitNet feature-map regression."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.context import BuildContext
from padkd.methods.base import METHODS, Method
from padkd.ops import pool


@METHODS.register("hint")
class Hint(Method):
    """L2 hint on pooled embeddings: per-element `(connector(s) - t)²`, shape `[B, D_teacher]`.

    The batch-and-element mean is the usual MSE hint (the "L2" of the PAD paper's ImageNet table).
    A linear connector maps the student width to the teacher's when they differ (`connector="auto"`).
    """

    reference = "Romero et al. FitNets: Hints for Thin Deep Nets. ICLR 2015 (L2 on pooled embeddings)"

    def __init__(self, connector: Literal["auto", "linear", "none"] = "auto") -> None:
        super().__init__()
        self.connector_kind = connector
        self.connector: nn.Module = nn.Identity()

    def build(self, ctx: BuildContext) -> None:
        ds, dt = pool(ctx.student).shape[1], pool(ctx.teacher).shape[1]
        if self.connector_kind == "linear" or (self.connector_kind == "auto" and ds != dt):
            self.connector = nn.Linear(ds, dt)
        elif ds != dt:
            raise ValueError(f"hint: student width {ds} != teacher width {dt} and connector='none'")

    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Tensor:  # type: ignore[override]
        s = self.connector(pool(student))
        return (s.float() - pool(teacher).float()).pow(2)


@METHODS.register("fitnet")
class FitNet(Method):
    """FitNet hint on a feature map: a 1x1-conv regressor maps student channels to the teacher's.

    Discrepancy per element `(r(s) - t)²` over channels and locations, shape `[B, C_t·H·W]`. When
    spatial sizes differ both maps are average-pooled to the smaller height and width. With PAD, prefer
    `mode: per_sample` on large maps (a per-element head would predict C·H·W variances).
    """

    reference = "Romero et al. FitNets: Hints for Thin Deep Nets. ICLR 2015"
    default_weight = 100.0  # β of the CRD benchmark (RepDistiller)

    def __init__(self, batchnorm: bool = True) -> None:
        super().__init__()
        self.batchnorm = batchnorm
        self.regressor: nn.Module = nn.Identity()

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return (torch.randn(batch_size, 4, 6, 6, generator=generator),
                torch.randn(batch_size, 8, 3, 3, generator=generator))

    def build(self, ctx: BuildContext) -> None:
        student, teacher = ctx.student, ctx.teacher
        if student.dim() != 4 or teacher.dim() != 4:
            raise ValueError(
                f"fitnet needs feature maps [B, C, H, W], got student {tuple(student.shape)} and "
                f"teacher {tuple(teacher.shape)}: tap a convolutional layer, or use method 'hint'"
            )
        cs, ct = student.shape[1], teacher.shape[1]
        layers: list[nn.Module] = [nn.Conv2d(cs, ct, kernel_size=1, bias=not self.batchnorm)]
        if self.batchnorm:
            layers.append(nn.BatchNorm2d(ct))
        self.regressor = nn.Sequential(*layers)

    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Tensor:  # type: ignore[override]
        s = self.regressor(student)
        if s.shape[-2:] != teacher.shape[-2:]:
            size = tuple(min(a, b) for a, b in zip(s.shape[-2:], teacher.shape[-2:], strict=True))
            s, teacher = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(teacher, size)
        return (s.float() - teacher.float()).pow(2).flatten(1)
