"""The run directory's guarantees: one run per directory, a consistent state whatever moment a process
dies, and a directory whose start failed stays usable.

- `RunLock`: an exclusive `flock` on `OUTPUT_DIR/.padkd.lock`, held for the whole run (resume
  included); the operating system releases it when the process dies, even by `kill -9`.
- `check`: refuses a directory that holds another run, or (on resume) a run of another config except
  for the changes `RESUMABLE` lists; a directory whose start failed before any checkpoint is reused.
- `repair_best`: the epoch-end writes go metrics event → `last.pt` → `best.pt`; a process killed
  between the last two leaves a `last.pt` that names itself the best, and resume copies it to `best.pt`.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from typing import Any

import yaml

from padkd import checkpoint as ckpt
from padkd.errors import PadkdError

LOCK_NAME = ".padkd.lock"
#: What a start that failed before its first checkpoint may leave: such a directory is reused.
FAILED_START = frozenset({LOCK_NAME, "config.yaml", "metrics.jsonl", "tensorboard", "checkpoints"})
#: Config keys (dotted, list indices as numbers) that may differ when a run is resumed: where data come
#: from and how they are loaded, logging, the device, compilation, and a stage's learning rate (to
#: continue past a NaN from the last good checkpoint with a lower LR).
RESUMABLE = (r"log(\..+)?", r"data\.(num_workers|pin_memory|persistent_workers|prefetch_factor|root)",
             r"device", r"engine\.(compile|compile_backend)", r"stages\.\d+\.optimizer\.lr")


class RunLock:
    """An exclusive lock on a run directory, or a one-line error naming the process that holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise PadkdError(f"output_dir '{self.path.parent}' cannot be used ({err.strerror}); "
                             "choose a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise PadkdError(f"output_dir '{self.path.parent}' is in use by another padkd process (pid {holder}); "
                             "wait for it to finish or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= _flat(value, f"{prefix}{key}.")
        return out or {prefix.rstrip("."): {}}
    if isinstance(tree, list):
        out = {}
        for i, value in enumerate(tree):
            out |= _flat(value, f"{prefix}{i}.")
        return out or {prefix.rstrip("."): []}
    return {prefix.rstrip("."): tree}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two resolved configs: key → (old, new)."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _has_progress(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "last.pt").exists() or (run_dir / "checkpoints" / "best.pt").exists()


def check(run_dir: Path, new_config: str, resume: bool) -> dict[str, tuple[Any, Any]]:
    """Whether this run may use `run_dir`; on resume, the allowed config changes (key → (old, new)).

    A directory with a config but no checkpoint is a start that failed: it is reused as if empty."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PadkdError(f"output_dir '{run_dir}' is a file; choose a directory")
    config_path = run_dir / "config.yaml"
    if config_path.exists() and _has_progress(run_dir):
        if not resume:
            raise PadkdError(f"output_dir '{run_dir}' already holds a run; pass --resume to continue "
                             "it, or set another output_dir (e.g. output_dir=runs/new)")
        old = yaml.safe_load(config_path.read_text()) or {}
        changes = config_changes(old, yaml.safe_load(new_config))
        refused = [k for k in changes if not any(re.fullmatch(p, k) for p in RESUMABLE)]
        if refused:
            before, after = changes[refused[0]]
            raise PadkdError(f"output_dir '{run_dir}' holds a run whose '{refused[0]}' was {before!r}, not "
                             f"{after!r}; resume with the same config (only log, data loading, device, compile and "
                             "stages.N.optimizer.lr may change), or set another output_dir")
        return changes
    if run_dir.is_dir() and any(p.name not in FAILED_START for p in run_dir.iterdir()):
        raise PadkdError(f"output_dir '{run_dir}' is not empty and holds no padkd run; "
                         "choose an empty or new directory")
    return {}


def repair_best(run_dir: Path, last: dict[str, Any]) -> bool:
    """Make `best.pt` the model `last.pt` names as best when a kill fell between writing the two; True
    if it was repaired."""
    progress = last["progress"]
    if list(progress["best_at"]) != [progress["stage"], progress["epoch"]] or progress["batch"] != 0:
        return False
    best_path = run_dir / "checkpoints" / "best.pt"
    if best_path.exists():
        best = ckpt.load(best_path, kind="run")
        if list(best["progress"]["best_at"]) == list(progress["best_at"]):
            return False
    ckpt.atomic_save(last, best_path)
    return True
