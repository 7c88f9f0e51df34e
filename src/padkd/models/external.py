"""timm models by name, when timm is installed (an optional dependency: `pip install padkd[timm]`)."""

from __future__ import annotations

from torch import nn

from padkd.errors import PadkdError, did_you_mean
from padkd.models import MODELS


@MODELS.register("timm")
def timm_model(in_channels: int, num_classes: int, arch: str, weights_path: str | None = None) -> nn.Module:
    """Any timm model by name (`arch: resnet18`); `weights_path`: a local state dict, never downloaded.

    Built with timm's `in_chans`/`num_classes` from the data, `pretrained=False`."""
    try:
        import timm
    except ImportError:
        raise PadkdError("model: timm is not installed (the timm family needs it); `pip install timm` "
                         "or use the torchvision family") from None
    if not timm.is_model(arch):
        raise PadkdError(f"model.arch: unknown timm model '{arch}'{did_you_mean(arch, timm.list_models())}")
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    if weights_path is not None:
        from padkd.models.convert import load_weights_file

        load_weights_file(model, weights_path, f"model.weights_path of timm {arch}")
    return model
