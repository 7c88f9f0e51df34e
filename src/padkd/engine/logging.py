"""Run outputs: metrics.jsonl (one JSON object per event), TensorBoard scalars, a progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


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
        line = json.dumps(finite_json(record), allow_nan=False) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None and step is not None:
            for key, value in _flatten(record).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Step-level scalars (TensorBoard only; the JSON log keeps epoch-level events)."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def keep_until(self, stage: int, epoch: int) -> None:
        """On resume: drop epoch events after the checkpoint's (stage, epoch), written before a kill."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a crash or a full disk: the replay writes it again
                continue
            if rec.get("event") == "epoch" and (rec["stage"], rec["epoch"]) > (stage, epoch):
                continue
            if rec.get("event") == "final":
                continue
            kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

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
    """All events of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


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
