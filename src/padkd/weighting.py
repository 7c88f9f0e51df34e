"""How samples count: a weighting reduces per-sample discrepancies to one scalar loss.

`uniform` is what every existing distillation method does. `pad` learns a variance per sample
(and per element) and minimises the Gaussian negative log-likelihood `d/σ² + log σ²`. The
hard-mining family (`focal`, `ohem`, `softmax_hard`, `polynomial`, ...) are the hand-made weightings
the PAD paper argues against; their weights are detached and normalised to mean 1 in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.discrepancy import Discrepancy, batch_mean, valid_count
from padkd.errors import PadkdError
from padkd.ops import pool
from padkd.registry import Registry

if TYPE_CHECKING:
    from padkd.context import BuildContext
    from padkd.methods.base import Method

WEIGHTINGS: Registry[Weighting] = Registry("weighting")

#: Default floor on log σ² (σ² ≥ 1e-3): keeps `d/σ² + log σ²` bounded below where d is exactly 0.
DEFAULT_LOG_VAR_FLOOR = math.log(1e-3)
#: Default linear warm-up of the PAD term (steps). With σ² at the mean discrepancy from step one the
#: term's weight is 1/mean(d); without a ramp it slowed a tiny student's learning (docs/pad.md).
DEFAULT_WARMUP_STEPS = 100


def pooled(embedding: Any) -> Tensor:
    """A student embedding as `[B, D]`: a map is average-pooled; a dict or list of maps (FPN levels) is
    pooled map by map and concatenated."""
    if isinstance(embedding, dict):
        embedding = list(embedding.values())
    if isinstance(embedding, list | tuple):
        return torch.cat([pool(x) for x in embedding], dim=1)
    return pool(embedding)


@dataclass
class WeightedLoss:
    """A weighting's result: the scalar `loss`; per sample (detached, for records) the relative
    `weight` of the sample in this batch's loss (mean 1 over valid samples, 0 for masked ones, so the
    column means the same under every weighting); extra per-sample `columns` (PAD: the learned
    `log_var` and the unnormalised `inv_var` = mean over elements of 1/σ²); and per-element
    `element_columns` `[B, E]` (PAD: log σ² of every element), which records average over samples."""

    loss: Tensor
    weight: Tensor
    columns: dict[str, Tensor] = field(default_factory=dict)
    element_columns: dict[str, Tensor] = field(default_factory=dict)


class Weighting(nn.Module):
    """Base class: `forward(d, embedding)` → WeightedLoss. `embedding` is only read by learned weightings."""

    #: True when the weighting reads a student embedding (the Distiller then taps one).
    needs_embedding: bool = False
    #: True for weightings that leave the batch mean as it is, the only ones a batch-level method allows.
    accepts_batch_level: bool = False
    #: LR multiplier of the weighting's own parameters (a PAD head) relative to its term's `lr_scale`.
    lr_scale: float = 1.0

    def __init__(self) -> None:
        # An explicit signature (nn.Module's takes **kwargs): the registry then rejects unknown options.
        super().__init__()

    def check(self, method: Method) -> None:
        """Refuse a method this weighting cannot weight (ValueError naming the fix); run at config check."""
        if method.unit == "batch" and not self.accepts_batch_level:
            fix = f"; {method.per_sample_fix}" if method.per_sample_fix else ""
            raise ValueError(f"method '{type(method).__name__}' is batch-level (its loss does not split into "
                             f"per-sample parts): only weighting 'uniform' applies{fix}")

    def build(self, d: Discrepancy, embedding: Tensor | None, ctx: BuildContext | None = None) -> None:
        """Create shape-dependent parameters from an example batch (before the optimizer exists)."""

    def forward(self, d: Tensor | Discrepancy, embedding: Tensor | None = None) -> WeightedLoss:
        raise NotImplementedError


class SampleWeighting(Weighting):
    """Hand-made weighting: `loss = mean_i w_i d_i` with w detached and normalised to mean 1.

    `granularity: element` weighs the elements instead (the locations of a detection feature map):
    `loss = mean_i reduce_e(w_ie d_ie)` with the weights computed from every valid element of the batch
    and normalised to mean 1 over them, so weights of 1 give the uniform loss. Its `weight` column is a
    sample's mean element weight, normalised to mean 1 over the samples."""

    def __init__(self, granularity: Literal["sample", "element"] = "sample") -> None:
        super().__init__()
        if granularity not in ("sample", "element"):
            raise ValueError(f"granularity must be 'sample' or 'element', got {granularity!r}")
        self.granularity = granularity

    def weights(self, d: Tensor) -> Tensor:
        """Unnormalised, non-negative weights for discrepancies `d` (detached, 1-d: samples or elements)."""
        raise NotImplementedError

    def forward(self, d: Tensor | Discrepancy, embedding: Tensor | None = None) -> WeightedLoss:
        d = Discrepancy.of(d)
        if self.granularity == "element" and d.value.dim() == 2:
            return self._per_element(d)
        per_sample = d.reduce_elements().float()
        valid = d.sample_mask()
        n = valid_count(per_sample, valid)
        with torch.no_grad():
            # Masked-out samples score 0 (discrepancies are >= 0) so hard mining never selects them.
            scores = per_sample.detach()
            if valid is not None:
                scores = torch.where(valid, scores, scores.new_zeros(()))
            w = self.weights(scores)
            if valid is not None:
                w = w * valid.to(w.dtype)
            total = w.sum()
            uniform = torch.ones_like(w) if valid is None else valid.to(w.dtype)
            w = torch.where(total > 0, w * n / total.clamp_min(1e-30), uniform)
        loss = (w * per_sample).sum() / n.clamp_min(1.0)
        return WeightedLoss(loss=loss, weight=w)

    def _per_element(self, d: Discrepancy) -> WeightedLoss:
        """Weights over the valid elements of the whole batch (selecting them costs one host sync)."""
        values, mask = d.matrix()
        values = values.float()
        valid = torch.ones_like(values, dtype=torch.bool) if mask is None else mask
        with torch.no_grad():
            scores = values.detach()[valid]
            w = torch.zeros_like(values)
            if scores.numel() > 0:
                raw = self.weights(scores)
                total = raw.sum()
                w[valid] = torch.where(total > 0, raw * scores.numel() / total.clamp_min(1e-30), torch.ones_like(raw))
        samples = d.sample_mask()
        loss = batch_mean(d.reduce_elements(w * values), samples)
        with torch.no_grad():
            per_sample = d.reduce_elements(w, mean=True)
            weight = per_sample / batch_mean(per_sample, samples).clamp_min(1e-30)
            if samples is not None:
                weight = weight * samples.to(weight.dtype)
        return WeightedLoss(loss=loss, weight=weight)


