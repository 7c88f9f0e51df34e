"""Methods on the networks' outputs (logits): KD, DKD, DIST, MLKD, CTKD, and DIST+ (logits and one map).

Logit standardization (Sun et al., CVPR 2024) is an option (`standardize`) of `kd`, `dkd`, `mlkd` and
`ctkd`. See docs/methods-logits-relations.md for the conventions chosen where public implementations
disagree.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.context import BuildContext, Features, StageClock
from padkd.discrepancy import Discrepancy
from padkd.methods.base import METHODS, Method
from padkd.methods.features import _common_size, _he_connector, _no_autocast

#: The logit-standardization authors' epsilon (added to the unbiased standard deviation).
LS_EPS = 1e-7


def standardize(z: Tensor, eps: float = LS_EPS) -> Tensor:
    """Logit standardization: each row's z-score `(z - mean) / (std + eps)`, std unbiased (the authors' code).

    The softmax of a z-score no longer depends on the logits' range, so the student matches the teacher's
    logit relations rather than its magnitude (Sun et al., CVPR 2024)."""
    if z.shape[1] < 2:
        raise ValueError(f"logit standardization needs at least 2 logits per row, got {z.shape[1]}")
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def _logits(student: Tensor, teacher: Tensor, standardized: bool) -> tuple[Tensor, Tensor]:
    """Both logits in fp32, z-scored per row when `standardized`."""
    s, t = student.float(), teacher.float()
    return (standardize(s), standardize(t)) if standardized else (s, t)


def _kl_rows(student: Tensor, teacher: Tensor, temperature: float | Tensor) -> Tensor:
    """Per-row `KL(softmax(t/T) ‖ softmax(s/T))`, in log space (T a number or a `[B, 1]` column)."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


