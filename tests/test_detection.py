"""Detection: the FGFI mask and losses against hand computations, PAD per location, per-element hard mining,
the COCO and VOC readers on tiny files in their real formats, COCO mAP, the task and one CLI run."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from padkd.batch import Batch, list_collate
from padkd.context import BuildContext, DataInfo
from padkd.data import DATASETS
from padkd.discrepancy import Discrepancy
from padkd.errors import PadkdError
from padkd.methods import METHODS
from padkd.methods.detection import imitation_mask, level_anchors
from padkd.models import MODELS
from padkd.tasks.detection import CocoEvaluator, Detection, coco_metrics, match_normalization
from padkd.weightings import PAD, WEIGHTINGS

TINY = {"backbone": "cnn", "widths": [4, 8, 8, 8], "fpn_channels": 8, "min_size": 32, "max_size": 32,
        "anchor_size": 8, "representation_size": 16, "proposals": 20, "box_batch_size_per_image": 16,
        "detections_per_image": 10}


def gt_of(boxes: list[list[list[float]]], image_sizes: list[tuple[int, int]], padded: tuple[int, int] = (32, 32)
          ) -> dict[str, torch.Tensor]:
    """Batch-first ground truth as the detector's `gt` tap gives it (boxes padded to the longest list)."""
    m = max(len(b) for b in boxes)
    out = torch.zeros(len(boxes), m, 4)
    mask = torch.zeros(len(boxes), m, dtype=torch.bool)
    for i, image_boxes in enumerate(boxes):
        if image_boxes:
            out[i, : len(image_boxes)] = torch.tensor(image_boxes)
            mask[i, : len(image_boxes)] = True
    return {"boxes": out, "labels": mask.long(), "box_mask": mask, "image_sizes": torch.tensor(image_sizes),
            "padded_size": torch.tensor([padded] * len(boxes))}


def grid(rows: list[str]) -> torch.Tensor:
    """A location mask written as rows of '#' (imitated) and '.', flattened row-major."""
    return torch.tensor([[c == "#" for c in row] for row in rows]).flatten()


# ------------------------------------------------------------------------------------------ FGFI mask

# One 4×4 level of stride 8 (a 32×32 batch), one 16×16 anchor per location centred on (8x, 8y), so the
# anchor at (x, y) is [8x-8, 8y-8, 8x+8, 8y+8]. Ground truth [4, 4, 20, 20] (16×16) overlaps:
#   (1,1) (1,2) (2,1) (2,2): intersection 12×12 = 144, IoU 144 / (256 + 256 - 144) = 0.391 (the best, M)
#   edge neighbours such as (0,1), (1,0), (3,1): 4×12 = 48, IoU 48 / 464 = 0.103
#   corners (0,0), (0,3), (3,0), (3,3): 4×4 = 16, IoU 16 / 496 = 0.032
M = 144 / 368
EDGE = 48 / 464
CORNER = 16 / 496
ONE_ANCHOR = [((16.0,), (1.0,))]


def test_hand_computed_ious_order_the_thresholds() -> None:
    assert 0.5 * M > EDGE > 0.25 * M > CORNER  # so ψ = 0.5 keeps 4 locations and ψ = 0.25 keeps 12


@pytest.mark.parametrize("psi,expected", [
    (0.5, ["....", ".##.", ".##.", "...."]),
    (0.25, [".##.", "####", "####", ".##."]),
])
def test_fgfi_mask_hand_computed(psi: float, expected: list[str]) -> None:
    gt = gt_of([[[4.0, 4.0, 20.0, 20.0]]], [(32, 32)])
    mask = imitation_mask(gt, [(4, 4)], ONE_ANCHOR, psi)
    assert mask.shape == (1, 16)
    torch.testing.assert_close(mask[0], grid(expected))


def test_fgfi_mask_unions_boxes_and_ignores_padding_boxes() -> None:
    # Image 0: the box above plus a box exactly on the anchor at (3, 3) (IoU 1: only that location passes
    # 0.5); image 1: no real box (a padded zero box only): nothing is imitated.
    gt = gt_of([[[4.0, 4.0, 20.0, 20.0], [16.0, 16.0, 32.0, 32.0]], []], [(32, 32), (32, 32)])
    mask = imitation_mask(gt, [(4, 4)], ONE_ANCHOR, 0.5)
    torch.testing.assert_close(mask[0], grid(["....", ".##.", ".##.", "...#"]))
    assert not mask[1].any()


def test_fgfi_mask_scope_all_takes_the_best_anchor_over_levels() -> None:
    # Level A (stride 8, 16×16 anchors) and level B (stride 16, 2×2 map, 64×64 anchors). For the box
    # [4, 4, 20, 20] level B's best IoU is 256/4096 = 0.0625 < 0.5·M: with scope 'all' level B imitates
    # nothing; with scope 'level' its own best anchors pass.
    gt = gt_of([[[4.0, 4.0, 20.0, 20.0]]], [(32, 32)])
    anchors = [((16.0,), (1.0,)), ((64.0,), (1.0,))]
    both = imitation_mask(gt, [(4, 4), (2, 2)], anchors, 0.5, scope="all")
    assert both[0, 16:].sum() == 0 and both[0, :16].sum() == 4
    per_level = imitation_mask(gt, [(4, 4), (2, 2)], anchors, 0.5, scope="level")
    assert per_level[0, 16:].sum() > 0


