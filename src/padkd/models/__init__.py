"""Model registry: small CNN/MLP families for digits and MNIST, and any torchvision classifier.

Every factory takes `in_channels` and `num_classes` (filled in from the dataset) plus its options.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from padkd.errors import PadkdError, did_you_mean
from padkd.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU blocks (max-pooled between blocks), then global average pooling (`pool_size`
    None) or the flattened map of `pool_size x pool_size` locations, and a linear classifier.

    The embedding is the input of `fc` (tap `"fc:in"`); block k's output is `features.k`.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int], pool_size: int | None = None) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(widths):
            block: list[nn.Module] = [nn.Conv2d(prev, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU()]  # not in place: `features.k.1` stays the pre-activation
            if i < len(widths) - 1:
                block.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*block))
            prev = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(pool_size or 1)
        self.fc = nn.Linear(prev * (pool_size or 1) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@MODELS.register("cnn")
def cnn(in_channels: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128),
        pool_size: int | None = None) -> nn.Module:
    """Small CNN for 8x8/28x28 inputs; `widths` sets the channels of each conv block; `pool_size` k
    keeps a k x k map (flattened, C·k² features) instead of global average pooling."""
    if not widths or min(widths) < 1:
        raise PadkdError(f"model.widths must be a non-empty list of positive ints, got {list(widths)}")
    if pool_size is not None and pool_size < 1:
        raise PadkdError(f"model.pool_size must be a positive int or null, got {pool_size}")
    return SmallCNN(in_channels, num_classes, widths, pool_size)


class MLP(nn.Module):
    """Flatten → [Linear-ReLU]* → embedding → `fc` classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.ReLU(inplace=True)]
            prev = width
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


@MODELS.register("mlp")
def mlp(in_channels: int, num_classes: int, input_size: int = 8, hidden: tuple[int, ...] = (64,)) -> nn.Module:
    """Multi-layer perceptron on flattened `in_channels x input_size x input_size` images."""
    return MLP(in_channels * input_size * input_size, num_classes, hidden)


@MODELS.register("torchvision")
def torchvision_model(in_channels: int, num_classes: int, arch: str, weights: str | None = None,
                      weights_path: str | None = None) -> nn.Module:
    """Any torchvision classification model by name (`arch: resnet18`); `weights` names a torchvision
    weights enum value (e.g. `IMAGENET1K_V1`, downloaded by torchvision) and needs num_classes 1000;
    `weights_path` is a local torchvision-style state dict (never downloaded)."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise PadkdError(f"model.arch: unknown torchvision model '{arch}'{did_you_mean(arch, available)}")
    if in_channels != 3:
        raise PadkdError(f"model.arch {arch}: torchvision models take 3-channel images, the data has {in_channels}")
    if weights is not None and weights_path is not None:
        raise PadkdError("model: give weights (a torchvision enum, downloaded) or weights_path (a local file), "
                         "not both")
    if weights is not None:
        return torchvision.models.get_model(arch, weights=weights)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if weights_path is not None:
        from padkd.models.convert import load_weights_file

        load_weights_file(model, weights_path, f"model.weights_path of torchvision {arch}")
    return model


from padkd.models import cifar, detection, external, language, lenet, retrieval  # noqa: E402,F401  (zoo, detectors, timm, LMs, embeddings)
