"""PAD's ceiling: the weights its variance head would give if it were perfect, without a head.

- `inverse_discrepancy`: `w ∝ d^-p` of the current batch (detached, mean 1): PAD's optimum σ² = d, exactly.
- `variance_memory`: one free log σ² per training sample, held by dataset index ("data parameters"), learned
  from the sample's own discrepancies by the NLL `d/σ² + log σ²` (or an EMA of d). It remembers what each
  sample's discrepancy has been, which no head reading the embedding has to predict.

If these do not beat uniform weighting, weighting by 1/d does not help, whatever the head; if they do, the
head's capacity is PAD's limit (docs/evidence.md, "Is it the head or the principle?").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from padkd.discrepancy import Discrepancy, WeightingInputs, batch_mean
from padkd.distributed import all_gather_cat
from padkd.errors import PadkdError
from padkd.weightings.base import WEIGHTINGS, SampleWeighting, WeightedLoss, Weighting
from padkd.weightings.pad import DEFAULT_LOG_VAR_FLOOR

if TYPE_CHECKING:
    from padkd.context import BuildContext


@WEIGHTINGS.register("inverse_discrepancy")
class InverseDiscrepancy(SampleWeighting):
    """PAD's optimum without a head: `w ∝ 1/d^exponent` of each sample, detached, mean 1 in the batch.

    A discrepancy below `floor` times the batch mean counts as that (a sample matched exactly would
    otherwise take all the weight)."""

    def __init__(self, exponent: float = 1.0, floor: float = 1e-3,
                 granularity: Literal["sample", "element"] = "sample") -> None:
        super().__init__(granularity)
        if exponent < 0:
            raise ValueError(f"inverse_discrepancy exponent must be >= 0, got {exponent}")
        if not 0 < floor <= 1:
            raise ValueError(f"inverse_discrepancy floor must be in (0, 1], got {floor}")
        self.exponent = exponent
        self.floor = floor

    def weights(self, d: Tensor) -> Tensor:
        low = (d.mean() * self.floor).clamp_min(1e-30)
        return d.clamp_min(low).pow(-self.exponent)


@WEIGHTINGS.register("variance_memory")
class VarianceMemory(Weighting):
    """One free log σ² per training sample (by dataset index), learned by `d/σ² + log σ²`: PAD without a head.

    Each time a training sample is seen, its log σ² takes one step on its own NLL, `s ← s - lr·(1 - d·e^-s)`
    (never past log d), or with `update: ema`, σ² ← momentum·σ² + (1 - momentum)·d. A sample seen for the
    first time starts at σ² = d. The weights are 1/σ² from before this step's update, detached: the memory
    is what the sample's discrepancy has been. `preserve_scale` (default) normalises them to mean 1 in the
    batch, so the term keeps the base loss's scale and only reweights; without it the loss is PAD's
    `mean(d/σ² + log σ²)`. The memory is a buffer (saved in checkpoints); under DDP every rank gathers every
    rank's (index, d) and applies the same update, so the memories stay identical. Records of the training
    split carry each sample's `log_var`; other splits are weighted uniformly (the memory knows no test sample).
    """

    reads_inputs = True

    def __init__(self, update: Literal["nll", "ema"] = "nll", lr: float = 0.5, momentum: float = 0.9,
                 preserve_scale: bool = True, log_var_floor: float | None = DEFAULT_LOG_VAR_FLOOR,
                 eps: float = 1e-6) -> None:
        super().__init__()
        if update not in ("nll", "ema"):
            raise ValueError(f"variance_memory update must be 'nll' or 'ema', got {update!r}")
        if not 0 < lr <= 1:
            raise ValueError(f"variance_memory lr must be in (0, 1], got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"variance_memory momentum must be in [0, 1), got {momentum}")
        if eps <= 0:
            raise ValueError(f"variance_memory eps must be > 0, got {eps}")
        self.update = update
        self.lr = lr
        self.momentum = momentum
        self.preserve_scale = preserve_scale
        self.log_var_floor = log_var_floor
        self.eps = eps
        # Sized at build from the training set (BuildContext.data.n_train); saved in checkpoints.
        self.register_buffer("log_var", torch.zeros(0))
        self.register_buffer("seen", torch.zeros(0, dtype=torch.bool))

    def build(self, d: Discrepancy, embedding: Tensor | None, ctx: BuildContext | None = None) -> None:
        if ctx is None:
            raise ValueError("variance_memory needs the training set's size: build it with a BuildContext")
        if self.log_var.numel() != ctx.data.n_train:
            self.log_var = torch.zeros(ctx.data.n_train, device=d.value.device)
            self.seen = torch.zeros(ctx.data.n_train, dtype=torch.bool, device=d.value.device)

    def _floored(self, s: Tensor) -> Tensor:
        return s if self.log_var_floor is None else s.clamp_min(self.log_var_floor)

    @torch.no_grad()
    def _learn(self, index: Tensor, d: Tensor) -> None:
        """Apply one batch of every rank: initialise unseen samples at log d, then update the others."""
        index, d = all_gather_cat(index), all_gather_cat(d)
        # a sample twice in the gathered batch (DDP padding) is updated once, with its mean discrepancy
        unique, inverse = torch.unique(index, return_inverse=True)
        count = torch.zeros(len(unique), device=d.device).index_add_(0, inverse, torch.ones_like(d))
        d = torch.zeros(len(unique), device=d.device).index_add_(0, inverse, d) / count
        s = self.log_var[unique]
        fresh = ~self.seen[unique]
        if self.update == "ema":
            var = self.momentum * s.exp() + (1 - self.momentum) * d
            new = torch.log(var + self.eps)
        else:
            ratio = d / s.exp()
            step = self.lr * (ratio - 1)
            new = s + torch.where(ratio > 1, torch.minimum(step, ratio.log()), step)
        new = torch.where(fresh, torch.log(d + self.eps), new)
        self.log_var[unique] = self._floored(new)
        self.seen[unique] = True

    def forward(self, d: Tensor | Discrepancy, embedding: Tensor | None = None,
                inputs: WeightingInputs | None = None) -> WeightedLoss:
        d = Discrepancy.of(d)
        per_sample = d.reduce_elements().float()
        valid = d.sample_mask()
        if inputs is None or inputs.index is None:
            raise ValueError("variance_memory reads each sample's dataset index: pass WeightingInputs(index=...)")
        if self.log_var.numel() == 0:
            raise RuntimeError("variance_memory not built: call build() with a BuildContext first")
        index = inputs.index.to(self.log_var.device)
        if inputs.split != "train":  # the memory holds training samples only
            w = torch.ones_like(per_sample) if valid is None else valid.to(per_sample.dtype)
            return WeightedLoss(loss=batch_mean(per_sample, valid), weight=w)
        if len(index) != len(per_sample):
            raise ValueError(f"variance_memory got {len(index)} dataset indices for {len(per_sample)} samples")
        if len(index) and int(index.max()) >= self.log_var.numel():
            raise PadkdError(f"variance_memory holds {self.log_var.numel()} training samples but got indices up to "
                             f"{int(index.max())}; its size comes from the training split")
        with torch.no_grad():
            scores = per_sample.detach()
            seen = self.seen[index]
            # a sample seen for the first time is weighted as if σ² = d; the memory itself changes in _learn only
            s = torch.where(seen, self.log_var[index].float(), self._floored(torch.log(scores + self.eps)))
            inv = torch.exp(-s)
            mean_inv = batch_mean(inv, valid).clamp_min(1e-30)
            weight = inv / mean_inv if valid is None else inv / mean_inv * valid.to(inv.dtype)
            if self.training:
                self._learn(index if valid is None else index[valid], scores if valid is None else scores[valid])
        if self.preserve_scale:
            loss = batch_mean(weight * per_sample, valid)
        else:
            loss = batch_mean(per_sample * inv + s, valid)
        log_var = torch.where(seen, s, torch.full_like(s, math.nan))
        return WeightedLoss(loss=loss, weight=weight, columns={"log_var": log_var, "inv_var": torch.where(
            seen, inv, torch.full_like(inv, math.nan))})