def test_level_anchors_are_torchvisions() -> None:
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    sizes, ratios = ((32.0,), (64.0, 90.0)), ((0.5, 1.0, 2.0), (1.0, 2.0))
    gen = AnchorGenerator(sizes, ratios)
    images = ImageList(torch.zeros(1, 3, 64, 96), [(60, 90)])
    maps = [torch.zeros(1, 1, 16, 24), torch.zeros(1, 1, 8, 12)]
    expected = gen(images, maps)[0]
    ours = torch.cat([level_anchors(16, 24, (4, 4), sizes[0], ratios[0], torch.device("cpu")).reshape(-1, 4),
                      level_anchors(8, 12, (8, 8), sizes[1], ratios[1], torch.device("cpu")).reshape(-1, 4)])
    torch.testing.assert_close(ours, expected)


# ------------------------------------------------------------------------------------------ FGFI and L2 losses


def built(name: str, options: dict, student: list | dict, teacher: dict, model: nn.Module | None = None):
    method = METHODS.create(name, options, "m")
    batch = Batch(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), torch.arange(2))
    ctx = BuildContext(student=student, teacher=teacher, batch=batch, data=DataInfo(n_train=2), world_size=1,
                       student_model=model or nn.Linear(1, 1), teacher_model=None)
    method.build(ctx)
    return method, batch


def test_fgfi_loss_is_the_papers_normalisation() -> None:
    """Uniform FGFI = Σ_imitated Σ_c (s − t)² / (2 N_p) over the batch (Wang et al.: divided by twice the number
    of imitated locations); `normalize: image` averages each image's own mean instead."""
    torch.manual_seed(0)
    gen = nn.Module()
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    gen.anchors = AnchorGenerator(((16.0,),), ((1.0,),))
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    gt = gt_of([[[4.0, 4.0, 20.0, 20.0]], [[0.0, 0.0, 30.0, 30.0]]], [(32, 32), (32, 32)])
    masks = imitation_mask(gt, [(4, 4)], ONE_ANCHOR, 0.5)
    n = masks.sum(1).float()
    assert n[0] == 4 and n[1] != 4  # different region sizes, so the two normalisations differ
    squared = (s - t).pow(2).sum(1).flatten(1)  # [B, 16]: Σ_c per location
    paper = (squared * masks).sum() / (2 * masks.sum())
    per_image = ((squared * masks).sum(1) / (2 * n)).mean()

    for normalize, expected in (("batch", paper), ("image", per_image)):
        method, batch = built("fgfi", {"adapter": "none", "normalize": normalize}, [{"0": s}, gt], {"0": t}, gen)
        d = method([{"0": s}, gt], {"0": t}, batch)
        assert d.layout == [("0", 4, 4)]
        torch.testing.assert_close(d.mask, masks)
        torch.testing.assert_close(WEIGHTINGS.create("uniform", {})(d).loss, expected)


