"""Weights trained elsewhere: foreign checkpoints read safely, checked against a padkd model, and
written as padkd exports (`padkd import-teacher`) or loaded directly (torchvision/timm `weights_path`).

Layouts read (all with `torch.load(weights_only=True)`):
- a bare state dict (torchdistill's published weights, torchvision/timm state dicts);
- a dict with the state dict under `model` (RepDistiller and mdistiller checkpoints, torchdistill's
  training checkpoints, whose `args` namespace is allowed) or `state_dict` (timm training checkpoints);
- keys prefixed `module.` (DataParallel/DDP) or `_orig_mod.` (torch.compile), stripped;
- a distiller's state (mdistiller's `latest`/`best`: `student.*`, `teacher.*` and the method's own
  modules), of which one part (`student` by default) is taken.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from padkd import checkpoint as ckpt
from padkd.config import Component
from padkd.errors import PadkdError
from padkd.models import MODELS

WRAPPERS = ("model", "state_dict")
PREFIXES = ("module.", "_orig_mod.")
PARTS = ("student", "teacher")


def _load(path: Path) -> Any:
    if not path.is_file():
        raise PadkdError(f"'{path}' not found; pass the checkpoint file (.pth/.pt) of the trained model")
    # torchdistill stores its parsed args beside the weights
    return ckpt.torch_load(path, "PyTorch checkpoint", allowed=(argparse.Namespace,))


def _is_state(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _strip(state: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], set[str]]:
    out: dict[str, Tensor] = {}
    stripped: set[str] = set()
    for key, value in state.items():
        name = key
        while name.startswith(PREFIXES):
            prefix = next(p for p in PREFIXES if name.startswith(p))
            stripped.add(prefix)
            name = name[len(prefix):]
        if name in out:
            raise PadkdError(f"'{path}' holds '{name}' twice once prefixes {sorted(stripped)} are removed; "
                             "save one copy of the model's state dict")
        out[name] = value
    return out, stripped


def read_state_dict(path: Path, part: str | None = None) -> tuple[dict[str, Tensor], str]:
    """The model tensors of a foreign checkpoint (see the module docstring) and a phrase naming its
    layout; `part` picks `student` or `teacher` from a distiller's state (default: student)."""
    obj = _load(path)
    if isinstance(obj, dict) and obj.get("format") == ckpt.FORMAT:
        raise PadkdError(f"'{path}' is already a padkd checkpoint; use it as the checkpoint directly")
    layout = "a bare state dict"
    if not _is_state(obj) and isinstance(obj, dict):
        for key in WRAPPERS:
            if _is_state(obj.get(key)):
                obj, layout = obj[key], f"a state dict under '{key}'"
                break
    if not _is_state(obj):
        what = f"top-level keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else type(obj).__name__
        raise PadkdError(f"'{path}' holds no state dict ({what}); expected a dict of tensors, bare or under "
                         f"{' or '.join(repr(w) for w in WRAPPERS)}")
    state, stripped = _strip(obj, path)
    if stripped:
        layout += f", prefixes {' '.join(sorted(stripped))} stripped"
    parts = sorted({key.split(".", 1)[0] for key in state} & set(PARTS))
    if parts:
        chosen = part or "student"
        if chosen not in parts:
            raise PadkdError(f"'{path}' is a distiller checkpoint with parts {parts}, not '{chosen}'; "
                             f"pick one of them")
        state, _ = _strip({k[len(chosen) + 1:]: v for k, v in state.items() if k.startswith(f"{chosen}.")}, path)
        layout += f", the '{chosen}' part of a distiller checkpoint"
    elif part is not None:
        raise PadkdError(f"'{path}' holds one model, not a distiller checkpoint with a '{part}' part; "
                         "leave the part out")
    return state, layout


def fit_state(model: nn.Module, state: dict[str, Tensor], what: str, fix: str) -> None:
    """Load `state` into `model` strictly, or raise ONE line naming the missing and unexpected keys and the
    shape mismatches, ending with `fix`. The BN counters (`num_batches_tracked`) that checkpoints of PyTorch
    < 0.4.1 lack beside a BN's running statistics are taken from the model."""
    own = model.state_dict()
    counters = {k: v for k, v in own.items() if k.endswith(".num_batches_tracked") and k not in state
                and f"{k.rsplit('.', 1)[0]}.running_mean" in state}
    state = {**counters, **state}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {_count(missing, 'key')} {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_count(unexpected, 'key')} {_few(unexpected)}")
    if shapes:
        problems.append(f"{_count(shapes, 'shape mismatch')}: " + ", ".join(
            f"{k} {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)}" for k in shapes[:3])
            + (", …" if len(shapes) > 3 else ""))
    if problems:
        raise PadkdError(f"{what} does not fit: {'; '.join(problems)}; {fix}")
    model.load_state_dict(state)


