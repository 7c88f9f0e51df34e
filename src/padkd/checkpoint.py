"""Checkpoints and exports: the file format, its one writer (`save`) and its checked reader (`load`).

Full training state is written atomically and loaded with `weights_only=True`. This module knows
nothing of the training loop: the engine, the CLI and `padkd import-teacher` all write through `save`.

The LR schedule is a pure function of the step, so the step in `progress` is its whole state. Files
are written whole through `padkd.files.atomic_write` (temporary file, fsync, rename): a reader sees the
old file or the new one, never a torn one, and a planted symlink is never followed.
"""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from padkd import files
from padkd.errors import PadkdError

if TYPE_CHECKING:
    from padkd.config import Component

FORMAT = "padkd-checkpoint"
VERSION = 3


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` atomically (`padkd.files.atomic_write`): on any failure the previous file
    is untouched, and a symlink planted at `path` is replaced, never followed."""
    files.atomic_write(path, lambda f: torch.save(obj, f))


def torch_load(path: Path, what: str, allowed: tuple[type, ...] = ()) -> Any:
    """torch.load with weights_only=True (nothing in the file can run), `allowed` classes besides; any
    failure is one line in padkd's words, and torch's warnings about the file are not printed."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allowed)):
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 4": we say what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unpickling failure means: not a file we can read safely)
        text = str(err)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if refused:
            reason = f"it holds a {refused.group(1)} object"
        else:
            inner = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
            detail = inner.group(1) if inner else (text.strip().splitlines() or [""])[0]
            reason = f"{type(err).__name__}{': ' + detail[:200] if detail else ''}"
        if "weights_only" in text:  # the safe unpickler refused it: say what the unsafe way would risk
            reason += ("; padkd reads files with torch.load(weights_only=True), which runs no code from them, and "
                       "weights_only=False could run arbitrary code: where you trust the file, re-save its state "
                       "dict alone (torch.save(state_dict, 'weights.pt')) and pass that")
        raise PadkdError(f"'{path}' is not a readable {what} ({reason})") from None


#: What each kind of file must hold, beside the header: key → type.
_REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "export": {"model": dict, "student": dict},
    "run": {"model": dict, "student": dict, "terms": dict, "optimizer": dict, "progress": dict, "rng": dict},
}


def save(path: Path, kind: str, **payload: Any) -> None:
    """Write a padkd file of `kind` ("run" or "export"): the header, then `payload`, which must hold what
    `load` demands of that kind; atomically (see `atomic_save`)."""
    state = {"format": FORMAT, "version": VERSION, "kind": kind, **payload}
    wrong = [key for key, types in _REQUIRED[kind].items() if not isinstance(state.get(key), types)]
    if wrong:
        raise ValueError(f"a padkd {kind} needs '{wrong[0]}' of type {_REQUIRED[kind][wrong[0]]}")
    atomic_save(state, path)


def load(path: Path, kind: str | None = None) -> dict[str, Any]:
    """Load a padkd checkpoint or export safely and check its structure; `kind` ("run") demands one kind,
    of this version (resume). Without `kind`, a run checkpoint of another version is accepted for its
    weights alone. Anything else gets one line saying what the file is not."""
    if not path.is_file():
        raise PadkdError(f"checkpoint '{path}' not found; pass a .pt file written by padkd or a run directory")
    if path.stat().st_size == 0:
        raise PadkdError(f"'{path}' is empty (0 bytes: a write that never finished?); use another checkpoint")
    obj = torch_load(path, "padkd checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise PadkdError(f"'{path}' is not a padkd checkpoint (no '{FORMAT}' header); "
                         "export plain weights with `padkd export` or train with padkd")
    found = obj.get("kind")
    if found not in _REQUIRED:
        raise PadkdError(f"'{path}' is a padkd file of unknown kind {found!r}; expected a run checkpoint or an export")
    if kind is not None and found != kind:
        raise PadkdError(f"'{path}' is a padkd {found}, not a {kind} checkpoint; --resume needs "
                         "checkpoints/last.pt of a run")
    required = _REQUIRED[found]
    if found == "run" and obj.get("version") != VERSION:
        if kind == "run":
            raise PadkdError(f"'{path}' was written by another padkd version (format {obj.get('version')}, this is "
                             f"{VERSION}); resume it with that version, or export its student and start anew")
        # Read for its weights (a teacher, eval, export): `model` and `student` mean the same in every
        # version; the training state, whose layout changed, is not read.
        required = _REQUIRED["export"]
    for key, types in required.items():
        if not isinstance(obj.get(key), types):
            raise PadkdError(f"'{path}' is a malformed padkd {found}: '{key}' is missing or of the wrong type")
    bad = [k for k, v in obj["student"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise PadkdError(f"'{path}' is a malformed padkd {found}: its student holds non-tensor entries "
                         f"({str(bad[0])[:60]})")
    return obj


def non_finite(state: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor of a (nested) state that holds NaN or inf, else None."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                return str(key)
        elif isinstance(value, dict):
            inner = non_finite(value)
            if inner is not None:
                return f"{key}.{inner}"
    return None


def resolve(path: Path) -> Path:
    """A run directory means its best checkpoint (else last); a file is itself."""
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise PadkdError(f"'{path}' holds no checkpoints/best.pt or last.pt; train it first or pass a .pt file")
    return path


def model_spec(component: Component) -> dict[str, Any]:
    """Architecture identity stored with weights: registered name and options."""
    return {"name": component.name, **{k: _plain(v) for k, v in component.options.items()}}


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def load_model_weights(model: nn.Module, path: Path, component: Component, where: str) -> None:
    """Load a checkpoint's student (or an export) into `model`, refusing another architecture; errors name
    the config key (`teacher.checkpoint`) and the path resolved from the current directory."""
    if not path.exists():
        raise PadkdError(f"{where}.checkpoint '{path}' not found ({path.absolute()}: paths in a config are relative "
                         f"to the current directory); train that run first or point {where}.checkpoint at a padkd "
                         ".pt file or run directory")
    try:
        path = resolve(path)
        ckpt = load(path)
    except PadkdError as err:
        raise PadkdError(f"{where}.checkpoint: {err}") from None
    expected, found = model_spec(component), ckpt.get("model")
    if found != expected:
        raise PadkdError(f"{where}.checkpoint '{path}' holds model {found}, but {where}.model is {expected}; "
                         f"point {where}.checkpoint at a checkpoint of that architecture or fix {where}.model")
    bad = non_finite(ckpt["student"])
    if bad is not None:
        raise PadkdError(f"{where}.checkpoint '{path}' holds NaN/inf weights ('{bad}'); use a checkpoint of a "
                         "run that did not diverge")
    load_state_strict(model, ckpt["student"], f"{where}.checkpoint '{path}'")


def load_state_strict(module: nn.Module, state: dict[str, Any], what: str) -> None:
    """load_state_dict(strict) with the mismatch explained in one line."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {shapes[0]}: {tuple(state[shapes[0]].shape)} vs {tuple(own[shapes[0]].shape)}")
        raise PadkdError(f"{what} does not fit this architecture ({detail}); use a checkpoint of the same model")
    module.load_state_dict(state)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states, as weights_only-safe values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    """random.setstate needs tuples where serialisation may have produced lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, list | tuple) else x
