"""PAD's variance heads: what predicts log σ² of a term's discrepancies (before PAD's floor and clamp).

- `LinearHead`: `Linear(D, out) + BatchNorm1d(out)` on a pooled student embedding; out = E (one variance
  per element, the reference form) or 1 (per sample).
- `MapsHead`: per feature map, `Conv2d(C, 1, 1) + BatchNorm2d(1)` on the student's map of the same size,
  one variance per location, for discrepancies over map locations (a `Discrepancy.layout`).
- `TokenHead`: `Linear(D, 1)` on the student's hidden state at each position of a sequence `[B, T, D]`,
  one variance per token (PAD over the tokens of a language model).
- `DimensionHead`: no input; one learned log σ² per element shared by every sample (the ablation that
  separates PAD's per-dimension reweighting from its per-sample one).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from padkd.errors import PadkdError
from padkd.ops import pool

Layout = list[tuple[str, int, int]]


def pooled(embedding: Any) -> Tensor:
    """A student embedding as `[B, D]`: a map is average-pooled; a dict or list of maps (FPN levels) is
    pooled map by map and concatenated."""
    if isinstance(embedding, dict):
        embedding = list(embedding.values())
    if isinstance(embedding, list | tuple):
        return torch.cat([pool(x) for x in embedding], dim=1)
    return pool(embedding)


class VarianceHead(nn.Module):
    """Interface of a variance head: `forward(embedding, layout, detach)` → raw log σ², and `start_at`."""

    #: False for a head that predicts without reading the student (DimensionHead).
    needs_embedding: bool = True

    def forward(self, embedding: Any, layout: Layout | None, detach: bool) -> Tensor:
        raise NotImplementedError

    def start_at(self, value: float) -> None:
        """Make the head's output start at `value` (PAD's data initialisation: σ² at the mean discrepancy)."""
        raise NotImplementedError


def _xavier(layer: nn.Linear | nn.Conv2d) -> None:
    nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)


class LinearHead(nn.Sequential, VarianceHead):
    """`Linear(in_dim, out_dim) + BatchNorm1d(out_dim)` on the pooled embedding: `[B, out_dim]`."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        linear = nn.Linear(in_dim, out_dim)
        _xavier(linear)
        super().__init__(linear, nn.BatchNorm1d(out_dim))

    def forward(self, embedding: Any, layout: Layout | None = None, detach: bool = False) -> Tensor:
        x = pooled(embedding)
        return super().forward((x.detach() if detach else x).float()).float()

    @torch.no_grad()
    def start_at(self, value: float) -> None:
        self[1].bias.fill_(value)


class MapsHead(nn.ModuleDict, VarianceHead):
    """Per map of a layout, `Conv2d(C, 1, 1) + BatchNorm2d(1)`: `[B, E]` over the layout's locations."""

    def __init__(self, maps: dict[str, Tensor]) -> None:
        heads = {}
        for name, x in maps.items():
            conv = nn.Conv2d(x.shape[1], 1, kernel_size=1)
            _xavier(conv)
            heads[name] = nn.Sequential(conv, nn.BatchNorm2d(1))
        super().__init__(heads)

    @staticmethod
    def maps(embedding: Any, layout: Layout | None) -> dict[str, Tensor]:
        """The student map under each entry of the discrepancy's layout, checked against its size."""
        fix = "set the term's embedding to the student maps the method reads (e.g. embedding: fpn)"
        if layout is None:
            raise PadkdError("PAD head 'conv1x1' predicts per-location variances, but this method's discrepancies "
                             "are not feature-map locations (no layout); use head: linear")
        maps = {}
        for name, h, w in layout:
            if isinstance(embedding, dict):
                if name not in embedding:
                    raise PadkdError(f"PAD head 'conv1x1': the embedding has no map '{name}' (it has "
                                     f"{list(embedding)}); {fix}")
                x = embedding[name]
            elif isinstance(embedding, Tensor) and len(layout) == 1:
                x = embedding
            else:
                raise PadkdError(f"PAD head 'conv1x1' needs feature maps by name as its embedding; {fix}")
            if x.dim() != 4 or tuple(x.shape[-2:]) != (h, w):
                raise PadkdError(f"PAD head 'conv1x1': embedding map '{name}' has shape {tuple(x.shape)} but the "
                                 f"discrepancy's locations are {h}x{w}; {fix}")
            maps[name] = x
        return maps

    def forward(self, embedding: Any, layout: Layout | None = None, detach: bool = False) -> Tensor:
        maps = self.maps(embedding, layout)
        return torch.cat([self[name]((x.detach() if detach else x).float()).flatten(1)
                          for name, x in maps.items()], dim=1).float()

    @torch.no_grad()
    def start_at(self, value: float) -> None:
        for seq in self.values():
            seq[1].bias.fill_(value)


class DimensionHead(VarianceHead):
    """One learned log σ² per element, `[1, E]`, shared by every sample; reads no embedding."""

    needs_embedding = False

    def __init__(self, elements: int) -> None:
        super().__init__()
        # reference init: log σ² = 0 (σ² = 1), the BN head's mean output at initialisation
        self.log_var = nn.Parameter(torch.zeros(elements))

    def forward(self, embedding: Any = None, layout: Layout | None = None, detach: bool = False) -> Tensor:
        return self.log_var.float()[None]

    @torch.no_grad()
    def start_at(self, value: float) -> None:
        self.log_var.fill_(value)


class TokenHead(VarianceHead):
    """`Linear(D, 1)` applied at every position of a sequence embedding `[B, T, D]`: `[B, T]`, one log σ² per
    token. The weight starts at 0, so every token starts at the same σ² (PAD's data initialisation)."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, embedding: Any, layout: Layout | None = None, detach: bool = False) -> Tensor:
        if not isinstance(embedding, Tensor) or embedding.dim() != 3:
            raise PadkdError("PAD head 'token' reads the student's hidden states [B, T, D] (e.g. embedding: "
                             f"final_norm), got {type(embedding).__name__} "
                             f"{tuple(embedding.shape) if isinstance(embedding, Tensor) else ''}")
        x = embedding.detach() if detach else embedding
        return self.linear(x.float()).squeeze(-1)

    @torch.no_grad()
    def start_at(self, value: float) -> None:
        self.linear.bias.fill_(value)