@WEIGHTINGS.register("uniform")
class Uniform(SampleWeighting):
    """Every sample counts the same: the weighting of every existing distillation method."""

    accepts_batch_level = True

    def weights(self, d: Tensor) -> Tensor:
        return torch.ones_like(d)


@WEIGHTINGS.register("focal")
class Focal(SampleWeighting):
    """Focal-style hard mining: `w ∝ d^gamma` (larger discrepancy, larger weight)."""

    def __init__(self, gamma: float = 1.0, granularity: Literal["sample", "element"] = "sample") -> None:
        super().__init__(granularity)
        self.gamma = gamma

    def weights(self, d: Tensor) -> Tensor:
        return d.clamp_min(0).pow(self.gamma)


@WEIGHTINGS.register("ohem")
class OHEM(SampleWeighting):
    """Online hard example mining: only the `fraction` of samples with the largest discrepancy count."""

    def __init__(self, fraction: float = 0.5, granularity: Literal["sample", "element"] = "sample") -> None:
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

    def __init__(self, temperature: float = 1.0, granularity: Literal["sample", "element"] = "sample") -> None:
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

    def __init__(self, gamma: float = 1.0, granularity: Literal["sample", "element"] = "sample") -> None:
        super().__init__(granularity)
        self.gamma = gamma

    def weights(self, d: Tensor) -> Tensor:
        return (1 - d / d.max().clamp_min(1e-12)).clamp_min(0).pow(self.gamma)


@WEIGHTINGS.register("discard_hardest")
class DiscardHardest(SampleWeighting):
    """Drop the `fraction` of samples with the largest discrepancy; the rest count uniformly."""

    def __init__(self, fraction: float = 0.1, granularity: Literal["sample", "element"] = "sample") -> None:
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


