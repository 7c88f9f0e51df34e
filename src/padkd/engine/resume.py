"""What a resume continues from: the run's checkpoint (`last.pt`, else `best.pt`) and its state checked
against the config before anything is trained or written, so that a damaged, foreign or non-finite
checkpoint is one line instead of a crash mid-training or a run that trains on NaN.

Resuming from `best.pt` when `last.pt` is gone replays the epochs after it: `best.pt` holds the full
training state (the same writer as `last.pt`) and resume is exact, so the replay is the same run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from padkd import checkpoint as ckpt
from padkd.config import StageConfig
from padkd.errors import PadkdError

log = logging.getLogger(__name__)

#: The fields of a checkpoint's `progress` (the Trainer's Progress).
PROGRESS_FIELDS = ("stage", "epoch", "batch", "global_step", "best_metric", "best_at")
_DAMAGED = "the file is damaged or belongs to another config: restore it, or start over in another output_dir"


def checkpoint_path(run_dir: Path) -> Path | None:
    """The checkpoint a resume continues from: `last.pt`, else `best.pt` (with a warning), else None."""
    last, best = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    if last.is_file():
        return last
    if best.is_file():
        log.warning("checkpoints/last.pt is missing: resuming from checkpoints/best.pt; the epochs after it are "
                    "trained again (the same run: resume is exact)")
        return best
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _progress_problem(progress: dict[str, Any], stages: list[StageConfig]) -> str | None:
    """What makes `progress` a position this config cannot reach, or None."""
    if sorted(map(str, progress)) != sorted(PROGRESS_FIELDS):
        return f"the keys {sorted(map(str, progress))[:8]}, not {list(PROGRESS_FIELDS)}"
    if not all(_count(progress[k]) for k in ("stage", "epoch", "batch", "global_step")):
        return "stage, epoch, batch and global_step that are not all counts"
    stage, epoch, batch = progress["stage"], progress["epoch"], progress["batch"]
    if stage >= len(stages):
        return f"stage {stage}, but the config has {len(stages)} stage(s)"
    if epoch > stages[stage].epochs or (epoch == stages[stage].epochs and batch):
        return f"epoch {epoch} (batch {batch}) of stage {stage}, which has {stages[stage].epochs} epoch(s)"
    best, at = progress["best_metric"], progress["best_at"]
    if best is not None and not (isinstance(best, int | float) and not isinstance(best, bool) and math.isfinite(best)):
        return f"a best metric of {str(best)[:40]}"
    if not (isinstance(at, list | tuple) and len(at) == 2 and all(isinstance(v, int) for v in at)
            and (list(at) == [-1, -1] or (0 <= at[0] and 1 <= at[1] and tuple(at) <= (stage, epoch)))):
        return f"best_at {str(at)[:40]}, not an epoch trained before it"
    return None


def check_state(state: dict[str, Any], stages: list[StageConfig], where: str) -> None:
    """Refuse, in one line, a run checkpoint whose progress this config cannot reach, whose weights,
    distillation modules or optimizer state hold NaN/inf, or whose RNG state cannot be restored."""
    problem = _progress_problem(state["progress"], stages)
    if problem:
        raise PadkdError(f"{where}: its progress holds {problem}; {_DAMAGED}")
    optimizer = state["optimizer"].get("state", {})
    bad = ckpt.non_finite({"student": state["student"], "terms": state["terms"],
                           "optimizer": optimizer if isinstance(optimizer, dict) else {},
                           "meters": state.get("meters") if isinstance(state.get("meters"), dict) else {}})
    if bad is not None:
        raise PadkdError(f"{where} holds NaN/inf values ('{bad}'), so training cannot continue from it; restore "
                         "a good copy of it, or start over in another output_dir")
    saved = ckpt.rng_state()
    try:
        ckpt.set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError, OverflowError) as err:
        raise PadkdError(f"{where}: its rng state cannot be restored ({type(err).__name__}); {_DAMAGED}") from None
    finally:
        ckpt.set_rng_state(saved)


def finished_stages(progress: dict[str, Any], stages: list[StageConfig]) -> int:
    """How many stages had finished training when the checkpoint at `progress` was written."""
    stage = progress["stage"]
    return stage + (progress["epoch"] >= stages[stage].epochs)


def check_batch(batch: int, batches_per_epoch: int, where: str) -> None:
    """The checkpoint's position inside an epoch must exist in this data (a changed data.root may shrink it)."""
    if batch >= batches_per_epoch:
        raise PadkdError(f"{where}: its progress holds batch {batch} of an epoch, which here has "
                         f"{batches_per_epoch} batches (other data?); {_DAMAGED}")


def check_optimizer_state(optimizer: torch.optim.Optimizer, where: str) -> None:
    """Each tensor of the loaded optimizer state must have its parameter's shape (a wrong one would fail
    mid-training, or silently broadcast)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise PadkdError(f"{where}: its optimizer state '{key}' has shape {list(value.shape)} for a "
                                     f"parameter of shape {list(param.shape)}; {_DAMAGED}")


def load_module_state(load: Any, where: str) -> None:
    """Run `load()` (an optimizer's, a scaler's load_state_dict), turning what a damaged state raises into
    one line."""
    try:
        load()
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise PadkdError(f"{where}: its optimizer state does not fit this stage ({type(err).__name__}"
                         f"{': ' + first if first else ''}); {_DAMAGED}") from None

