"""Methods on intermediate features: pooled-embedding hints, FitNet, AT, NST, AB, FT, FSP and VID.

See docs/methods-features.md for the conventions chosen where public implementations disagree.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.context import BuildContext, Features
from padkd.discrepancy import Discrepancy
from padkd.methods.base import METHODS, Method
from padkd.ops import pool

log = logging.getLogger(__name__)


@METHODS.register("hint")
class Hint(Method):
    """L2 hint on pooled embeddings: per-element `(connector(s) - t)²`, shape `[B, D_teacher]`.

    The batch-and-element mean is the usual MSE hint (the "L2" of the PAD paper's ImageNet table).
    A linear connector maps the student width to the teacher's when they differ (`connector="auto"`);
    a PAD head can read its output (term `embedding: connector`, as the MNIST probe's head does).
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

    def connector_output(self, student: Features) -> Tensor:
        return self.connector(pool(student))  # type: ignore[arg-type]


@METHODS.register("fitnet")
class FitNet(Method):
    """FitNet hint on a feature map: a 1x1-conv regressor maps student channels to the teacher's.

    Discrepancy per element `(r(s) - t)²` over channels and locations, shape `[B, C_t·H·W]`. When
    spatial sizes differ both maps are average-pooled to the smaller height and width. With PAD, prefer
    `mode: per_sample` on large maps (a per-element head would predict C·H·W variances). A PAD head can
    read the regressor's output, pooled (term `embedding: connector`).
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

    def connector_output(self, student: Features) -> Tensor:
        return self.regressor(student)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Methods on lists of feature maps (AT, NST, AB, FSP, VID) and factor transfer (FT).
#
# A term may tap several layers (`student: [features.0, features.1]`); these methods then return one
# element per layer (or per layer pair), parts that add up (`sum_elements`): a sample's discrepancy is
# the sum over layers that RepDistiller and mdistiller take, and the CRD benchmark's β keeps its meaning.
# When the two maps of a comparison differ in height/width, both are pooled to the smaller height and
# width (adaptive average pooling, as RepDistiller does for square maps; FSP can max-pool instead).


def _layers(x: Features) -> list[Tensor]:
    """A tapped value as a list of layers (a single tapped tensor is one layer)."""
    return [x] if isinstance(x, Tensor) else list(x)


def _check_maps(name: str, student: Features, teacher: Features, min_layers: int = 1) -> tuple[list[Tensor],
                                                                                             list[Tensor]]:
    """The student's and teacher's layers, checked: as many on both sides, each a map `[B, C, H, W]`."""
    s, t = _layers(student), _layers(teacher)
    if len(s) != len(t) or len(s) < min_layers:
        raise ValueError(f"{name}: the student taps {len(s)} layer(s) and the teacher {len(t)}; tap the same "
                         f"number of layers (at least {min_layers}) on both sides")
    for role, maps in (("student", s), ("teacher", t)):
        for x in maps:
            if x.dim() != 4:
                raise ValueError(f"{name} needs feature maps [B, C, H, W], the {role} gave {tuple(x.shape)}: "
                                 "tap convolutional layers")
    return s, t


def _common_size(a: Tensor, b: Tensor, pool: Literal["avg", "max"] = "avg") -> tuple[Tensor, Tensor]:
    """Pool the larger of two maps to the smaller height and width (each dimension separately)."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    size = tuple(min(x, y) for x, y in zip(a.shape[-2:], b.shape[-2:], strict=True))
    fn = F.adaptive_avg_pool2d if pool == "avg" else F.adaptive_max_pool2d
    a = a if tuple(a.shape[-2:]) == size else fn(a, size)
    b = b if tuple(b.shape[-2:]) == size else fn(b, size)
    return a, b


def _no_autocast(x: Tensor) -> torch.autocast:
    """Autocast off on `x`'s device, for matrix products that must stay in fp32."""
    return torch.autocast(x.device.type, enabled=False)


def _parts(per_part: list[Tensor], unweighted: Tensor | None = None) -> Discrepancy:
    """`[B]` values of P parts (layers, layer pairs) → `[B, P]` parts that add up to the sample's loss."""
    return Discrepancy(torch.stack(per_part, dim=1), unweighted=unweighted, sum_elements=True)


def _example_maps(batch_size: int, generator: torch.Generator, channels: tuple[int, ...],
                  sizes: tuple[int, ...]) -> list[Tensor]:
    return [torch.randn(batch_size, c, h, h, generator=generator) for c, h in zip(channels, sizes, strict=True)]


@METHODS.register("at")
class AT(Method):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) on one or more layers, p = 2 by default.

    The attention map of sample i at a layer is `q_i = normalize(mean_c |A_ic|^p)` over positions.
    Element l of sample i (one per tapped layer, `[B, L]`) is, with `mode="code"` (the authors' code,
    RepDistiller, mdistiller, torchdistill `mode='code'`), `mean_hw (q_s,i - q_t,i)²`; with
    `mode="paper"` (Eq. 2, torchdistill `mode='paper'`, without the paper's β/2) the unsquared
    `‖q_s,i - q_t,i‖₂`. Maps of different sizes are average-pooled to the smaller one before the
    attention maps are taken (RepDistiller). The batch mean of the elements' sum is RepDistiller's loss.
    """

    reference = ("Zagoruyko, Komodakis. Paying More Attention to Attention: Improving the Performance of "
                 "Convolutional Neural Networks via Attention Transfer. ICLR 2017")
    default_weight = 1000.0  # β of the CRD benchmark (RepDistiller)

    def __init__(self, p: float = 2.0, mode: Literal["code", "paper"] = "code") -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"at: p must be > 0, got {p}")
        self.p = p
        self.mode = mode

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Features, Features]:
        return (_example_maps(batch_size, generator, (4, 8), (6, 3)),
                _example_maps(batch_size, generator, (8, 16), (3, 4)))

    def build(self, ctx: BuildContext) -> None:
        _check_maps("at", ctx.student, ctx.teacher)

    def attention(self, f: Tensor) -> Tensor:
        """`[B, C, H, W]` → the L2-normalised attention map `[B, H·W]` (fp32)."""
        return F.normalize(f.float().abs().pow(self.p).mean(1).flatten(1), dim=1)

    def forward(self, student: Features, teacher: Features, batch: Batch) -> Discrepancy:  # type: ignore[override]
        parts = []
        for s, t in zip(_layers(student), _layers(teacher), strict=True):
            s, t = _common_size(s, t)
            diff = self.attention(s) - self.attention(t)
            parts.append(diff.pow(2).mean(1) if self.mode == "code" else torch.linalg.vector_norm(diff, dim=1))
        return _parts(parts)


@METHODS.register("nst")
class NST(Method):
    """Neuron selectivity transfer (Huang & Wang, arXiv 1707.01219, 2017): MMD² with a polynomial kernel.

    For sample i at a layer, each channel's map is flattened over positions and L2-normalised, giving
    the sets {s_a} (student channels) and {t_b} (teacher channels) of vectors in R^{HW}. Element l of
    sample i (one per tapped layer, `[B, L]`) is their squared MMD with `k(x, y) = (xᵀy + coef)^degree`:
    `mean_ab k(t_a, t_b) + mean_ab k(s_a, s_b) - 2 mean_ab k(s_a, t_b)` (>= 0; rounding is clamped).
    Defaults (degree 2, coef 0) are the paper's polynomial kernel and RepDistiller/mdistiller's `NSTLoss`,
    whose batch loss is the mean of these over samples (summed over layers). Maps of different sizes are
    average-pooled to the smaller one.
    """

    reference = "Huang, Wang. Like What You Like: Knowledge Distill via Neuron Selectivity Transfer. arXiv 1707.01219"
    default_weight = 50.0  # β of the CRD benchmark (RepDistiller)

    def __init__(self, degree: int = 2, coef: float = 0.0) -> None:
        super().__init__()
        if degree < 1 or coef < 0:
            raise ValueError(f"nst: degree must be >= 1 and coef >= 0 (a positive definite kernel), got "
                             f"degree {degree}, coef {coef}")
        self.degree = degree
        self.coef = coef

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Features, Features]:
        return (_example_maps(batch_size, generator, (4, 8), (6, 3)),
                _example_maps(batch_size, generator, (8, 16), (3, 4)))

    def build(self, ctx: BuildContext) -> None:
        _check_maps("nst", ctx.student, ctx.teacher)

    def kernel_mean(self, a: Tensor, b: Tensor) -> Tensor:
        """Mean of `k(a_x, b_y)` over all pairs of rows, per sample: `[B, Ca, P]`, `[B, Cb, P]` → `[B]`."""
        with _no_autocast(a):
            return (a @ b.transpose(1, 2) + self.coef).pow(self.degree).mean(dim=(1, 2))

    def forward(self, student: Features, teacher: Features, batch: Batch) -> Discrepancy:  # type: ignore[override]
        parts = []
        for s, t in zip(_layers(student), _layers(teacher), strict=True):
            s, t = _common_size(s, t)
            s = F.normalize(s.float().flatten(2), dim=2)
            t = F.normalize(t.float().flatten(2), dim=2)
            mmd = self.kernel_mean(t, t) + self.kernel_mean(s, s) - 2 * self.kernel_mean(s, t)
            parts.append(mmd.clamp_min(0))
        return _parts(parts)


def _he_connector(cs: int, ct: int, batchnorm: bool) -> nn.Module:
    """1x1 conv (no bias) from `cs` to `ct` channels, He-initialised, optionally followed by BatchNorm."""
    conv = nn.Conv2d(cs, ct, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / ct))
    return nn.Sequential(conv, nn.BatchNorm2d(ct)) if batchnorm else conv


@METHODS.register("ab")
class AB(Method):
    """Activation-boundary distillation (Heo et al., AAAI 2019): a margin loss on pre-activations.

    A connector (1x1 conv + BN, He-initialised, as in the authors' code; identity where the channel
    counts agree and `connector="auto"`) maps the student's pre-activation s to the teacher's width. With
    margin μ, each neuron (channel, position) of sample i costs `ReLU(μ - r(s))²` where the teacher's
    pre-activation is > 0 and `ReLU(μ + r(s))²` where it is <= 0. Element l of sample i (one per tapped
    layer, `[B, L]`) is `scale · w_l · Σ_{c,h,w}` of these, with the authors' layer weights
    `w_l = 2^(l-L+1)` (last layer 1) and scale 3/1000 (as RepDistiller; torchdistill uses neither: set
    `layer_weights: [1, ...]`, `scale: 1`). Maps of different sizes are average-pooled to the smaller one.
    Only the sign of the teacher's value is read, so a post-ReLU teacher tap gives the same targets; the
    student's tap must be a pre-activation (checked at build unless `check_preact: false`).
    The method is meant for an initialisation stage (see src/padkd/recipes/methods/ab.yaml).
    """

    reference = ("Heo, Lee, Yun, Choi. Knowledge Transfer via Distillation of Activation Boundaries Formed by "
                 "Hidden Neurons. AAAI 2019")
    default_weight = 1.0  # β of the CRD benchmark (RepDistiller)

    def __init__(self, margin: float = 1.0, layer_weights: tuple[float, ...] | None = None, scale: float = 3e-3,
                 connector: Literal["auto", "always"] = "auto", check_preact: bool = True) -> None:
        super().__init__()
        if margin <= 0 or scale <= 0 or (layer_weights is not None and min(layer_weights, default=0) < 0):
            raise ValueError("ab: margin and scale must be > 0 and layer_weights >= 0")
        self.margin = margin
        self.layer_weights = layer_weights
        self.scale = scale
        self.connector_kind = connector
        self.check_preact = check_preact
        self.connectors = nn.ModuleList()
        self.weights: list[float] = []

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Features, Features]:
        return (_example_maps(batch_size, generator, (4, 8), (6, 3)),
                _example_maps(batch_size, generator, (8, 16), (6, 4)))

    def build(self, ctx: BuildContext) -> None:
        s_maps, t_maps = _check_maps("ab", ctx.student, ctx.teacher)
        n = len(s_maps)
        if self.layer_weights is not None and len(self.layer_weights) != n:
            raise ValueError(f"ab: layer_weights has {len(self.layer_weights)} entries for {n} tapped layers")
        self.weights = list(self.layer_weights) if self.layer_weights is not None else [2.0 ** (i - n + 1)
                                                                                        for i in range(n)]
        for k, s in enumerate(s_maps):
            if self.check_preact and bool((s >= 0).all()):
                raise ValueError(f"ab: the student's tapped layer {k} has no negative value on the example batch: "
                                 "AB needs pre-activations (tap the BatchNorm before the ReLU, or NAME:copy where an "
                                 "in-place ReLU follows), or set check_preact: false")
        self.connectors = nn.ModuleList(
            nn.Identity() if self.connector_kind == "auto" and s.shape[1] == t.shape[1]
            else _he_connector(s.shape[1], t.shape[1], batchnorm=True)
            for s, t in zip(s_maps, t_maps, strict=True))

    def forward(self, student: Features, teacher: Features, batch: Batch) -> Discrepancy:  # type: ignore[override]
        parts = []
        for s, t, connector, w in zip(_layers(student), _layers(teacher), self.connectors, self.weights,
                                      strict=True):
            s, t = _common_size(s, t)
            r = connector(s).float()
            on = t.float() > 0
            cost = torch.where(on, F.relu(self.margin - r), F.relu(self.margin + r)).pow(2)
            parts.append(cost.flatten(1).sum(1) * (w * self.scale))
        return _parts(parts)


class Paraphraser(nn.Module):
    """FT's convolutional autoencoder on a teacher map: three 3x3 convs down to `factor_channels`
    (the factor) and three 3x3 transposed convs back, LeakyReLU(0.1) after each (the authors' code)."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = _ft_stack(nn.Conv2d, (channels, channels, factor_channels, factor_channels), batchnorm=False)
        self.decoder = _ft_stack(nn.ConvTranspose2d, (factor_channels, factor_channels, channels, channels),
                                 batchnorm=False)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of `x`."""
        return self.decoder(self.encoder(x))


def _ft_stack(conv: type[nn.Conv2d] | type[nn.ConvTranspose2d], widths: tuple[int, ...],
              batchnorm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for cin, cout in zip(widths[:-1], widths[1:], strict=True):
        layers.append(conv(cin, cout, kernel_size=3, padding=1))
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


@METHODS.register("ft")
class FT(Method):
    """Factor transfer (Kim, Park, Kwak, NeurIPS 2018): student and teacher factors matched after L2 norm.

    A translator's factor of the student map is matched with a paraphraser's factor of the teacher map.

    `mode="paraphraser"` (the initialisation stage): trains the paraphraser (an autoencoder with
    `round(rate · C_t)` factor channels) to reconstruct the teacher's map; sample i's discrepancy is its
    mean reconstruction error (`reconstruction: l1` as the authors, `mse` as RepDistiller); the student
    is not read, so no gradient reaches it. `mode="transfer"` (the default): the paraphraser is frozen
    (no gradient, eval mode, left out of the optimizer) and carried from the paraphraser stage
    (`carry: true`); a fresh translator (three 3x3 convs, LeakyReLU) maps the student map to factor
    channels. With factors pooled to the smaller size and `f(x)` = x flattened over channels and
    positions and L2-normalised (`factor: flat`, the authors' code and torchdistill), sample i's
    discrepancy (`[B]`) is `mean_e |f(F_s,i) - f(F_t,i)|^p` (p = 1, the paper's L1).
    `factor: attention, reconstruction: mse, translator_bn: true` is RepDistiller's variant, whose factor
    is first collapsed over channels the way AT does (`f(x) = normalize(mean_c x²)`); the CRD benchmark's
    β = 200 was set for that variant (the authors used β = 500 with theirs).
    """

    reference = ("Kim, Park, Kwak. Paraphrasing Complex Network: Network Compression via Factor Transfer. "
                 "NeurIPS 2018")
    default_weight = 200.0  # β of the CRD benchmark (RepDistiller)

    def __init__(self, mode: Literal["transfer", "paraphraser"] = "transfer", rate: float = 0.5,
                 factor: Literal["flat", "attention"] = "flat", p: Literal[1, 2] = 1,
                 reconstruction: Literal["l1", "mse"] = "l1", translator_bn: bool = False) -> None:
        super().__init__()
        if not 0 < rate <= 4:
            raise ValueError(f"ft: rate (factor channels / teacher channels) must be in (0, 4], got {rate}")
        self.mode = mode
        self.rate = rate
        self.factor_kind = factor
        self.p = p
        self.reconstruction = reconstruction
        self.translator_bn = translator_bn
        self.paraphraser: Paraphraser | None = None
        self.translator: nn.Module | None = None
        #: Training steps the paraphraser has had (carried from the paraphraser stage with the weights).
        self.register_buffer("paraphraser_steps", torch.zeros((), dtype=torch.long))
        self._warned = False

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Features, Features]:
        return (torch.randn(batch_size, 4, 6, 6, generator=generator),
                torch.randn(batch_size, 8, 3, 3, generator=generator))

    def build(self, ctx: BuildContext) -> None:
        names = ("student", "teacher") if self.mode == "transfer" else ("teacher",)
        for role in names:
            x = getattr(ctx, role)
            if not isinstance(x, Tensor) or x.dim() != 4:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"ft needs one feature map [B, C, H, W] per side, the {role} gave {shape}: "
                                 "tap one convolutional layer")
        ct = ctx.teacher.shape[1]
        k = max(1, round(ct * self.rate))
        self.paraphraser = Paraphraser(ct, k)
        if self.mode == "transfer":
            cs = ctx.student.shape[1]
            self.translator = _ft_stack(nn.Conv2d, (cs, cs, k, k), batchnorm=self.translator_bn)
            self.paraphraser.requires_grad_(False)
            self.paraphraser.eval()

    def train(self, mode: bool = True) -> FT:
        """As `nn.Module.train`, but a frozen paraphraser (transfer mode) stays in eval mode."""
        super().train(mode)
        if self.mode == "transfer" and self.paraphraser is not None:
            self.paraphraser.train(False)
        return self

    def factor(self, x: Tensor) -> Tensor:
        """The L2-normalised factor vector `[B, D]` of a factor map (fp32)."""
        x = x.float()
        if self.factor_kind == "attention":
            x = x.pow(2).mean(1)
        return F.normalize(x.flatten(1), dim=1)

    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Tensor:  # type: ignore[override]
        assert self.paraphraser is not None, "ft: build(ctx) must run before the first forward"
        if self.mode == "paraphraser":
            if self.training:
                self.paraphraser_steps += 1
            err = (self.paraphraser(teacher).float() - teacher.float()).abs()
            return (err if self.reconstruction == "l1" else err.pow(2)).flatten(1).mean(1)
        if not self._warned:
            self._warned = True
            if int(self.paraphraser_steps) == 0:
                log.warning("ft: the paraphraser was never trained (no 'paraphraser' stage carried into this "
                            "term): its factors are random projections of the teacher's map")
        assert self.translator is not None
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(teacher)
        factor_s, factor_t = _common_size(self.translator(student), factor_t)
        return (self.factor(factor_s) - self.factor(factor_t)).abs().pow(self.p).mean(1)


@METHODS.register("fsp")
class FSP(Method):
    """Flow of solution procedure (Yim et al., CVPR 2017): Gram matrices between consecutive tapped layers.

    For tapped layers F_0 … F_L and sample i, pair l's FSP matrix is `G_l,i = F_l,i F_{l+1},iᵀ / (H·W)`
    (`[C_l, C_{l+1}]`, the two maps pooled to the smaller size: average pooling as RepDistiller, or
    `pool: max` as torchdistill). Element l of sample i (one per pair, `[B, L]`) is
    `mean (G^s_l,i - G^t_l,i)²` over the matrix (`norm: mse`, RepDistiller, whose batch loss is the mean
    of these over samples, summed over pairs), or the paper's squared Frobenius norm (`norm: frobenius`).
    torchdistill's sum of unsquared column norms / B is not offered. The paper compares networks of equal
    widths; where the student's channels differ, `connector: auto` (a padkd extension) maps each student
    map with a 1x1 conv to the teacher's width first. The method is meant for an initialisation stage
    (see src/padkd/recipes/methods/fsp.yaml).
    """

    reference = ("Yim, Joo, Bae, Kim. A Gift from Knowledge Distillation: Fast Optimization, Network Minimization "
                 "and Transfer Learning. CVPR 2017")
    default_weight = 50.0  # β of the CRD benchmark (RepDistiller)

    def __init__(self, norm: Literal["mse", "frobenius"] = "mse", pool: Literal["avg", "max"] = "avg",
                 connector: Literal["auto", "none"] = "auto") -> None:
        super().__init__()
        self.norm = norm
        self.pool = pool
        self.connector_kind = connector
        self.connectors = nn.ModuleList()

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Features, Features]:
        return (_example_maps(batch_size, generator, (4, 6, 8), (6, 6, 3)),
                _example_maps(batch_size, generator, (8, 12, 16), (6, 3, 3)))

    def build(self, ctx: BuildContext) -> None:
        s_maps, t_maps = _check_maps("fsp", ctx.student, ctx.teacher, min_layers=2)
        connectors: list[nn.Module] = []
        for k, (s, t) in enumerate(zip(s_maps, t_maps, strict=True)):
            cs, ct = s.shape[1], t.shape[1]
            if cs != ct and self.connector_kind == "none":
                raise ValueError(f"fsp: layer {k} has {cs} student and {ct} teacher channels and connector='none'; "
                                 "tap layers of equal widths or set connector: auto")
            connectors.append(nn.Identity() if cs == ct else _he_connector(cs, ct, batchnorm=False))
        self.connectors = nn.ModuleList(connectors)

    def matrices(self, maps: list[Tensor]) -> list[Tensor]:
        """The FSP matrices `[B, C_l, C_{l+1}]` of consecutive maps (fp32)."""
        out = []
        for a, b in zip(maps[:-1], maps[1:], strict=True):
            a, b = _common_size(a.float(), b.float(), self.pool)
            a, b = a.flatten(2), b.flatten(2)
            with _no_autocast(a):
                out.append(a @ b.transpose(1, 2) / a.shape[2])
        return out

    def forward(self, student: Features, teacher: Features, batch: Batch) -> Discrepancy:  # type: ignore[override]
        s_maps = [c(x) for c, x in zip(self.connectors, _layers(student), strict=True)]
        parts = []
        for gs, gt in zip(self.matrices(s_maps), self.matrices(_layers(teacher)), strict=True):
            sq = (gs - gt).pow(2).flatten(1)
            parts.append(sq.mean(1) if self.norm == "mse" else sq.sum(1))
        return _parts(parts)


@METHODS.register("vid")
class VID(Method):
    """Variational information distillation (Ahn et al., CVPR 2019): Gaussian NLL, learned per-channel variance.

    The likelihood is that of the teacher's map given the student's.

    Per tapped layer, a regressor (1x1 convs with ReLUs, as the authors and RepDistiller) predicts the mean
    μ of the teacher's map from the student's (maps average-pooled to the smaller size first), and
    `σ²_c = softplus(α_c) + eps` is one learned variance per teacher channel, starting at `init_var`.
    The negative log-likelihood `½ mean_{c,h,w} [(μ - t)²/σ²_c + log σ²_c]` splits into element l of
    sample i (one per layer, `[B, L]`): `½ mean_{c,h,w} (μ_i - t_i)²/σ²_c` (>= 0, weighted), and
    `½ mean_c log σ²_c`, which can be negative and is shared by all samples: it is returned as
    `Discrepancy.unweighted` (summed over layers) and added after the weighting.

    VID's variance is not PAD's: VID learns σ²_c per channel as a parameter shared by every sample and
    position (it scales channels, never samples), while PAD predicts σ² per sample (and per element)
    from the student's embedding. Under `pad` both act: PAD's per-sample σ² weights VID's discrepancies.
    """

    reference = ("Ahn, Hu, Damianou, Lawrence, Dai. Variational Information Distillation for Knowledge Transfer. "
                 "CVPR 2019")
    default_weight = 1.0  # β of the CRD benchmark (RepDistiller)
    signed = True

    def __init__(self, init_var: float = 5.0, eps: float = 1e-5, mid_channels: int | None = None) -> None:
        super().__init__()
        if eps <= 0 or init_var <= eps:
            raise ValueError(f"vid: need 0 < eps < init_var, got eps {eps}, init_var {init_var}")
        if mid_channels is not None and mid_channels < 1:
            raise ValueError(f"vid: mid_channels must be >= 1 or null (the teacher's width), got {mid_channels}")
        self.init_var = init_var
        self.eps = eps
        self.mid_channels = mid_channels
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Features, Features]:
        return (_example_maps(batch_size, generator, (4, 8), (6, 3)),
                _example_maps(batch_size, generator, (8, 16), (3, 4)))

    def build(self, ctx: BuildContext) -> None:
        s_maps, t_maps = _check_maps("vid", ctx.student, ctx.teacher)
        alpha = math.log(math.expm1(self.init_var - self.eps))  # softplus(alpha) + eps = init_var
        for s, t in zip(s_maps, t_maps, strict=True):
            cs, ct = s.shape[1], t.shape[1]
            mid = self.mid_channels or ct
            self.regressors.append(nn.Sequential(
                nn.Conv2d(cs, mid, 1, bias=False), nn.ReLU(),
                nn.Conv2d(mid, mid, 1, bias=False), nn.ReLU(),
                nn.Conv2d(mid, ct, 1, bias=False)))
            self.log_scales.append(nn.Parameter(torch.full((ct,), alpha)))

    def variances(self) -> list[Tensor]:
        """σ²_c of each layer (fp32)."""
        return [F.softplus(a.float()) + self.eps for a in self.log_scales]

    def forward(self, student: Features, teacher: Features, batch: Batch) -> Discrepancy:  # type: ignore[override]
        parts = []
        log_var = []
        for s, t, regressor, var in zip(_layers(student), _layers(teacher), self.regressors, self.variances(),
                                        strict=True):
            s, t = _common_size(s, t)
            mu = regressor(s).float()
            parts.append(0.5 * ((mu - t.float()).pow(2) / var.view(1, -1, 1, 1)).flatten(1).mean(1))
            log_var.append(0.5 * var.log().mean())
        return _parts(parts, unweighted=torch.stack(log_var).sum())
