"""ShuffleNetV1 (Zhang et al., CVPR 2018; g = 3, stages of 240/480/960 channels) and ShuffleNetV2 (Ma et
al., ECCV 2018; 1× by default) for CIFAR as the CRD benchmark has them (RepDistiller
`models/ShuffleNetv1.py`, `models/ShuffleNetv2.py`): a 1x1 stem at full resolution, three stages that each
halve the resolution, global average pooling and a `linear` classifier. Module names match the reference,
so its checkpoints load by key; each block's pre-ReLU output passes through an `nn.Identity` `preact`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.models.cifar.common import ChannelShuffle, zoo


class ShuffleV1Block(nn.Module):
    """Grouped 1x1-BN-ReLU, channel shuffle, depthwise 3x3(stride)-BN-ReLU, grouped 1x1-BN; added to the
    input, or concatenated with its 3x3/2 average pool when striding; then ReLU. The first 1x1 is not
    grouped when it reads the 24-channel stem, as in the reference."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, 2, 1)) if stride == 2 else nn.Sequential()
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(self.preact(out))


class ShuffleNetV1(nn.Module):
    """conv1x1(24)-BN-ReLU, stages of [4, 8, 4] blocks at 240/480/960 channels (g = 3), `linear`."""

    def __init__(self, in_channels: int, num_classes: int, out_planes: tuple[int, ...] = (240, 480, 960),
                 num_blocks: tuple[int, ...] = (4, 8, 4), groups: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=True)
        channels = 24
        for k, (planes, n) in enumerate(zip(out_planes, num_blocks, strict=True), start=1):
            blocks = []
            for i in range(n):  # the striding block concatenates its input: it makes planes - input channels
                blocks.append(ShuffleV1Block(channels, planes - channels if i == 0 else planes, 2 if i == 0 else 1,
                                             groups))
                channels = planes
            self.add_module(f"layer{k}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)
        self.padkd_taps = _stage_taps(num_blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x).flatten(1))


class ShuffleV2Block(nn.Module):
    """Split the channels in halves; the second goes through 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU;
    concatenate with the first half and shuffle. `preact` sees the concatenation before the ReLU and the
    shuffle (the reference's `preact`)."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = int(in_channels * split_ratio)
        half = in_channels - self.split
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.shuffle = ChannelShuffle(2)
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, :self.split], x[:, self.split:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        # x1 is the output of earlier ReLUs (>= 0), so relu(cat(x1, out)) = cat(x1, relu(out)): one concatenation
        # gives the pre-activation and the output
        return self.shuffle(F.relu(self.preact(torch.cat([x1, out], 1))))


class ShuffleV2Down(nn.Module):
    """Two branches at stride 2 — depthwise 3x3/2-BN, 1x1-BN-ReLU; and 1x1-BN-ReLU, depthwise 3x3/2-BN,
    1x1-BN-ReLU — each making half the output channels, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


#: ShuffleNetV2 sizes of the reference: stage channels + head channels, and blocks per stage.
V2_SIZES: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.2: ((40, 80, 160, 512), (3, 3, 3)),
    0.3: ((40, 80, 160, 512), (3, 7, 3)),
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((224, 488, 976, 2048), (3, 7, 3)),
}


class ShuffleNetV2(nn.Module):
    """conv1x1(24)-BN-ReLU, three stages (a down block + n basic blocks), conv1x1-BN-ReLU head, `linear`."""

    def __init__(self, in_channels: int, num_classes: int, net_size: float = 1.0) -> None:
        super().__init__()
        widths, num_blocks = V2_SIZES[net_size]
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=True)
        channels = 24
        for k, (width, n) in enumerate(zip(widths[:3], num_blocks, strict=True), start=1):
            self.add_module(f"layer{k}", nn.Sequential(ShuffleV2Down(channels, width),
                                                       *[ShuffleV2Block(width) for _ in range(n)]))
            channels = width
        self.conv2 = nn.Conv2d(channels, widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)
        # block 0 of each stage is the down block, so the last basic block is index n
        self.padkd_taps = _stage_taps(tuple(n + 1 for n in num_blocks))

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(self.avgpool(x).flatten(1))


def _stage_taps(lengths: tuple[int, ...]) -> dict[str, str]:
    taps = {"stem": "relu", "pooled": "linear:in", "logits": "linear"}
    for k, n in enumerate(lengths, start=1):
        taps |= {f"stage{k}": f"layer{k}", f"preact{k}": f"layer{k}.{n - 1}.preact"}
    return taps


def shufflenetv1(in_channels: int, num_classes: int) -> nn.Module:
    """CIFAR ShuffleNetV1, g=3, stages 240/480/960 (RepDistiller's ShuffleV1; 0.95 M params at 100 classes)."""
    return ShuffleNetV1(in_channels, num_classes)


def shufflenetv2(in_channels: int, num_classes: int, net_size: float = 1.0) -> nn.Module:
    """CIFAR ShuffleNetV2 of size `net_size` (RepDistiller's ShuffleV2 is 1.0: 1.36 M params at 100 classes)."""
    if net_size not in V2_SIZES:
        raise ValueError(f"net_size must be one of {sorted(V2_SIZES)}, got {net_size}")
    return ShuffleNetV2(in_channels, num_classes, float(net_size))


zoo("shufflenetv1", shufflenetv1)
zoo("shufflenetv2", shufflenetv2)
