"""The training loop: stages of epochs over a Distiller, evaluation every epoch, checkpoints,
resume (also mid-epoch), per-sample records and a final test evaluation.

One loop serves plain training (no teacher), single-term distillation and multi-stage recipes:
a stage is a fresh Distiller (new terms, e.g. a new PAD head) + a fresh optimizer over the same student.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from padkd.build import build_data, build_distiller, build_model, resolve_device
from padkd.config import Config, SchedulerConfig, StageConfig, dump_config
from padkd.data import DataSplits
from padkd.distiller import Distiller
from padkd.engine import checkpoint as ckpt
from padkd.engine import distributed as ddp
from padkd.engine import records
from padkd.engine.logging import MetricsLog, progress_bar, show_progress
from padkd.errors import NonFiniteLossError, PadkdError
from padkd.methods.base import Batch
from padkd.tasks import Classification

log = logging.getLogger(__name__)


class Interrupted(PadkdError):
    """Training stopped on request (Ctrl-C, SIGTERM); a checkpoint was saved to resume from."""


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


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


def build_optimizer(stage: StageConfig, distiller: Distiller) -> torch.optim.Optimizer:
    """One parameter group for the student, one per term (its modules at `lr × term.lr_scale`)."""
    o = stage.optimizer
    groups = [{"params": [p for p in distiller.student.parameters() if p.requires_grad], "lr_scale": 1.0}]
    for term, term_cfg in zip(distiller.terms, stage.terms, strict=True):
        params = [p for p in term.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr_scale": term_cfg.lr_scale})
    for group in groups:
        group["lr"] = o.lr * group["lr_scale"]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


@dataclass
class Progress:
    """Where a run stands: stage index, epochs completed in it, batches done in the current epoch."""

    stage: int = 0
    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    best_metric: float = -math.inf
    best_at: list[int] = field(default_factory=lambda: [-1, -1])


@dataclass
class RunResult:
    run_dir: Path
    final: dict[str, Any]


StepCallback = Callable[["Trainer", int], None]


class Trainer:
    """Runs a Config end to end. `callbacks` are called after every optimizer step with the global step."""

    def __init__(self, cfg: Config, resume: bool = False, quiet: bool = False,
                 callbacks: list[StepCallback] | None = None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.quiet = quiet
        self.callbacks = callbacks or []
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(ddp.local_rank())
            self.device = torch.device("cuda", ddp.local_rank())
        self.rank, self.world = ddp.init_from_env(self.device)
        self.main = self.rank == 0
        self.run_dir = Path(cfg.output_dir)
        self.task = Classification(cfg.task.label_smoothing)
        self._stop_requested = False

    # ------------------------------------------------------------------ set-up
    def _check_run_dir(self) -> None:
        """Refuse an output_dir that holds another run (or, on resume, a run of another config)."""
        config_path = self.run_dir / "config.yaml"
        if config_path.exists():
            if not self.resume:
                raise PadkdError(f"output_dir '{self.run_dir}' already holds a run; pass --resume to continue "
                                 "it, or set another output_dir (e.g. output_dir=runs/new)")
            if config_path.read_text() != dump_config(self.cfg):
                raise PadkdError(f"output_dir '{self.run_dir}' holds a run with a different config; resume needs "
                                 "the same config and overrides, or set another output_dir")
        elif self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise PadkdError(f"output_dir '{self.run_dir}' is not empty and holds no padkd run; "
                             "choose an empty or new directory")

    def _resume_state(self) -> dict[str, Any] | None:
        """The checkpoint to continue from (resume only); rank 0 checks the directory for every rank."""
        error = None
        if self.main:
            try:
                self._check_run_dir()
            except PadkdError as err:
                error = str(err)
        error = ddp.broadcast_object(error)
        if error:
            raise PadkdError(error)
        last = self.run_dir / "checkpoints" / "last.pt"
        if self.resume and last.exists():
            return ckpt.load(last)
        if self.resume and self.main:
            log.info("no checkpoint in %s yet: starting from the beginning", self.run_dir)
        return None

    def _plain_loader(self, dataset: Any, batch_size: int) -> DataLoader:
        """Unsharded, unshuffled loader with a private generator (never draws on the global RNG)."""
        return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    def loader(self, data: DataSplits, split: str, train: bool) -> DataLoader:
        """Training loader (seeded, sharded, resumable sampler) or evaluation loader (exact shards)."""
        dataset = data.split(split)
        dc = self.cfg.data
        if train:
            sampler: Any = ddp.EpochSampler(len(dataset), shuffle=True, seed=self.cfg.seed, rank=self.rank,
                                            world=self.world)
            batch_size = dc.batch_size
        else:
            sampler = ddp.ShardSampler(len(dataset), self.rank, self.world)
            batch_size = dc.eval_batch_size or dc.batch_size
        # A private generator: starting an epoch's iterator must not draw on the global RNG, or a run
        # resumed mid-epoch (one more iterator) would continue with another random stream.
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
                          num_workers=dc.num_workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=dc.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    def _batch(self, items: tuple[Tensor, Tensor, Tensor]) -> Batch:
        x, y, idx = items
        nb = self.device.type == "cuda"
        return Batch(x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb),
                     idx.to(self.device, non_blocking=nb))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Top-1/top-5/loss of `model` on a loader, summed over ranks."""
        was_training = model.training
        model.eval()
        sums: dict[str, Tensor] = {}
        for items in loader:
            batch = self._batch(items)
            for key, value in self.task.batch_counts(model(batch.inputs), batch).items():
                sums[key] = sums.get(key, 0) + value
        model.train(was_training)
        return self.task.finalize(ddp.all_reduce_sum(sums))

    # ------------------------------------------------------------------ main entry
    def run(self) -> RunResult:
        cfg = self.cfg
        state = self._resume_state()
        seed_everything(cfg.seed, cfg.deterministic)
        data = build_data(cfg)
        teacher = build_model(cfg.teacher, data, "teacher").to(self.device) if cfg.teacher else None
        student = build_model(cfg.student, data, "student").to(self.device)
        progress = Progress()
        if state is not None:
            ckpt.load_state_strict(student, state["student"], "checkpoints/last.pt")
            progress = Progress(**state["progress"])
        if self.main:  # written once set-up has succeeded, so a failed start leaves the directory reusable
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        ddp.barrier()
        metrics = MetricsLog(self.run_dir, cfg.log.tensorboard, enabled=self.main)
        if state is not None:
            metrics.keep_until(progress.stage, progress.epoch)
        loaders = {s: self.loader(data, s, train=False) for s in ("val", "test")}
        train_loader = self.loader(data, "train", train=True)
        if len(train_loader) == 0:
            raise PadkdError(f"data.batch_size {cfg.data.batch_size} is larger than the training split "
                             f"({len(data.train)} samples per rank); lower data.batch_size")
        if teacher is not None and state is None:
            t_metrics = {s: self.evaluate(teacher, loaders[s]) for s in ("val", "test") if s == "val" or cfg.eval_test}
            metrics.event({"event": "teacher", **t_metrics})
        restore_signals = self._install_signals()
        carried: dict[str, tuple[str, dict[str, Tensor]]] = {}  # term name → (signature, method state)
        try:
            for index, stage in enumerate(cfg.stages):
                if index < progress.stage:
                    continue
                carry = {name: carried[name][1] for name, term in zip(cfg.term_names(stage), stage.terms, strict=True)
                         if term.carry and name in carried and carried[name][0] == term.signature()}
                distiller = self._run_stage(index, stage, student, teacher, data, train_loader, loaders,
                                            progress, metrics, state if index == progress.stage else None, carry)
                carried = {t.name: (term.signature(), t.method.state_dict())
                           for term, t in zip(stage.terms, distiller.terms, strict=True)}
                state = None
                progress.stage, progress.epoch, progress.batch = index + 1, 0, 0
            final = self._finish(student, loaders, progress, metrics)
        finally:
            restore_signals()
            metrics.close()
        return RunResult(self.run_dir, final)

    def _install_signals(self) -> Callable[[], None]:
        """Ctrl-C/SIGTERM request a stop at the next step boundary; returns the handlers' restorer.
        Off the main thread (where Python allows no handlers) nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_requested:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self._stop_requested = True

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, request_stop)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def request_stop(self) -> None:
        """Ask the loop to save a checkpoint and stop after the current step (what Ctrl-C does)."""
        self._stop_requested = True

    # ------------------------------------------------------------------ one stage
    def _run_stage(self, index: int, stage: StageConfig, student: nn.Module, teacher: nn.Module | None,
                   data: DataSplits, train_loader: DataLoader, loaders: dict[str, DataLoader],
                   progress: Progress, metrics: MetricsLog, state: dict[str, Any] | None,
                   carry: dict[str, dict[str, Tensor]]) -> Distiller:
        """Train one stage (from `state` when resuming) and return its distiller."""
        cfg = self.cfg
        where = f"stages[{index}]"
        distiller = build_distiller(cfg, stage, student, teacher, self.task, where).to(self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            example = next(iter(self._plain_loader(data.train, cfg.data.batch_size)))
            distiller.prepare(self._batch(example), carry)
        optimizer = build_optimizer(stage, distiller)
        meters: dict[str, Tensor] = {}
        if state is not None:
            ckpt.load_state_strict(distiller.terms, state["aux"], "checkpoints/last.pt (distillation terms)")
            optimizer.load_state_dict(state["optimizer"])
            meters = {k: v.to(self.device) for k, v in state.get("meters", {}).items()}
            ckpt.set_rng_state(state["rng"])
        model: nn.Module = distiller
        if self.world > 1:
            model = DistributedDataParallel(distiller, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None, find_unused_parameters=False)
        steps_per_epoch = len(train_loader)
        bar = progress_bar(stage.epochs * steps_per_epoch, f"{stage.name}", self.main and not self.quiet
                           and show_progress(cfg.log.progress), initial=progress.epoch * steps_per_epoch
                           + progress.batch)
        try:
            while progress.epoch < stage.epochs:
                t0 = time.perf_counter()
                done = self._train_epoch(index, stage, model, distiller, optimizer, train_loader, progress, meters,
                                         metrics, bar)
                if not done:
                    self._save(distiller, optimizer, progress, meters, "last")
                    raise Interrupted(f"interrupted at stage '{stage.name}' epoch {progress.epoch + 1} batch "
                                      f"{progress.batch}; checkpoint saved to {self.run_dir}/checkpoints/last.pt; "
                                      "continue with the same command plus --resume")
                self._end_epoch(index, stage, student, distiller, optimizer, loaders, progress, meters, metrics,
                                time.perf_counter() - t0, steps_per_epoch)
                meters = {}
        finally:
            bar.close()
        if self.main and distiller.terms:  # rank 0 alone reads every sample of the split
            for split in cfg.records.splits:
                loader = self._plain_loader(data.split(split), cfg.data.eval_batch_size or cfg.data.batch_size)
                table = records.collect(distiller, loader, self.device)
                records.write_csv(table, self.run_dir / "records" / f"{index}-{stage.name}-{split}.csv")
        ddp.barrier()
        return distiller

    def _train_epoch(self, index: int, stage: StageConfig, model: nn.Module, distiller: Distiller,
                     optimizer: torch.optim.Optimizer, loader: DataLoader, progress: Progress,
                     meters: dict[str, Tensor], metrics: MetricsLog, bar: Any) -> bool:
        """One epoch from `progress.batch`; False when stopped on request (after a finished step)."""
        cfg = self.cfg
        sampler = loader.sampler
        assert isinstance(sampler, ddp.EpochSampler)
        sampler.set_epoch(index * 100_000 + progress.epoch, start=progress.batch * cfg.data.batch_size)
        steps_per_epoch = len(loader) + progress.batch
        distiller.train()
        first_bad: Tensor | None = None
        names: list[str] = []
        t_last, n_last = time.perf_counter(), 0
        for items in loader:
            if self._stop_requested:
                self._check_finite(first_bad, names, stage, progress)  # never save non-finite weights
                return False
            epoch_f = progress.epoch + progress.batch / steps_per_epoch
            lr = stage.optimizer.lr * lr_factor(stage.scheduler, epoch_f, stage.epochs, stage.optimizer.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            batch = self._batch(items)
            out = model(batch)
            total = out.total
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            progress.batch += 1
            progress.global_step += 1
            n_last += len(batch)
            losses = {k: v.detach().float() for k, v in out.losses.items()} | {"total": total.detach().float()}
            names = list(losses)
            # The first step with a non-finite loss, kept on the device: no host sync per step.
            bad = torch.stack([~torch.isfinite(v) for v in losses.values()])
            first_bad = bad if first_bad is None else torch.where(first_bad.any(), first_bad, bad)
            for key, value in losses.items():
                meters[key] = meters.get(key, torch.zeros((), device=self.device)) + value
            meters["steps"] = meters.get("steps", torch.zeros((), device=self.device)) + 1
            for callback in self.callbacks:
                callback(self, progress.global_step)
            if progress.global_step % cfg.log.interval == 0 or progress.batch == steps_per_epoch:
                self._check_finite(first_bad, names, stage, progress)
                now = time.perf_counter()
                rate = n_last / max(now - t_last, 1e-9) * self.world
                t_last, n_last = now, 0
                step_losses = {f"step/{k}": float(v) for k, v in losses.items()}
                metrics.scalars(step_losses | {"step/lr": lr, "step/samples_per_s": rate}, progress.global_step)
                bar.set_postfix(loss=f"{float(losses['total']):.4f}", lr=f"{lr:.3g}", samples_s=f"{rate:.0f}")
            bar.update(1)
        return True

    def _check_finite(self, first_bad: Tensor | None, names: list[str], stage: StageConfig,
                      progress: Progress) -> None:
        if first_bad is not None and bool(first_bad.any()):
            term = names[int(first_bad.float().argmax())]
            raise NonFiniteLossError(
                f"loss '{term}' became NaN/inf in stage '{stage.name}' by global step {progress.global_step}; "
                f"the last good checkpoint is kept in {self.run_dir}/checkpoints; lower the learning rate "
                f"or the term's weight (and consider PAD's log_var_floor or warmup_steps)"
            )

    def _end_epoch(self, index: int, stage: StageConfig, student: nn.Module, distiller: Distiller,
                   optimizer: torch.optim.Optimizer, loaders: dict[str, DataLoader], progress: Progress,
                   meters: dict[str, Tensor], metrics: MetricsLog, seconds: float, steps_per_epoch: int) -> None:
        meters = ddp.all_reduce_sum(meters)
        steps = max(float(meters.pop("steps", torch.ones(()))), 1.0)
        train = {k: float(v) / steps for k, v in meters.items()}
        ddp.broadcast_buffers(distiller)
        val = self.evaluate(student, loaders["val"])
        progress.epoch += 1
        progress.batch = 0
        improved = val[self.task.primary_metric] > progress.best_metric
        if improved:
            progress.best_metric = val[self.task.primary_metric]
            progress.best_at = [index, progress.epoch]
        self._save(distiller, optimizer, progress, {}, "last")
        if improved:
            self._save(distiller, optimizer, progress, {}, "best")
        samples = steps_per_epoch * self.cfg.data.batch_size * self.world
        record = {"event": "epoch", "stage": index, "stage_name": stage.name, "epoch": progress.epoch,
                  "global_step": progress.global_step,
                  "lr": optimizer.param_groups[0]["lr"], "train": train, "val": val,
                  "time_s": round(seconds, 3), "samples_per_s": round(samples / max(seconds, 1e-9), 1)}
        metrics.event(record, step=progress.global_step)
        if not self.quiet and self.main:
            terms = " ".join(f"{k}={v:.4f}" for k, v in train.items())
            print(f"[{stage.name}] epoch {progress.epoch}/{stage.epochs} {terms} val_top1={val['top1']:.2f}",
                  flush=True)

    def _save(self, distiller: Distiller, optimizer: torch.optim.Optimizer, progress: Progress,
              meters: dict[str, Tensor], name: str) -> None:
        if not self.main:
            return
        state = {
            "format": ckpt.FORMAT,
            "version": ckpt.VERSION,
            "kind": "run",
            "model": ckpt.model_spec(self.cfg.student.model),
            "student": distiller.student.state_dict(),
            "aux": distiller.aux_state_dict(),
            "optimizer": optimizer.state_dict(),
            "progress": vars(progress).copy(),
            "meters": {k: v.detach().cpu() for k, v in meters.items()},
            "rng": ckpt.rng_state(),
        }
        ckpt.atomic_save(state, self.run_dir / "checkpoints" / f"{name}.pt")

    def _finish(self, student: nn.Module, loaders: dict[str, DataLoader], progress: Progress,
                metrics: MetricsLog) -> dict[str, Any]:
        final: dict[str, Any] = {"best_stage_epoch": progress.best_at, "best_val_top1": progress.best_metric}
        split = "test" if self.cfg.eval_test else "val"
        final["split"] = split
        final["last"] = self.evaluate(student, loaders[split])
        best_path = self.run_dir / "checkpoints" / "best.pt"
        if best_path.exists():
            best = copy.deepcopy(student)  # same architecture; weights replaced below
            ckpt.load_state_strict(best, ckpt.load(best_path)["student"], str(best_path))
            final["best"] = self.evaluate(best, loaders[split])
        metrics.event({"event": "final", **final})
        if self.main:
            (self.run_dir / "final.json").write_text(json.dumps(final, indent=2) + "\n")
        return final
