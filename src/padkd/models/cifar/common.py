"""What the CIFAR zoo's modules share: registration into MODELS (and the ZOO list), channel shuffle, inits.

Zoo models follow the CRD benchmark's reference code (RepDistiller `models/`, mdistiller
`mdistiller/models/cifar/`) layer for layer and name their modules as it does, so the published
teacher checkpoints load by key. Each declares `padkd_taps` (alias → module path, read by
`padkd.taps`): `stem`, `stage1`… (stage outputs), `preact1`… (the same points before their final
ReLU, for AB), `pooled` (the classifier's input) and `logits`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from padkd.models import MODELS

#: Registered names of the CIFAR zoo, in registration order.
ZOO: list[str] = []


def zoo(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register `factory` as model `name` and list it in ZOO."""
    MODELS.register(name)(factory)
    ZOO.append(name)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """[N, g·c, H, W] → [N, c·g, H, W]: interleave the channels of the `groups` groups (ShuffleNet)."""
    n, channels, h, w = x.shape
    return x.reshape(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)


class ChannelShuffle(nn.Module):
    """`channel_shuffle` as a module (no parameters), where the references have one."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(x, self.groups)


def init_conv_bn(model: nn.Module) -> None:
    """Conv weights ~ N(0, 2 / (k·k·C_out)) (He, fan-out) with zero bias, BN scale 1 and shift 0: the
    init every reference zoo model but ShuffleNet uses (Linear layers are left to the caller)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
