"""A teacher on a device and in a precision of its own (`teacher.device`, `teacher.precision`).

A large teacher can sit on a second GPU in bf16 while the student trains on the first: `place` moves the
teacher there and hooks its root module so that every call (the Distiller's, an evaluator's, a task's)
sends the inputs to the teacher's device and dtype and gets fp32 outputs back on the caller's device. Tapped
activations of inner modules stay where the teacher computed them; `home` brings them back.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from padkd.batch import tree_map

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _to(value: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Tensors of a pytree (and of HF-style output mappings, in place) on `device`, floats cast to `dtype`."""

    def move(t: Tensor) -> Tensor:
        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
        return t.to(device=device, dtype=cast)

    if isinstance(value, MutableMapping) and type(value) is not dict:  # e.g. transformers' ModelOutput
        for key in list(value.keys()):
            value[key] = _to(value[key], device, dtype)
        return value
    return tree_map(move, value)


def place(teacher: nn.Module, device: torch.device | str, precision: Literal["fp32", "bf16"],
          home: torch.device | str) -> nn.Module:
    """Move `teacher` to `device` in `precision` and hook it so callers on `home` pass and get `home` tensors
    (fp32). Marks it `padkd_placed`, so the Distiller leaves it where it is."""
    device, home = torch.device(device), torch.device(home)
    dtype = DTYPES[precision]
    teacher.to(device=device, dtype=dtype)

    def inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        return _to(args, device, dtype), _to(kwargs, device, dtype)

    def outputs(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        return _to(output, home, torch.float32)

    teacher.register_forward_pre_hook(inputs, with_kwargs=True)
    teacher.register_forward_hook(outputs, with_kwargs=True)
    teacher.padkd_placed = True  # type: ignore[assignment]
    teacher.padkd_home = home  # type: ignore[assignment]
    return teacher


def is_placed(module: nn.Module | None) -> bool:
    """Whether `module` is a teacher `place` put on a device and precision of its own."""
    return bool(getattr(module, "padkd_placed", False))


def home(values: Any, module: nn.Module) -> Any:
    """Tapped values of a placed teacher on the caller's device in fp32 (others unchanged)."""
    if not is_placed(module):
        return values
    return _to(values, module.padkd_home, torch.float32)  # type: ignore[arg-type]
