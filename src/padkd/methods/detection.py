"""Detection distillation: full-map L2 and fine-grained (FGFI) imitation of FPN levels, KD on ROI class logits.

Both read the student's FPN maps (tap `fpn`, an ordered dict of `[B, C, H, W]` levels) and the teacher's
(its `fpn`), and return one discrepancy per feature-map location, `[B, E]` with E = Σ_levels H·W, a mask
(padding of the batch tensor, and for FGFI everything outside the imitation region), and a `layout`
(level, H, W) so that PAD's `conv1x1` head can predict one variance per location. Student and teacher
levels are paired by spatial size (same stride; a MobileNetV3 student's two stride-32 maps both pair with
a ResNet teacher's stride-32 map); a 1×1-conv adapter maps student channels to the teacher's where they
differ. Ground truth and the batch geometry come from the student's `gt` tap (batch-first boxes, image
and padded sizes), so a term taps `student: [fpn, gt]`.

`roi_kd` reads the class logits of the proposals the student's ROI head classifies (tap `box_scores`),
and the teacher's on the same proposals (task option `teacher_heads: true`): one discrepancy per
proposal, `[B, M]` masked to each image's proposals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.context import BuildContext, Features
from padkd.discrepancy import Discrepancy
from padkd.methods.base import METHODS, Method

#: torchvision's FPN anchors when the student declares none: one size of 8 × stride per level, three ratios.
DEFAULT_RATIOS = (0.5, 1.0, 2.0)


def split_inputs(student: Features, needs_gt: bool, name: str) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """(FPN maps, batch-first ground truth) from a term's student value: `fpn` alone or `[fpn, gt]`."""
    if isinstance(student, dict):
        fpn, gt = student, None
    elif isinstance(student, list | tuple) and len(student) == 2 and isinstance(student[0], dict) \
            and isinstance(student[1], dict) and "boxes" in student[1]:
        fpn, gt = student
    else:
        raise ValueError(f"{name} reads the student's FPN maps and its batch-first ground truth: tap "
                         "student: [fpn, gt] (the detector's `gt` tap, not `transform`)")
    if needs_gt and gt is None:
        raise ValueError(f"{name} needs the ground-truth boxes: tap student: [fpn, gt]")
    return fpn, gt


def pair_levels(student: dict[str, Tensor], teacher: dict[str, Tensor], levels: Sequence[str] | None
                ) -> list[tuple[str, str]]:
    """(student level, teacher level) pairs of equal spatial size, in the student's level order; a teacher
    level of the same name is preferred among equals."""
    if levels is not None:
        unknown = [name for name in levels if name not in student]
        if unknown:
            raise ValueError(f"levels: the student has no FPN level '{unknown[0]}' (it has {list(student)})")
    pairs = []
    for name, fmap in student.items():
        if levels is not None and name not in levels:
            continue
        same = [t for t, tmap in teacher.items() if tmap.shape[-2:] == fmap.shape[-2:]]
        if same:
            pairs.append((name, name if name in same else same[0]))
    if not pairs:
        raise ValueError(f"no student FPN level has a teacher level of the same size (student "
                         f"{[tuple(v.shape[-2:]) for v in student.values()]}, teacher "
                         f"{[tuple(v.shape[-2:]) for v in teacher.values()]}); tap both detectors' `fpn`")
    return pairs


