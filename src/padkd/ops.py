"""Small tensor helpers shared by methods and weightings."""

from __future__ import annotations

from torch import Tensor


def pool(x: Tensor) -> Tensor:
    """Global average pool a feature map `[B, C, ...]` to `[B, C]`; `[B, D]` passes through."""
    return x.flatten(2).mean(-1) if x.dim() > 2 else x
