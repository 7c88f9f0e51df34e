"""torchvision detectors by name: Faster R-CNN with FPN and RetinaNet on ResNet, MobileNetV3 or small CNN backbones.

Each detector keeps torchvision's module tree (so torchvision's detection checkpoints load by key through
`weights_path`) and declares tap aliases for distillation (`padkd_taps`):
- `fpn`: the backbone + FPN output, an `OrderedDict` of feature maps (`body`: the backbone alone);
- `transform`: torchvision's `(ImageList, targets)` after normalisation, resizing and padding;
- `gt`: the same ground truth batch-first (boxes `[B, M, 4]` in resized coordinates, `box_mask`, `labels`,
  `image_sizes`, `padded_size`), which masked-imitation methods read;
- Faster R-CNN: `rois` (the proposals the ROI head classifies, a list per image) and `box_scores` (their
  class logits batch-first, `{"logits": [B, M, K], "mask": [B, M]}`); RetinaNet: `head`.
Nothing is downloaded: `weights_path` is a local torchvision detection state dict, `backbone_weights_path` a
local ImageNet classification state dict for the backbone alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from padkd.errors import PadkdError
from padkd.models import MODELS

Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "cnn"]
#: torchvision's ImageNet normalisation, the default of its detectors.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Marker(nn.Identity):
    """A no-op module whose output a tap can read (a value computed inside a forward, such as the
    batch-first ground truth or the proposals)."""


def batch_first_targets(images: ImageList, targets: list[dict[str, Tensor]] | None) -> dict[str, Tensor]:
    """The resized ground truth of a batch as padded tensors, dim 0 = image: `boxes` `[B, M, 4]` (xyxy, zeros
    where padded), `labels` `[B, M]`, `box_mask` `[B, M]` (real boxes), `image_sizes` `[B, 2]` (h, w of
    each resized image) and `padded_size` `[B, 2]` (h, w of the padded batch tensor)."""
    device = images.tensors.device
    n = len(images.image_sizes)
    counts = [len(t["boxes"]) for t in targets] if targets is not None else [0] * n
    m = max(counts, default=0)
    boxes = torch.zeros(n, m, 4, device=device)
    labels = torch.zeros(n, m, dtype=torch.long, device=device)
    mask = torch.zeros(n, m, dtype=torch.bool, device=device)
    for i, k in enumerate(counts):
        if k:
            assert targets is not None
            boxes[i, :k] = targets[i]["boxes"].to(boxes.dtype)
            labels[i, :k] = targets[i]["labels"]
            mask[i, :k] = True
    sizes = torch.tensor([list(s) for s in images.image_sizes], dtype=torch.long, device=device).reshape(n, 2)
    padded = torch.tensor(list(images.tensors.shape[-2:]), dtype=torch.long, device=device).expand(n, 2)
    return {"boxes": boxes, "labels": labels, "box_mask": mask, "image_sizes": sizes, "padded_size": padded}


class TappedTransform(GeneralizedRCNNTransform):
    """torchvision's detector transform, plus a `gt` marker that exposes its output batch-first.

    The ImageList it returns remembers the normalisation it applied (`padkd_normalization`), so that a
    teacher with another pixel mean/std can be fed the same resized, padded images."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gt = Marker()

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        image_list, targets = super().forward(images, targets)
        image_list.padkd_normalization = (tuple(self.image_mean), tuple(self.image_std))  # type: ignore[attr-defined]
        self.gt(batch_first_targets(image_list, targets))
        return image_list, targets


