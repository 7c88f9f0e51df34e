"""Checkpoints: full training state, written atomically, loaded with `weights_only=True`.

The LR schedule is a pure function of the step, so the step in `progress` is its whole state.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from padkd.config import Component
from padkd.errors import PadkdError

FORMAT = "padkd-checkpoint"
VERSION = 1


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path: Path) -> dict[str, Any]:
    """Load a padkd checkpoint or export safely; a clear error for anything else."""
    if not path.is_file():
        raise PadkdError(f"checkpoint '{path}' not found; pass a .pt file written by padkd or a run directory")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unpickling failure means: not our file)
        raise PadkdError(f"'{path}' is not a readable padkd checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise PadkdError(f"'{path}' is not a padkd checkpoint (no '{FORMAT}' header); "
                         "export plain weights with `padkd export` or train with padkd")
    return obj


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
    """Load a checkpoint's student (or an export) into `model`, refusing another architecture."""
    path = resolve(path)
    ckpt = load(path)
    expected, found = model_spec(component), ckpt.get("model")
    if found != expected:
        raise PadkdError(f"{where}.checkpoint '{path}' holds model {found}, but {where}.model is {expected}; "
                         f"point {where}.checkpoint at a checkpoint of that architecture or fix {where}.model")
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
