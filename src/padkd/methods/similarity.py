"""Similarity matching: the student's cosine-similarity matrix of the batch should equal the teacher's."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.discrepancy import Discrepancy
from padkd.methods.base import METHODS, Method


def cosine_matrix(x: Tensor) -> Tensor:
    """`[B, B]` cosine similarities of the rows of `x` (flattened per sample), in fp32 (autocast off)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        unit = F.normalize(x.flatten(1).float(), dim=1)
        return unit @ unit.T


@METHODS.register("similarity")
class Similarity(Method):
    """Match cosine-similarity rows: sample i's elements are `(cos(s_i, s_j) − cos(t_i, t_j))²` for j ≠ i.

    Shape `[B, B]` with the diagonal masked out (a sample's similarity to itself is 1 on both sides), so
    the uniform batch loss is the mean over ordered pairs i ≠ j. The elements are exchangeable partners:
    a pair (i, j) appears in row i and in row j, so under a per-sample weighting it counts with weight
    w_i + w_j (PAD: 1/σ²_i + 1/σ²_j). Needs no connector: both matrices are B × B whatever the widths.
    Close to similarity-preserving KD (Tung & Mori, ICCV 2019), which matches L2-normalised rows of
    the Gram matrix of raw features, and to RKD's distance term (Park et al., CVPR 2019); here the
    entries are cosine similarities of the embeddings, the quantity retrieval ranks by.
    """

    reference = "Tung & Mori. Similarity-Preserving Knowledge Distillation. ICCV 2019 (cosine-similarity rows)"
    elements = "exchangeable"

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return (torch.randn(batch_size, 6, generator=generator), torch.randn(batch_size, 10, generator=generator))

    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Discrepancy:  # type: ignore[override]
        with torch.no_grad():
            target = cosine_matrix(teacher)
        d = (cosine_matrix(student) - target).pow(2)
        partners = ~torch.eye(len(d), dtype=torch.bool, device=d.device)
        return Discrepancy(d, mask=partners)
