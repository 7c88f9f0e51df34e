"""Forward hooks by module path, installed once and switched on by a capture context.

A tap path names what to read from a forward:
- `"output"`: the value the task's forward returned (logits, embeddings, a loss dict);
- `"layer3.1"`: that module's output; `"fc:in"`: its first input (e.g. the pooled embedding);
  `"bn1:copy"`: a copy of its output, for a value that a later in-place op (an in-place ReLU)
  overwrites — a plain tap to such a value is an error that says so;
- an alias the model declares in its `padkd_taps` mapping (`"stage3"`, `"pooled"`, `"preact2"`), so
  one recipe runs across architectures; module paths keep working;
- `"relu#1"`: the second call of a module that runs several times in one forward, `"relu#*"` the list
  of all its calls. A plain path to a module that ran more than once is an error that says so.

Hooks stay installed for a stage (adding or removing hooks per step would make `torch.compile`
recompile); outside `capture()` they return at once. Values may be tensors, lists or dicts (FPN levels).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from padkd.batch import tree_leaves, tree_map
from padkd.errors import PadkdError, did_you_mean

OUTPUT = "output"


def _versions(tree: Any) -> tuple[int, ...] | None:
    """In-place modification counters of a pytree's tensors (None while compiling: not traceable)."""
    if torch.compiler.is_compiling():
        return None
    return tuple(t._version for t in tree_leaves(tree))


def aliases(model: nn.Module) -> dict[str, str]:
    """The model's named tap points (`padkd_taps`: alias → module path), empty for plain models."""
    return dict(getattr(model, "padkd_taps", {}) or {})


def default_embedding(model: nn.Module) -> str:
    """Where PAD reads the student embedding by default: the model's `pooled` alias, else the input
    of its last `nn.Linear` (its pooled embedding by convention)."""
    if "pooled" in aliases(model):
        return "pooled"
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise PadkdError("the student has no nn.Linear and no 'pooled' tap to take an embedding from: "
                         "set distill.embedding to a tap path")
    return f"{names[-1]}:in"


class _Call(NamedTuple):
    """One recorded call of a tapped module: its first input, its output, the kept output (a copy for a
    `:copy` tap, else the output itself) and the in-place version counters of input and output then."""

    input: Any
    output: Any
    kept: Any
    versions: tuple[tuple[int, ...] | None, tuple[int, ...] | None]

    def value(self, tap: TapPath) -> Any:
        """What `tap` reads from this call."""
        return self.input if tap.want_input else (self.kept if tap.copy else self.output)

    def overwritten(self, tap: TapPath) -> bool:
        """Whether the value `tap` reads was changed in place after the call (never for a `:copy` tap)."""
        recorded = self.versions[0] if tap.want_input else self.versions[1]
        value = self.input if tap.want_input else self.output
        return not tap.copy and recorded is not None and _versions(value) != recorded


@dataclass(frozen=True)
class TapPath:
    """A parsed tap path: module name, input or output, and which call (None: the only one; -1: all)."""

    text: str
    module: str
    want_input: bool
    call: int | None
    copy: bool = False

    @classmethod
    def parse(cls, text: str, model: nn.Module, role: str) -> TapPath:
        head, _, call_text = text.partition("#")
        path = aliases(model).get(head, head)
        path, _, alias_call = path.partition("#")  # an alias may name one call itself
        call_text = call_text or alias_call
        name, _, which = path.partition(":")
        if which not in ("", "in", "copy"):
            raise PadkdError(f"{role} tap '{text}': suffix must be ':in', ':copy' or nothing")
        call: int | None = None
        if call_text:
            if call_text != "*" and not call_text.isdigit():
                raise PadkdError(f"{role} tap '{text}': '#' must be followed by a call number or '*'")
            call = -1 if call_text == "*" else int(call_text)
        return cls(text, name, which == "in", call, copy=which == "copy")


class Taps:
    """Records the values at `paths` of `model`'s forwards run inside `capture()`; `close()` removes the hooks."""

    def __init__(self, model: nn.Module, paths: set[str], role: str) -> None:
        self.role = role
        self._recording = False
        self._calls: dict[str, list[_Call]] = {}
        self._handles: list[RemovableHandle] = []
        modules = dict(model.named_modules())
        self.paths = {p: TapPath.parse(p, model, role) for p in sorted(paths - {OUTPUT})}
        for tap in self.paths.values():
            if tap.module not in modules:
                hint = did_you_mean(tap.module, list(modules) + list(aliases(model)))
                raise PadkdError(f"{role} tap '{tap.text}': no module '{tap.module}'{hint}")
        copied = {tap.module for tap in self.paths.values() if tap.copy}
        for name in sorted({tap.module for tap in self.paths.values()}):
            self._handles.append(modules[name].register_forward_hook(self._hook(name, name in copied)))

    def _hook(self, name: str, copy: bool):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if self._recording:
                first = inputs[0] if inputs else None
                kept = tree_map(torch.Tensor.clone, output) if copy else output
                call = _Call(first, output, kept, (_versions(first), _versions(output)))
                self._calls.setdefault(name, []).append(call)

        return hook

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record every call of the tapped modules during the block (previous values are dropped)."""
        self._calls = {}
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def values(self, output: Any) -> dict[str, Any]:
        """The last capture's tapped values by path, plus `"output"`; clears the recorded calls."""
        calls, self._calls = self._calls, {}
        values: dict[str, Any] = {OUTPUT: output}
        for text, tap in self.paths.items():
            made = calls.get(tap.module, [])
            if any(c.overwritten(tap) for c in made):
                raise PadkdError(f"{self.role} tap '{text}': the value was changed in place later in the forward (an "
                                 f"in-place ReLU after '{tap.module}'?); tap '{tap.module}:copy' to keep a copy of it")
            picked = [c.value(tap) for c in made]
            if tap.call == -1:
                values[text] = picked
            elif tap.call is not None:
                if tap.call >= len(picked):
                    raise PadkdError(f"{self.role} tap '{text}': module '{tap.module}' ran {len(picked)} time(s) "
                                     "in this forward")
                values[text] = picked[tap.call]
            elif len(picked) == 1:
                values[text] = picked[0]
            elif not picked:
                raise PadkdError(f"{self.role} tap '{text}': module '{tap.module}' did not run in this forward; "
                                 "tap a module on the forward path")
            else:
                raise PadkdError(f"{self.role} tap '{text}': module '{tap.module}' ran {len(picked)} times in one "
                                 f"forward; tap '{text}#0' … '{text}#{len(picked) - 1}' for one call or "
                                 f"'{text}#*' for all of them")
        return values

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
