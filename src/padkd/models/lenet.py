"""A plain LeNet-style network (no BatchNorm): the student and teacher shape of the MNIST probe
(docs/pad.md §3b: the project's early single-stage PAD experiment), so the evidence study can rerun it inside padkd."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from padkd.errors import PadkdError
from padkd.models import MODELS


class LeNet(nn.Module):
    """conv3x3-ReLU-maxpool blocks, the flattened map, a hidden `Linear`-ReLU (the embedding, tap
    `"fc:in"`), and a linear classifier `fc`."""

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int], hidden: int,
                 input_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev, size = in_channels, input_size
        for width in channels:
            layers += [nn.Conv2d(prev, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            prev, size = width, size // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(prev * size * size, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.hidden(self.features(x)))


@MODELS.register("lenet")
def lenet(in_channels: int, num_classes: int, channels: tuple[int, ...] = (32, 64), hidden: int = 128,
          input_size: int = 28) -> nn.Module:
    """LeNet-style CNN without BatchNorm for `input_size` x `input_size` images: `channels` per conv
    block (each halves the size), a `hidden`-wide embedding, then the classifier."""
    if not channels or min(channels) < 1 or hidden < 1:
        raise PadkdError(f"model: channels must be positive ints and hidden >= 1, got {list(channels)} and {hidden}")
    if input_size >> len(channels) < 1:
        raise PadkdError(f"model.input_size {input_size} is too small for {len(channels)} pooling blocks")
    return LeNet(in_channels, num_classes, channels, hidden, input_size)
