"""Decorator registries: configs name registered keys only, never import paths.

Each entry is a factory (class or function). `Registry.create` checks the config's keyword
arguments against the factory's signature and types (pydantic), so a typo in a YAML file becomes
`distill.terms[0].method.temprature: unknown option; did you mean 'temperature'?`.
"""

from __future__ import annotations

import inspect
import reprlib
import typing
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import pydantic

from padkd.errors import PadkdError, did_you_mean

T = TypeVar("T")
#: Options are finite numbers: NaN or inf in a config is a mistake, not a setting.
_NO_INF_NAN = pydantic.ConfigDict(allow_inf_nan=False)


class Registry(Generic[T]):
    """A named table of factories for one kind of object (methods, weightings, models, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register `factory` under `name` (names are unique per registry)."""

        def wrap(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = factory
            return factory

        return wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str, where: str = "") -> Callable[..., T]:
        """The factory registered as `name`; a PadkdError with a did-you-mean otherwise."""
        if name not in self._entries:
            prefix = f"{where}: " if where else ""
            raise PadkdError(f"{prefix}unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}")
        return self._entries[name]

    def describe(self, name: str) -> str:
        """First docstring line of an entry, for `padkd list`."""
        doc = inspect.getdoc(self._entries[name]) or ""
        return doc.splitlines()[0] if doc else ""

    def create(self, name: str, options: dict[str, Any] | None = None, where: str = "", **fixed: Any) -> T:
        """Call the factory with validated `options` (from a config) plus `fixed` (from the code)."""
        factory = self.get(name, where)
        options = dict(options or {})
        check_options(factory, options, where, set(fixed))
        try:
            return factory(**fixed, **validate_options(factory, options, where))
        except ValueError as err:
            raise PadkdError(f"{where}: {err}") from None


def _signature_target(factory: Callable[..., Any]) -> Callable[..., Any]:
    return factory.__init__ if inspect.isclass(factory) else factory  # type: ignore[misc]


def validate_options(factory: Callable[..., Any], options: dict[str, Any], where: str) -> dict[str, Any]:
    """Coerce each option to the factory's annotated type (YAML lists become tuples, ints floats)."""
    hints = typing.get_type_hints(_signature_target(factory))
    out = {}
    for key, value in options.items():
        if key not in hints:
            out[key] = value
            continue
        try:
            out[key] = pydantic.TypeAdapter(hints[key], config=_NO_INF_NAN).validate_python(value)
        except pydantic.ValidationError as err:
            msg = err.errors()[0]["msg"]
            raise PadkdError(f"{where}.{key}: {msg} (got {reprlib.repr(value)})") from None
    return out


def check_options(factory: Callable[..., Any], options: dict[str, Any], where: str, fixed: set[str],
                  also: frozenset[str] = frozenset()) -> None:
    """Reject option names the factory does not take, naming the closest valid one (from its
    parameters and `also`: keys valid beside them, such as a data section's loader keys)."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL} - fixed
    for key in options:
        if key not in allowed:
            raise PadkdError(f"{where}.{key}: unknown option{did_you_mean(key, allowed | also)}")
    for name in sorted(allowed):
        p = params[name]
        if p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_POSITIONAL \
                and name not in options:
            raise PadkdError(f"{where}.{name}: required option is missing")