def test_fgfi_reads_the_students_anchor_generator() -> None:
    model = MODELS.create("fasterrcnn", TINY, "m", num_classes=3)
    method = METHODS.create("fgfi", {}, "m")
    fpn = OrderedDict((k, torch.randn(1, 8, 32 // 2 ** (i + 2), 32 // 2 ** (i + 2)))
                      for i, k in enumerate(["0", "1", "2", "3"]))
    fpn["pool"] = torch.randn(1, 8, 1, 1)
    gt = gt_of([[[4.0, 4.0, 20.0, 20.0]]], [(32, 32)])
    ctx = BuildContext(student=[fpn, gt], teacher=fpn, batch=Batch(torch.zeros(1), torch.zeros(1), torch.arange(1)),
                       data=DataInfo(n_train=1), world_size=1, student_model=model, teacher_model=None)
    method.build(ctx)
    assert method.anchors is not None
    assert [method.anchors[k][0] for k in fpn] == [(8.0,), (16.0,), (32.0,), (64.0,), (128.0,)]
    assert all(method.anchors[k][1] == (0.5, 1.0, 2.0) for k in fpn)


def test_fpn_l2_pairs_levels_by_size_adapts_channels_and_masks_padding() -> None:
    torch.manual_seed(1)
    student = {"0": torch.randn(2, 3, 4, 4), "1": torch.randn(2, 3, 2, 2)}
    teacher = {"a": torch.randn(2, 5, 2, 2), "b": torch.randn(2, 5, 4, 4)}  # other names, other order
    gt = gt_of([[[0.0, 0.0, 8.0, 8.0]], [[0.0, 0.0, 8.0, 8.0]]], [(32, 32), (16, 24)])
    method, batch = built("fpn_l2", {}, [student, gt], teacher)
    assert method.pairs == [("0", "b"), ("1", "a")]
    d = method([student, gt], teacher, batch)
    # image 1 is 16×24 in a 32×32 batch: on the 4×4 level (stride 8) rows 0-1 and columns 0-2 are real.
    valid0 = torch.zeros(4, 4, dtype=torch.bool)
    valid0[:2, :3] = True
    valid1 = torch.zeros(2, 2, dtype=torch.bool)
    valid1[:1, :2] = True
    torch.testing.assert_close(d.mask[1], torch.cat([valid0.flatten(), valid1.flatten()]))
    assert d.mask[0].all()
    with torch.no_grad():
        err0 = (method.adapters["0"](student["0"]) - teacher["b"]).pow(2)
        err1 = (method.adapters["1"](student["1"]) - teacher["a"]).pow(2)
    # uniform, batch normalisation: the MSE over every real location and channel of the batch
    total = err0[0].sum() + err1[0].sum() + err0[1][:, valid0].sum() + err1[1][:, valid1].sum()
    count = 5 * (16 + 4 + int(valid0.sum()) + int(valid1.sum()))
    torch.testing.assert_close(WEIGHTINGS.create("uniform", {})(d).loss, total / count)


def test_detection_methods_explain_wrong_taps() -> None:
    fpn = {"0": torch.randn(1, 2, 4, 4)}
    with pytest.raises(ValueError, match=r"student: \[fpn, gt\]"):
        built("fgfi", {}, fpn, fpn)
    with pytest.raises(ValueError, match="same size"):
        built("fpn_l2", {}, fpn, {"0": torch.randn(1, 2, 3, 3)})


# ------------------------------------------------------------------------------------------ PAD per location


def identity_bn(seq: nn.Sequential) -> None:
    """Make a head's BatchNorm the identity in eval mode."""
    bn = seq[1]
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.weight.data.fill_(1.0)
    bn.bias.data.zero_()
    bn.eps = 0.0


def test_pad_conv1x1_over_locations_equals_formula_with_mask() -> None:
    """L = mean_i [Σ_e m_ie (d_ie e^(−s_ie) + s_ie) / Σ_e m_ie], s_ie = w_l · x_l(location) + b_l per level."""
    torch.manual_seed(2)
    layout = [("0", 4, 4), ("1", 2, 2)]
    maps = {"0": torch.randn(3, 5, 4, 4), "1": torch.randn(3, 7, 2, 2)}
    d = torch.rand(3, 20) * 2
    mask = torch.rand(3, 20) > 0.4
    mask[:, 0] = True
    pad = PAD(head="conv1x1", eps=1e-30, init="reference", log_var_floor=None, warmup_steps=0)
    disc = Discrepancy(torch.where(mask, d, torch.zeros(())), mask, layout=layout)
    pad.build(disc, maps)
    pad.eval()
    for seq in pad.head.values():
        identity_bn(seq)
    out = pad(disc, maps)
    s = torch.cat([torch.einsum("c,bchw->bhw", pad.head[k][0].weight[0, :, 0, 0], maps[k]).flatten(1)
                   + pad.head[k][0].bias for k in ("0", "1")], dim=1)
    nll = d * torch.exp(-s) + s
    expected = ((nll * mask).sum(1) / mask.sum(1)).mean()
    torch.testing.assert_close(out.loss, expected)
    inv = (torch.exp(-s) * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(out.weight, inv / inv.mean())
    # another image size: the same heads predict over 6×6 and 3×3 maps
    bigger = {"0": torch.randn(3, 5, 6, 6), "1": torch.randn(3, 7, 3, 3)}
    other = pad(Discrepancy(torch.rand(3, 45), layout=[("0", 6, 6), ("1", 3, 3)]), bigger)
    assert torch.isfinite(other.loss) and other.weight.shape == (3,)


def test_pad_conv1x1_data_init_and_errors() -> None:
    maps = {"0": torch.randn(4, 3, 2, 2)}
    d = Discrepancy(torch.rand(4, 4) + 1.0, layout=[("0", 2, 2)])
    pad = PAD(head="conv1x1")
    pad.build(d, maps)
    torch.testing.assert_close(pad.head["0"][1].bias, torch.full((1,), math.log(float(d.value.mean()) + 1e-6)))
    with pytest.raises(PadkdError, match="no map 'x'"):
        pad(Discrepancy(torch.rand(4, 4), layout=[("x", 2, 2)]), maps)
    with pytest.raises(PadkdError, match="locations are 3x3"):
        pad(Discrepancy(torch.rand(4, 9), layout=[("0", 3, 3)]), maps)
    with pytest.raises(PadkdError, match="no layout"):
        PAD(head="conv1x1").build(Discrepancy(torch.rand(4, 4)), maps)
    with pytest.raises(ValueError, match="per_element"):
        PAD(head="conv1x1", mode="per_sample")


def test_pad_per_sample_pools_fpn_dicts() -> None:
    torch.manual_seed(3)
    maps = {"0": torch.randn(4, 3, 4, 4), "1": torch.randn(4, 2, 2, 2)}
    pad = PAD(mode="per_sample", eps=1e-30, init="reference", log_var_floor=None, warmup_steps=0).eval()
    d = torch.rand(4, 20)
    out = pad(d, maps)
    assert pad.head[0].in_features == 5
    s = pad.head(torch.cat([maps["0"].mean((2, 3)), maps["1"].mean((2, 3))], 1))[:, 0]
    torch.testing.assert_close(out.loss, (d.mean(1) * torch.exp(-s) + s).mean())


# ------------------------------------------------------------------------------------------ per-element mining


def test_element_granularity_ohem_keeps_the_hardest_valid_elements() -> None:
    d = torch.tensor([[1.0, 5.0, 0.0, 2.0], [9.0, 3.0, 4.0, 0.5]])
    mask = torch.tensor([[True, True, True, True], [False, True, True, True]])  # the 9 is padding
    out = WEIGHTINGS.create("ohem", {"fraction": 0.5, "granularity": "element"})(Discrepancy(d, mask))
    # 7 valid elements, top ceil(3.5) = 4: 5, 4, 3, 2; weights 7/4 on them (mean 1 over valid elements)
    w = torch.tensor([[0.0, 1.75, 0.0, 1.75], [0.0, 1.75, 1.75, 0.0]])
    expected = ((w * d)[0].sum() / 4 + (w * d)[1, 1:].sum() / 3) / 2
    torch.testing.assert_close(out.loss, expected)
    per_sample = torch.tensor([3.5 / 4, 3.5 / 3])
    torch.testing.assert_close(out.weight, per_sample / per_sample.mean())


def test_element_granularity_uniform_weights_give_the_uniform_loss() -> None:
    torch.manual_seed(4)
    d = torch.rand(3, 6)
    mask = torch.rand(3, 6) > 0.3
    mask[:, 0] = True
    focal = WEIGHTINGS.create("focal", {"gamma": 0.0, "granularity": "element"})(Discrepancy(d, mask))
    uniform = WEIGHTINGS.create("uniform", {})(Discrepancy(d, mask))
    torch.testing.assert_close(focal.loss, uniform.loss)
    gamma2 = WEIGHTINGS.create("focal", {"gamma": 2.0, "granularity": "element"})(Discrepancy(d, mask))
    w = torch.where(mask, d**2, torch.zeros(()))
    w = w * mask.sum() / w.sum()
    torch.testing.assert_close(gamma2.loss, (((w * d) * mask).sum(1) / mask.sum(1)).mean())
    with pytest.raises(PadkdError, match="granularity"):
        WEIGHTINGS.create("ohem", {"granularity": "pixel"})


# ------------------------------------------------------------------------------------------ readers


def write_image(path: Path, h: int, w: int) -> None:
    """A random RGB image in the format its suffix names (PNG, JPEG), written by Pillow."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(torch.randint(0, 255, (h, w, 3), dtype=torch.uint8).numpy()).save(path)


def tiny_coco(root: Path) -> Path:
    write_image(root / "train" / "a.png", 20, 30)
    write_image(root / "train" / "b.png", 16, 16)
    write_image(root / "val" / "c.png", 16, 16)
    cats = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    train = {"images": [{"id": 10, "file_name": "a.png", "width": 30, "height": 20},
                        {"id": 11, "file_name": "b.png", "width": 16, "height": 16}],
             "annotations": [{"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 3, 10, 5], "area": 50,
                              "iscrowd": 0},
                             {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0, 0, 30, 20], "area": 600,
                              "iscrowd": 1},
                             {"id": 3, "image_id": 10, "category_id": 3, "bbox": [25, 15, 10, 10], "area": 25},
                             {"id": 4, "image_id": 11, "category_id": 3, "bbox": [4, 4, 0, 5], "area": 0}],
             "categories": cats}
    val = {"images": [{"id": 5, "file_name": "c.png", "width": 16, "height": 16}],
           "annotations": [{"id": 1, "image_id": 5, "category_id": 3, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}],
           "categories": cats}
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train.json").write_text(json.dumps(train))
    (root / "annotations" / "instances_val.json").write_text(json.dumps(val))
    return root


def test_coco_reader(tmp_path: Path) -> None:
    root = tiny_coco(tmp_path)
    data = DATASETS.create("coco", {"root": str(root), "train": "train", "val": None, "test": "val", "flip": 0.0}, "d")
    assert data.num_classes == 3 and data.val is None
    assert len(data.train) == 1  # image 11 has only a zero-width box: left out of training
    assert len(data.eval_train) == 2
    image, target, index = data.train[0]
    assert image.shape == (3, 20, 30) and 0 <= float(image.min()) and float(image.max()) <= 1
    # crowd left out, the box over the border clipped to the image, labels 1..K in category-id order
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 8.0], [25.0, 15.0, 30.0, 20.0]]))
    assert target["labels"].tolist() == [2, 1] and int(target["image_id"]) == 10 and index == 0
    assert data.test.label_to_category == {1: 3, 2: 7}
    raw = DATASETS.create("coco", {"root": str(root), "train": "train", "val": None, "test": "val",
                                  "contiguous_labels": False}, "d")
    assert raw.num_classes == 8 and raw.train[0][1]["labels"].tolist() == [7, 3]


def test_coco_resize_and_flip_move_the_boxes(tmp_path: Path) -> None:
    root = tiny_coco(tmp_path)
    plain = DATASETS.create("coco", {"root": str(root), "train": "train", "val": None, "test": "val", "flip": 0.0}, "d")
    sized = DATASETS.create("coco", {"root": str(root), "train": "train", "val": None, "test": "val", "flip": 1.0,
                                    "resize": [40, 45]}, "d")
    image, target, _ = sized.train[0]
    assert image.shape == (3, 30, 45)  # 20×30 → shorter side 40 would make the longer 60 > 45: ×1.5
    torch.testing.assert_close(target["scale"], torch.tensor([1.5, 1.5]))
    boxes = plain.train[0][1]["boxes"] * 1.5
    flipped = torch.stack([45 - boxes[:, 2], boxes[:, 1], 45 - boxes[:, 0], boxes[:, 3]], 1)
    torch.testing.assert_close(target["boxes"], flipped)


def test_coco_reader_errors_are_one_line(tmp_path: Path) -> None:
    root = tiny_coco(tmp_path)
    options = {"root": str(root), "train": "train", "val": None, "test": "val"}
    (root / "annotations" / "instances_val.json").write_text('{"images": [')
    with pytest.raises(PadkdError, match=r"not valid JSON \(line 1") as err:
        DATASETS.create("coco", options, "d")
    assert "\n" not in str(err.value)
    (root / "annotations" / "instances_val.json").write_text('{"images": [], "categories": []}')
    with pytest.raises(PadkdError, match="no 'annotations' list"):
        DATASETS.create("coco", options, "d")
    (root / "annotations" / "instances_val.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "gone.png"}], "annotations": [], "categories": [{"id": 3}, {"id": 7}]}))
    with pytest.raises(PadkdError, match=r"gone\.png' listed in .* not found \(1 of 1 missing\)"):
        DATASETS.create("coco", options, "d")
    with pytest.raises(PadkdError, match="annotation file .* not found"):
        DATASETS.create("coco", {**options, "test": "test"}, "d")


def write_voc(root: Path) -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    objects = {"000005": [("dog", 1, 2, 10, 8, 0), ("cat", 5, 5, 12, 12, 1)], "000007": [("cat", 3, 3, 6, 9, 0)]}
    for name, objs in objects.items():
        write_image(root / "JPEGImages" / f"{name}.jpg", 16, 20)
        body = "".join(f"<object><name>{c}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                       f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>" for c, x1, y1, x2, y2, d in objs)
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>20</width><height>16</height>"
            f"<depth>3</depth></size>{body}</annotation>")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("000005\n000007\n")
    return root


def test_voc_reader(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "VOC2007")
    data = DATASETS.create("voc", {"root": str(root), "classes": ["cat", "dog"], "flip": 0.0}, "d")
    assert data.num_classes == 3 and len(data.train) == 1 and len(data.test) == 2
    image, target, _ = data.train[0]
    assert image.shape == (3, 16, 20)
    # 1-based inclusive pixels (1..10) → the continuous box [0, 10]; the difficult cat is left out
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 1.0, 10.0, 8.0]]))
    assert target["labels"].tolist() == [2]
    anns = data.test.coco.imgToAnns[1]
    assert [a["iscrowd"] for a in anns] == [0, 1]  # difficult objects are ignored by COCOeval
    assert anns[0]["bbox"] == [0.0, 1.0, 10.0, 7.0]
    kept = DATASETS.create("voc", {"root": str(root), "classes": ["cat", "dog"], "keep_difficult": True}, "d")
    assert len(kept.train[0][1]["boxes"]) == 2
    with pytest.raises(PadkdError, match="unknown class 'dog'"):
        DATASETS.create("voc", {"root": str(root), "classes": ["cat"]}, "d")
    (root / "Annotations" / "000007.xml").write_text("<annotation><size>")
    with pytest.raises(PadkdError, match="not valid XML"):
        DATASETS.create("voc", {"root": str(root), "classes": ["cat", "dog"]}, "d")


# ------------------------------------------------------------------------------------------ COCO mAP


def gt_coco(boxes: dict[int, list[tuple[int, list[float]]]]):
    from padkd.data.coco import quiet_coco

    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in boxes]
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, c, b) in enumerate((i, c, b) for i, objs in boxes.items() for c, b in objs)]
    return quiet_coco({"images": images, "annotations": anns, "categories": [{"id": 1}, {"id": 2}]})


OBJECTS = {1: [(1, [10.0, 10.0, 30.0, 20.0]), (2, [50.0, 40.0, 40.0, 50.0])], 2: [(1, [5.0, 60.0, 12.0, 12.0])]}


def test_map_of_perfect_predictions_is_one_and_of_shifted_boxes_lower() -> None:
    coco = gt_coco(OBJECTS)
    perfect = [{"image_id": i, "category_id": c, "bbox": b, "score": 0.9}
               for i, objs in OBJECTS.items() for c, b in objs]
    metrics = coco_metrics(coco, perfect, [1, 2])
    for key in ("mAP", "AP50", "AP75"):
        assert metrics[key] == pytest.approx(1.0)
    shifted = [{**d, "bbox": [d["bbox"][0] + 3, d["bbox"][1] + 2, *d["bbox"][2:]]} for d in perfect]
    worse = coco_metrics(coco, shifted, [1, 2])
    assert 0 < worse["mAP"] < 1.0 and worse["mAP"] < worse["AP50"]
    wrong_class = [{**d, "category_id": 3 - d["category_id"]} for d in perfect]
    assert coco_metrics(coco, wrong_class, [1, 2])["mAP"] == 0
    none = coco_metrics(coco, [], [1, 2])
    assert none["mAP"] == 0 and none["APl"] == -1  # no large object: pycocotools' -1
    assert none["AR@100"] == 0 and none["ARl"] == -1


def test_all_twelve_coco_stats_by_hand() -> None:
    # Image 1: two objects of class 1, A small (10×10) and B medium (40×40); image 2: C of class 2, large
    # (99×99 > 96²). Detections: A exact (score .9), B cut to 40×28.8 (IoU .72, score .8), C exact (.7).
    # Over the ten IoU thresholds .50:.05:.95, B is found at the five up to .70.
    coco = gt_coco({1: [(1, [5.0, 5.0, 10.0, 10.0]), (1, [50.0, 50.0, 40.0, 40.0])], 2: [(2, [0.0, 0.0, 99.0, 99.0])]})
    detections = [{"image_id": 1, "category_id": 1, "bbox": [5.0, 5.0, 10.0, 10.0], "score": 0.9},
                  {"image_id": 1, "category_id": 1, "bbox": [50.0, 50.0, 40.0, 28.8], "score": 0.8},
                  {"image_id": 2, "category_id": 2, "bbox": [0.0, 0.0, 99.0, 99.0], "score": 0.7}]
    # AP of class 1 where B is missed: precision 1 up to recall 1/2, i.e. at 51 of the 101 recall points.
    missed = 51 / 101
    expected = {
        "mAP": ((5 + 5 * missed) / 10 + 1) / 2, "AP50": 1.0, "AP75": (missed + 1) / 2,
        "APs": 1.0,  # A only (C's class has no small object: left out of the mean)
        "APm": 0.5,  # B: found at 5 thresholds; at the others its detection is a false positive
        "APl": 1.0,  # C only
        "AR@1": (0.5 + 1) / 2,  # one detection per image and class: A's, so class 1 recalls 1 of 2
        "AR@10": ((1 + 0.5) / 2 + 1) / 2, "AR@100": ((1 + 0.5) / 2 + 1) / 2,
        "ARs": 1.0, "ARm": 0.5, "ARl": 1.0,
    }
    metrics = coco_metrics(coco, detections, [1, 2])
    assert list(metrics) == list(expected)
    assert metrics == pytest.approx(expected, abs=1e-12)


def test_evaluator_maps_detections_back_to_the_annotation_file() -> None:
    class Split:
        coco = gt_coco(OBJECTS)
        label_to_category = {1: 1, 2: 2}

    ev = CocoEvaluator()
    ev.attach(Split())
    # the loader resized image 1 by (x 2, y 0.5): detections come in the resized coordinates
    targets = [{"image_id": torch.tensor(1), "scale": torch.tensor([2.0, 0.5])},
               {"image_id": torch.tensor(2), "scale": torch.tensor([1.0, 1.0])}]
    outputs = []
    for target, objs in zip(targets, OBJECTS.values(), strict=True):
        xyxy = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for _, b in objs]) * target["scale"].repeat(2)
        outputs.append({"boxes": xyxy, "scores": torch.full((len(objs),), 0.8),
                        "labels": torch.tensor([c for c, _ in objs])})
    ev.update(outputs, Batch(None, targets, torch.arange(2)))
    assert ev.compute()["mAP"] == pytest.approx(1.0)
    with pytest.raises(PadkdError, match="COCO-format"):
        CocoEvaluator().attach(object())


# ------------------------------------------------------------------------------------------ task and models


def test_detector_taps_and_task_calls() -> None:
    from padkd.taps import Taps

    torch.manual_seed(5)
    model = MODELS.create("fasterrcnn", TINY, "m", num_classes=3)
    task = Detection()
    images = [torch.rand(3, 32, 32), torch.rand(3, 24, 32)]
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    batch = Batch(images, targets, torch.arange(2))
    taps = Taps(model, {"fpn", "gt", "transform", "rois"}, "student")
    model.train()
    with taps.capture():
        out = task.forward(model, batch, training=True)
    values = taps.values(out)
    loss = task.loss(values["output"], batch)
    torch.testing.assert_close(loss, sum(v for v in out.values()))
    assert list(values["fpn"]) == ["0", "1", "2", "3", "pool"]
    gt = values["gt"]
    assert gt["boxes"].shape == (2, 1, 4) and gt["box_mask"].tolist() == [[True], [False]]
    assert gt["image_sizes"].tolist() == [[32, 32], [24, 32]] and gt["padded_size"].tolist() == [[32, 32]] * 2
    assert len(values["rois"]) == 2 and values["rois"][0].shape[1] == 4
    model.eval()
    with torch.no_grad():
        detections = task.forward(model, batch, training=False)
    assert task.loss(detections, batch) == 0
    rows = task.record_columns(detections, None, batch)
    assert rows["gt_boxes"].tolist() == [1.0, 0.0] and math.isnan(rows["recall50"][1])
    # the teacher runs its backbone on the student's transformed batch: FPN maps of the same sizes
    teacher = MODELS.create("fasterrcnn", {**TINY, "fpn_channels": 16}, "t", num_classes=3).eval()
    with torch.no_grad():
        t_fpn = task.teacher_forward(teacher, batch, values)
    assert [v.shape[-2:] for v in t_fpn.values()] == [v.shape[-2:] for v in values["fpn"].values()]


def test_roi_kd_on_the_students_proposals_classified_by_both_heads() -> None:
    """With `teacher_heads`, the teacher's ROI head classifies the student's proposals; roi_kd is then per
    proposal T²·KL(softmax(t/T) ‖ softmax(s/T)), masked to each image's proposals."""
    from padkd.taps import Taps

    torch.manual_seed(6)
    student = MODELS.create("fasterrcnn", TINY, "s", num_classes=3)
    teacher = MODELS.create("fasterrcnn", {**TINY, "fpn_channels": 16}, "t", num_classes=3).eval()
    task = Detection(teacher_heads=True)
    assert task.student_taps == {"transform", "rois"}
    images = [torch.rand(3, 32, 32), torch.rand(3, 32, 24)]
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[4.0, 4.0, 12.0, 16.0]]), "labels": torch.tensor([2])}]
    batch = Batch(images, targets, torch.arange(2))
    s_taps = Taps(student, {"box_scores"} | task.student_taps, "student")
    t_taps = Taps(teacher, {"box_scores"}, "teacher")
    student.train()
    with s_taps.capture():
        out = task.forward(student, batch, training=True)
    sv = s_taps.values(out)
    with torch.no_grad(), t_taps.capture():
        t_out = task.teacher_forward(teacher, batch, sv)
    tv = t_taps.values(t_out)
    s, t = sv["box_scores"], tv["box_scores"]
    counts = [len(r) for r in sv["rois"]]
    assert s["mask"].sum(1).tolist() == counts == t["mask"].sum(1).tolist()
    d = METHODS.create("roi_kd", {"temperature": 2.0}, "m")(s, t, batch)
    for i, n in enumerate(counts):
        for j in range(n):
            p_t = torch.softmax(t["logits"][i, j] / 2, 0)
            kl = (p_t * (p_t.log() - torch.log_softmax(s["logits"][i, j].detach() / 2, 0))).sum() * 4
            torch.testing.assert_close(d.value[i, j].detach(), kl, rtol=1e-4, atol=1e-6)
    assert d.mask.tolist() == s["mask"].tolist() and (d.value[~d.mask] == 0).all()


