"""The run directory's guarantees: one run per directory, a consistent state whatever moment a process
dies, a directory whose start failed stays usable, and nothing planted in it is written through.

- `RunLock`: an exclusive `flock` on `OUTPUT_DIR/.padkd.lock`, held for the whole run (resume
  included); the operating system releases it when the process dies, even by `kill -9`.
- `check`: refuses a directory where an entry padkd writes is a symbolic link, one that holds a run
  (unless resumed), and one that holds the trace of a run that trained but no checkpoint to resume it
  from; a directory whose start failed before its first checkpointed epoch is reused.
- `resume_changes`: the config changes a resume may make, judged against what trained (config.yaml,
  which is never rewritten, and the changes of earlier resumes, recorded in `resume` events).
- `repair_best`: the epoch-end writes go metrics event → `last.pt` → `best.pt`; a process killed
  between the last two leaves a `last.pt` that names itself the best, and resume copies it to `best.pt`.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

from padkd import checkpoint as ckpt
from padkd import files
from padkd.config import read_yaml, short_repr
from padkd.engine.logging import kept_resumes, read_metrics
from padkd.errors import PadkdError

LOCK_NAME = ".padkd.lock"
#: What padkd writes in a run directory: these files, and every entry of these folders.
RUN_FILES = (LOCK_NAME, "config.yaml", "metrics.jsonl", "final.json")
RUN_FOLDERS = ("checkpoints", "records", "tensorboard")
#: What a start that failed before its first checkpoint may leave: such a directory is reused.
FAILED_START = frozenset({LOCK_NAME, "config.yaml", "metrics.jsonl", "tensorboard", "checkpoints"})
#: The crash reports of `padkd` (cli): a start that crashed leaves one, and its directory stays reusable.
CRASH_REPORT = re.compile(r"^padkd-crash-[0-9-]+-\w+\.log$")
#: Config keys (dotted, list indices as numbers) that may differ when a run is resumed: where data come
#: from and how they are loaded, logging, the device, compilation, and (lowered only, in a stage that has
#: not finished) a stage's learning rate, to continue past a NaN from the last good checkpoint.
RESUMABLE = (r"log(\..+)?", r"data\.(num_workers|pin_memory|persistent_workers|prefetch_factor|root)",
             r"device", r"engine\.(compile|compile_backend|threads)", r"stages\.\d+\.optimizer\.lr")
_LR = re.compile(r"stages\.(\d+)\.optimizer\.lr")


class RunLock:
    """An exclusive lock on a run directory, or a one-line error naming the process that holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = files.open_no_follow(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as err:
            raise PadkdError(f"output_dir '{self.path.parent}' cannot be used ({err.strerror}); "
                             "choose a writable directory") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # writing the pid would change another file
            os.close(fd)
            raise PadkdError(f"'{self.path}' is not padkd's lock file (a hard link, or not a regular file); "
                             "remove it or choose another output_dir")
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


def check(run_dir: Path, resume: bool) -> bool:
    """Whether this run may use `run_dir`, and whether it holds a run to resume (True) or is empty or a
    start that failed (False, reused as if empty). Refused in one line: a name the system cannot encode,
    a symlink where padkd writes, a run without --resume, and a run that trained but lost its checkpoints."""
    try:
        os.fsencode(run_dir)
    except UnicodeEncodeError:
        raise PadkdError(f"output_dir {str(run_dir)!r} cannot be a file name in this system's encoding "
                         f"({sys.getfilesystemencoding()}, the C locale?); run padkd in a UTF-8 locale (e.g. "
                         "LANG=C.UTF-8, or PYTHONUTF8=1) or choose an ASCII output_dir") from None
    if run_dir.exists() and not run_dir.is_dir():
        raise PadkdError(f"output_dir '{run_dir}' is a file; choose a directory")
    if not run_dir.is_dir():
        return False
    _refuse_links(run_dir)
    if any((run_dir / "checkpoints" / name).is_file() for name in ("last.pt", "best.pt")):
        if not (run_dir / "config.yaml").is_file():
            raise PadkdError(f"output_dir '{run_dir}' holds checkpoints but no config.yaml; restore the run's "
                             "config.yaml, or choose another output_dir")
        if not resume:
            raise PadkdError(f"output_dir '{run_dir}' already holds a run; pass --resume to continue "
                             "it, or set another output_dir (e.g. output_dir=runs/new)")
        return True
    trace = _trace(run_dir)
    if trace:
        raise PadkdError(f"output_dir '{run_dir}' holds a run that trained ({trace}) but no checkpoint "
                         "(checkpoints/last.pt and best.pt are gone), so it cannot be resumed; restore the "
                         "checkpoints, or start over in another output_dir")
    if any(p.name not in FAILED_START and not files.is_temporary(p.name) and not CRASH_REPORT.match(p.name)
           for p in run_dir.iterdir()):
        raise PadkdError(f"output_dir '{run_dir}' is not empty and holds no padkd run; "
                         "choose an empty or new directory")
    return False


def _refuse_links(run_dir: Path) -> None:
    """One line for the first symbolic link among the entries padkd writes in `run_dir`."""
    entries = [run_dir / name for name in (*RUN_FILES, *RUN_FOLDERS)]
    for folder in RUN_FOLDERS:
        if (run_dir / folder).is_dir() and not (run_dir / folder).is_symlink():
            entries += sorted((run_dir / folder).iterdir())
    for path in entries:
        if path.is_symlink():
            raise PadkdError(f"output_dir '{run_dir}': '{path.relative_to(run_dir)}' is a symbolic link; padkd "
                             "never writes through a link in a run directory: remove the link, or choose another "
                             "output_dir")


def _trace(run_dir: Path) -> str:
    """What shows that a run trained past its first epoch (which a kill may leave without its checkpoint)."""
    found = [name for name in ("final.json", "records") if (run_dir / name).exists()]
    epochs = [e for e in read_metrics(run_dir) if e["event"] in ("epoch", "final")]
    if len(epochs) > 1:
        found.append(f"{len(epochs)} epoch and final events in metrics.jsonl")
    return ", ".join(found)


def resume_changes(run_dir: Path, new: dict[str, Any], position: tuple[int, int, int],
                   finished_stages: int) -> dict[str, tuple[Any, Any]]:
    """The changes of config `new` against the config that trained the run up to its checkpoint at
    `position` (config.yaml with the changes of the resume events before it): key → (old, new). Refused
    in one line: a key outside RESUMABLE, a raised learning rate, and the learning rate of a stage of the
    `finished_stages` first. A different `output_dir` naming this directory is no change; one naming
    another place is a moved run (recorded)."""
    config = read_yaml(run_dir / "config.yaml", "run config")
    if not isinstance(config, dict):
        raise PadkdError(f"'{run_dir / 'config.yaml'}' is not a padkd config (not a mapping); restore it")
    trained = _flat(config)
    for event in kept_resumes(run_dir, position):
        trained |= {key: change["now"] for key, change in event["changes"].items()}
    now = _flat(new)
    if _same_dir(trained.get("output_dir"), run_dir):
        trained["output_dir"] = now.get("output_dir")
    changes = {k: (trained.get(k), now.get(k)) for k in sorted(set(trained) | set(now))
               if trained.get(k) != now.get(k)}
    for key, (before, after) in changes.items():
        problem = _refused(key, before, after, finished_stages)
        if problem:
            raise PadkdError(f"output_dir '{run_dir}' holds a run whose '{key}' was {short_repr(before)}, not "
                             f"{short_repr(after)}{problem}")
    return changes


def _refused(key: str, before: Any, after: Any, finished_stages: int) -> str | None:
    """Why a resume may not change `key` from `before` to `after`, or None."""
    if key == "output_dir":  # the config was read from this directory: it moved
        return None
    if not any(re.fullmatch(p, key) for p in RESUMABLE):
        return ("; resume with the same config (only log, data loading, device, compile, threads and a lower "
                "stages.N.optimizer.lr of a stage that has not finished may change), or set another output_dir")
    lr = _LR.fullmatch(key)
    if lr is None:
        return None
    if int(lr[1]) < finished_stages:
        return (f": stage {lr[1]} has finished training, so its learning rate can no longer change; pass "
                f"{key}={before} or leave it as it trained")
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (before, after))
    if not numbers or not after < before:
        return (f": the learning rate may only be lowered at resume (to continue past a NaN); pass a value below "
                f"{short_repr(before)}, or {key}={short_repr(before)}")
    return None


def _same_dir(old: Any, run_dir: Path) -> bool:
    """Whether the `output_dir` a config names is `run_dir` (spelt relatively, through a link, ...)."""
    if not isinstance(old, str):
        return False
    try:
        return Path(old).resolve() == run_dir.resolve() or (Path(old).exists() and os.path.samefile(old, run_dir))
    except (OSError, ValueError):
        return False


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