@METHODS.register("kd")
class KD(Method):
    """Hinton KD: sample i's discrepancy is `T² · KL(softmax(t_i/T) ‖ softmax(s_i/T))`.

    The T² factor keeps gradient magnitudes comparable across temperatures; the batch mean of these
    discrepancies equals `KLDivLoss(reduction="batchmean") · T²`. `standardize: true` z-scores both
    logits per row first ("KD + LS", Sun et al. CVPR 2024: their recipe is T = 2, term weight 9).
    """

    reference = "Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv 1503.02531, 2015"

    def __init__(self, temperature: float = 4.0, standardize: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.standardize = standardize

    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Tensor:  # type: ignore[override]
        s, t = _logits(student, teacher, self.standardize)
        return _kl_rows(s, t, self.temperature) * (self.temperature**2)


@METHODS.register("dkd")
class DKD(Method):
    """Decoupled KD: target-class (TCKD) and non-target-class (NCKD) KL terms, two elements `[B, 2]`.

    Sample i: `TCKD_i = T² KL(b_t ‖ b_s)` on the binary split `b = [p_gt, 1 - p_gt]` of softmax(·/T), and
    `NCKD_i = T² KL(p̂_t ‖ p̂_s)` on the softmax(·/T) of the non-target logits alone. Element 0 is
    `α TCKD_i`, element 1 `β NCKD_i`, parts that add up (`sum_elements`): sample i's discrepancy is
    `α TCKD_i + β NCKD_i` and the batch mean under `uniform` is the authors' loss. Needs class
    targets. The term's weight ramps up over `warmup_epochs` (the published 20: `min(epoch / 20, 1)`
    with mdistiller's 1-based epochs).
    Defaults are mdistiller's CIFAR-100 ones (α=1, β=8, T=4, warm-up 20, loss weight 1); its
    per-pair configs lower β for some pairs (resnet56→20: 2; wrn-40-2→16-2 and vgg13→mbv2: 6).
    `standardize: true` z-scores both logits per row first ("DKD + LS": the LS authors multiply α and β by
    their KD weight, which is the term weight here, and use T = 2).
    """

    reference = "Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation. CVPR 2022"
    warmup_epochs = 20.0

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup_epochs: float = 20.0, standardize: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DKD temperature must be > 0, got {temperature}")
        if alpha < 0 or beta < 0 or warmup_epochs < 0:
            raise ValueError(f"DKD alpha, beta and warmup_epochs must be >= 0, got {alpha}, {beta}, {warmup_epochs}")
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.standardize = standardize

    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Discrepancy:  # type: ignore[override]
        targets = batch.targets
        if not isinstance(targets, Tensor) or targets.dim() != 1 or targets.is_floating_point():
            raise ValueError("dkd needs class-index targets of shape [B] (a classification task)")
        n, c = student.shape
        if c < 2:
            raise ValueError(f"dkd needs at least 2 classes, got logits of width {c}")
        t = self.temperature
        s, z_t = _logits(student, teacher, self.standardize)
        gt = F.one_hot(targets, c).bool()
        tckd = _binary_kl(s / t, z_t / t, gt)
        nckd = _kl_rows(s[~gt].view(n, c - 1), z_t[~gt].view(n, c - 1), t)
        return Discrepancy(torch.stack([self.alpha * tckd, self.beta * nckd], dim=1) * (t * t), sum_elements=True)


def _binary_kl(s: Tensor, t: Tensor, gt: Tensor) -> Tensor:
    """Per-sample KL between the teacher's and the student's [p_target, p_rest] (log space, no log(0))."""

    def log_split(z: Tensor) -> Tensor:
        log_p = F.log_softmax(z, dim=1)
        rest = log_p.masked_fill(gt, float("-inf")).logsumexp(dim=1)
        return torch.stack([log_p[gt], rest], dim=1)

    log_b_s, log_b_t = log_split(s), log_split(t)
    return (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=1)


def _pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Row-wise Pearson correlation with eps in the denominator (the DIST authors' form)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def _dist_relations(student: Tensor, teacher: Tensor, tau: float, beta: float, gamma: float, intra: bool,
                    name: str) -> list[Tensor]:
    """DIST's parts on logits, each `[B]` and scaled by τ² and its coefficient: the per-sample inter-class
    relation and, with `intra`, the batch's intra-class relation repeated on every row."""
    scale = tau * tau
    y_s = F.softmax(student.float() / tau, dim=1)
    y_t = F.softmax(teacher.float() / tau, dim=1)
    inter = scale * beta * (1 - _pearson(y_s, y_t)).clamp_min(0)
    if not intra:
        return [inter]
    if y_s.shape[0] < 2:
        raise ValueError(f"{name}: the intra-class relation correlates classes over the batch and needs batch "
                         "size >= 2; set intra: false for the per-sample part alone")
    intra_part = scale * gamma * (1 - _pearson(y_s.t(), y_t.t()).mean()).clamp_min(0)
    return [inter, intra_part.expand_as(inter)]


@METHODS.register("dist")
class DIST(Method):
    """DIST: relations of softmax(·/τ) predictions, by Pearson correlation instead of KL.

    Inter-class relation of sample i: `τ² β (1 - ρ(y_s,i, y_t,i))`, ρ the Pearson correlation of the
    student's and teacher's probability rows. Intra-class relation: `τ² γ (1 - mean_c ρ(y_s[:, c],
    y_t[:, c]))`, a correlation of each class's column *over the batch*: it belongs to no sample.
    `intra: true` (the authors' loss) returns `[B, 2]` = (inter_i, intra) — the batch's intra value
    repeated on every row, parts that add up (`sum_elements`) — and the instance declares
    `unit = "batch"`: only `uniform` accepts it, whose batch mean is the authors' loss.
    `intra: false` returns the per-sample inter part alone, `[B]`, which PAD and hard mining can weight.

    Defaults, from the authors' CIFAR-100 recipe (hunto/image_classification_sota at d9662f7, the
    DIST_KD submodule: `configs/strategies/distill/dist_cifar.yaml`, `kd: dist_t4`): β = γ = 1, τ = 4,
    both parts scaled by τ², loss weight 2 (`kd_loss_weight`) beside CE weight 1. Their ImageNet
    recipe uses τ = 1 with the same weight 2. eps 1e-8 in the correlation's denominator as theirs.
    """

    reference = "Huang, You, Wang, Qian, Xu. Knowledge Distillation from A Stronger Teacher. NeurIPS 2022"
    default_weight = 2.0  # the authors' kd_loss_weight on CIFAR-100 and ImageNet
    unit = "batch"
    per_sample_fix = "set the method's intra: false for its per-sample (inter-class) part alone"

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 4.0, intra: bool = True) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"DIST tau must be > 0, got {tau}")
        if beta < 0 or gamma < 0:
            raise ValueError(f"DIST beta and gamma must be >= 0, got {beta}, {gamma}")
        self.beta = beta
        self.gamma = gamma
        self.tau = tau
        self.intra = intra
        self.unit = "batch" if intra else "sample"

    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Tensor | Discrepancy:  # type: ignore[override]
        parts = _dist_relations(student, teacher, self.tau, self.beta, self.gamma, self.intra, "dist")
        return parts[0] if len(parts) == 1 else Discrepancy(torch.stack(parts, dim=1), sum_elements=True)


