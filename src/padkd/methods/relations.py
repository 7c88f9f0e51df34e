"""Relational methods: what is matched is how the samples of a batch relate to each other.

Each pairwise loss decomposes by rows: sample i's discrepancy is row i of the loss matrix, so the mean
of the rows over the batch is the usual scalar loss (what `uniform` computes). A row's elements are
partners j, not fixed features: methods that return the row itself declare `elements = "exchangeable"`
(PAD then runs `per_sample`); RKD reduces each row to its two fixed parts and PKT to one number.
Features are flattened per sample (`[B, ...]` → `[B, D]`); student and teacher widths may differ.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.context import BuildContext
from padkd.discrepancy import Discrepancy
from padkd.methods.base import METHODS, Method


def _flat(x: Tensor) -> Tensor:
    return x.float().flatten(1)


def _fp32(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run a forward with autocast off: the Gram/kernel products must not drop to bf16/fp16."""

    @functools.wraps(forward)
    def wrapped(self: Method, student: Tensor, teacher: Tensor, batch: Batch) -> Tensor:
        with torch.autocast(device_type=student.device.type, enabled=False):
            return forward(self, student, teacher, batch)

    return wrapped


def _embeddings(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Pooled embeddings of different widths (student 6, teacher 12)."""
    return torch.randn(batch_size, 6, generator=generator), torch.randn(batch_size, 12, generator=generator)


@METHODS.register("sp")
class SP(Method):
    """Similarity-preserving KD: squared differences of row-L2-normalised batch Gram matrices, `[B, B]`.

    With `G = F Fᵀ` (F the flattened features) and `Ĝ` its rows scaled to unit L2 norm, element (i, j)
    is `(Ĝ_t[i, j] - Ĝ_s[i, j])²` and row i's mean is sample i's discrepancy; the batch mean is the
    paper's `‖Ĝ_t - Ĝ_s‖²_F / B²`. A pair (i, j), i ≠ j, counts once in row i (entry (i, j), scaled by
    row i's norm) and once in row j (entry (j, i), scaled by row j's norm), each with weight 1/B².
    L2 row norms as in the paper, RepDistiller and mdistiller (torchdistill's `SPKDLoss` uses L1).
    One tap per term; the CRD benchmark taps the last convolutional block's output (β 3000).
    """

    reference = "Tung, Mori. Similarity-Preserving Knowledge Distillation. ICCV 2019"
    default_weight = 3000.0  # β of the CRD benchmark (RepDistiller, mdistiller)
    elements = "exchangeable"

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return (torch.randn(batch_size, 4, 3, 3, generator=generator),
                torch.randn(batch_size, 8, 2, 2, generator=generator))

    @_fp32
    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Tensor:  # type: ignore[override]
        def gram(x: Tensor) -> Tensor:
            f = _flat(x)
            return F.normalize(f @ f.t(), p=2, dim=1)

        return (gram(teacher) - gram(student)).pow(2)


@METHODS.register("cc")
class CC(Method):
    """Correlation congruence: squared differences of Gaussian-kernel correlation matrices, `[B, B]`.

    The kernel `exp(-γ‖f_i - f_j‖²)` of L2-normalised embeddings is replaced by its order-P Taylor
    expansion `C_ij = exp(-2γ) Σ_{p=0..P} (2γ)^p / p! (f_i · f_j)^p` (the paper's form). Element (i, j) is
    `(C_t[i, j] - C_s[i, j])²`; row i's mean is sample i's discrepancy and the batch mean is the paper's
    `‖C_t - C_s‖²_F / B²`. C is symmetric, so a pair (i, j), i ≠ j, adds the same value to rows i and j,
    each with weight 1/B². `embed: 128` maps student and teacher features through linear embeddings
    (both trained with the student, as in RepDistiller and torchdistill); `embed: null` uses them as
    they are. `normalize: false` drops the L2 normalisation (torchdistill), leaving the expansion
    away from the kernel it approximates. Not implemented: torchdistill's unsquared norm `‖·‖_F / B²`
    (no per-sample split) and RepDistiller's `Correlation` (products of neighbouring samples'
    differences, which depend on the batch order). β 0.02 is the CRD benchmark's, tuned for
    RepDistiller's formula; γ = 0.4, P = 2 are torchdistill's.
    """

    reference = "Peng et al. Correlation Congruence for Knowledge Distillation. ICCV 2019"
    default_weight = 0.02  # β of the CRD benchmark (RepDistiller's variant of CC)
    elements = "exchangeable"

    def __init__(self, gamma: float = 0.4, order: int = 2, embed: int | None = 128, normalize: bool = True) -> None:
        super().__init__()
        if gamma <= 0 or order < 1:
            raise ValueError(f"cc needs gamma > 0 and order >= 1, got gamma={gamma}, order={order}")
        if embed is not None and embed < 1:
            raise ValueError(f"cc embed must be a positive width or null, got {embed}")
        self.gamma = gamma
        self.order = order
        self.embed = embed
        self.normalize = normalize
        self.embed_s: nn.Module = nn.Identity()
        self.embed_t: nn.Module = nn.Identity()

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return _embeddings(batch_size, generator)

    def build(self, ctx: BuildContext) -> None:
        if self.embed is not None:
            self.embed_s = nn.Linear(ctx.student[0].numel(), self.embed)
            self.embed_t = nn.Linear(ctx.teacher[0].numel(), self.embed)

    def correlation(self, f: Tensor) -> Tensor:
        """The Taylor-expanded Gaussian-kernel correlation matrix `[B, B]` of embeddings `f`."""
        if self.normalize:
            f = F.normalize(f, p=2, dim=1)
        dot = f @ f.t()
        c = torch.ones_like(dot)
        for p in range(1, self.order + 1):
            c = c + (2 * self.gamma) ** p / math.factorial(p) * dot.pow(p)
        return math.exp(-2 * self.gamma) * c

    @_fp32
    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Tensor:  # type: ignore[override]
        f_s, f_t = self.embed_s(_flat(student)), self.embed_t(_flat(teacher))
        return (self.correlation(f_t) - self.correlation(f_s)).pow(2)


@METHODS.register("rkd")
class RKD(Method):
    """Relational KD: distance and angle parts with the Huber loss, two elements `[B, 2]`.

    Distance: `ψ_ij = ‖f_i - f_j‖ / μ`, μ the mean over pairs i ≠ j (per network); the part is
    `mean_{ij} huber(ψ_s - ψ_t)` over all B² entries (the zero diagonal included, as in RepDistiller
    and mdistiller). Row i is `mean_j huber(ψ_s,ij - ψ_t,ij)`: the pair (i, j) counts in rows i and j
    with the same value, each with weight 1/B². Angle: `cos∠(f_j, f_i, f_k)`, the angle at vertex i,
    over all B³ ordered triplets (degenerate ones are 0 for both networks); triplet (j, i, k) counts in
    the row of its vertex i only, so row i is `mean_{jk}` of its B² triplets. Element 0 is
    `distance_weight · row_dist_i`, element 1 `angle_weight · row_angle_i`, parts that add up
    (`sum_elements`); the batch mean under `uniform` is RepDistiller's `25 L_D + 50 L_A`. Needs at
    least 2 samples per batch. `squared: true` uses squared distances (mdistiller's option).
    """

    reference = "Park, Kim, Lu, Cho. Relational Knowledge Distillation. CVPR 2019"
    default_weight = 1.0  # β of the CRD benchmark, with distance 25 and angle 50 inside

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, squared: bool = False) -> None:
        super().__init__()
        if distance_weight < 0 or angle_weight < 0:
            raise ValueError(f"rkd part weights must be >= 0, got {distance_weight}, {angle_weight}")
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.squared = squared

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return _embeddings(batch_size, generator)

    def distances(self, f: Tensor) -> Tensor:
        """Pairwise distances `[B, B]` divided by their mean over pairs i ≠ j (zero diagonal)."""
        n = f.shape[0]
        sq = (f.unsqueeze(1) - f.unsqueeze(0)).pow(2).sum(dim=2).clamp_min(1e-12)
        d = sq if self.squared else sq.sqrt()
        d = d * (1 - torch.eye(n, device=f.device, dtype=f.dtype))
        return d / (d.sum() / (n * (n - 1)))

    @staticmethod
    def angles(f: Tensor) -> Tensor:
        """`[B, B, B]`: entry (i, j, k) is the cosine of the angle at vertex i between f_j and f_k."""
        e = F.normalize(f.unsqueeze(0) - f.unsqueeze(1), p=2, dim=2)  # e[i, j] = unit(f_j - f_i)
        return e @ e.transpose(1, 2)

    @_fp32
    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Discrepancy:  # type: ignore[override]
        s, t = _flat(student), _flat(teacher)
        if s.shape[0] < 2:
            raise ValueError("rkd needs at least 2 samples per batch (it matches pairwise distances and angles)")
        dist = F.smooth_l1_loss(self.distances(s), self.distances(t), reduction="none").mean(dim=1)
        angle = F.smooth_l1_loss(self.angles(s), self.angles(t), reduction="none").flatten(1).mean(dim=1)
        return Discrepancy(torch.stack([self.distance_weight * dist, self.angle_weight * angle], dim=1),
                           sum_elements=True)


@METHODS.register("pkt")
class PKT(Method):
    """Probabilistic knowledge transfer: KL between teacher and student conditional probabilities, `[B]`.

    With cosine similarities rescaled to `k_ij = (1 + cos(f_i, f_j)) / 2` and each row normalised into
    `p_j|i = k_ij / Σ_j k_ij` (the self-pair included, as in the authors' code), sample i's
    discrepancy is `(1/B) Σ_j q_j|i log((q_j|i + ε) / (p_j|i + ε))` (q teacher, p student, ε = 1e-7):
    row i of the authors' loss, whose batch mean over all B² entries is their `torch.mean`. A pair
    (i, j) counts in row i through `q_j|i` and in row j through `q_i|j` (each row normalised on its own).
    A row is one number (its terms can be negative), floored at 0 against rounding; β 30000 is the CRD
    benchmark's.
    """

    reference = "Passalis, Tefas. Learning Deep Representations with Probabilistic Knowledge Transfer. ECCV 2018"
    default_weight = 30000.0  # β of the CRD benchmark (RepDistiller, mdistiller)

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"pkt eps must be > 0, got {eps}")
        self.eps = eps

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return _embeddings(batch_size, generator)

    def conditional(self, f: Tensor) -> Tensor:
        """Row-normalised rescaled cosine similarities `[B, B]` (the authors' eps on the norms)."""
        f = f / (f.norm(dim=1, keepdim=True) + self.eps)
        k = (f @ f.t() + 1) / 2
        return k / k.sum(dim=1, keepdim=True)

    @_fp32
    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Tensor:  # type: ignore[override]
        p, q = self.conditional(_flat(student)), self.conditional(_flat(teacher))
        rows = q * (torch.log(q + self.eps) - torch.log(p + self.eps))
        return rows.mean(dim=1).clamp_min(0)
