"""The contract between methods and weightings: per-sample discrepancies, dim 0 = sample, the flags
of a method that a weighting may read (`MethodTraits`), and the task outputs a weighting may read
(`WeightingInputs`). Neither side imports the other, and no weighting imports a task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor


class MethodTraits(Protocol):
    """What a weighting may know of the method it weights (every `padkd.Method` has these flags).

    `unit`: "sample" when the discrepancy decomposes per sample, "batch" when only its batch mean means
    anything (then only `uniform` applies, and `per_sample_fix` says how to get a per-sample variant);
    `elements`: "fixed" when element e means the same in every batch (a feature dimension, a part),
    "exchangeable" when elements are partners (row j of a pairwise loss) and E follows the batch."""

    unit: Literal["sample", "batch"]
    elements: Literal["fixed", "exchangeable"]
    per_sample_fix: str


@dataclass
class Discrepancy:
    """Discrepancies `value` of shape `[B]` or `[B, E]` and an optional boolean `mask` of the same shape.

    E counts the elements of one sample (feature dimensions, locations, pair partners, anchors, parts);
    masked-out elements (mask False) take no part in any reduction. A sample's discrepancy is the mean
    of its elements, or their sum when `sum_elements` is set: the elements are then the parts of one
    loss that the method adds up (RKD's distance and angle, DKD's TCKD and NCKD, AT's layers), so the
    parts keep their published scale and `uniform` gives the method's usual loss. `unweighted` is an
    optional scalar that belongs to the method's loss but to no sample (VID's `½ mean log σ²_c`): the
    Distiller adds it after the weighting, so no weighting ever scales or mines it. `layout` says that the
    elements are feature-map locations: one `(name, H, W)` per map, flattened row-major in this order
    (E = Σ H·W), so a weighting can predict per-location quantities from maps of that size (PAD's
    `conv1x1` head); E may then change from batch to batch with the image size.
    """

    value: Tensor
    mask: Tensor | None = None
    unweighted: Tensor | None = None
    sum_elements: bool = False
    layout: list[tuple[str, int, int]] | None = None

    def __post_init__(self) -> None:
        if self.value.dim() not in (1, 2):
            raise ValueError(f"discrepancy must have shape [B] or [B, E], got {tuple(self.value.shape)}")
        if self.mask is not None and self.mask.shape != self.value.shape:
            raise ValueError(f"mask shape {tuple(self.mask.shape)} != discrepancy shape {tuple(self.value.shape)}")
        if self.unweighted is not None and self.unweighted.dim() != 0:
            raise ValueError(f"unweighted part must be a scalar, got shape {tuple(self.unweighted.shape)}")
        if self.layout is not None:
            total = sum(h * w for _, h, w in self.layout)
            if self.value.dim() != 2 or self.value.shape[1] != total:
                raise ValueError(f"layout {self.layout} covers {total} locations but the discrepancy has shape "
                                 f"{tuple(self.value.shape)}")

    @classmethod
    def of(cls, d: Tensor | Discrepancy) -> Discrepancy:
        """Accept a bare tensor where a Discrepancy is expected."""
        return d if isinstance(d, Discrepancy) else cls(d)

    @property
    def elements(self) -> int:
        """E: 1 for a `[B]` discrepancy."""
        return 1 if self.value.dim() == 1 else self.value.shape[1]

    def matrix(self) -> tuple[Tensor, Tensor | None]:
        """The values as `[B, E]` (E=1 for `[B]`) with the mask reshaped alike."""
        if self.value.dim() == 1:
            mask = None if self.mask is None else self.mask.unsqueeze(1)
            return self.value.unsqueeze(1), mask
        return self.value, self.mask

    def reduce_elements(self, x: Tensor | None = None, mean: bool | None = None) -> Tensor:
        """Masked mean (or, for `sum_elements`, sum) over elements of `x` (default: the values) → `[B]`;
        0 for fully masked samples. `mean` overrides the choice (records of per-element quantities)."""
        values, mask = self.matrix()
        x = values if x is None else x
        average = not self.sum_elements if mean is None else mean
        if mask is None:
            return x.mean(dim=1) if average else x.sum(dim=1)
        total = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)
        return total / mask.sum(dim=1).clamp_min(1).to(x.dtype) if average else total

    def sample_mask(self) -> Tensor | None:
        """`[B]` bool: samples with at least one valid element (None when nothing is masked)."""
        if self.mask is None:
            return None
        _, mask = self.matrix()
        assert mask is not None
        return mask.any(dim=1)


#: The `WeightingInputs` fields that only some tasks supply (`Task.weighting_inputs` names those it does).
TASK_INPUTS = ("student_logits", "teacher_logits", "targets")


@dataclass(frozen=True)
class WeightingInputs:
    """What a weighting may read besides the discrepancies, all detached: the samples' dataset `index`
    (`[B]`, long) in `split`, and, where the task supplies them, the student's and the teacher's class
    logits `[B, C]` and the class-index `targets` `[B]`. The Distiller fills it; a weighting names the
    task fields it reads in `Weighting.needs`, and a task that cannot supply one is refused at config check."""

    index: Tensor | None = None
    split: str = "train"
    student_logits: Tensor | None = None
    teacher_logits: Tensor | None = None
    targets: Tensor | None = None

    def require(self, name: str, who: str) -> Tensor:
        """Field `name`, or a ValueError naming the weighting `who` that needed it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"weighting '{who}' reads {name.replace('_', ' ')}, which this forward did not "
                             "supply; pass WeightingInputs from a task that has them (classification)")
        return value


def batch_mean(per_sample: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean over samples, skipping samples without any valid element."""
    if valid is None:
        return per_sample.mean()
    total = torch.where(valid, per_sample, torch.zeros((), dtype=per_sample.dtype, device=per_sample.device))
    return total.sum() / valid.sum().clamp_min(1).to(per_sample.dtype)


def valid_count(per_sample: Tensor, valid: Tensor | None) -> Tensor:
    """Number of samples that count in the batch mean, as a tensor (no host sync)."""
    if valid is None:
        return torch.tensor(float(per_sample.shape[0]), device=per_sample.device)
    return valid.sum().to(per_sample.dtype)
