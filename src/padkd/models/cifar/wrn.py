"""Wide ResNets of the CRD benchmark: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (Zagoruyko & Komodakis,
BMVC 2016: pre-activation blocks, widths 16k/32k/64k), as in RepDistiller `models/wrn.py`.

Module names match it (`block2.layer.0.convShortcut`, `bn1`, `fc`), so its checkpoints load by key. The
stage outputs of a pre-activation net carry no ReLU; the `preactN` taps are the BN that follows stage N
(the next stage's first `bn1`, or the final `bn1`), as RepDistiller's `preact` features and AB use them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn import functional as F

from padkd.models.cifar.common import init_conv_bn, zoo


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, added to the input; when the width changes the
    shortcut is a 1x1 conv of the *activated* input (`convShortcut`)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()  # not in place: bn1's output is a tap point (preactN)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut = None if in_planes == out_planes else nn.Conv2d(in_planes, out_planes, 1, stride,
                                                                            bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return (x if self.convShortcut is None else self.convShortcut(act)) + out


class WideStage(nn.Module):
    """n wide blocks in `layer` (the reference's `NetworkBlock`); the first one strides and widens."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else out_planes, out_planes,
                                               stride if i == 0 else 1, drop_rate) for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """conv3x3(16), three stages of (depth-4)/6 wide blocks (widths 16k, 32k, 64k; strides 1, 2, 2),
    BN-ReLU, global average pooling, `fc`."""

    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"a wide ResNet has depth 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = WideStage(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = WideStage(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()  # not in place: bn1's output is the preact3 tap
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)
        self.padkd_taps: dict[str, str] = {
            "stem": "conv1", "stage1": "block1", "stage2": "block2", "stage3": "block3",
            "preact1": "block2.layer.0.bn1", "preact2": "block3.layer.0.bn1", "preact3": "bn1",
            "pooled": "fc:in", "logits": "fc",
        }

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.avgpool(self.relu(self.bn1(x))).flatten(1))


def _wrn(depth: int, widen: int, params: str) -> Callable[..., nn.Module]:
    def factory(in_channels: int, num_classes: int, drop_rate: float = 0.0) -> nn.Module:
        if not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        return WideResNet(depth, widen, in_channels, num_classes, drop_rate)

    factory.__doc__ = (f"CIFAR wide ResNet-{depth}-{widen} ({params} M params at 100 classes; CRD zoo); "
                       "`drop_rate`: dropout inside each block")
    return factory


for _depth, _widen, _params in ((16, 1, "0.18"), (16, 2, "0.70"), (40, 1, "0.57"), (40, 2, "2.26")):
    zoo(f"wrn_{_depth}_{_widen}", _wrn(_depth, _widen, _params))