def _count(items: list[str], noun: str) -> str:
    return f"{len(items)} {noun}" + ("" if len(items) == 1 else "es" if noun.endswith("ch") else "s")


def _few(keys: list[str]) -> str:
    return "[" + ", ".join(keys[:3]) + (", …]" if len(keys) > 3 else "]")


def load_weights_file(model: nn.Module, path: str, what: str) -> None:
    """Load a local state dict (any layout `read_state_dict` reads) into `model`, e.g. a `weights_path`."""
    state, _ = read_state_dict(Path(path))
    fit_state(model, state, f"{what} '{path}'", "point it at weights of this architecture and class count")


def load_student(path: str | Path, **model_kwargs: Any) -> nn.Module:
    """The student of a padkd export, run checkpoint or run directory as a model in eval mode, built from
    the registered name and options and the data's fields (`num_classes`, `in_channels`) stored with it;
    `model_kwargs` give those fields for a file written before padkd stored them."""
    source = ckpt.resolve(Path(path))
    state = ckpt.load(source)
    stored = state.get("model_kwargs")
    if not isinstance(stored, dict) and not model_kwargs:
        raise PadkdError(f"'{source}' was written by a padkd that did not store the model's data fields "
                         "(num_classes, in_channels); pass them: padkd.load_student(path, num_classes=N, "
                         "in_channels=C), or export a run trained with this padkd")
    options = {k: v for k, v in state["model"].items() if k != "name"}
    model = MODELS.create(str(state["model"].get("name")), options, f"'{source}' model",
                          **{**(stored or {}), **model_kwargs})
    ckpt.load_state_strict(model, state["student"], f"'{source}'")
    return model.eval()


def classifier_name(model: nn.Module) -> str | None:
    """Module path of the model's last nn.Linear (the classifier of every zoo and torchvision model)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def import_teacher(source: Path, output: Path, name: str, options: dict[str, Any] | None = None,
                   num_classes: int | None = None, in_channels: int = 3, part: str | None = None) -> str:
    """Convert a foreign checkpoint into a padkd export of registered model `name` (options `options`),
    checked key by key; `num_classes` defaults to the file's classifier size. Returns a summary line."""
    options = dict(options or {})
    if num_classes is not None and num_classes < 1:
        raise PadkdError(f"--num-classes {num_classes}: a classifier needs at least 1 class; leave it out to read "
                         "the number from the file's classifier")
    state, layout = read_state_dict(source, part)
    bad = ckpt.non_finite(state)
    if bad is not None:
        raise PadkdError(f"'{source}' holds NaN/inf values ('{bad}'); a teacher must have finite weights: import a "
                         "checkpoint of a run that did not diverge")
    model = MODELS.create(name, options, "model", in_channels=in_channels, num_classes=num_classes or 1)
    classifier = state.get(f"{classifier_name(model)}.weight")
    found = int(classifier.shape[0]) if classifier is not None and classifier.dim() == 2 else None
    if num_classes is None:
        if found is None:
            raise PadkdError(f"'{source}': cannot tell the number of classes from its classifier; pass --num-classes")
        num_classes = found
        if found != 1:
            model = MODELS.create(name, options, "model", in_channels=in_channels, num_classes=found)
    fix = (f"the file was trained with {found} classes: pass --num-classes {found}" if found not in (None, num_classes)
           else "check --model (and its --option values) against the architecture the file was trained with")
    fit_state(model, state, f"'{source}' ({layout}) as {name}", fix)
    spec = ckpt.model_spec(Component(name=name, **options))
    ckpt.save(output, "export", model=spec, student=model.state_dict(), imported_from=str(source),
              model_kwargs={"in_channels": in_channels, "num_classes": num_classes})
    n_params = sum(p.numel() for p in model.parameters())
    return (f"imported {source} ({layout}) as {name} with {num_classes} classes ({n_params:,} parameters) into "
            f"{output}; use it as teacher: {{model: {spec}, checkpoint: {output}}}")
