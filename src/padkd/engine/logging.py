"""Run outputs: metrics.jsonl (one JSON object per event), TensorBoard scalars, a progress bar.

metrics.jsonl is appended to (never through a symlink), rewritten only whole (`padkd.files.atomic_write`)
and read back within MAX_METRICS_BYTES, each line checked to be an event padkd writes: a resume and a
report meet a torn or foreign line as one line naming it, never as a traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from padkd import files
from padkd.errors import PadkdError

#: The most metrics.jsonl a resume or a report reads (a 10,000-epoch run with ten terms writes ~10 MB).
MAX_METRICS_BYTES = 64 << 20


class MetricsLog:
    """Appends events to `metrics.jsonl` and mirrors numeric leaves to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def event(self, record: dict[str, Any], step: int | None = None) -> None:
        """Append one event as strict JSON (NaN and inf become null); one write, then fsync."""
        if not self.enabled:
            return
        files.append(self.path, (json.dumps(finite_json(record), allow_nan=False) + "\n").encode())
        if self.writer is not None and step is not None:
            for key, value in _flatten(record).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Step-level scalars (TensorBoard only; the JSON log keeps epoch-level events)."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def keep_until(self, stage: int, epoch: int, batch: int) -> None:
        """On resume from a checkpoint at (stage, epochs done, batches done): drop the events written after it
        (epochs a kill cut off, resumes from a later checkpoint, `final`) and a torn last line; the file is
        rewritten whole, and only when something is dropped."""
        if not self.enabled or not self.path.exists():
            return
        text = files.read_text(self.path, MAX_METRICS_BYTES, "metrics log")
        kept = "".join(line + "\n" for line, record in _events(text, self.path)
                       if not _after(record, (stage, epoch, batch)))
        if kept != text:
            files.atomic_write_text(self.path, kept)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def finite_json(value: Any) -> Any:
    """`value` with every NaN/inf float replaced by None, so it serialises as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All events of a run's metrics.jsonl (a torn last line left out); one line for anything else."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [record for _, record in _events(files.read_text(path, MAX_METRICS_BYTES, "metrics log"), path)]


def _events(text: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, event) for each line of a metrics log. The last line may be torn (a kill mid-append: it is
    left out); any other line that is not an event padkd writes is one line naming it."""
    lines = text.split("\n")
    complete = text.endswith("\n") or not text
    out = []
    for number, line in enumerate(lines[:-1] if complete else lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            if number == len(lines) and not complete:
                continue
            raise PadkdError(f"'{path}' line {number} is not JSON; restore the file, or delete that line") from None
        problem = _event_problem(record)
        if problem:
            raise PadkdError(f"'{path}' line {number} is not a padkd event ({problem}); restore the file, or "
                             "delete that line")
        out.append((line, record))
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _event_problem(record: Any) -> str | None:
    """What keeps `record` from being an event that a resume and a report can read, else None."""
    if not isinstance(record, dict) or not isinstance(record.get("event"), str):
        return "not an object with an 'event' name"
    kind = record["event"]
    if kind == "epoch":
        if not (_is_int(record.get("stage")) and _is_int(record.get("epoch"))):
            return "an epoch event needs integer 'stage' and 'epoch'"
        if not (record.get("val") is None or isinstance(record["val"], dict)) or not isinstance(
                record.get("train", {}), dict):
            return "an epoch event's 'train' and 'val' are mappings"
    if kind == "resume":
        changes = record.get("changes")
        if not isinstance(changes, dict) or not all(isinstance(c, dict) and "now" in c for c in changes.values()):
            return "a resume event's 'changes' map keys to {was, now}"
        if not all(_is_int(record.get(k, 0)) for k in ("stage", "epoch", "batch")):
            return "a resume event's 'stage', 'epoch' and 'batch' are integers"
    return None


def _after(record: dict[str, Any], position: tuple[int, int, int]) -> bool:
    """Whether an event was written after the checkpoint at `position` (stage, epochs done, batches done)."""
    if record["event"] == "final":
        return True
    if record["event"] == "epoch":
        return (record["stage"], record["epoch"], 0) > position
    if record["event"] == "resume":
        return (record.get("stage", 0), record.get("epoch", 0), record.get("batch", 0)) > position
    return False


def kept_resumes(run_dir: Path, position: tuple[int, int, int]) -> list[dict[str, Any]]:
    """The resume events of a run up to a checkpoint at `position`, oldest first: with config.yaml, they
    say which config trained up to that checkpoint."""
    return [e for e in read_metrics(run_dir) if e["event"] == "resume" and not _after(e, position)]


def show_progress(mode: str) -> bool:
    """`auto`: a bar only on an interactive terminal outside CI."""
    if mode == "none":
        return False
    if mode == "bar":
        return True
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0) -> tqdm:
    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                leave=False)
