"""ReviewKD (Chen et al., CVPR 2021): attention-based fusion of the student's stages, hierarchical context loss.

See docs/methods-features.md for the conventions chosen where the authors' code and mdistiller differ.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.context import BuildContext, Features
from padkd.discrepancy import Discrepancy
from padkd.methods.base import METHODS, Method
from padkd.methods.features import _layers, _parts

#: The pooled sizes of the hierarchical context loss and their weights, halving from the level itself.
HCL_LEVELS = (4, 2, 1)


def _as_map(x: Tensor) -> Tensor:
    """A feature map `[B, C, H, W]`; a pooled embedding `[B, C]` becomes a 1x1 map."""
    return x[:, :, None, None] if x.dim() == 2 else x


class ABF(nn.Module):
    """Attention-based fusion of one student level with the fused result of the deeper levels.

    `conv1` (1x1 conv + BN) maps the student's map to `mid` channels; where there is a deeper result (all
    levels but the deepest), it is resized to this level (nearest) and the two are mixed with two per-location
    weights predicted from both (1x1 conv, sigmoid). The mix, resized to the teacher's size, is passed on to
    the next shallower level; `conv2` (3x3 conv + BN) maps it to the teacher's channels for the loss."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(the level's output for the loss, the fused map passed to the next shallower level)."""
        x = self.conv1(x)
        if self.att is not None:
            assert deeper is not None
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            z = self.att(torch.cat([x, deeper], dim=1))
            x = x * z[:, :1] + deeper * z[:, 1:]
        if tuple(x.shape[-2:]) != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


def hcl(student: Tensor, teacher: Tensor) -> Tensor:
    """The hierarchical context loss of one level, per sample `[B]`: the mean squared error of the maps plus
    that of their average-pooled 4x4, 2x2 and 1x1 versions smaller than the map, weighted 1, 1/2, 1/4, ...
    in that order and divided by the weights' sum (the authors' `hcl`)."""
    loss = (student - teacher).pow(2).flatten(1).mean(dim=1)
    weight, total = 1.0, 1.0
    for size in HCL_LEVELS:
        if size >= min(student.shape[-2:]):
            continue
        weight /= 2
        pooled = F.adaptive_avg_pool2d(student, size) - F.adaptive_avg_pool2d(teacher, size)
        loss = loss + weight * pooled.pow(2).flatten(1).mean(dim=1)
        total += weight
    return loss / total


@METHODS.register("reviewkd")
class ReviewKD(Method):
    """ReviewKD: each teacher level is matched by a fusion of the student's same and deeper levels.

    Taps: L student and L teacher levels, shallow to deep (maps `[B, C, H, W]`; a pooled `[B, C]` is a 1x1
    map), e.g. student `[stage1, stage2, stage3, pooled]`, teacher `[preact1, preact2, preact3, pooled]`.
    From the deepest level up, an `ABF` fuses the student's level k with the fused result of the deeper levels
    (the "review" path) and predicts the teacher's level k. Element k of sample i (one per level, `[B, L]`,
    parts that add up) is the hierarchical context loss `hcl` of that prediction and the teacher's map:
    the batch mean of their sum is the authors' loss. The ABFs' middle width is
    `min(max_mid_channels, C_student of the deepest level)` (the authors': 512). The term's weight ramps up
    over `warmup_epochs` (the authors' 20); its weight is the authors' per-pair `kd-loss-weight`.
    """

    reference = "Chen, Liu, Zhao, Jia. Distilling Knowledge via Knowledge Review. CVPR 2021"
    default_weight = 1.0  # mdistiller's REVIEWKD_WEIGHT; the authors' CIFAR scripts use 0.6-8 per pair
    warmup_epochs = 20.0

    def __init__(self, max_mid_channels: int = 512, warmup_epochs: float = 20.0) -> None:
        super().__init__()
        if max_mid_channels < 1 or warmup_epochs < 0:
            raise ValueError(f"reviewkd: need max_mid_channels >= 1 and warmup_epochs >= 0, got {max_mid_channels}, "
                             f"{warmup_epochs}")
        self.max_mid_channels = max_mid_channels
        self.warmup_epochs = warmup_epochs
        self.abfs = nn.ModuleList()  # deepest level first

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Features, Features]:
        g = generator
        return ([torch.randn(batch_size, 4, 8, 8, generator=g), torch.randn(batch_size, 8, 4, 4, generator=g),
                 torch.randn(batch_size, 8, generator=g)],
                [torch.randn(batch_size, 6, 8, 8, generator=g), torch.randn(batch_size, 12, 4, 4, generator=g),
                 torch.randn(batch_size, 12, generator=g)])

    @staticmethod
    def _levels(student: Features, teacher: Features) -> tuple[list[Tensor], list[Tensor]]:
        s, t = [_as_map(x) for x in _layers(student)], [_as_map(x) for x in _layers(teacher)]
        if len(s) != len(t):
            raise ValueError(f"reviewkd: the student taps {len(s)} level(s) and the teacher {len(t)}; tap the same "
                             "number on both sides, shallow to deep")
        for role, maps in (("student", s), ("teacher", t)):
            if any(x.dim() != 4 for x in maps):
                raise ValueError(f"reviewkd needs feature maps [B, C, H, W] or pooled [B, C] on the {role} side, "
                                 f"got {[tuple(x.shape) for x in maps]}")
        return s, t

    def build(self, ctx: BuildContext) -> None:
        s, t = self._levels(ctx.student, ctx.teacher)
        mid = min(self.max_mid_channels, s[-1].shape[1])
        self.abfs = nn.ModuleList(ABF(xs.shape[1], mid, xt.shape[1], fuse=k < len(s) - 1)
                                  for k, (xs, xt) in reversed(list(enumerate(zip(s, t, strict=True)))))

    def forward(self, student: Features, teacher: Features, batch: Batch) -> Discrepancy:  # type: ignore[override]
        s, t = self._levels(student, teacher)
        deeper: Tensor | None = None
        parts: list[Tensor] = []
        for abf, xs, xt in zip(self.abfs, reversed(s), reversed(t), strict=True):
            out, deeper = abf(xs, deeper, tuple(xt.shape[-2:]))
            parts.insert(0, hcl(out.float(), xt.float()))
        return _parts(parts)
