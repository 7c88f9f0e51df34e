"""Prime-Aware Adaptive Distillation: a learned variance per sample (and element), `d/σ² + log σ²`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.discrepancy import Discrepancy, MethodTraits, WeightingInputs, batch_mean
from padkd.errors import PadkdError
from padkd.weightings.base import WEIGHTINGS, WeightedLoss, Weighting
from padkd.weightings.heads import DimensionHead, Layout, LinearHead, MapsHead, TokenHead, VarianceHead, pooled

if TYPE_CHECKING:
    from padkd.context import BuildContext

#: Default floor on log σ² (σ² ≥ 1e-3): keeps `d/σ² + log σ²` bounded below where d is exactly 0.
DEFAULT_LOG_VAR_FLOOR = math.log(1e-3)
#: Default warm-up of a PAD term (optimizer steps). With σ² at the mean discrepancy from step one the
#: term's weight is 1/mean(d); without a ramp it slowed a tiny student's learning (docs/pad.md).
DEFAULT_WARMUP_STEPS = 100


@WEIGHTINGS.register("pad")
class PAD(Weighting):
    """Prime-Aware Adaptive Distillation: `mean_i mean_e [d_ie / (σ²_ie + eps) + log σ²_ie]`.

    A variance head (`padkd.weightings.heads`) predicts `s = log σ²`: `per_element` (a `Linear + BN` head
    with one output per element, the reference form), `per_sample` (one output), `per_dimension` (no head:
    one learned log σ² per element shared by every sample), or with `head: conv1x1` one per feature-map
    location of a discrepancy with a `layout` (detection imitation; its embedding is the student's maps), or
    with `head: token` one per token of a sequence (its embedding is the student's hidden states `[B, T, D]`).
    The optimum is σ² = d, so samples the student can match get small σ² and a large weight 1/σ².
    Safety defaults (docs/pad.md): σ² starts at the first batch's mean discrepancy (`init="data"`), the
    term ramps in over `warmup_steps` optimizer steps (the term's ramp, unless the term sets its own), and
    log σ² has a smooth floor. `PAD.reference(...)` is the unmodified published form.

    `preserve_scale`: at σ² ≈ d PAD also rescales the whole term by about 1/mean(d). With this switch the
    student's gradient uses the weights `w/mean(w)` (w = 1/σ², detached, mean over the batch's valid
    elements), so the term keeps the base loss's scale and only reweights; the head is still trained by
    the NLL (with d detached). `head_lr_scale` multiplies the head's LR relative to its term's.
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
        head: Literal["linear", "conv1x1", "token"] = "linear",
        preserve_scale: bool = False,
        head_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if mode not in ("per_element", "per_sample", "per_dimension"):
            raise ValueError(f"PAD mode must be 'per_element', 'per_sample' or 'per_dimension', got {mode!r}")
        if head not in ("linear", "conv1x1", "token"):
            raise ValueError(f"PAD head must be 'linear', 'conv1x1' or 'token', got {head!r}")
        if head != "linear" and (mode != "per_element" or in_dim is not None or out_dim is not None):
            raise ValueError(f"PAD head '{head}' predicts one log σ² per location or token: use mode per_element "
                             "and leave in_dim/out_dim out (its width comes from the embedding)")
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
        self.head_lr_scale = head_lr_scale
        self.needs_embedding = mode != "per_dimension"
        self.head: VarianceHead | None = None
        self._ready = False  # python mirror of `initialized`: no host sync per step
        # Saved in checkpoints: a resumed run does not re-initialise the head.
        self.register_buffer("initialized", torch.tensor(False))
        if mode == "per_dimension" and (out_dim or in_dim) is not None:
            self.head = DimensionHead(int(out_dim or in_dim))  # type: ignore[arg-type]
        elif mode != "per_dimension" and in_dim is not None:
            self.head = LinearHead(in_dim, 1 if mode == "per_sample" else (out_dim or in_dim))

    @classmethod
    def reference(cls, in_dim: int | None = None, out_dim: int | None = None) -> PAD:
        """The published PAD-L2 form: per element, eps 1e-6, random head, no floor, no warm-up."""
        return cls(in_dim, out_dim, mode="per_element", eps=1e-6, init="reference", log_var_floor=None,
                   warmup_steps=0)

    def check(self, method: MethodTraits) -> None:
        super().check(method)
        if self.mode in ("per_element", "per_dimension") and method.elements == "exchangeable":
            raise ValueError(f"PAD mode '{self.mode}' needs elements with a fixed meaning, but the elements of "
                             f"method '{type(method).__name__}' are exchangeable partners (pairwise rows); "
                             "use mode: per_sample")

    def build(self, d: Discrepancy, embedding: Tensor | None, ctx: BuildContext | None = None) -> None:
        if self.head is None:
            self.head = self._make_head(d, embedding)
        if self.init == "data" and not self._ready:
            self._init_from(d)

    def _make_head(self, d: Discrepancy, embedding: Any) -> VarianceHead:
        if self.mode == "per_dimension":
            return DimensionHead(d.elements)
        if embedding is None:
            raise ValueError("PAD needs a student embedding to predict log σ² from")
        if self.head_kind == "conv1x1":
            return MapsHead(MapsHead.maps(embedding, d.layout))
        if self.head_kind == "token":
            return TokenHead(embedding.shape[-1])
        return LinearHead(pooled(embedding).shape[1], 1 if self.mode == "per_sample" else d.elements)

    def param_groups(self) -> list[tuple[str, list[nn.Parameter], float]]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [("weighting", params, self.head_lr_scale)] if params else []

    @torch.no_grad()
    def _init_from(self, d: Discrepancy) -> None:
        """Start σ² at the batch's mean discrepancy (geometric centre)."""
        assert self.head is not None
        mean_d = float(batch_mean(d.reduce_elements(mean=True).float(), d.sample_mask()))
        self.head.start_at(math.log(max(mean_d, self.eps) + self.eps))
        self.initialized.fill_(True)
        self._ready = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)

    def log_var(self, embedding: Any, layout: Layout | None = None) -> Tensor:
        """Predicted log σ², `[B, out_dim]` (conv1x1 head: `[B, E]` over the layout's locations;
        `per_dimension`: `[1, E]`), after the floor and clamp."""
        if self.head is None or (embedding is None and self.head.needs_embedding):
            raise RuntimeError("PAD head not built: pass in_dim or call build() with an example batch")
        s = self.head(embedding, layout, self.detach_input)
        if self.log_var_floor is not None:
            s = self.log_var_floor + F.softplus(s - self.log_var_floor)
        if self.clamp is not None:
            s = s.clamp(self.clamp[0], self.clamp[1])
        return s

    def forward(self, d: Tensor | Discrepancy, embedding: Tensor | None = None,
                inputs: WeightingInputs | None = None) -> WeightedLoss:
        d = Discrepancy.of(d)
        if embedding is None and self.needs_embedding:
            raise ValueError("PAD needs the student embedding: call pad(d, embedding)")
        if self.head is None or (self.init == "data" and not self._ready and self.training):
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
            loss = batch_mean(d.reduce_elements(nll), valid)
        with torch.no_grad():
            inv_var = d.reduce_elements(torch.exp(-s.detach()), mean=True)
            log_var = d.reduce_elements(s.detach(), mean=True)
            weight = inv_var / batch_mean(inv_var, valid).clamp_min(1e-30)
            if valid is not None:
                weight = weight * valid.to(weight.dtype)
            elements = {"log_var": s.detach(), "inv_var": torch.exp(-s.detach())} \
                if self.mode != "per_sample" and values.shape[1] > 1 else {}
        return WeightedLoss(loss=loss, weight=weight, columns={"log_var": log_var, "inv_var": inv_var},
                            element_columns=elements)