@WEIGHTINGS.register("pad")
class PAD(Weighting):
    """Prime-Aware Adaptive Distillation: `mean_i mean_e [d_ie / (σ²_ie + eps) + log σ²_ie]`.

    A variance head `Linear(in_dim, out_dim) + BatchNorm1d(out_dim)` on a student embedding predicts
    `s = log σ²`, per element (`per_element`, out_dim = E, the reference form) or once per sample
    (`per_sample`, out_dim = 1). `per_dimension` has no head: one learned log σ² per element, shared by
    every sample (a learned diagonal Mahalanobis L2), the ablation that separates PAD's per-dimension
    reweighting from its per-sample one. The optimum is σ² = d, so samples the student can match get
    small σ² and a large weight 1/σ². Safety defaults (see docs/pad.md): σ² starts at the first
    batch's mean discrepancy (`init="data"`), the term ramps up linearly over `warmup_steps`, and
    log σ² has a smooth floor. `PAD.reference(...)` gives the unmodified published form (random
    init, no floor, no warm-up).

    `head: conv1x1` is the spatial form for discrepancies over feature-map locations (those with a
    `Discrepancy.layout`, e.g. detection imitation): per map, `Conv2d(C, 1, 1) + BatchNorm2d(1)` on the
    student's map of the same size predicts one log σ² per location (shared by its channels), for any
    image size. Its embedding is the student's maps (a dict by level name, e.g. the tap `fpn`). With the
    linear head, an embedding that is a dict or list of maps is pooled map by map and concatenated.

    `preserve_scale`: at σ² ≈ d PAD also rescales the whole term by about 1/mean(d). With this switch the
    student's gradient uses the weights `w/mean(w)` (w = 1/σ², detached, mean over the batch's valid
    elements), so the term keeps the base loss's scale and only reweights; the head is still trained by
    the NLL (with d detached). `head_lr_scale` multiplies the LR of the head (or of the per-dimension
    log σ²) on top of the term's `lr_scale`, which also scales the method's connector.
    """

    needs_embedding = True

    def __init__(
        self,
        in_dim: int | None = None,
        out_dim: int | None = None,
        mode: Literal["per_element", "per_sample", "per_dimension"] = "per_element",
        eps: float = 1e-6,
        init: Literal["data", "reference"] = "data",
        log_var_floor: float | None = DEFAULT_LOG_VAR_FLOOR,
        clamp: tuple[float, float] | None = None,
        detach_input: bool = False,
        warmup_steps: int = DEFAULT_WARMUP_STEPS,
        head: Literal["linear", "conv1x1"] = "linear",
        preserve_scale: bool = False,
        head_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if mode not in ("per_element", "per_sample", "per_dimension"):
            raise ValueError(f"PAD mode must be 'per_element', 'per_sample' or 'per_dimension', got {mode!r}")
        if head not in ("linear", "conv1x1"):
            raise ValueError(f"PAD head must be 'linear' or 'conv1x1', got {head!r}")
        if head == "conv1x1" and (mode != "per_element" or in_dim is not None or out_dim is not None):
            raise ValueError("PAD head 'conv1x1' predicts one log σ² per location: use mode per_element and "
                             "leave in_dim/out_dim out (its width comes from the feature maps)")
        if init not in ("data", "reference"):
            raise ValueError(f"PAD init must be 'data' or 'reference', got {init!r}")
        if not eps > 0:
            raise ValueError(f"PAD eps must be > 0 (it keeps 1/σ² finite), got {eps}")
        if warmup_steps < 0:
            raise ValueError(f"PAD warmup_steps must be >= 0, got {warmup_steps}")
        if clamp is not None and clamp[0] >= clamp[1]:
            raise ValueError(f"PAD clamp must be (low, high) with low < high, got {clamp}")
        if head_lr_scale < 0:
            raise ValueError(f"PAD head_lr_scale must be >= 0, got {head_lr_scale}")
        self.mode = mode
        self.eps = eps
        self.init = init
        self.log_var_floor = log_var_floor
        self.clamp = clamp
        self.detach_input = detach_input
        self.warmup_steps = warmup_steps
        self.head_kind = head
        self.preserve_scale = preserve_scale
        self.lr_scale = head_lr_scale
        self.needs_embedding = mode != "per_dimension"
        #: linear: Sequential(Linear, BatchNorm1d); conv1x1: ModuleDict of Sequential(Conv2d, BatchNorm2d) by map.
        self.head: nn.Module | None = None
        #: `per_dimension`: the learned log σ² of each element, `[E]`.
        self.log_var_dims: nn.Parameter | None = None
        self._ready = False  # python mirror of `initialized`: no host sync per step
        # Saved in checkpoints: a resumed run neither re-initialises the head nor restarts warm-up.
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        if mode == "per_dimension" and (out_dim or in_dim) is not None:
            self._make_dims(int(out_dim or in_dim))  # type: ignore[arg-type]
        elif mode != "per_dimension" and in_dim is not None:
            self._make_head(in_dim, 1 if mode == "per_sample" else (out_dim or in_dim))

    @classmethod
    def reference(cls, in_dim: int | None = None, out_dim: int | None = None) -> PAD:
        """The published PAD-L2 form: per element, eps 1e-6, random head, no floor, no warm-up."""
        return cls(in_dim, out_dim, mode="per_element", eps=1e-6, init="reference", log_var_floor=None,
                   warmup_steps=0)

    def _make_head(self, in_dim: int, out_dim: int) -> None:
        linear = nn.Linear(in_dim, out_dim)
        nn.init.xavier_normal_(linear.weight)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(linear, nn.BatchNorm1d(out_dim))

    def _make_maps_head(self, maps: dict[str, Tensor]) -> None:
        heads = nn.ModuleDict()
        for name, x in maps.items():
            conv = nn.Conv2d(x.shape[1], 1, kernel_size=1)
            nn.init.xavier_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
            heads[name] = nn.Sequential(conv, nn.BatchNorm2d(1))
        self.head = heads

    def _maps(self, embedding: Any, layout: list[tuple[str, int, int]] | None) -> dict[str, Tensor]:
        """The student map under each entry of the discrepancy's layout (for the conv1x1 head)."""
        fix = "set the term's embedding to the student maps the method reads (e.g. embedding: fpn)"
        if layout is None:
            raise PadkdError("PAD head 'conv1x1' predicts per-location variances, but this method's discrepancies "
                             "are not feature-map locations (no layout); use head: linear")
        maps = {}
        for name, h, w in layout:
            if isinstance(embedding, dict):
                if name not in embedding:
                    raise PadkdError(f"PAD head 'conv1x1': the embedding has no map '{name}' (it has "
                                     f"{list(embedding)}); {fix}")
                x = embedding[name]
            elif isinstance(embedding, Tensor) and len(layout) == 1:
                x = embedding
            else:
                raise PadkdError(f"PAD head 'conv1x1' needs feature maps by name as its embedding; {fix}")
            if x.dim() != 4 or tuple(x.shape[-2:]) != (h, w):
                raise PadkdError(f"PAD head 'conv1x1': embedding map '{name}' has shape {tuple(x.shape)} but the "
                                 f"discrepancy's locations are {h}x{w}; {fix}")
            maps[name] = x
        return maps

    def _make_dims(self, elements: int) -> None:
        # reference init: log σ² = 0 (σ² = 1), the BN head's mean output at initialisation
        self.log_var_dims = nn.Parameter(torch.zeros(elements))

    def check(self, method: Method) -> None:
        super().check(method)
        if self.mode in ("per_element", "per_dimension") and method.elements == "exchangeable":
            raise ValueError(f"PAD mode '{self.mode}' needs elements with a fixed meaning, but the elements of "
                             f"method '{type(method).__name__}' are exchangeable partners (pairwise rows); "
                             "use mode: per_sample")

    def build(self, d: Discrepancy, embedding: Tensor | None, ctx: BuildContext | None = None) -> None:
        if self.mode == "per_dimension":
            if self.log_var_dims is None:
                self._make_dims(d.elements)
        elif embedding is None:
            raise ValueError("PAD needs a student embedding to predict log σ² from")
        elif self.head is None and self.head_kind == "conv1x1":
            self._make_maps_head(self._maps(embedding, d.layout))
        elif self.head is None:
            out_dim = 1 if self.mode == "per_sample" else d.elements
            self._make_head(pooled(embedding).shape[1], out_dim)
        if self.init == "data" and not self._ready:
            self._init_from(d)

    @torch.no_grad()
    def _init_from(self, d: Discrepancy) -> None:
        """Set the head's BN bias (or the per-dimension log σ²) so that σ² starts at the batch's mean
        discrepancy (geometric centre)."""
        mean_d = float(batch_mean(d.reduce_elements(mean=True).float(), d.sample_mask()))
        start = math.log(max(mean_d, self.eps) + self.eps)
        if self.log_var_dims is not None:
            self.log_var_dims.fill_(start)
        else:
            assert self.head is not None
            norms = [seq[1] for seq in self.head.values()] if isinstance(self.head, nn.ModuleDict) else [self.head[1]]
            for norm in norms:
                norm.bias.fill_(start)
        self.initialized.fill_(True)
        self._ready = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)

    def log_var(self, embedding: Any, layout: list[tuple[str, int, int]] | None = None) -> Tensor:
        """Predicted log σ², `[B, out_dim]` (conv1x1 head: `[B, E]` over the layout's locations;
        `per_dimension`: `[1, E]`), after the floor and clamp."""
        if self.log_var_dims is not None:
            s = self.log_var_dims.float()[None]
        elif self.head is None or embedding is None:
            raise RuntimeError("PAD head not built: pass in_dim or call build() with an example batch")
        elif isinstance(self.head, nn.ModuleDict):
            maps = self._maps(embedding, layout)
            s = torch.cat([self.head[name]((x.detach() if self.detach_input else x).float()).flatten(1)
                           for name, x in maps.items()], dim=1).float()
        else:
            x = pooled(embedding)
            s = self.head((x.detach() if self.detach_input else x).float()).float()
        if self.log_var_floor is not None:
            s = self.log_var_floor + F.softplus(s - self.log_var_floor)
        if self.clamp is not None:
            s = s.clamp(self.clamp[0], self.clamp[1])
        return s

    def forward(self, d: Tensor | Discrepancy, embedding: Tensor | None = None) -> WeightedLoss:
        d = Discrepancy.of(d)
        if embedding is None and self.needs_embedding:
            raise ValueError("PAD needs the student embedding: call pad(d, embedding)")
        unbuilt = self.head is None and self.log_var_dims is None
        if unbuilt or (self.init == "data" and not self._ready and self.training):
            self.build(d, embedding)
        with torch.autocast(device_type=d.value.device.type, enabled=False):
            values, _ = d.matrix()
            s = self.log_var(embedding, d.layout)
            if s.shape[1] not in (1, values.shape[1]):
                fix = "head: conv1x1 (one variance per location) or mode: per_sample" if d.layout else \
                    "mode: per_sample"
                raise PadkdError(
                    f"PAD head predicts {s.shape[1]} log-variances per sample but this discrepancy has "
                    f"E={values.shape[1]} elements (its size changed since the head was built, e.g. another "
                    f"input size); use weighting {fix}"
                )
            s = s.expand_as(values)
            valid = d.sample_mask()
            if self.preserve_scale:
                inv = 1.0 / (torch.exp(s) + self.eps)
                with torch.no_grad():
                    mean_w = batch_mean(d.reduce_elements(inv.detach(), mean=True), valid).clamp_min(1e-30)
                # the head learns from the NLL (d detached); the student sees mean-1 weights
                nll = values.detach().float() * inv + s + values.float() * (inv.detach() / mean_w)
            else:
                nll = values.float() / (torch.exp(s) + self.eps) + s
            per_sample = d.reduce_elements(nll)
            loss = batch_mean(per_sample, valid)
            if self.warmup_steps > 0:
                loss = loss * (self.step.clamp_max(self.warmup_steps).float() + 1) / (self.warmup_steps + 1)
        if self.training:
            self.step += 1
        with torch.no_grad():
            inv_var = d.reduce_elements(torch.exp(-s.detach()), mean=True)
            log_var = d.reduce_elements(s.detach(), mean=True)
            weight = inv_var / batch_mean(inv_var, valid).clamp_min(1e-30)
            if valid is not None:
                weight = weight * valid.to(weight.dtype)
        elements = {"log_var": s.detach()} if self.mode != "per_sample" and values.shape[1] > 1 else {}
        return WeightedLoss(loss=loss, weight=weight, columns={"log_var": log_var, "inv_var": inv_var},
                            element_columns=elements)
