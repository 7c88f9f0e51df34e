"""CIFAR ResNets of the CRD benchmark: resnet8 … resnet110, resnet8x4, resnet32x4 (He et al., CVPR 2016,
section 4.2: a 3×3 stem and three stages of 6n+2 layers) and the CIFAR ResNet-50 (bottlenecks [3, 4, 6, 3]
behind a 3×3 stride-1 stem, no max-pool), as in RepDistiller `models/resnet.py`, `models/resnetv2.py`.

Module names match those files (`layer2.0.downsample.0`, `layer3.2.shortcut.1`, `fc`/`linear`), so
RepDistiller/mdistiller checkpoints and torchdistill's CIFAR ResNets load by key. Each block's pre-ReLU
sum passes through an `nn.Identity` named `preact` (the references compute it inside the block, where no
hook reaches it), which the `preactN` taps read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from padkd.models.cifar.common import init_conv_bn, zoo


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the input (through `downsample` when the shape changes), then ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(self.preact(out))


class CifarResNet(nn.Module):
    """Stem conv3x3-BN-ReLU, three stages of (depth-2)/6 basic blocks (stride 1, 2, 2), global average
    pooling, `fc`. `widths` = (stem, stage1, stage2, stage3) channels: (16, 16, 32, 64), or ×4 for the
    resnet8x4/32x4 of the CRD benchmark."""

    def __init__(self, depth: int, widths: Sequence[int], in_channels: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        channels = widths[0]
        for k, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True), start=1):
            layers: list[nn.Module] = []
            for b in range(blocks):
                downsample = None
                if b == 0 and (stride != 1 or channels != width):
                    downsample = nn.Sequential(nn.Conv2d(channels, width, 1, stride, bias=False),
                                               nn.BatchNorm2d(width))
                layers.append(BasicBlock(channels, width, stride if b == 0 else 1, downsample))
                channels = width
            self.add_module(f"layer{k}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_conv_bn(self)
        last = blocks - 1
        self.padkd_taps: dict[str, str] = {
            "stem": "relu", "stage1": "layer1", "stage2": "layer2", "stage3": "layer3",
            "preact1": f"layer1.{last}.preact", "preact2": f"layer2.{last}.preact", "preact3": f"layer3.{last}.preact",
            "pooled": "fc:in", "logits": "fc",
        }

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(×4)-BN, plus the `shortcut`, then ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or inplanes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        out += self.shortcut(x)
        return F.relu(self.preact(out))


class CifarResNet50(nn.Module):
    """RepDistiller's `ResNet50`: conv3x3(64)-BN-ReLU, bottleneck stages of [3, 4, 6, 3] blocks at widths
    64/128/256/512 (×4 out, strides 1, 2, 2, 2), global average pooling, `linear`."""

    def __init__(self, in_channels: int, num_classes: int, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        channels = 64
        for k, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, 2), strict=True),
                                                start=1):
            layers = []
            for b in range(n):
                layers.append(Bottleneck(channels, planes, stride if b == 0 else 1))
                channels = planes * Bottleneck.expansion
            self.add_module(f"layer{k}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)
        init_conv_bn(self)
        if zero_init_residual:  # each block starts as the identity (Goyal et al., 2017)
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
        self.padkd_taps: dict[str, str] = {
            "stem": "relu", "stage1": "layer1", "stage2": "layer2", "stage3": "layer3", "stage4": "layer4",
            "preact1": "layer1.2.preact", "preact2": "layer2.3.preact", "preact3": "layer3.5.preact",
            "preact4": "layer4.2.preact", "pooled": "linear:in", "logits": "linear",
        }

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.avgpool(x).flatten(1))


def _resnet(depth: int, widths: tuple[int, ...], doc: str) -> Callable[..., nn.Module]:
    def factory(in_channels: int, num_classes: int) -> nn.Module:
        return CifarResNet(depth, widths, in_channels, num_classes)

    factory.__doc__ = doc
    return factory


for _name, _depth, _widths, _params in (
    ("resnet8", 8, (16, 16, 32, 64), "0.08"), ("resnet14", 14, (16, 16, 32, 64), "0.18"),
    ("resnet20", 20, (16, 16, 32, 64), "0.28"), ("resnet32", 32, (16, 16, 32, 64), "0.47"),
    ("resnet44", 44, (16, 16, 32, 64), "0.67"), ("resnet56", 56, (16, 16, 32, 64), "0.86"),
    ("resnet110", 110, (16, 16, 32, 64), "1.74"),
    ("resnet8x4", 8, (32, 64, 128, 256), "1.23"), ("resnet32x4", 32, (32, 64, 128, 256), "7.43"),
):
    zoo(_name, _resnet(_depth, _widths, f"CIFAR ResNet-{_depth}, widths {'/'.join(map(str, _widths))} "
                                        f"({_params} M params at 100 classes; CRD zoo)"))


def resnet50(in_channels: int, num_classes: int, zero_init_residual: bool = False) -> nn.Module:
    """CIFAR ResNet-50 (RepDistiller's ResNet50: 3x3 stem, no max-pool; 23.71 M params at 100 classes)."""
    return CifarResNet50(in_channels, num_classes, zero_init_residual)


zoo("resnet50", resnet50)
