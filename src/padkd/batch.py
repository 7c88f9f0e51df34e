"""`Batch`: one mini-batch as a pytree of inputs and targets, plus the samples' dataset indices.

Inputs and targets may be tensors, lists or dicts of them (detection: a list of images and a list of
target dicts), so every task and method reads the same type. `index` is each sample's position in its
split (records, memory banks); `extras` holds whatever a task or data set adds (image sizes, masks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


def tree_map(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """Apply `fn` to every tensor leaf of nested lists, tuples and dicts; other leaves pass through."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return type(tree)((k, tree_map(fn, v)) for k, v in tree.items())
    if isinstance(tree, list | tuple) and not hasattr(tree, "_fields"):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def tree_leaves(tree: Any) -> list[Tensor]:
    """The tensor leaves of a pytree, in a fixed order."""
    out: list[Tensor] = []
    tree_map(out.append, tree)
    return out


@dataclass
class Batch:
    """One mini-batch: model `inputs`, task `targets` (each a tensor or a pytree of tensors), the
    samples' dataset `index` (`[B]`, long) and `extras` (task- or data-specific fields)."""

    inputs: Any
    targets: Any
    index: Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.index)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor moved to `device`."""

        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Batch(tree_map(move, self.inputs), tree_map(move, self.targets), move(self.index),
                     tree_map(move, self.extras))

    def pin_memory(self) -> Batch:
        """Page-locked copies (DataLoader's `pin_memory=True` calls this on custom batch types)."""
        return Batch(tree_map(Tensor.pin_memory, self.inputs), tree_map(Tensor.pin_memory, self.targets),
                     self.index.pin_memory(), tree_map(Tensor.pin_memory, self.extras))

    def replace(self, **changes: Any) -> Batch:
        """A copy with some fields replaced (e.g. augmented `inputs`)."""
        return replace(self, **changes)


def stack_collate(items: list[tuple[Any, Any, int]]) -> Batch:
    """Collate `(input, target, index)` items whose inputs and targets stack (classification, retrieval)."""
    from torch.utils.data import default_collate

    inputs, targets, index = default_collate(items)
    return Batch(inputs, targets, torch.as_tensor(index, dtype=torch.long))


def list_collate(items: list[tuple[Any, Any, int]]) -> Batch:
    """Collate items of different sizes (detection images, target dicts) into lists."""
    inputs = [item[0] for item in items]
    targets = [item[1] for item in items]
    return Batch(inputs, targets, torch.tensor([int(item[2]) for item in items], dtype=torch.long))