class TappedRoIPool(MultiScaleRoIAlign):
    """MultiScaleRoIAlign with a `rois` marker that shows the proposals the ROI head classifies (in training,
    the sampled proposals matched to ground truth); it remembers how many each image has (`counts`) for
    the predictor of the same forward."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rois = Marker()
        self.counts: list[int] = []

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        self.rois(boxes)
        self.counts = [len(b) for b in boxes]
        return super().forward(x, boxes, image_shapes)


class TappedPredictor(FastRCNNPredictor):
    """torchvision's box predictor with a `scores` marker that shows its class logits batch-first:
    `{"logits": [B, M, K], "mask": [B, M]}`, M the most proposals of an image in the batch."""

    def __init__(self, in_channels: int, num_classes: int, pool: TappedRoIPool) -> None:
        super().__init__(in_channels, num_classes)
        self._pool = [pool]  # a reference, not a submodule: the pool belongs to the ROI heads
        self.scores = Marker()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, deltas = super().forward(x)
        counts = self._pool[0].counts
        padded = nn.utils.rnn.pad_sequence(list(logits.split(counts)), batch_first=True)
        lengths = torch.tensor(counts, device=logits.device)
        mask = torch.arange(padded.shape[1], device=logits.device)[None, :] < lengths[:, None]
        self.scores({"logits": padded, "mask": mask})
        return logits, deltas


class ConvStages(nn.Module):
    """A small CNN backbone for tiny images (demos, tests): a stride-2 stem, then one stride-2 stage per
    width (conv3x3-BN-ReLU twice), so stage k has stride 2^(k+1) like ResNet's layer k."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = _conv_bn(3, widths[0], 2)
        prev = widths[0]
        for k, width in enumerate(widths, start=1):
            self.add_module(f"stage{k}", nn.Sequential(_conv_bn(prev, width, 2), _conv_bn(width, width, 1)))
            prev = width

    def forward(self, x: Tensor) -> Tensor:
        for module in self.children():
            x = module(x)
        return x


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _norm_layer(norm: str) -> type[nn.Module]:
    return FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d


def _pretrained_defaults(trainable_layers: int | None, norm: str, *weights: str | None) -> tuple[int | None, str]:
    """torchvision's defaults: with pretrained weights the first stages stay frozen (3 stages train) and
    BatchNorm is frozen; from scratch everything trains with ordinary BatchNorm."""
    pretrained = any(w is not None for w in weights)
    layers = trainable_layers if trainable_layers is not None else (3 if pretrained else None)
    return layers, norm if norm != "auto" else ("frozen_bn" if pretrained else "bn")


def _load_backbone_weights(body: nn.Module, path: str, drop: tuple[str, ...], strip: str = "") -> None:
    """Load an ImageNet classification state dict into a backbone body: keys under `drop` (the classifier)
    are left out, `strip` is removed from the front of the others; BN counters the body lacks are ignored."""
    from padkd.models.convert import fit_state, read_state_dict

    state, _ = read_state_dict(Path(path))
    own = body.state_dict()
    picked = {}
    for key, value in state.items():
        if key.startswith(drop) or (strip and not key.startswith(strip)):
            continue
        name = key[len(strip):]
        if name.endswith("num_batches_tracked") and name not in own:
            continue
        picked[name] = value
    fit_state(body, picked, f"model.backbone_weights_path '{path}'",
              "point it at ImageNet classification weights of the same backbone")


def _freeze(body: nn.Module, trainable: list[str]) -> None:
    """Freeze the body's parameters outside the modules named in `trainable`."""
    for name, p in body.named_parameters():
        if not any(name == m or name.startswith(f"{m}.") for m in trainable):
            p.requires_grad_(False)


