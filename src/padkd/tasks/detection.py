"""Object detection on torchvision detectors: their own losses, COCO mAP through pycocotools, per-image records.

Models are called as `model(images, targets)`: in training they return their loss dict (summed into the
task loss); in evaluation their detections. Targets are passed in evaluation too, so the detector's
transform also resizes the ground truth that masked-imitation methods read (it changes no detection).
The teacher runs its backbone and FPN only, on the images the student's transform produced (read from the
student's `transform` tap), so both FPNs see the same resized, padded batch and their maps align; with
`teacher_heads` its ROI box head also classifies the student's proposals (for ROI-level terms).
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import box_iou

from padkd.batch import Batch, list_collate
from padkd.data import DataSplits
from padkd.distributed import all_gather_object, broadcast_object, is_distributed
from padkd.errors import PadkdError
from padkd.tasks.base import TASKS, Evaluator, Task

#: pycocotools' twelve summary numbers, in its order: AP over IoU .50:.95, at .50, at .75, and over .50:.95 for
#: small/medium/large objects (100 detections per image); AR over .50:.95 with at most 1, 10 and 100 detections
#: per image, and with 100 for small/medium/large objects.
METRICS = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs", "ARm", "ARl")


def coco_metrics(coco_gt: Any, detections: list[dict[str, Any]], image_ids: list[int]) -> dict[str, float]:
    """COCOeval (bbox) of `detections` (COCO result dicts: image_id, category_id, bbox xywh, score) on the
    images `image_ids` of the ground truth `coco_gt`: its twelve summary numbers, named as in `METRICS`.
    Values in [0, 1]; -1 where a size range has no ground truth (pycocotools' convention)."""
    from pycocotools.cocoeval import COCOeval

    from padkd.data.coco import quiet_coco

    if not image_ids:
        raise PadkdError("detection evaluation saw no images; the evaluated split is empty")
    with contextlib.redirect_stdout(io.StringIO()):
        if detections:
            coco_dt = coco_gt.loadRes(detections)
        else:  # pycocotools cannot load an empty result list: an empty result set scores 0 where there is gt
            coco_dt = quiet_coco({"images": copy.deepcopy(coco_gt.dataset["images"]),
                                  "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []})
        evaluation = COCOeval(coco_gt, coco_dt, "bbox")
        evaluation.params.imgIds = sorted(set(image_ids))
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: float(value) for name, value in zip(METRICS, evaluation.stats, strict=True)}


class CocoEvaluator(Evaluator):
    """Collects detections in the annotation file's coordinates and category ids; `compute` gathers every
    rank's, scores them with COCOeval on rank 0 against the split's annotation file, and shares the result."""

    def __init__(self) -> None:
        self.dataset: Any = None
        self.detections: list[dict[str, Any]] = []
        self.image_ids: list[int] = []

    def attach(self, dataset: Any) -> None:
        if not hasattr(dataset, "coco") or not hasattr(dataset, "label_to_category"):
            raise PadkdError("task 'detection' evaluates data sets with COCO-format ground truth (data: coco or voc); "
                             f"this split is a {type(dataset).__name__}")
        self.dataset = dataset

    def update(self, output: list[dict[str, Tensor]], batch: Batch) -> None:
        if self.dataset is None:
            raise PadkdError("the detection evaluator needs the split's annotations: evaluate through "
                             "padkd.engine.evaluate.evaluate or call attach(dataset) first")
        to_category = self.dataset.label_to_category
        for det, target in zip(output, batch.targets, strict=True):
            image_id = int(target["image_id"])
            self.image_ids.append(image_id)
            boxes = det["boxes"].detach().float().cpu() / target["scale"].float().cpu().repeat(2)
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True):
                self.detections.append({"image_id": image_id, "category_id": to_category[label], "bbox": box,
                                        "score": score})

    def compute(self) -> dict[str, float]:
        parts = all_gather_object((self.detections, self.image_ids))
        metrics = None
        if not is_distributed() or dist.get_rank() == 0:
            detections = [d for part in parts for d in part[0]]  # type: ignore[index]
            image_ids = [i for part in parts for i in part[1]]  # type: ignore[index]
            metrics = coco_metrics(self.dataset.coco, detections, image_ids)
        return broadcast_object(metrics)  # type: ignore[return-value]


def match_normalization(images: Any, transform: nn.Module) -> Tensor:
    """The student's normalised, padded batch, re-normalised with the teacher's pixel mean/std when they
    differ (padding stays 0)."""
    tensors = images.tensors
    mean_s, std_s = getattr(images, "padkd_normalization", (transform.image_mean, transform.image_std))
    mean_t, std_t = tuple(transform.image_mean), tuple(transform.image_std)
    if (tuple(mean_s), tuple(std_s)) == (mean_t, std_t):
        return tensors

    def col(values: Any) -> Tensor:
        return torch.as_tensor(values, dtype=tensors.dtype, device=tensors.device)[:, None, None]

    x = (tensors * col(std_s) + col(mean_s) - col(mean_t)) / col(std_t)
    valid = torch.zeros(tensors.shape[0], 1, *tensors.shape[-2:], dtype=torch.bool, device=tensors.device)
    for i, (h, w) in enumerate(images.image_sizes):
        valid[i, :, :h, :w] = True
    return x * valid


def image_matches(det: dict[str, Tensor], target: dict[str, Tensor], score: float) -> tuple[Tensor, Tensor]:
    """Per image: which ground-truth boxes a kept detection (score >= `score`, same label, IoU >= 0.5)
    finds, and which kept detections find a ground-truth box."""
    keep = det["scores"] >= score
    boxes, labels = det["boxes"][keep], det["labels"][keep]
    gt_boxes, gt_labels = target["boxes"].to(boxes.device), target["labels"].to(boxes.device)
    iou = box_iou(gt_boxes.float(), boxes.float()) * (gt_labels[:, None] == labels[None, :])
    hit = iou >= 0.5
    return hit.any(1), hit.any(0)


@TASKS.register("detection")
class Detection(Task):
    """Object detection with torchvision detectors: their own losses; COCO mAP@[.5:.95] selects the best checkpoint.

    `teacher_heads`: the teacher also runs its ROI box head on the student's proposals (ROI-level terms
    such as `roi_kd`); otherwise only its backbone and FPN run. `record_score`: the score above which a
    detection counts in the per-image records. `find_unused_parameters`: tell DDP that some student
    parameters may get no gradient in a step."""

    primary_metric = "mAP"
    model_fields = frozenset({"num_classes"})
    collate = staticmethod(list_collate)

    def __init__(self, teacher_heads: bool = False, record_score: float = 0.5,
                 find_unused_parameters: bool = False) -> None:
        if not 0 <= record_score <= 1:
            raise ValueError(f"record_score must be in [0, 1], got {record_score}")
        self.teacher_heads = teacher_heads
        self.record_score = record_score
        self.find_unused_parameters = find_unused_parameters
        self.student_taps = frozenset({"transform", "rois"} if teacher_heads else {"transform"})

    def model_kwargs(self, data: DataSplits) -> dict[str, Any]:
        if data.num_classes is None:
            raise ValueError("detection needs a data set with object categories (num_classes)")
        return {"num_classes": data.num_classes}

    def forward(self, model: nn.Module, batch: Batch, *, training: bool) -> Any:
        return model(batch.inputs, batch.targets)

    def teacher_forward(self, teacher: nn.Module, batch: Batch, student_values: dict[str, Any]) -> Any:
        images, _ = student_values["transform"]
        features = teacher.backbone(match_normalization(images, teacher.transform))
        if self.teacher_heads:
            heads = teacher.roi_heads
            pooled = heads.box_roi_pool(features, student_values["rois"], images.image_sizes)
            heads.box_predictor(heads.box_head(pooled))
        return features

    def loss(self, output: Any, batch: Batch) -> Tensor:
        if isinstance(output, dict):  # training: the detector's own losses
            return torch.stack([v.float() for v in output.values()]).sum()
        # Evaluation (records): detectors return detections, not losses.
        return torch.zeros((), device=batch.index.device)

    def evaluator(self) -> Evaluator:
        return CocoEvaluator()

    def record_columns(self, student: Any, teacher: Any | None, batch: Batch) -> dict[str, Tensor]:
        rows: dict[str, list[float]] = {"gt_boxes": [], "detections": [], "recall50": [], "precision50": []}
        for det, target in zip(student, batch.targets, strict=True):
            found, correct = image_matches(det, target, self.record_score)
            rows["gt_boxes"].append(float(len(found)))
            rows["detections"].append(float(len(correct)))
            rows["recall50"].append(float(found.float().mean()) if len(found) else float("nan"))
            rows["precision50"].append(float(correct.float().mean()) if len(correct) else float("nan"))
        return {key: torch.tensor(values) for key, values in rows.items()}

    def summary(self, metrics: dict[str, float]) -> str:
        return f"mAP={metrics['mAP']:.4f} AP50={metrics['AP50']:.4f}"
