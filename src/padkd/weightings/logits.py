"""Published per-sample weightings that read the task's class logits (and labels), for any method.

- `entropy` (EA-KD, Su et al., ICCV 2025): a sample counts by its teacher's entropy, raised where the
  student is also uncertain: `w = (H_t + H_t·H_s / H_ub) / 2`, entropies of softmax(z / t).
- `wsld` (weighted soft labels, Zhou et al., ICLR 2021): a sample counts by how much worse the student
  fits its label than the teacher does: `w = 1 - exp(-CE_s / (CE_t + eps))`, cross-entropies at T = 1.

Both weights are detached and, as in the authors' code, not normalised (`normalize: true` rescales them
to mean 1 in the batch, so the term keeps the uniform scale). Conventions: docs/pad.md ("weightings").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from padkd.discrepancy import WeightingInputs
from padkd.weightings.base import WEIGHTINGS, SampleWeighting


def entropy(logits: Tensor, temperature: float) -> Tensor:
    """Per-row Shannon entropy (nats) of softmax(logits / temperature), in fp32."""
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def _logits(inputs: WeightingInputs | None, who: str) -> tuple[Tensor, Tensor]:
    if inputs is None:
        raise ValueError(f"weighting '{who}' reads the student's and the teacher's class logits: pass WeightingInputs")
    s, t = inputs.require("student_logits", who), inputs.require("teacher_logits", who)
    if s.dim() != 2 or s.shape != t.shape:
        raise ValueError(f"weighting '{who}' needs student and teacher logits of one shape [B, C], got "
                         f"{tuple(s.shape)} and {tuple(t.shape)}")
    return s.detach().float(), t.detach().float()


@WEIGHTINGS.register("entropy")
class EntropyAware(SampleWeighting):
    """EA-KD (ICCV 2025): `w = (H_t + H_t·H_s/H_ub)/2` from teacher and student entropies at temperature t.

    `entropy_bound` is H_ub; None takes log C, the largest entropy of C classes (the authors' ImageNet
    value; their CIFAR-100 code uses 100). The authors' default t is 3 (2 in their ImageNet KD recipe).
    """

    needs = frozenset({"student_logits", "teacher_logits"})

    def __init__(self, temperature: float = 3.0, entropy_bound: float | None = None, normalize: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"entropy temperature must be > 0, got {temperature}")
        if entropy_bound is not None and entropy_bound <= 0:
            raise ValueError(f"entropy_bound must be > 0 (or null for log C), got {entropy_bound}")
        self.temperature = temperature
        self.entropy_bound = entropy_bound
        self.normalize = normalize

    def sample_weights(self, d: Tensor, inputs: WeightingInputs | None) -> Tensor:
        s, t = _logits(inputs, "entropy")
        bound = self.entropy_bound if self.entropy_bound is not None else math.log(s.shape[1])
        h_t, h_s = entropy(t, self.temperature), entropy(s, self.temperature)
        return (h_t + h_t * h_s / bound) / 2


@WEIGHTINGS.register("wsld")
class WeightedSoftLabels(SampleWeighting):
    """WSLD (ICLR 2021): `w = 1 - exp(-CE(s, y) / (CE(t, y) + eps))`, cross-entropies with the label at T = 1.

    A sample the student already fits as well as the teacher gets w ≈ 0.63; one the teacher fits far
    better gets w → 1; one the teacher fits worse than the student (a teacher error) gets w → 0."""

    needs = frozenset({"student_logits", "teacher_logits", "targets"})

    def __init__(self, eps: float = 1e-7, normalize: bool = False) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"wsld eps must be > 0, got {eps}")
        self.eps = eps
        self.normalize = normalize

    def sample_weights(self, d: Tensor, inputs: WeightingInputs | None) -> Tensor:
        s, t = _logits(inputs, "wsld")
        assert inputs is not None
        y = inputs.require("targets", "wsld")
        if y.dim() != 1 or y.is_floating_point() or len(y) != len(s):
            raise ValueError(f"weighting 'wsld' needs class-index targets of shape [{len(s)}], got {tuple(y.shape)}")
        ce_s = F.cross_entropy(s, y, reduction="none")
        ce_t = F.cross_entropy(t, y, reduction="none")
        return 1 - torch.exp(-(ce_s / (ce_t + self.eps)).clamp_min(0))