def build_backbone(name: str, *, fpn_channels: int, returned: list[int], extra: ExtraFPNBlock,
                   trainable_layers: int | None, norm: str, widths: tuple[int, ...],
                   weights_path: str | None) -> BackboneWithFPN:
    """A backbone with an FPN on its stages `returned` (1-based). torchvision's `trainable_layers`: the last
    k stages of the body train, the earlier ones stay frozen (None: all train)."""
    import torchvision

    if name == "cnn":
        if weights_path is not None:
            raise PadkdError("model.backbone_weights_path: the 'cnn' backbone has no pretrained weights; leave it out")
        if len(widths) < max(returned):
            raise PadkdError(f"model.widths: the cnn backbone needs {max(returned)} widths, got {list(widths)}")
        body: nn.Module = ConvStages(widths)
        channels = list(widths)
        stages = [f"stage{k}" for k in range(1, len(widths) + 1)]
    elif name.startswith("resnet"):
        body = getattr(torchvision.models, name)(weights=None, norm_layer=_norm_layer(norm))
        body.fc = nn.Identity()  # the FPN body ends at layer4; the classifier is neither used nor loaded
        if weights_path is not None:
            _load_backbone_weights(body, weights_path, drop=("fc.",))
        expansion = 4 if name in ("resnet50", "resnet101") else 1
        channels = [64 * expansion * 2 ** (k - 1) for k in range(1, 5)]
        stages = [f"layer{k}" for k in range(1, 5)]
        layers = 5 if trainable_layers is None else trainable_layers
        if not 0 <= layers <= 5:
            raise PadkdError(f"model.trainable_layers must be in [0, 5], got {layers}")
        _freeze(body, ["layer4", "layer3", "layer2", "layer1", "conv1"][:layers] + (["bn1"] if layers == 5 else []))
    else:  # mobilenet_v3_large
        body = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=_norm_layer(norm)).features
        if weights_path is not None:
            _load_backbone_weights(body, weights_path, drop=("classifier.",), strip="features.")
        # Stage ends: the blocks before each stride-2 block, and the last block (as torchvision does).
        starts = [0] + [i for i, b in enumerate(body) if getattr(b, "_is_cn", False)] + [len(body) - 1]
        n_stages = len(starts)
        returned = [n_stages - 2, n_stages - 1]
        channels = [body[starts[k]].out_channels for k in returned]
        stages = [str(starts[k]) for k in returned]
        layers = n_stages if trainable_layers is None else trainable_layers
        if not 0 <= layers <= n_stages:
            raise PadkdError(f"model.trainable_layers must be in [0, {n_stages}] for {name}, got {layers}")
        _freeze(body, [str(i) for i in range(starts[n_stages - layers], len(body))] if layers else [])
        return_layers = {stage: str(i) for i, stage in enumerate(stages)}
        return BackboneWithFPN(body, return_layers, channels, fpn_channels, extra_blocks=extra)
    return_layers = {stages[k - 1]: str(i) for i, k in enumerate(returned)}
    in_channels = [channels[k - 1] for k in returned]
    return BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=extra)


def _finish(model: nn.Module, taps: dict[str, str], weights_path: str | None, what: str,
            min_size: int, max_size: int, image_mean: tuple[float, ...], image_std: tuple[float, ...]) -> nn.Module:
    """Swap in the tapped transform, load `weights_path`, and declare taps and frozen parameters."""
    model.transform = TappedTransform(min_size, max_size, list(image_mean), list(image_std))
    if weights_path is not None:
        from padkd.models.convert import load_weights_file

        load_weights_file(model, weights_path, f"model.weights_path of {what}")
    model.padkd_taps = {"fpn": "backbone", "body": "backbone.body", "transform": "transform", "gt": "transform.gt",
                        # PAD's default embedding: the FPN maps (its linear head pools each level, its
                        # conv1x1 head reads them location by location).
                        "pooled": "backbone", **taps}
    #: Parameters the detector keeps frozen in every stage (torchvision's `trainable_layers`).
    model.padkd_frozen = tuple(f"backbone.body.{name}" for name, p in model.backbone.body.named_parameters()
                               if not p.requires_grad)
    return model


def _check(min_size: int, max_size: int, anchor_size: float) -> None:
    if min_size < 1 or max_size < min_size:
        raise PadkdError(f"model: need 1 <= min_size <= max_size, got min_size {min_size}, max_size {max_size}")
    if anchor_size <= 0:
        raise PadkdError(f"model.anchor_size must be > 0, got {anchor_size}")


