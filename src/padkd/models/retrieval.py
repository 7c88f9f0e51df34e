"""Embedding networks for metric learning: a backbone, a linear embedding layer, L2-normalised output.

As in RKD's `LinearEmbedding` (Park et al., CVPR 2019): the backbone's pooled feature goes through one
`nn.Linear` to `embedding_dim` (teacher 512, students 128 and 64 in the recipes), then onto the unit
sphere. Tap aliases: `pooled` (backbone feature, where PAD's variance head reads by default),
`embedding` (before normalisation), `stage1`.. (ResNet layers / CNN blocks); `output` is the
normalised embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.errors import PadkdError, did_you_mean
from padkd.models import MODELS, SmallCNN


class EmbeddingNet(nn.Module):
    """`normalize(embedding(backbone(x)))`; the backbone returns a pooled feature of width `feature_dim`."""

    def __init__(self, backbone: nn.Module, feature_dim: int, embedding_dim: int,
                 stages: dict[str, str] | None = None) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise PadkdError(f"model.embedding_dim must be >= 1, got {embedding_dim}")
        self.backbone = backbone
        self.embedding = nn.Linear(feature_dim, embedding_dim)
        self.padkd_taps = {"pooled": "backbone", "embedding": "embedding", **(stages or {})}

    def forward(self, x: Tensor) -> Tensor:
        feature = self.backbone(x)
        if isinstance(feature, tuple):  # GoogLeNet/Inception in train mode: (main output, aux outputs)
            feature = feature[0]
        return F.normalize(self.embedding(feature.flatten(1)), dim=1)


def _replace_last_linear(model: nn.Module) -> int:
    """Swap the model's last `nn.Linear` (its classifier) for an identity; returns its input width."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise PadkdError("model: the backbone has no nn.Linear classifier to replace with the embedding layer")
    parent_name, _, attr = names[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    width = int(getattr(parent, attr).in_features)
    setattr(parent, attr, nn.Identity())
    return width


def _load_weights(model: nn.Module, path: str, arch: str) -> None:
    """Load a local torchvision state dict (e.g. the ImageNet weights file) into the classifier model."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise PadkdError(f"model.weights_path: '{file}' not found; point it at a local {arch} state-dict file "
                         "(e.g. torchvision's ImageNet weights), or remove it to start from random weights")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unpickling failure: not a state dict)
        raise PadkdError(f"model.weights_path: '{file}' is not a readable state dict ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise PadkdError(f"model.weights_path: '{file}' does not hold a state dict")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        keys = result.missing_keys or result.unexpected_keys
        kind = "missing" if result.missing_keys else "unexpected"
        raise PadkdError(f"model.weights_path: '{file}' does not fit torchvision's {arch} ({kind} key {keys[0]!r}); "
                         "use weights of the same architecture")


@MODELS.register("torchvision_embedding")
def torchvision_embedding(in_channels: int, arch: str = "resnet50", embedding_dim: int = 512,
                          weights_path: str | None = None) -> nn.Module:
    """A torchvision classifier by name (`arch: resnet18`) as backbone, its last Linear replaced by the
    embedding layer; `weights_path`: a local state dict of that classifier (ImageNet weights; never downloaded)."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise PadkdError(f"model.arch: unknown torchvision model '{arch}'{did_you_mean(arch, available)}")
    if in_channels != 3:
        raise PadkdError(f"model.arch {arch}: torchvision models take 3-channel images, the data has {in_channels}")
    backbone = torchvision.models.get_model(arch, weights=None)
    if weights_path is not None:
        _load_weights(backbone, weights_path, arch)
    width = _replace_last_linear(backbone)
    stages = {f"stage{i}": f"backbone.layer{i}" for i in range(1, 5) if hasattr(backbone, f"layer{i}")}
    return EmbeddingNet(backbone, width, embedding_dim, stages)


@MODELS.register("cnn_embedding")
def cnn_embedding(in_channels: int, widths: tuple[int, ...] = (32, 64, 128), embedding_dim: int = 64) -> nn.Module:
    """The small `cnn` (conv blocks + global average pooling) as backbone, for digits and MNIST."""
    if not widths or min(widths) < 1:
        raise PadkdError(f"model.widths must be a non-empty list of positive ints, got {list(widths)}")
    backbone = SmallCNN(in_channels, 1, widths)
    width = _replace_last_linear(backbone)
    stages = {f"stage{i + 1}": f"backbone.features.{i}" for i in range(len(widths))}
    return EmbeddingNet(backbone, width, embedding_dim, stages)
