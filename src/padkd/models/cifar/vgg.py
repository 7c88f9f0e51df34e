"""VGG with batch norm for CIFAR as the CRD benchmark has it: vgg8/11/13/16/19 (Simonyan & Zisserman,
ICLR 2015, without the fully connected layers), as in RepDistiller `models/vgg.py`.

Five conv blocks (`block0` … `block4`) end in a BN whose ReLU is applied outside the block; max-pools
follow blocks 0–2 (and block 3 for 64-pixel inputs only, as in the reference), then global average
pooling and one linear `classifier`. Module names match the reference, so its checkpoints load by key.
The ReLUs after the blocks are parameter-free modules `relu0` … `relu4` here: their outputs are the
`stem`/`stageN` taps, the block outputs before them the `preactN` taps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from padkd.models.cifar.common import init_conv_bn, zoo

#: Channels of the convs in each of the five blocks.
CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _block(widths: Sequence[int], in_channels: int) -> nn.Sequential:
    """[conv3x3(bias)-BN-ReLU] per width, without the last ReLU."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN for 32×32 inputs (see the module docstring)."""

    def __init__(self, config: Sequence[Sequence[int]], in_channels: int, num_classes: int) -> None:
        super().__init__()
        previous = in_channels
        for k, widths in enumerate(config):
            self.add_module(f"block{k}", _block(widths, previous))
            previous = widths[-1]
        for k in range(4):
            self.add_module(f"pool{k}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        for k in range(5):  # not in place: the block outputs before them are the preactN taps
            self.add_module(f"relu{k}", nn.ReLU())
        self.classifier = nn.Linear(previous, num_classes)
        init_conv_bn(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)
        self.padkd_taps: dict[str, str] = {"stem": "relu0", "pooled": "classifier:in", "logits": "classifier"}
        for k in range(1, 5):
            self.padkd_taps |= {f"stage{k}": f"relu{k}", f"preact{k}": f"block{k}"}

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if size == 64:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.pool4(x).flatten(1))


def _vgg(depth: int, params: str) -> Callable[..., nn.Module]:
    def factory(in_channels: int, num_classes: int) -> nn.Module:
        return VGG(CONFIGS[depth], in_channels, num_classes)

    factory.__doc__ = f"CIFAR VGG-{depth} with batch norm ({params} M params at 100 classes; CRD zoo)"
    return factory


for _depth, _params in ((8, "3.97"), (11, "9.28"), (13, "9.46"), (16, "14.77"), (19, "20.09")):
    zoo(f"vgg{_depth}", _vgg(_depth, _params))
