"""OFD, the overhaul of feature distillation (Heo et al., ICCV 2019): margin ReLU on the teacher, partial L2.

See docs/methods-features.md for the conventions chosen where the authors' code and mdistiller differ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from padkd.batch import Batch
from padkd.context import BuildContext, Features
from padkd.discrepancy import Discrepancy
from padkd.methods.base import METHODS, Method
from padkd.methods.features import _check_maps, _common_size, _example_maps, _he_connector, _layers, _parts

#: Below this probability of a negative response, the authors' margin is `-3 std` instead of the tail mean.
MIN_NEGATIVE_MASS = 1e-3


def margin(mean: float, std: float) -> float:
    """The expected value of a response below 0, for a response ~ N(mean, std²): `E[x | x < 0] = mean − std ·
    φ(mean/std) / Φ(−mean/std)`, or `−3 std` where `Φ(−mean/std) <= 0.001` (the authors' rule)."""
    std = max(abs(std), 1e-12)
    negative = 0.5 * math.erfc(mean / std / math.sqrt(2))  # Φ(−mean/std)
    if negative <= MIN_NEGATIVE_MASS:
        return -3 * std
    return mean - std * math.exp(-0.5 * (mean / std) ** 2) / math.sqrt(2 * math.pi) / negative


def _batchnorm(model: nn.Module | None, path: str, channels: int) -> nn.modules.batchnorm._BatchNorm:
    """The teacher's affine BatchNorm at `path`, with `channels` features (ValueError naming the fix)."""
    try:
        bn = model.get_submodule(path) if model is not None else None
    except AttributeError:
        bn = None
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine or bn.num_features != channels:
        raise ValueError(f"ofd: teacher_bn '{path}' must name an affine BatchNorm of the teacher with {channels} "
                         "channels (the BN before the tapped pre-activation), or set teacher_bn: null for margins "
                         "from the build batch")
    return bn


@METHODS.register("ofd")
class OFD(Method):
    """OFD: the student's pre-ReLU maps, through a connector, match the teacher's after a margin ReLU.

    Taps: L pre-ReLU maps on each side (the teacher's before its ReLU: `preact1…`). Per layer l, a
    connector (1x1 conv + BN, He-initialised, as the authors') maps the student's map to the teacher's
    width, r = connector(s), and the teacher's response is floored at its channel's margin m_c < 0:
    `t' = max(t, m_c)`. Each neuron (channel, location) costs the partial L2 `(r − t')²` unless the teacher
    is not positive and the student already lies below it (`r <= t'` and `t <= 0`, where the student is
    free). Element l of sample i (one per layer, `[B, L]`, parts that add up) is `2^(l−L+1)` (last layer 1,
    the authors' layer weights) times the sum over neurons; the batch mean of their sum is the authors'
    loss before its 1/1000, which is the default weight.

    The margins are buffers set at build: `margin(β_c, |γ_c|)` from the affine parameters of the teacher's
    BatchNorm before each tapped pre-activation (`teacher_bn`: their module paths, one per layer, as the
    authors' `get_bn_before_relu`), or, with `teacher_bn: null`, from the per-channel mean and standard
    deviation of the tapped teacher maps on the build batch (a padkd fallback for models without such a BN).
    """

    reference = "Heo, Kim, Yun, Park, Kwak, Choi. A Comprehensive Overhaul of Feature Distillation. ICCV 2019"
    default_weight = 1e-3  # the authors' 1/1000 (mdistiller's FEAT_WEIGHT 0.001)

    def __init__(self, teacher_bn: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.teacher_bn = teacher_bn
        self.connectors = nn.ModuleList()

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Features, Features]:
        return (_example_maps(batch_size, generator, (4, 8), (6, 3)),
                _example_maps(batch_size, generator, (8, 16), (6, 3)))

    def build(self, ctx: BuildContext) -> None:
        s_maps, t_maps = _check_maps("ofd", ctx.student, ctx.teacher)
        if self.teacher_bn is not None and len(self.teacher_bn) != len(t_maps):
            raise ValueError(f"ofd: teacher_bn lists {len(self.teacher_bn)} BatchNorm path(s) for {len(t_maps)} tapped "
                             "layer(s); give one per layer")
        for k, t in enumerate(t_maps):
            self.register_buffer(f"margin{k}", self._margins(t, k, ctx.teacher_model).view(1, -1, 1, 1))
        self.connectors = nn.ModuleList(_he_connector(s.shape[1], t.shape[1], batchnorm=True)
                                        for s, t in zip(s_maps, t_maps, strict=True))

    def _margins(self, teacher: Tensor, k: int, model: nn.Module | None) -> Tensor:
        """The margins of layer k's channels `[C]`: from the teacher's BatchNorm (β mean, |γ| std), or from
        the tapped map's per-channel mean and std on the build batch."""
        if self.teacher_bn is None:
            x = teacher.detach().float().transpose(0, 1).flatten(1)
            means, stds = x.mean(dim=1).tolist(), x.std(dim=1).tolist()
        else:
            bn = _batchnorm(model, self.teacher_bn[k], teacher.shape[1])
            means, stds = bn.bias.detach().float().tolist(), bn.weight.detach().float().tolist()
        return torch.tensor([margin(m, s) for m, s in zip(means, stds, strict=True)], device=teacher.device)

    def margins(self) -> list[Tensor]:
        """The margin buffers, one `[1, C, 1, 1]` per layer."""
        return [getattr(self, f"margin{k}") for k in range(len(self.connectors))]

    def forward(self, student: Features, teacher: Features, batch: Batch) -> Discrepancy:  # type: ignore[override]
        s_maps, t_maps = _layers(student), _layers(teacher)
        n = len(s_maps)
        parts = []
        for k, (s, t, connector, m) in enumerate(zip(s_maps, t_maps, self.connectors, self.margins(), strict=True)):
            r, t = _common_size(connector(s).float(), t.float())
            target = torch.maximum(t, m)
            cost = (r - target).pow(2) * ((r > target) | (t > 0))
            parts.append(cost.flatten(1).sum(dim=1) * 2.0 ** (k - n + 1))
        return _parts(parts)