def level_anchors(height: int, width: int, stride: tuple[int, int], sizes: Sequence[float],
                  ratios: Sequence[float], device: torch.device) -> Tensor:
    """torchvision's AnchorGenerator anchors of one level, `[H, W, K, 4]` (xyxy): base anchors of the given
    sizes and aspect ratios (h/w), rounded, centred on `(x·stride, y·stride)`."""
    scales = torch.as_tensor(sizes, dtype=torch.float32, device=device)
    ar = torch.as_tensor(ratios, dtype=torch.float32, device=device)
    h_ratios = ar.sqrt()
    ws = ((1 / h_ratios)[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()
    ys = torch.arange(height, dtype=torch.float32, device=device) * stride[0]
    xs = torch.arange(width, dtype=torch.float32, device=device) * stride[1]
    shifts = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).repeat(1, 1, 2)  # [H, W, 4]
    return shifts[:, :, None, :] + base[None, None, :, :]


def batch_iou(anchors: Tensor, boxes: Tensor) -> Tensor:
    """IoU of anchors `[A, 4]` with each image's boxes `[B, M, 4]` → `[B, A, M]` (0 where a box is empty)."""
    lt = torch.maximum(anchors[None, :, None, :2], boxes[:, None, :, :2])
    rb = torch.minimum(anchors[None, :, None, 2:], boxes[:, None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (anchors[:, 2:] - anchors[:, :2]).clamp_min(0).prod(-1)
    area_b = (boxes[..., 2:] - boxes[..., :2]).clamp_min(0).prod(-1)
    union = area_a[None, :, None] + area_b[:, None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros((), device=anchors.device))


def strides(gt: dict[str, Tensor], shapes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each level's stride as torchvision's anchor generator computes it: padded size // map size."""
    padded_h, padded_w = (int(v) for v in gt["padded_size"][0])
    return [(padded_h // h, padded_w // w) for h, w in shapes]


def valid_locations(gt: dict[str, Tensor] | None, shapes: list[tuple[int, int]], batch: int,
                    device: torch.device) -> Tensor:
    """`[B, E]` bool: locations whose receptive cell starts inside the image, not in the batch's padding
    (row y is real when y·stride < image height)."""
    if gt is None:
        return torch.ones(batch, sum(h * w for h, w in shapes), dtype=torch.bool, device=device)
    parts = []
    sizes = gt["image_sizes"].to(device)
    for (h, w), (sh, sw) in zip(shapes, strides(gt, shapes), strict=True):
        rows = torch.arange(h, device=device)[None, :] * sh < sizes[:, :1]
        cols = torch.arange(w, device=device)[None, :] * sw < sizes[:, 1:]
        parts.append((rows[:, :, None] & cols[:, None, :]).flatten(1))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def imitation_mask(gt: dict[str, Tensor], shapes: list[tuple[int, int]],
                   anchors: list[tuple[Sequence[float], Sequence[float]]], psi: float,
                   scope: Literal["all", "level"] = "all") -> Tensor:
    """FGFI's imitation region (Wang et al., CVPR 2019), `[B, E]` bool over the levels' locations.

    For each ground-truth box, M is its largest IoU with any anchor (of any imitated level for
    `scope: all`, of each level for `scope: level`); a location is imitated when one of its anchors
    has IoU > ψ·M with some box. Images without boxes imitate nothing."""
    boxes = gt["boxes"].float()
    present = gt["box_mask"]
    device = boxes.device
    ious = []
    for (h, w), stride, (sizes, ratios) in zip(shapes, strides(gt, shapes), anchors, strict=True):
        grid = level_anchors(h, w, stride, sizes, ratios, device)
        iou = batch_iou(grid.reshape(-1, 4), boxes) * present[:, None, :]
        ious.append(iou.reshape(boxes.shape[0], h * w, grid.shape[2], boxes.shape[1]))  # [B, HW, K, M]
    if scope == "all":
        best = torch.stack([iou.amax(dim=(1, 2)) for iou in ious]).amax(0)  # [B, M]
        thresholds = [best] * len(ious)
    else:
        thresholds = [iou.amax(dim=(1, 2)) for iou in ious]
    hits = [(iou > psi * thr[:, None, None, :]).any(dim=3).any(dim=2)
            for iou, thr in zip(ious, thresholds, strict=True)]
    return torch.cat(hits, dim=1)


class FeatureImitation(Method):
    """Shared body of the FPN imitation methods: level pairing, adapters, per-location errors, masks,
    normalisation. Subclasses set how channels reduce and which locations are imitated."""

    elements = "fixed"
    #: Whether the method needs the ground-truth boxes (the `gt` tap).
    needs_gt: bool = False

    def __init__(self, levels: list[str] | None = None, adapter: Literal["auto", "always", "none"] = "auto",
                 normalize: Literal["batch", "image"] = "batch") -> None:
        super().__init__()
        if adapter not in ("auto", "always", "none"):
            raise ValueError(f"adapter must be 'auto', 'always' or 'none', got {adapter!r}")
        if normalize not in ("batch", "image"):
            raise ValueError(f"normalize must be 'batch' or 'image', got {normalize!r}")
        self.levels = levels
        self.adapter_kind = adapter
        self.normalize = normalize
        self.adapters = nn.ModuleDict()
        self.pairs: list[tuple[str, str]] = []

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Features, Features]:
        """Two FPN levels (strides 4 and 8 of a 32×32 padded batch) and one or two boxes per image."""
        def maps(channels: int) -> dict[str, Tensor]:
            return {"0": torch.randn(batch_size, channels, 8, 8, generator=generator),
                    "1": torch.randn(batch_size, channels, 4, 4, generator=generator)}

        sizes = torch.randint(20, 33, (batch_size, 2), generator=generator)
        corner = torch.rand(batch_size, 2, 2, generator=generator) * 8
        extent = 6 + torch.rand(batch_size, 2, 2, generator=generator) * 10
        boxes = torch.cat([corner, corner + extent], dim=-1)  # [B, 2, 4]
        box_mask = torch.ones(batch_size, 2, dtype=torch.bool)
        box_mask[:, 1] = torch.rand(batch_size, generator=generator) < 0.5
        gt = {"boxes": boxes * box_mask[..., None], "labels": box_mask.long(), "box_mask": box_mask,
              "image_sizes": sizes, "padded_size": torch.full((batch_size, 2), 32)}
        return [maps(4), gt], maps(6)

    def build(self, ctx: BuildContext) -> None:
        fpn, _ = split_inputs(ctx.student, self.needs_gt, type(self).__name__)
        if not isinstance(ctx.teacher, dict):
            raise ValueError(f"{type(self).__name__} reads the teacher's FPN maps: tap teacher: fpn")
        self.pairs = pair_levels(fpn, ctx.teacher, self.levels)
        for s_name, t_name in self.pairs:
            cs, ct = fpn[s_name].shape[1], ctx.teacher[t_name].shape[1]
            if self.adapter_kind == "always" or (self.adapter_kind == "auto" and cs != ct):
                self.adapters[s_name] = nn.Conv2d(cs, ct, kernel_size=1)
            elif cs != ct:
                raise ValueError(f"level '{s_name}': student has {cs} channels, teacher {ct}, and adapter is 'none'")
        self._build_extra(ctx)

    def _build_extra(self, ctx: BuildContext) -> None:
        """Anything else a subclass reads from the context (FGFI: the student's anchors)."""

    def location_error(self, diff2: Tensor) -> Tensor:
        """`[B, C, H, W]` squared differences → `[B, H·W]` per-location discrepancy."""
        raise NotImplementedError

    def region(self, gt: dict[str, Tensor] | None, shapes: list[tuple[int, int]], valid: Tensor) -> Tensor:
        """`[B, E]` bool: the imitated locations among the valid ones."""
        return valid

    def forward(self, student: Features, teacher: Features, batch: Batch) -> Discrepancy:  # type: ignore[override]
        fpn, gt = split_inputs(student, self.needs_gt, type(self).__name__)
        errors, shapes = [], []
        for s_name, t_name in self.pairs:
            s, t = fpn[s_name], teacher[t_name]
            if s.shape[-2:] != t.shape[-2:]:
                raise ValueError(f"student level '{s_name}' is {tuple(s.shape[-2:])} but teacher level '{t_name}' "
                                 f"is {tuple(t.shape[-2:])}: feed the teacher the student's transformed images")
            adapted = self.adapters[s_name](s) if s_name in self.adapters else s
            errors.append(self.location_error((adapted.float() - t.float()).pow(2)))
            shapes.append((int(s.shape[-2]), int(s.shape[-1])))
        value = torch.cat(errors, dim=1)
        mask = self.region(gt, shapes, valid_locations(gt, shapes, value.shape[0], value.device))
        value = torch.where(mask, value, torch.zeros((), device=value.device))
        if self.normalize == "batch":  # each image's mean × n_i·B'/N: the batch sum over the N imitated locations
            counts = mask.sum(1).float()
            images = (counts > 0).sum().float()
            value = value * (counts * images / counts.sum().clamp_min(1))[:, None]
        layout = [(s_name, h, w) for (s_name, _), (h, w) in zip(self.pairs, shapes, strict=True)]
        return Discrepancy(value, mask, layout=layout)


@METHODS.register("fpn_l2")
class FpnL2(FeatureImitation):
    """Full-map L2 imitation of FPN levels: per location the mean over channels of `(a(s) − t)²`, `[B, Σ H·W]`.

    With `normalize: batch` (default) the uniform loss is the MSE over every non-padding location and
    channel of the batch; `image` averages each image's locations first (each image counts once)."""

    reference = "Romero et al. FitNets. ICLR 2015 (full-map feature imitation, on FPN levels)"

    def location_error(self, diff2: Tensor) -> Tensor:
        return diff2.mean(1).flatten(1)


@METHODS.register("fgfi")
class FGFI(FeatureImitation):
    """Fine-grained feature imitation (Wang et al., CVPR 2019): `½ Σ_c (a(s) − t)²` at the locations near
    objects, `[B, Σ H·W]` masked to the imitation region.

    A location is imitated when one of its anchors has IoU > ψ·M with a ground-truth box, M being that
    box's best anchor IoU (`psi` 0.5; `scope: all` takes M over every imitated level, `level` per level).
    Anchors are the student's (its AnchorGenerator), or torchvision's FPN rule (8 × stride, ratios 0.5, 1,
    2) when it has none. With `normalize: batch` (default) the uniform loss is the paper's: the batch
    sum divided by 2·N_p, N_p the number of imitated locations; the default weight 0.01 is the
    authors' imitation weight."""

    reference = "Wang et al. Distilling Object Detectors with Fine-grained Feature Imitation. CVPR 2019"
    default_weight = 0.01
    needs_gt = True

    def __init__(self, psi: float = 0.5, scope: Literal["all", "level"] = "all", levels: list[str] | None = None,
                 adapter: Literal["auto", "always", "none"] = "auto",
                 normalize: Literal["batch", "image"] = "batch") -> None:
        super().__init__(levels, adapter, normalize)
        if not 0 < psi <= 1:
            raise ValueError(f"psi must be in (0, 1], got {psi}")
        if scope not in ("all", "level"):
            raise ValueError(f"scope must be 'all' or 'level', got {scope!r}")
        self.psi = psi
        self.scope: Literal["all", "level"] = scope
        #: Per student level: (anchor sizes, aspect ratios), or None for torchvision's FPN rule.
        self.anchors: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] | None = None

    def _build_extra(self, ctx: BuildContext) -> None:
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        fpn, _ = split_inputs(ctx.student, True, "FGFI")
        generators = [m for m in ctx.student_model.modules() if isinstance(m, AnchorGenerator)]
        if not generators:
            self.anchors = None
            return
        gen = generators[0]
        if len(gen.sizes) != len(fpn):
            raise ValueError(f"the student's anchor generator has {len(gen.sizes)} levels but its FPN {len(fpn)}")
        self.anchors = {name: (tuple(gen.sizes[k]), tuple(gen.aspect_ratios[k])) for k, name in enumerate(fpn)}

    def location_error(self, diff2: Tensor) -> Tensor:
        return diff2.sum(1).mul(0.5).flatten(1)

    def region(self, gt: dict[str, Tensor] | None, shapes: list[tuple[int, int]], valid: Tensor) -> Tensor:
        assert gt is not None
        if self.anchors is not None:
            anchors = [self.anchors[s_name] for s_name, _ in self.pairs]
        else:
            anchors = [((8.0 * math.sqrt(sh * sw),), DEFAULT_RATIOS) for sh, sw in strides(gt, shapes)]
        return valid & imitation_mask(gt, shapes, anchors, self.psi, self.scope)


@METHODS.register("roi_kd")
class RoiKD(Method):
    """KD on the class logits of the student's proposals: per proposal `T² · KL(p_t ‖ p_s)` with p = softmax(z/T),
    `[B, M]` masked to each image's proposals (in training, the ones the ROI head sampled and matched to
    the ground truth). The teacher's ROI head classifies the same proposals (task `teacher_heads: true`).

    A sample is an image and its elements are its proposals, which have no fixed meaning from batch to
    batch (`elements: exchangeable`: PAD weighs images with `mode: per_sample`). Uniform averages each
    image's proposals, then the images."""

    reference = "Chen et al. Learning Efficient Object Detection Models with Knowledge Distillation. NeurIPS 2017"
    elements = "exchangeable"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Features, Features]:
        """Up to five proposals per image over four classes, padded batch-first as the `box_scores` tap gives them."""
        counts = torch.randint(1, 6, (batch_size,), generator=generator)
        mask = torch.arange(5)[None, :] < counts[:, None]

        def scores() -> dict[str, Tensor]:
            return {"logits": torch.randn(batch_size, 5, 4, generator=generator) * mask[..., None], "mask": mask}

        return scores(), scores()

    def forward(self, student: Features, teacher: Features, batch: Batch) -> Discrepancy:  # type: ignore[override]
        for side, value in (("student", student), ("teacher", teacher)):
            if not (isinstance(value, dict) and "logits" in value and "mask" in value):
                raise ValueError(f"roi_kd reads the ROI head's batch-first class logits: tap {side}: box_scores "
                                 "(and set task.teacher_heads: true)")
        s, t = student["logits"].float(), teacher["logits"].float()
        if s.shape != t.shape:
            raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ: the teacher "
                             "must classify the student's proposals (task.teacher_heads: true)")
        temp = self.temperature
        log_p_t = F.log_softmax(t / temp, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - F.log_softmax(s / temp, dim=-1))).sum(-1) * temp**2
        mask = student["mask"]
        return Discrepancy(torch.where(mask, kl.clamp_min(0), torch.zeros((), device=kl.device)), mask)
