"""One stage of training: the object that owns a stage's state, and the one training step.

`StageRun` holds the stage's distiller, its DDP wrapper, the optimizer over the distiller's parameter
groups, the gradient scaler and the loss meters. `step(batch)` is the only place where autocast,
gradient accumulation, clipping and the optimizer step happen.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from padkd.batch import Batch
from padkd.checkpoint import load_state_strict
from padkd.config import EngineConfig, OptimizerConfig, SchedulerConfig, StageConfig
from padkd.distiller import Distiller
from padkd.engine import resume
from padkd.errors import PadkdError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: DDP must not broadcast buffers before every forward (a CRD memory bank would be copied from rank 0 each
#: step); the engine syncs BatchNorm statistics itself at epoch end. Newer torch names the option anew.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})


def lr_factor(s: SchedulerConfig, epoch: float, epochs: int, base_lr: float) -> float:
    """Multiplier of the base LR at fractional `epoch` (linear warm-up, then the schedule)."""
    if s.warmup_epochs > 0 and epoch < s.warmup_epochs:
        return (epoch + 1e-3) / s.warmup_epochs
    if s.name == "multistep":
        return s.gamma ** sum(epoch >= m for m in s.milestones)
    if s.name == "cosine":
        span = max(epochs - s.warmup_epochs, 1e-9)
        progress = min(max((epoch - s.warmup_epochs) / span, 0.0), 1.0)
        floor = s.min_lr / base_lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def base_lr(o: OptimizerConfig, global_batch: int | None) -> float:
    """The stage's LR before its schedule: `lr`, or `lr × global_batch / lr_per` when the config gives the
    LR per `lr_per` images (the linear scaling rule, Goyal et al. 2017)."""
    if o.lr_per is None:
        return o.lr
    if global_batch is None:
        raise ValueError("optimizer.lr_per scales the LR by the global batch size, which was not given")
    return o.lr * global_batch / o.lr_per


def build_optimizer(o: OptimizerConfig, groups: list[dict[str, Any]], lr: float | None = None) -> torch.optim.Optimizer:
    """SGD or AdamW over parameter groups that carry their own `lr_scale`; `lr` (default `o.lr`) is the base LR."""
    lr = o.lr if lr is None else lr
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=o.betas, weight_decay=o.weight_decay)


class StageRun:
    """A stage's distiller, DDP wrapper, optimizer, grad scaler and meters; `step()` trains one micro-batch.

    `batch_size` (per process) sets the global batch that an `optimizer.lr_per` scales the LR by."""

    def __init__(self, stage: StageConfig, distiller: Distiller, engine: EngineConfig, device: torch.device,
                 world: int, batch_size: int | None = None) -> None:
        self.stage = stage
        self.distiller = distiller
        self.engine = engine
        self.device = device
        groups = distiller.param_groups(stage.trainable)
        if not groups:
            raise ValueError(f"stage '{stage.name}' trains nothing: its 'trainable' list selects no student "
                             "module and every term has lr_scale 0")
        self.base_lr = base_lr(stage.optimizer, None if batch_size is None else batch_size * engine.accumulate * world)
        self.optimizer = build_optimizer(stage.optimizer, groups, self.base_lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=engine.precision == "fp16")
        self.model: nn.Module = distiller
        if world > 1:
            self.model = DistributedDataParallel(
                distiller, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=distiller.find_unused_parameters, **_NO_BUFFER_SYNC)
        self.meters: dict[str, Tensor] = {}
        self.pending = 0  # micro-batches accumulated since the last optimizer step
        self.steps = 0  # optimizer steps completed in this stage: the clock of the terms' ramps

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"terms": self.distiller.terms_state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "meters": {k: v.detach().cpu() for k, v in self.meters.items()},
                "stage_steps": self.steps}

    def load_state_dict(self, state: dict[str, Any], what: str) -> None:
        """Continue from a run checkpoint's state; a state that does not fit this stage is one line."""
        if not all(isinstance(v, torch.Tensor) for v in state["terms"].values()):
            raise PadkdError(f"{what}: its distillation terms hold non-tensor entries; the file is damaged")
        load_state_strict(self.distiller.terms, state["terms"], f"{what} (distillation terms)")

        def load() -> None:
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.meters = {k: v.to(self.device) for k, v in state.get("meters", {}).items()}
            self.steps = int(state["stage_steps"])

        resume.load_module_state(load, what)
        resume.check_optimizer_state(self.optimizer, what)

    # ------------------------------------------------------------------ training
    def set_lr(self, epoch: float) -> float:
        """Set every group's LR for fractional `epoch` of the stage; returns the base LR."""
        lr = self.base_lr * lr_factor(self.stage.scheduler, epoch, self.stage.epochs, self.base_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        return lr

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = _DTYPES.get(self.engine.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def step(self, batch: Batch) -> dict[str, Tensor]:
        """Forward and backward one micro-batch; every `accumulate` micro-batches, clip and step the
        optimizer. Returns the detached losses (and "total") on the device; no host synchronisation."""
        self.pending += 1
        last = self.pending == self.engine.accumulate
        sync = contextlib.nullcontext() if last or not isinstance(self.model, DistributedDataParallel) \
            else self.model.no_sync()
        with sync:
            with self._autocast():
                out = self.model(batch, self.steps)
            total = out.total
            self.scaler.scale(total / self.engine.accumulate).backward()
        if last:
            self._optimizer_step()
        losses = {k: v.detach().float() for k, v in out.losses.items()} | {"total": total.detach().float()}
        for key, value in losses.items():
            self.meters[key] = self.meters.get(key, torch.zeros((), device=self.device)) + value
        self.meters["steps"] = self.meters.get("steps", torch.zeros((), device=self.device)) + 1
        return losses

    def flush(self) -> bool:
        """Step on the micro-batches left at the end of an epoch (their gradients rescaled to a full
        group's mean); True when an optimizer step happened."""
        if self.pending == 0:
            return False
        self._optimizer_step(scale=self.engine.accumulate / self.pending)
        return True

    def _optimizer_step(self, scale: float = 1.0) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if scale != 1.0 or self.engine.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            if scale != 1.0:
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)
            if self.engine.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.engine.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        self.steps += 1

    def take_meters(self) -> dict[str, Tensor]:
        """The epoch's summed losses and step count, cleared for the next epoch."""
        meters, self.meters = self.meters, {}
        return meters