# ------------------------------------------------------------------------------------------------ MLKD

MLKD_LEVELS = ("instance", "batch", "class")


def _median_fraction(x: Tensor) -> Tensor:
    """The fraction of the entries of `x` at most their median (linear interpolation, as numpy's percentile)."""
    return (x <= x.quantile(0.5)).float().mean()


@METHODS.register("mlkd")
class MLKD(Method):
    """Multi-level logit distillation: instance, batch and class alignment of predictions at several temperatures.

    With `p_i = softmax(s_i/T)`, `q_i = softmax(t_i/T)`, the batch's prediction matrices P, Q `[B, C]` and
    the temperatures 𝒯 (default 2, 3, 4, 5, 6, the authors' five), the parts of sample i, in this order
    (elements that add up, those of `levels`):
    - instance: `Σ_T T² KL(q_i ‖ p_i)`;
    - batch: row i of the batch alignment `Σ_T Σ_j ((QQᵀ)_ij − (PPᵀ)_ij)²` (B×B Gram matrices of the
      predictions, no T²); the batch mean of the rows is the authors' `Σ_ij (·)² / B`, and a pair (i, j)
      counts in rows i and j;
    - class: `Σ_T Σ_cc' ((QᵀQ)_cc' − (PᵀP)_cc')² / C` (C×C Gram matrices, no T²), a statistic of the batch
      that no sample owns, repeated on every row: with it the method is batch-level (`uniform` only).
    `mask: code` is the authors' released confidence masking: the instance and batch parts are multiplied
    by the fraction of the batch whose teacher confidence `max_c softmax(t_i)` is at most the batch median,
    the class part by the fraction of classes whose summed teacher probability is at most their median
    (their mask multiplies losses already averaged over the batch, so it scales by ≈ ½ rather than
    selecting samples); `mask: none` leaves the parts unscaled. `standardize` z-scores the logits of the
    instance part only, as the logit-standardization authors' MLKD does. This is the authors' loss on the
    training view alone: their strong-augmentation terms need a second augmented view of each batch.
    """

    reference = "Jin, Wang, Lin. Multi-Level Logit Distillation. CVPR 2023"
    default_weight = 0.9  # the authors' KD_WEIGHT (beside cross-entropy 0.1)
    unit = "batch"
    per_sample_fix = "set the method's levels: [instance, batch] for its per-sample parts alone"

    def __init__(self, temperatures: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0),
                 levels: tuple[Literal["instance", "batch", "class"], ...] = MLKD_LEVELS,
                 mask: Literal["code", "none"] = "code", standardize: bool = False) -> None:
        super().__init__()
        if not temperatures or min(temperatures) <= 0:
            raise ValueError(f"mlkd: temperatures must be a non-empty list of values > 0, got {list(temperatures)}")
        if not levels or len(set(levels)) != len(levels) or not set(levels) <= set(MLKD_LEVELS):
            raise ValueError(f"mlkd: levels must be distinct values of {list(MLKD_LEVELS)}, got {list(levels)}")
        self.temperatures = tuple(temperatures)
        self.levels = [level for level in MLKD_LEVELS if level in levels]
        self.mask = mask
        self.standardize = standardize
        self.unit = "batch" if "class" in self.levels else "sample"

    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Discrepancy:  # type: ignore[override]
        s, t = student.float(), teacher.float()
        n, c = s.shape
        if self.mask == "code":
            p_t = F.softmax(t, dim=1)
            kept_samples, kept_classes = _median_fraction(p_t.amax(dim=1)), _median_fraction(p_t.sum(dim=0))
        else:
            kept_samples = kept_classes = torch.ones((), device=s.device)
        parts: dict[str, Tensor] = {}
        if "instance" in self.levels:
            zs, zt = _logits(student, teacher, self.standardize)
            parts["instance"] = kept_samples * sum(_kl_rows(zs, zt, temp) * temp**2 for temp in self.temperatures)
        if "batch" in self.levels or "class" in self.levels:
            rows, whole = s.new_zeros(n), s.new_zeros(())
            with _no_autocast(s):
                for temp in self.temperatures:
                    p, q = F.softmax(s / temp, dim=1), F.softmax(t / temp, dim=1)
                    rows = rows + (q @ q.t() - p @ p.t()).pow(2).sum(dim=1)
                    whole = whole + (q.t() @ q - p.t() @ p).pow(2).sum() / c
            parts["batch"] = kept_samples * rows
            parts["class"] = (kept_classes * whole).expand(n)
        return Discrepancy(torch.stack([parts[level] for level in self.levels], dim=1), sum_elements=True)


