"""Forward hooks by module path, so unmodified torchvision/timm/user models expose features.

A tap path is `"output"` (the model's return value), `"layer3.1"` (that module's output) or
`"fc:in"` (that module's first input, e.g. the pooled embedding before a classifier).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from padkd.errors import PadkdError, did_you_mean

OUTPUT = "output"


def last_linear_input(model: nn.Module) -> str:
    """Tap path of the input of the model's last `nn.Linear` (its pooled embedding by convention)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise PadkdError("the student has no nn.Linear to take an embedding from: set distill.embedding")
    return f"{names[-1]}:in"


class Taps:
    """Records the tensors at `paths` on every forward of `model` until `close()`."""

    def __init__(self, model: nn.Module, paths: set[str], role: str) -> None:
        self.values: dict[str, Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for path in sorted(paths - {OUTPUT}):
            name, _, which = path.partition(":")
            if which not in ("", "in"):
                raise PadkdError(f"{role} tap '{path}': suffix must be ':in' or nothing")
            if name not in modules:
                raise PadkdError(f"{role} tap '{path}': no module '{name}'{did_you_mean(name, modules)}")
            self._handles.append(modules[name].register_forward_hook(self._hook(path, which == "in")))

    def _hook(self, path: str, want_input: bool):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            self.values[path] = inputs[0] if want_input else output

        return hook

    def take(self, output: Tensor) -> dict[str, Tensor]:
        """This forward's tapped tensors (plus "output"), clearing them for the next one."""
        values, self.values = self.values, {}
        values[OUTPUT] = output
        return values

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
