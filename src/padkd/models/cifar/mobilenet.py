"""MobileNetV2 for CIFAR as the CRD benchmark has it (Sandler et al., CVPR 2018; the variant of
RepDistiller `models/mobilenetv2.py`, from Jin et al.'s route-constrained optimization code).

Differences from the ImageNet network, kept for checkpoint compatibility: the stem conv has stride 2
and 32·w channels, the first inverted residual also has its 1x1 expansion, the head is 1280 channels for
any w ≤ 1, and the classifier is `classifier.0`. The CRD tables' "MobileNetV2" is the half-width one
(`mobilenetv2_half`, w = 0.5). Stage outputs are linear bottlenecks (no ReLU), so `preactN` = `stageN`.
"""

from __future__ import annotations

from torch import Tensor, nn

from padkd.models.cifar.common import init_conv_bn, zoo

#: (expansion t — None means the model's T, channels c, repeats n, first stride s) per block group.
SETTINGS: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1), (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise(stride)-BN-ReLU, 1x1 project-BN (`conv.0` … `conv.7`);
    the input is added when stride is 1 and the width is unchanged."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """Stem conv3x3/2-BN-ReLU, seven groups of inverted residuals (`blocks.0` … `blocks.6`), 1x1 conv to
    1280 channels, global average pooling, `classifier.0`."""

    def __init__(self, in_channels: int, num_classes: int, width_mult: float = 1.0, expand_ratio: int = 6) -> None:
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in SETTINGS:
            out = int(c * width_mult)
            group = []
            for i in range(n):
                group.append(InvertedResidual(channels, out, s if i == 0 else 1, expand_ratio if t is None else t))
                channels = out
            self.blocks.append(nn.Sequential(*group))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        init_conv_bn(self)
        nn.init.normal_(self.classifier[0].weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier[0].bias)
        stages = {1: "blocks.1", 2: "blocks.2", 3: "blocks.4", 4: "blocks.6"}
        self.padkd_taps: dict[str, str] = {"stem": "conv1", "pooled": "classifier:in", "logits": "classifier"}
        for k, path in stages.items():
            self.padkd_taps |= {f"stage{k}": path, f"preact{k}": path}

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        return self.classifier(self.avgpool(self.conv2(x)).flatten(1))


def mobilenetv2(in_channels: int, num_classes: int, width_mult: float = 1.0, expand_ratio: int = 6) -> nn.Module:
    """CIFAR MobileNetV2 of the CRD code, width `width_mult` and expansion `expand_ratio` (2.35 M params at
    w=1, 100 classes)."""
    if width_mult <= 0 or expand_ratio < 1:
        raise ValueError(f"width_mult must be > 0 and expand_ratio >= 1, got {width_mult} and {expand_ratio}")
    return MobileNetV2(in_channels, num_classes, width_mult, expand_ratio)


def mobilenetv2_half(in_channels: int, num_classes: int) -> nn.Module:
    """The CRD tables' "MobileNetV2": RepDistiller's mobile_half, w=0.5, t=6 (0.81 M params at 100 classes)."""
    return MobileNetV2(in_channels, num_classes, 0.5, 6)


zoo("mobilenetv2", mobilenetv2)
zoo("mobilenetv2_half", mobilenetv2_half)