# ------------------------------------------------------------------------------------------------ CTKD


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by -λ (gradient reversal, Ganin & Lempitsky)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, lam: float) -> Tensor:  # type: ignore[override]
        ctx.lam = lam  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return -ctx.lam * grad, None  # type: ignore[attr-defined]


def curriculum_lambda(step: int, steps: int, kind: Literal["cosine", "linear"], lambda_max: float) -> float:
    """CTKD's λ after `step` optimizer steps: from 0 to `lambda_max` over `steps` steps, by `(1 − cos πx) / 2`
    (cosine) or `x` (linear), `x = min(step / steps, 1)`. The curriculum's one formula, a pure function of the step."""
    x = min(step / steps, 1.0) if steps > 0 else 1.0
    return lambda_max * ((1 - math.cos(math.pi * x)) / 2 if kind == "cosine" else x)


@METHODS.register("ctkd")
class CTKD(Method):
    """Curriculum temperature KD: KD at a learned temperature that is trained adversarially, to raise the loss.

    Sample i's discrepancy is `τ_i² KL(softmax(t_i/τ_i) ‖ softmax(s_i/τ_i))`, KD at the temperature
    `τ = min_temperature + temperature_range · sigmoid(θ)` that the method's own module gives: one
    parameter θ for every sample (`mode: global`, the authors' `Global_T`, θ starting at `init`), or a
    two-layer MLP of the sample's detached logits `[s_i, t_i]` (`mode: instance`), whose output layer starts
    at zero weight and bias `init`, so every sample starts at the global τ. A gradient reversal sits between
    θ and the loss: the optimizer's descent on the loss is an ascent for θ, scaled by λ, which the curriculum
    raises from 0 to `lambda_max` over the first `curriculum_epochs` (converted with the stage's epoch
    length) or `curriculum_steps` optimizer steps of the stage (default 7820: 10 epochs of CIFAR-100 at
    batch 64), read from the stage's clock (`curriculum_lambda`). The module trains in the term's parameter
    group (its `lr_scale` sets its LR) and is saved in checkpoints, as is the clock. `standardize` z-scores
    both logits first (CTKD + LS).
    """

    reference = ("Li, Li, Yang, Zhao, Song, Luo, Li, Yang. Curriculum Temperature for Knowledge Distillation. "
                 "AAAI 2023")
    default_weight = 0.9  # the authors' KD weight (-a 0.9) beside cross-entropy 0.1

    def __init__(self, mode: Literal["global", "instance"] = "global",
                 curriculum: Literal["cosine", "linear"] = "cosine", lambda_max: float = 1.0,
                 curriculum_epochs: float | None = None, curriculum_steps: int | None = None,
                 min_temperature: float = 1.0, temperature_range: float = 20.0, init: float = 1.0,
                 hidden: int = 128, standardize: bool = False) -> None:
        super().__init__()
        if min_temperature <= 0 or temperature_range <= 0:
            raise ValueError(f"ctkd: min_temperature and temperature_range must be > 0, got {min_temperature}, "
                             f"{temperature_range}")
        if curriculum_epochs is not None and curriculum_steps is not None:
            raise ValueError("ctkd: give curriculum_epochs or curriculum_steps, not both")
        if lambda_max < 0 or min(curriculum_epochs or 0, curriculum_steps or 0) < 0 or hidden < 1:
            raise ValueError(f"ctkd: need lambda_max >= 0, a curriculum length >= 0 and hidden >= 1, got {lambda_max}, "
                             f"{curriculum_epochs if curriculum_epochs is not None else curriculum_steps}, {hidden}")
        self.mode = mode
        self.curriculum = curriculum
        self.lambda_max = lambda_max
        self.curriculum_epochs = curriculum_epochs
        self.curriculum_steps = 7820 if curriculum_steps is None and curriculum_epochs is None else curriculum_steps
        self.min_temperature = min_temperature
        self.temperature_range = temperature_range
        self.init = init
        self.hidden = hidden
        self.standardize = standardize
        self.theta = nn.Parameter(torch.full((1,), float(init))) if mode == "global" else None
        self.mlp: nn.Module | None = None
        #: The stage's clock (the Distiller's, from `build`): its step is where the curriculum stands.
        self.clock = StageClock()

    def build(self, ctx: BuildContext) -> None:
        self.clock = ctx.clock
        if self.curriculum_epochs is not None:
            self.curriculum_steps = ctx.clock.steps(self.curriculum_epochs, "ctkd's curriculum_epochs")
        if self.mode == "instance" and self.mlp is None:
            classes = ctx.student.shape[1]
            self.mlp = nn.Sequential(nn.Linear(2 * classes, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.constant_(self.mlp[2].bias, self.init)

    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Tensor:  # type: ignore[override]
        s, t = _logits(student, teacher, self.standardize)
        assert self.curriculum_steps is not None, "ctkd: build(ctx) must run before the first forward"
        lam = curriculum_lambda(self.clock.step, self.curriculum_steps, self.curriculum, self.lambda_max)
        if self.mlp is not None:
            theta = self.mlp(torch.cat([s, t], dim=1).detach()).float().squeeze(1)
        else:
            assert self.theta is not None, "ctkd: build(ctx) must run before the first forward"
            theta = self.theta.float()
        tau = self.min_temperature + self.temperature_range * torch.sigmoid(_ReverseGradient.apply(theta, lam))
        return _kl_rows(s, t, tau.unsqueeze(1)) * tau.pow(2)


# ------------------------------------------------------------------------------------------------ DIST+


def _channel_pearson(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Pearson correlation across the channels of two maps at each sample and location: `[B, H, W]`."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / ((a.pow(2).sum(dim=1) * b.pow(2).sum(dim=1)).sqrt() + eps)


@METHODS.register("dist_plus")
class DISTPlus(Method):
    """DIST+ as torchdistill implements it (`DISTPlusLoss`): DIST on the logits plus two relations of a feature map.

    Taps `[logits, map]` on each side. Parts of sample i, in this order (elements that add up):
    DIST's inter-class `τ² β (1 − ρ_i)` and, with `intra`, its intra-class part (batch-level); the channel
    relation `ι · mean_hw (1 − ρ_ihw)`, ρ_ihw the Pearson correlation across channels of the student's and
    teacher's maps at location (h, w) of sample i; with `spatial`, the spatial relation
    `κ · (1 − mean_hw ρ_hw)`, ρ_hw the correlation *over the batch* of the channel-summed maps at (h, w),
    which no sample owns (repeated on every row; the method is then batch-level). torchdistill adds
    `+ι · mean ρ` for the channel relation, which rewards anti-correlation; `channel_sign: torchdistill`
    gives `ι · mean_hw (1 + ρ_ihw)`, the same gradients (a constant 1 apart, so that it stays >= 0).
    The student's map goes through a 1x1 conv + BN to the teacher's width where the widths differ
    (`connector: auto`, a padkd extension); maps of different sizes are pooled to the smaller one.
    Defaults: torchdistill's ImageNet sample (β = γ = 2, ι = κ = 1, τ = 1, weight 2), eps 1e-8.
    """

    reference = ("Huang, You, Wang, Qian, Xu. DIST+: Knowledge Distillation From a Stronger Adaptive Teacher. "
                 "TPAMI 2025 (torchdistill's DISTPlusLoss)")
    default_weight = 2.0  # torchdistill's ImageNet sample config
    unit = "batch"
    per_sample_fix = ("set the method's intra: false and spatial: false for its per-sample parts (inter-class and "
                      "channel relations) alone")

    def __init__(self, beta: float = 2.0, gamma: float = 2.0, iota: float = 1.0, kappa: float = 1.0,
                 tau: float = 1.0, eps: float = 1e-8, intra: bool = True, spatial: bool = True,
                 channel_sign: Literal["distance", "torchdistill"] = "distance",
                 connector: Literal["auto", "none"] = "auto") -> None:
        super().__init__()
        if tau <= 0 or eps <= 0 or min(beta, gamma, iota, kappa) < 0:
            raise ValueError(f"dist_plus: need tau > 0, eps > 0 and beta, gamma, iota, kappa >= 0, got tau {tau}, "
                             f"eps {eps}, {beta}, {gamma}, {iota}, {kappa}")
        self.beta, self.gamma, self.iota, self.kappa = beta, gamma, iota, kappa
        self.tau = tau
        self.eps = eps
        self.intra = intra
        self.spatial = spatial
        self.channel_sign = channel_sign
        self.connector_kind = connector
        self.connector: nn.Module = nn.Identity()
        self.unit = "batch" if intra or spatial else "sample"

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Features, Features]:
        g = generator
        return ([torch.randn(batch_size, 10, generator=g), torch.randn(batch_size, 4, 6, 6, generator=g)],
                [torch.randn(batch_size, 10, generator=g), torch.randn(batch_size, 8, 3, 3, generator=g)])

    @staticmethod
    def _split(x: Features, role: str) -> tuple[Tensor, Tensor]:
        """`[logits, map]` of one side, checked."""
        if not isinstance(x, (list, tuple)) or len(x) != 2 or x[0].dim() != 2 or x[1].dim() != 4:
            shapes = [tuple(v.shape) for v in x] if isinstance(x, (list, tuple)) else type(x).__name__
            raise ValueError(f"dist_plus reads [logits, feature map] on each side, the {role} gave {shapes}: tap "
                             "e.g. [logits, stage3]")
        return x[0], x[1]

    def build(self, ctx: BuildContext) -> None:
        (_, fs), (_, ft) = self._split(ctx.student, "student"), self._split(ctx.teacher, "teacher")
        cs, ct = fs.shape[1], ft.shape[1]
        if cs != ct and self.connector_kind == "none":
            raise ValueError(f"dist_plus: the student's map has {cs} channels and the teacher's {ct}, and "
                             "connector='none'; set connector: auto")
        self.connector = _he_connector(cs, ct, batchnorm=True) if cs != ct else nn.Identity()

    def forward(self, student: Features, teacher: Features, batch: Batch) -> Discrepancy:  # type: ignore[override]
        (zs, fs), (zt, ft) = self._split(student, "student"), self._split(teacher, "teacher")
        parts = _dist_relations(zs, zt, self.tau, self.beta, self.gamma, self.intra, "dist_plus")
        fs, ft = _common_size(self.connector(fs).float(), ft.float())
        rho = _channel_pearson(fs, ft, self.eps).flatten(1)
        parts.append(self.iota * (1 - rho if self.channel_sign == "distance" else 1 + rho).mean(dim=1).clamp_min(0))
        if self.spatial:
            if fs.shape[0] < 2:
                raise ValueError("dist_plus: the spatial relation correlates locations over the batch and needs batch "
                                 "size >= 2; set spatial: false (and intra: false) for the per-sample parts alone")
            rho_hw = _pearson(fs.sum(dim=1).flatten(1).t(), ft.sum(dim=1).flatten(1).t(), self.eps)
            parts.append((self.kappa * (1 - rho_hw.mean()).clamp_min(0)).expand_as(parts[0]))
        return Discrepancy(torch.stack(parts, dim=1), sum_elements=True)