@MODELS.register("fasterrcnn")
def fasterrcnn(num_classes: int, backbone: Backbone = "resnet50", fpn_channels: int = 256,
               trainable_layers: int | None = None, norm: Literal["auto", "frozen_bn", "bn"] = "auto",
               widths: tuple[int, ...] = (16, 32, 64, 128), min_size: int = 800, max_size: int = 1333,
               image_mean: tuple[float, float, float] = IMAGENET_MEAN,
               image_std: tuple[float, float, float] = IMAGENET_STD, anchor_size: float = 32.0,
               representation_size: int = 1024, proposals: int = 1000, box_batch_size_per_image: int = 512,
               detections_per_image: int = 100, weights_path: str | None = None,
               backbone_weights_path: str | None = None) -> nn.Module:
    """Faster R-CNN with FPN (torchvision's module tree); `num_classes` counts the background.

    Defaults are torchvision's `fasterrcnn_resnet50_fpn` (anchors 32..512 on P2..P6, 1000 proposals at
    test and 2000 in training, 512 sampled ROIs per image). As in torchvision, a pretrained backbone
    (`weights_path` or `backbone_weights_path`) has frozen BatchNorm and trains its last 3 stages
    (`trainable_layers`); one trained from scratch trains all with BatchNorm. `backbone: cnn` is a small
    CNN of `widths` for tiny images."""
    _check(min_size, max_size, anchor_size)
    trainable_layers, norm = _pretrained_defaults(trainable_layers, norm, weights_path, backbone_weights_path)
    body = build_backbone(backbone, fpn_channels=fpn_channels, returned=[1, 2, 3, 4],
                                  extra=LastLevelMaxPool(), trainable_layers=trainable_layers, norm=norm,
                                  widths=widths, weights_path=backbone_weights_path)
    levels = len(body.body.return_layers) + 1
    if backbone == "mobilenet_v3_large":  # torchvision's choice: every size on each of the three maps
        sizes = (tuple(anchor_size * 2**k for k in range(5)),) * levels
    else:  # one size per level, doubling with the stride (P2: anchor_size)
        sizes = tuple((anchor_size * 2**k,) for k in range(levels))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
    names = [str(k) for k in range(levels - 1)]
    pool = TappedRoIPool(featmap_names=names, output_size=7, sampling_ratio=2)
    model = FasterRCNN(body, rpn_anchor_generator=anchors, box_roi_pool=pool,
                       box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
                       box_predictor=TappedPredictor(representation_size, num_classes, pool),
                       rpn_pre_nms_top_n_train=2 * proposals, rpn_post_nms_top_n_train=2 * proposals,
                       rpn_pre_nms_top_n_test=proposals, rpn_post_nms_top_n_test=proposals,
                       box_batch_size_per_image=box_batch_size_per_image, box_detections_per_img=detections_per_image)
    taps = {"rois": "roi_heads.box_roi_pool.rois", "box_scores": "roi_heads.box_predictor.scores"}
    return _finish(model, taps, weights_path, f"fasterrcnn/{backbone}", min_size, max_size, image_mean,
                   image_std)


@MODELS.register("retinanet")
def retinanet(num_classes: int, backbone: Backbone = "resnet50", fpn_channels: int = 256,
              trainable_layers: int | None = None, norm: Literal["auto", "frozen_bn", "bn"] = "auto",
              widths: tuple[int, ...] = (16, 32, 64, 128), min_size: int = 800, max_size: int = 1333,
              image_mean: tuple[float, float, float] = IMAGENET_MEAN,
              image_std: tuple[float, float, float] = IMAGENET_STD, anchor_size: float = 32.0,
              detections_per_image: int = 300, weights_path: str | None = None,
              backbone_weights_path: str | None = None) -> nn.Module:
    """RetinaNet (torchvision's module tree: FPN on C3..C5 plus P6/P7 from P5, three octave anchors per level).

    Defaults are torchvision's `retinanet_resnet50_fpn`; `num_classes` counts the background as torchvision
    does (class 0 is never a target)."""
    _check(min_size, max_size, anchor_size)
    trainable_layers, norm = _pretrained_defaults(trainable_layers, norm, weights_path, backbone_weights_path)
    body = build_backbone(backbone, fpn_channels=fpn_channels, returned=[2, 3, 4],
                                  extra=LastLevelP6P7(fpn_channels, fpn_channels), trainable_layers=trainable_layers,
                                  norm=norm, widths=widths, weights_path=backbone_weights_path)
    levels = len(body.body.return_layers) + 2
    # Three octave scales per level, truncated to integers as torchvision does: (32, 40, 50) on P3.
    sizes = tuple(tuple(int(anchor_size * 2**k * 2 ** (j / 3)) for j in range(3)) for k in range(levels))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes)
    model = RetinaNet(body, num_classes, anchor_generator=anchors, head=head, detections_per_img=detections_per_image)
    return _finish(model, {"head": "head"}, weights_path, f"retinanet/{backbone}", min_size, max_size,
                   image_mean, image_std)


