"""The hard-mining family the PAD paper argues against: hand-made, detached weights from the discrepancy
itself, normalised to mean 1 in the batch (so the loss keeps the uniform scale)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from padkd.weightings.base import WEIGHTINGS, SampleWeighting

Granularity = Literal["sample", "element"]


@WEIGHTINGS.register("focal")
class Focal(SampleWeighting):
    """Focal-style hard mining: `w ∝ d^gamma` (larger discrepancy, larger weight)."""

    def __init__(self, gamma: float = 1.0, granularity: Granularity = "sample") -> None:
        super().__init__(granularity)
        self.gamma = gamma

    def weights(self, d: Tensor) -> Tensor:
        return d.clamp_min(0).pow(self.gamma)


@WEIGHTINGS.register("ohem")
class OHEM(SampleWeighting):
    """Online hard example mining: only the `fraction` of samples with the largest discrepancy count."""

    def __init__(self, fraction: float = 0.5, granularity: Granularity = "sample") -> None:
        super().__init__(granularity)
        if not 0 < fraction <= 1:
            raise ValueError(f"ohem fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def weights(self, d: Tensor) -> Tensor:
        k = max(1, math.ceil(self.fraction * d.numel()))
        keep = torch.zeros_like(d)
        keep[d.topk(k).indices] = 1.0
        return keep


class _Softmax(SampleWeighting):
    sign: float = 1.0

    def __init__(self, temperature: float = 1.0, granularity: Granularity = "sample") -> None:
        super().__init__(granularity)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def weights(self, d: Tensor) -> Tensor:
        # d is divided by its batch mean so the temperature is unit-free across methods.
        scale = d.mean().clamp_min(1e-12) * self.temperature
        return torch.softmax(self.sign * d / scale, dim=0)


@WEIGHTINGS.register("softmax_hard")
class SoftmaxHard(_Softmax):
    """`w = N·softmax(d / (T·mean d))`: smooth emphasis of large-discrepancy samples."""

    sign = 1.0


@WEIGHTINGS.register("softmax_easy")
class SoftmaxEasy(_Softmax):
    """`w = N·softmax(-d / (T·mean d))`: smooth emphasis of small-discrepancy (easy) samples."""

    sign = -1.0


@WEIGHTINGS.register("polynomial")
class Polynomial(SampleWeighting):
    """Easy emphasis `w ∝ (1 - d / max d)^gamma`: the hardest sample in the batch gets weight 0."""

    def __init__(self, gamma: float = 1.0, granularity: Granularity = "sample") -> None:
        super().__init__(granularity)
        self.gamma = gamma

    def weights(self, d: Tensor) -> Tensor:
        return (1 - d / d.max().clamp_min(1e-12)).clamp_min(0).pow(self.gamma)


@WEIGHTINGS.register("discard_hardest")
class DiscardHardest(SampleWeighting):
    """Drop the `fraction` of samples with the largest discrepancy; the rest count uniformly."""

    def __init__(self, fraction: float = 0.1, granularity: Granularity = "sample") -> None:
        super().__init__(granularity)
        if not 0 <= fraction < 1:
            raise ValueError(f"discard fraction must be in [0, 1), got {fraction}")
        self.fraction = fraction

    def weights(self, d: Tensor) -> Tensor:
        k = math.floor(self.fraction * d.numel())
        keep = torch.ones_like(d)
        if k > 0:
            keep[d.topk(k).indices] = 0.0
        return keep
