"""The weighting contract: a weighting reduces per-sample discrepancies to one scalar loss.

A weighting knows the method it weights only through the flags of `padkd.discrepancy.MethodTraits`
(its unit and the meaning of its elements), never the method itself, so the two axes stay independent;
it knows the task only through the detached `padkd.discrepancy.WeightingInputs` the Distiller passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from padkd.discrepancy import Discrepancy, MethodTraits, WeightingInputs, batch_mean, valid_count
from padkd.registry import Registry

if TYPE_CHECKING:
    from padkd.context import BuildContext

WEIGHTINGS: Registry[Weighting] = Registry("weighting")


@dataclass
class WeightedLoss:
    """A weighting's result: the scalar `loss`; per sample (detached, for records) the relative
    `weight` of the sample in this batch's loss (mean 1 over valid samples, 0 for masked ones, so the
    column means the same under every weighting); extra per-sample `columns` (PAD: the learned
    `log_var` and the unnormalised `inv_var` = mean over elements of 1/σ²); and per-element
    `element_columns` `[B, E]` (PAD: log σ² and 1/σ² of every element), which records average over samples."""

    loss: Tensor
    weight: Tensor
    columns: dict[str, Tensor] = field(default_factory=dict)
    element_columns: dict[str, Tensor] = field(default_factory=dict)


class Weighting(nn.Module):
    """Base class: `forward(d, embedding, inputs)` → WeightedLoss. `embedding` is only read by learned
    weightings, `inputs` (task outputs, dataset indices) only by those that say so in `needs`."""

    #: True when the weighting reads a student embedding (the Distiller then taps one).
    needs_embedding: bool = False
    #: The task-supplied `WeightingInputs` fields the weighting reads (of `TASK_INPUTS`; the dataset index
    #: and split are always supplied). A task whose `weighting_inputs` lack one is refused at config check.
    needs: frozenset[str] = frozenset()
    #: True when `forward` takes the `inputs` argument (set for every weighting with `needs`); the Distiller
    #: calls the others as `forward(d, embedding)`, so a plugin written before `inputs` existed still works.
    reads_inputs: bool = False
    #: True for weightings that leave the batch mean as it is, the only ones a batch-level method allows.
    accepts_batch_level: bool = False
    #: Optimizer steps over which the term ramps in when its config sets no warm-up (PAD's safety ramp);
    #: the ramp itself is the term's (`Term.ramp`), the same for every term.
    warmup_steps: int = 0

    def __init__(self) -> None:
        # An explicit signature (nn.Module's takes **kwargs): the registry then rejects unknown options.
        super().__init__()

    def check(self, method: MethodTraits) -> None:
        """Refuse a method this weighting cannot weight (ValueError naming the fix); run at config check."""
        if method.unit == "batch" and not self.accepts_batch_level:
            fix = f"; {method.per_sample_fix}" if method.per_sample_fix else ""
            raise ValueError(f"method '{type(method).__name__}' is batch-level (its loss does not split into "
                             f"per-sample parts): only weighting 'uniform' applies{fix}")

    def check_inputs(self, supplied: frozenset[str], task: str) -> None:
        """Refuse a task that does not supply the inputs in `needs` (ValueError naming the fix)."""
        missing = sorted(self.needs - supplied)
        if missing:
            raise ValueError(f"the weighting reads the {', '.join(missing)} of each sample, which task '{task}' does "
                             "not supply; use it with a classification task or choose another weighting")

    def build(self, d: Discrepancy, embedding: Tensor | None, ctx: BuildContext | None = None) -> None:
        """Create shape-dependent parameters from an example batch (before the optimizer exists)."""

    def param_groups(self) -> list[tuple[str, list[nn.Parameter], float]]:
        """The weighting's trainable parameters as (name, parameters, LR multiplier relative to the term's
        `lr_scale`); default: all of them at 1."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [("weighting", params, 1.0)] if params else []

    def forward(self, d: Tensor | Discrepancy, embedding: Tensor | None = None,
                inputs: WeightingInputs | None = None) -> WeightedLoss:
        raise NotImplementedError



class SampleWeighting(Weighting):
    """Hand-made weighting: `loss = mean_i w_i d_i` with w detached and normalised to mean 1.

    `granularity: element` weighs the elements instead (the locations of a detection feature map, the
    tokens of a sequence): `loss = mean_i reduce_e(w_ie d_ie)` with the weights computed from every valid
    element of the batch and normalised to mean 1 over them, so weights of 1 give the uniform loss. Its
    `weight` column is a sample's mean element weight, normalised to mean 1 over the samples.

    `normalize = False` (a published scheme whose weights carry their own scale, EA-KD, WSLD) keeps the raw
    weights in the loss, `loss = mean_i w_i d_i`; the `weight` column is still normalised to mean 1."""

    #: Whether the loss uses the weights normalised to mean 1 (a subclass or its options may say not).
    normalize: bool = True

    def __init__(self, granularity: Literal["sample", "element"] = "sample") -> None:
        super().__init__()
        if granularity not in ("sample", "element"):
            raise ValueError(f"granularity must be 'sample' or 'element', got {granularity!r}")
        self.granularity = granularity

    def weights(self, d: Tensor) -> Tensor:
        """Unnormalised, non-negative weights for discrepancies `d` (detached, 1-d: samples or elements)."""
        raise NotImplementedError

    def sample_weights(self, d: Tensor, inputs: WeightingInputs | None) -> Tensor:
        """Unnormalised per-sample weights; a weighting that reads task outputs overrides this (default:
        `weights(d)`, from the discrepancies alone)."""
        return self.weights(d)

    def forward(self, d: Tensor | Discrepancy, embedding: Tensor | None = None,
                inputs: WeightingInputs | None = None) -> WeightedLoss:
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
            raw = self.sample_weights(scores, inputs).float()
            if valid is not None:
                raw = raw * valid.to(raw.dtype)
            total = raw.sum()
            uniform = torch.ones_like(raw) if valid is None else valid.to(raw.dtype)
            w = torch.where(total > 0, raw * n / total.clamp_min(1e-30), uniform)
        loss = ((w if self.normalize else raw) * per_sample).sum() / n.clamp_min(1.0)
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