def test_teacher_input_is_renormalised_with_its_own_statistics() -> None:
    from padkd.models.detection import TappedTransform

    student_tf = TappedTransform(16, 16, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    teacher_tf = TappedTransform(16, 16, [0.1, 0.2, 0.3], [0.5, 0.5, 0.5])
    images = [torch.rand(3, 16, 16), torch.rand(3, 16, 8)]
    s_list, _ = student_tf(images)
    t_list, _ = teacher_tf(images)
    torch.testing.assert_close(match_normalization(s_list, teacher_tf), t_list.tensors)


def test_record_columns_count_matches() -> None:
    det = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0]]),
           "scores": torch.tensor([0.9, 0.8, 0.2]), "labels": torch.tensor([1, 1, 2])}
    target = {"boxes": torch.tensor([[1.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), "labels": torch.tensor([1, 1])}
    rows = Detection(record_score=0.5).record_columns([det], None, Batch(None, [target], torch.arange(1)))
    assert rows["detections"].tolist() == [2.0] and rows["recall50"].tolist() == [0.5]
    assert rows["precision50"].tolist() == [0.5]


def test_pretrained_backbone_freezes_early_stages_and_stages_respect_it(tmp_path: Path) -> None:
    import torchvision

    from padkd.distiller import Distiller

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    model = MODELS.create("fasterrcnn", {"backbone": "resnet18", "backbone_weights_path": str(path)}, "m",
                         num_classes=3)
    source = torch.load(path)
    torch.testing.assert_close(model.backbone.body.layer2[0].conv1.weight, source["layer2.0.conv1.weight"])
    frozen = set(model.padkd_frozen)
    assert "backbone.body.conv1.weight" in frozen and "backbone.body.layer1.0.conv1.weight" in frozen
    assert not any(name.startswith("backbone.body.layer2") for name in frozen)
    groups = Distiller(model).param_groups()
    trained = {id(p) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert id(named["backbone.body.layer2.0.conv1.weight"]) in trained
    assert all(id(named[name]) not in trained and not named[name].requires_grad for name in frozen)
    with pytest.raises(PadkdError, match="backbone_weights_path"):
        MODELS.create("fasterrcnn", {"backbone": "resnet50", "backbone_weights_path": str(path)}, "m", num_classes=3)


# ------------------------------------------------------------------------------------------ end to end


def test_cli_trains_distils_and_evaluates_a_tiny_detector(tmp_path: Path, write_yaml, capsys) -> None:
    from padkd.cli import main
    from padkd.demos.shapes import write_shapes_coco

    root = write_shapes_coco(tmp_path / "shapes", {"train": 8, "val": 4}, size=32, max_objects=2)
    data = {"name": "coco", "root": str(root), "train": "train", "val": None, "test": "val", "batch_size": 4}
    common = {"device": "cpu", "data": data, "task": {"name": "detection"}, "records": {"splits": ["test"]},
              "log": {"tensorboard": False, "progress": "none"}}
    teacher = write_yaml(tmp_path / "teacher.yaml", {**common, "output_dir": str(tmp_path / "t"),
                         "student": {"model": {"name": "fasterrcnn", **TINY, "fpn_channels": 16}},
                         "stages": [{"epochs": 1, "optimizer": {"lr": 0.01}}]})
    assert main(["train", str(teacher), "--quiet"]) == 0
    terms = [{"name": "fgfi", "method": {"name": "fgfi"}, "student": ["fpn", "gt"], "teacher": "fpn",
              "embedding": "fpn", "weighting": {"name": "pad", "head": "conv1x1"}},
             {"name": "roi", "method": {"name": "roi_kd"}, "student": "box_scores", "teacher": "box_scores",
              "weighting": {"name": "pad", "mode": "per_sample"}}]
    student = write_yaml(tmp_path / "student.yaml", {
        **common, "output_dir": str(tmp_path / "s"), "task": {"name": "detection", "teacher_heads": True},
        "teacher": {"model": {"name": "fasterrcnn", **TINY, "fpn_channels": 16}, "checkpoint": str(tmp_path / "t")},
        "student": {"model": {"name": "fasterrcnn", **TINY}},
        "stages": [{"epochs": 1, "optimizer": {"lr": 0.01}, "terms": terms}]})
    assert main(["train", str(student), "--quiet"]) == 0
    capsys.readouterr()
    final = json.loads((tmp_path / "s" / "final.json").read_text())
    assert final["primary_metric"] == "mAP" and set(final["last"]) == {"mAP", "AP50", "AP75", "APs", "APm", "APl",
                                                                  "AR@1", "AR@10", "AR@100", "ARs", "ARm", "ARl"}
    records = (tmp_path / "s" / "records" / "0-main-test.csv").read_text().splitlines()
    assert records[0].split(",")[:5] == ["index", "gt_boxes", "detections", "recall50", "precision50"]
    assert "fgfi.log_var" in records[0] and "roi.log_var" in records[0] and len(records) == 5
    assert main(["eval", str(tmp_path / "s" / "checkpoints" / "last.pt"), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["mAP"] == pytest.approx(final["last"]["mAP"])


def test_batches_of_images_of_different_sizes_collate_as_lists() -> None:
    items = [(torch.zeros(3, 4, 5), {"boxes": torch.zeros(0, 4)}, 0),
             (torch.zeros(3, 6, 2), {"boxes": torch.zeros(1, 4)}, 1)]
    batch = list_collate(items)
    assert [tuple(x.shape) for x in batch.inputs] == [(3, 4, 5), (3, 6, 2)] and batch.index.tolist() == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("name,builder,options", [
    ("fasterrcnn", "fasterrcnn_resnet50_fpn", {"backbone": "resnet50"}),
    ("fasterrcnn", "fasterrcnn_mobilenet_v3_large_fpn", {"backbone": "mobilenet_v3_large"}),
    ("retinanet", "retinanet_resnet50_fpn", {"backbone": "resnet50"}),
])
def test_torchvision_detection_checkpoints_load_by_key(tmp_path: Path, name: str, builder: str, options: dict) -> None:
    """A torchvision COCO detector's state dict (frozen BatchNorm, as released) loads through `weights_path`."""
    import torchvision

    reference = getattr(torchvision.models.detection, builder)(weights=None, weights_backbone=None, num_classes=91)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "coco.pth"
    torch.save(state, path)
    model = MODELS.create(name, {**options, "weights_path": str(path)}, "m", num_classes=91)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert len(model.state_dict()) == len(state)


def _evaluator_rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        class Split:
            coco = gt_coco(OBJECTS)
            label_to_category = {1: 1, 2: 2}

        image_id = rank + 1  # each rank sees one image
        objs = OBJECTS[image_id]
        boxes = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for _, b in objs])
        if rank == 1:
            boxes[:, :2] += 4  # rank 1's detection is off: the gathered mAP is below 1
        ev = CocoEvaluator()
        ev.attach(Split())
        ev.update([{"boxes": boxes, "scores": torch.full((len(objs),), 0.9),
                    "labels": torch.tensor([c for c, _ in objs])}],
                  Batch(None, [{"image_id": torch.tensor(image_id), "scale": torch.ones(2)}], torch.arange(1)))
        torch.save(ev.compute(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch
def test_coco_evaluation_gathers_detections_across_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_evaluator_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0] == ranks[1]
    objs = OBJECTS[1] + [(c, [b[0] + 4, b[1] + 4, b[2] - 4, b[3] - 4]) for c, b in OBJECTS[2]]
    single = coco_metrics(gt_coco(OBJECTS), [{"image_id": 1 if k < 2 else 2, "category_id": c, "bbox": b,
                                             "score": 0.9} for k, (c, b) in enumerate(objs)], [1, 2])
    assert ranks[0] == pytest.approx(single)
    assert ranks[0]["mAP"] < 1.0
