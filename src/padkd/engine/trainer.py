"""The training loop: stages of epochs over a Distiller, evaluation every epoch, checkpoints,
resume (also mid-epoch), per-sample records and a final test evaluation.

One loop serves plain training (no teacher), single-term distillation and multi-stage recipes: a
stage is a fresh Distiller (new terms, e.g. a new PAD head) and a fresh `StageRun` (optimizer, scaler)
over the same student. The loop never names a task, a metric or a method: the task says how models are
called and evaluated, the distiller what is distilled.
"""

from __future__ import annotations

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

from padkd import checkpoint as ckpt
from padkd import distributed as ddp
from padkd import files, placement
from padkd.assemble import make_data, make_distiller, make_model, make_task, resolve_device
from padkd.batch import tree_leaves
from padkd.config import Config, StageConfig, dump_config
from padkd.distiller import Distiller
from padkd.engine import records, resume, rundir
from padkd.engine.cpu import resolve_precision, set_threads
from padkd.engine.evaluate import evaluate
from padkd.engine.loaders import DeviceLoader, example_batch, make_loader
from padkd.engine.logging import MetricsLog, finite_json, progress_bar, show_progress
from padkd.engine.stage import StageRun
from padkd.errors import NonFiniteLossError, PadkdError
from padkd.taps import Taps
from padkd.validate import check_components

log = logging.getLogger(__name__)

#: Epoch keys of the training sampler: stage index × this + epoch, so every (stage, epoch) has its own order.
EPOCH_KEY_STRIDE = 100_000


class Interrupted(PadkdError):
    """Training stopped on request (Ctrl-C, SIGTERM); a checkpoint was saved to resume from."""


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


@dataclass
class Progress:
    """Where a run stands: stage index, epochs completed in it, micro-batches done in the current epoch,
    optimizer steps so far, and the best validation value of the task's primary metric with its
    (stage, epoch)."""

    stage: int = 0
    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_at: list[int] = field(default_factory=lambda: [-1, -1])


@dataclass
class RunResult:
    run_dir: Path
    final: dict[str, Any]


StepCallback = Callable[["Trainer", int], None]


class _NonFiniteWatch:
    """Remembers, on the device, which loss first became non-finite and at which step: no host sync per step."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.first: Tensor | None = None
        self.step: Tensor | None = None

    def update(self, losses: dict[str, Tensor], step: int) -> None:
        self.names = list(losses)
        bad = torch.stack([~torch.isfinite(v) for v in losses.values()])
        if self.first is None or self.step is None:
            self.first = bad
            self.step = torch.where(bad.any(), step, -1)
            return
        fresh = ~self.first.any() & bad.any()
        self.step = torch.where(fresh, step, self.step)
        self.first = torch.where(self.first.any(), self.first, bad)

    def bad(self) -> tuple[str, int] | None:
        """(loss name, first bad step) once a loss was non-finite (one host sync)."""
        if self.first is None or self.step is None or not bool(self.first.any()):
            return None
        return self.names[int(self.first.float().argmax())], int(self.step)


def _shapes(tree: Any) -> str:
    """Shapes of a pytree's tensors, for messages."""
    return ", ".join(str(list(t.shape)) for t in tree_leaves(tree)[:4])


class Trainer:
    """Runs a Config end to end. `callbacks` are called after every optimizer step with the global step."""

    def __init__(self, cfg: Config, resume: bool = False, quiet: bool = False,
                 callbacks: list[StepCallback] | None = None) -> None:
        check_components(cfg)  # every registered name and option, before anything is made or written
        self.cfg = cfg
        self.resume = resume
        self.quiet = quiet
        self.callbacks = callbacks or []
        self.threads = set_threads(cfg.engine.threads)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(ddp.local_rank())
            self.device = torch.device("cuda", ddp.local_rank())
        self.rank, self.world = ddp.init_from_env(self.device)
        #: The engine settings this run trains with: `precision: auto` resolved for this device.
        self.engine = cfg.engine.model_copy(update={"precision": resolve_precision(cfg.engine.precision,
                                                                                    self.device)})
        self.main = self.rank == 0
        self.run_dir = Path(cfg.output_dir)
        self.task = make_task(cfg.task)
        self.progress = Progress()
        self._stop_requested = False
        self._lock = rundir.RunLock(self.run_dir)
        #: What this start creates (run directory, lock file): removed again if it fails before config.yaml.
        self._leave: list[Path] = []
        #: The `resume` event to record once the checkpoint's state is in place (rank 0, resume only).
        self._resume_event: dict[str, Any] | None = None

    # ------------------------------------------------------------------ set-up
    def _resume_state(self) -> dict[str, Any] | None:
        """Lock and check the run directory (rank 0, for every rank) and return the checkpoint to continue
        from (resume only), checked against the config, with `best.pt` repaired if a kill fell between
        the epoch's two writes."""
        error, source = None, None
        state: dict[str, Any] | None = None
        if self.main:
            try:
                state = self._checked_resume_state()
                source = self._resume_event["checkpoint"] if self._resume_event else None
            except PadkdError as err:
                error = str(err)
        error, source = ddp.broadcast_object((error, source))  # type: ignore[misc]
        if error:
            raise PadkdError(error)
        self._resumed_from = f"checkpoints/{source}"
        if not self.main and source is not None:
            state = ckpt.load(self.run_dir / self._resumed_from, kind="run")
        return state

    def _checked_resume_state(self) -> dict[str, Any] | None:
        """Rank 0's part of `_resume_state`; sets the `resume` event to record."""
        rundir.check(self.run_dir, self.resume)  # before the lock file is created
        self._leave = self._absent_entries()
        # A start killed before its first checkpoint leaves its lock file or config.yaml (check() refuses
        # anything else): --resume starts that run over; a directory without a trace holds nothing to resume.
        started = self.run_dir.is_dir() and any(self.run_dir.iterdir())
        self._lock.acquire()
        holds_run = rundir.check(self.run_dir, self.resume)
        if self.resume and not holds_run and not started:  # the lock file and folders made for it are removed
            raise PadkdError(f"--resume: output_dir '{self.run_dir}' holds no run to resume (no "
                             "checkpoints/last.pt or best.pt); drop --resume to start it, or set output_dir to "
                             "the run to continue")
        if self.resume and not holds_run:
            log.warning("--resume: the run in %s was stopped before its first checkpoint: starting it from the "
                        "beginning", self.run_dir)
        for folder in (self.run_dir, self.run_dir / "checkpoints", self.run_dir / "records"):
            files.remove_stale_temporaries(folder)
        path = resume.checkpoint_path(self.run_dir) if self.resume and holds_run else None
        if path is None:
            return None
        where = f"checkpoints/{path.name}"
        state = ckpt.load(path, kind="run")
        resume.check_state(state, self.cfg.stages, where)
        progress = state["progress"]
        position = (progress["stage"], progress["epoch"], progress["batch"])
        changes = rundir.resume_changes(self.run_dir, self.cfg.model_dump(mode="json"), position,
                                        resume.finished_stages(progress, self.cfg.stages))
        if path.name == "last.pt" and rundir.repair_best(self.run_dir, state):
            log.warning("best.pt was older than the best epoch last.pt names (a kill between the two "
                        "writes): repaired from last.pt")
        self._resume_event = {"event": "resume", "stage": position[0], "epoch": position[1], "batch": position[2],
                              "global_step": progress["global_step"], "checkpoint": path.name,
                              "changes": {k: {"was": a, "now": b} for k, (a, b) in changes.items()}}
        return state

    def _loader(self, split: str, train: bool) -> DeviceLoader:
        return make_loader(self.cfg, self.data, split, train=train, collate=self.task.collate, device=self.device,
                           rank=self.rank, world=self.world)

    def _build_models(self) -> tuple[nn.Module, nn.Module | None]:
        """Student and teacher on the device, in the configured memory layout, compiled in place if asked
        (in place keeps state_dict keys, so checkpoints are the same with compile on or off)."""
        cfg = self.cfg
        teacher = make_model(cfg.teacher, self.data, self.task, "teacher").to(self.device) if cfg.teacher else None
        if teacher is not None and (cfg.teacher.device is not None or cfg.teacher.precision != "fp32"):
            device = resolve_device(cfg.teacher.device) if cfg.teacher.device else self.device
            placement.place(teacher, device, cfg.teacher.precision, home=self.device)
        student = make_model(cfg.student, self.data, self.task, "student").to(self.device)
        for model in (student, teacher):
            if model is None:
                continue
            if cfg.engine.channels_last:
                model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            if cfg.engine.compile:
                model.compile(backend=cfg.engine.compile_backend)
        return student, teacher

    # ------------------------------------------------------------------ main entry
    def run(self) -> RunResult:
        """Train every stage (from the last checkpoint with `resume`) and evaluate; holds the run
        directory's lock throughout. A start that fails before config.yaml is written removes what it
        created (the lock file, the empty output_dir): a failed validation leaves nothing behind."""
        try:
            return self._run()
        except BaseException:
            if self.main and not (self.run_dir / "config.yaml").exists():
                self._lock.release()
                self._remove_created()
            raise
        finally:
            self._close_taps()
            self._lock.release()

    def _absent_entries(self) -> list[Path]:
        """The run directory and its lock file, those of them that do not exist yet (removed again by a
        start that fails before it writes config.yaml)."""
        return [p for p in (self.run_dir / rundir.LOCK_NAME, *reversed([self.run_dir, *self.run_dir.parents]))
                if not p.exists() and not p.is_symlink()]

    def _remove_created(self) -> None:
        """Remove the lock file and the folders this start created, deepest first, where they are still empty."""
        for path in sorted(self._leave, key=lambda p: len(p.parts), reverse=True):
            try:
                path.unlink() if path.name == rundir.LOCK_NAME else path.rmdir()
            except OSError:  # not empty (another process wrote there) or gone: leave it
                pass

    def _run(self) -> RunResult:
        cfg = self.cfg
        state = self._resume_state()
        seed_everything(cfg.seed, cfg.deterministic)
        self.data = make_data(cfg)
        for split in cfg.records.splits:
            if split == "val" and self.data.val is None:
                raise PadkdError(f"records.splits: data set '{cfg.data.name}' has no 'val' split; record 'test' "
                                 "or 'train'")
        student, teacher = self._build_models()
        self.student = student
        #: What the data gave the models (num_classes, in_channels): saved so an export rebuilds the student.
        self._model_kwargs = self.task.model_kwargs(self.data)
        self.task.use_teacher(teacher, self.data)
        if state is not None:
            ckpt.load_state_strict(student, state["student"], self._resumed_from)
            self.progress = Progress(**state["progress"])
        self.eval_loaders = {s: self._loader(s, train=False) for s in ("val", "test")
                             if s != "val" or self.data.val is not None}
        self.train_loader = self._loader("train", train=True)
        if len(self.train_loader) == 0:
            raise PadkdError(f"data.batch_size {cfg.data.batch_size} is larger than the training split "
                             f"({len(self.data.train)} samples per rank); lower data.batch_size")
        if state is not None:
            resume.check_batch(self.progress.batch, len(self.train_loader), self._resumed_from)
        self._check_setup(student, teacher)
        if self.main and state is None:  # written once set-up has succeeded: a failed start stays reusable
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a start that failed may have left one
            files.atomic_write_text(self.run_dir / "config.yaml", dump_config(cfg))  # never rewritten: it trained
        ddp.barrier()
        self.metrics = MetricsLog(self.run_dir, cfg.log.tensorboard, enabled=self.main)
        if state is not None:
            self.metrics.keep_until(self.progress.stage, self.progress.epoch, self.progress.batch)
        if teacher is not None and state is None:
            splits = [s for s in self.eval_loaders if s == "val" or cfg.eval_test]
            self.metrics.event({"event": "teacher", **{s: evaluate(self.task, teacher, self.eval_loaders[s])
                                                       for s in splits}})
        restore_signals = self._install_signals()
        previous: Distiller | None = None
        try:
            for index, stage in enumerate(cfg.stages):
                if index < self.progress.stage:
                    continue
                previous = self._run_stage(index, stage, student, teacher,
                                           state if index == self.progress.stage else None, previous)
                state = None
                self.progress.stage, self.progress.epoch, self.progress.batch = index + 1, 0, 0
            final = self._finish(student)
        finally:
            restore_signals()
            self.metrics.close()
        return RunResult(self.run_dir, final)

    def _check_setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Before anything is written: every stage's distiller built once (taps, weightings against their
        methods, the modules a stage trains), so a bad option of stage 2 stops the run before stage 1; the
        run's taps installed (once, before any compiled forward); one forward of each model on an example
        batch, so a shape error becomes one line naming the model."""
        student_paths: set[str] = set()
        teacher_paths: set[str] = set()
        for index, stage in enumerate(self.cfg.stages):
            if index < self.progress.stage:
                continue
            distiller = make_distiller(self.cfg, stage, student, teacher, self.task, f"stages[{index}]",
                                       steps_per_epoch=self._optimizer_steps_per_epoch())
            student_paths |= distiller.student_paths
            teacher_paths |= distiller.teacher_paths
            try:
                distiller.check_trainable(stage.trainable)
            except ValueError as err:
                raise PadkdError(f"stages[{index}].trainable: {err}") from None
            finally:
                distiller.close()
        self._taps = (Taps(student, student_paths, "student"),
                      Taps(teacher, teacher_paths, "teacher") if teacher is not None else None)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            example = example_batch(self.cfg, self.data, self.task.collate, self.train_loader)
            for where, model, ref in (("student", student, self.cfg.student), ("teacher", teacher, self.cfg.teacher)):
                if model is None or ref is None:
                    continue
                was_training = model.training
                model.eval()
                try:
                    with torch.no_grad():
                        self.task.forward(model, example, training=False)
                except (RuntimeError, ValueError, IndexError) as err:
                    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                    raise PadkdError(f"{where}.model '{ref.model.name}' cannot take this data's inputs "
                                     f"({_shapes(example.inputs)}): {first}; fix {where}.model's options") from None
                finally:
                    model.train(was_training)

    def _optimizer_steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch: a step per `accumulate` micro-batches, and one for a partial group."""
        return math.ceil(len(self.train_loader) / self.cfg.engine.accumulate)

    def _close_taps(self) -> None:
        for taps in getattr(self, "_taps", ()):
            if taps is not None:
                taps.close()

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
                   state: dict[str, Any] | None, previous: Distiller | None) -> Distiller:
        """Train one stage (from `state` when resuming) and return its distiller (the next stage's `previous`)."""
        cfg, progress = self.cfg, self.progress
        where = f"stages[{index}]"
        distiller = make_distiller(cfg, stage, student, teacher, self.task, where, taps=self._taps,
                                   steps_per_epoch=self._optimizer_steps_per_epoch()).to(self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            example = example_batch(cfg, self.data, self.task.collate, self.train_loader)
            distiller.prepare(example, self.data.info(), self.world, previous)
        try:
            run = StageRun(stage, distiller, self.engine, self.device, self.world, cfg.data.batch_size)
        except ValueError as err:
            raise PadkdError(f"{where}: {err}") from None
        if state is not None:
            run.load_state_dict(state, self._resumed_from)
            ckpt.set_rng_state(state["rng"])
            if self._resume_event is not None:  # recorded once the checkpoint's state is in place
                self.metrics.event(self._resume_event)
                self._resume_event = None
        steps_per_epoch = len(self.train_loader)
        bar = progress_bar(stage.epochs * steps_per_epoch, f"{stage.name}", self.main and not self.quiet
                           and show_progress(cfg.log.progress), initial=progress.epoch * steps_per_epoch
                           + progress.batch)
        try:
            while progress.epoch < stage.epochs:
                t0 = time.perf_counter()
                if not self._train_epoch(index, run, bar):
                    self._save(run, "last")
                    raise Interrupted(f"interrupted at stage '{stage.name}' epoch {progress.epoch + 1} batch "
                                      f"{progress.batch}; checkpoint saved to {self.run_dir}/checkpoints/last.pt; "
                                      "continue with the same command plus --resume")
                self._end_epoch(index, run, time.perf_counter() - t0, steps_per_epoch)
        finally:
            bar.close()
        if self.main and distiller.terms:  # rank 0 alone reads every sample of the split
            for split in cfg.records.splits:
                loader = make_loader(cfg, self.data, split, train=False, collate=self.task.collate,
                                     device=self.device)
                table, elements = records.collect(distiller, self.task, loader, split)
                records.write_csv(table, self.run_dir / "records" / f"{index}-{stage.name}-{split}.csv")
                for term, per_element in elements.items():
                    records.write_csv(per_element, self.run_dir / "records"
                                      / f"{index}-{stage.name}-{split}.{term}.elements.csv")
        ddp.barrier()
        distiller.close()
        return distiller

    def _train_epoch(self, index: int, run: StageRun, bar: Any) -> bool:
        """One epoch from `progress.batch`; False when stopped on request (after a finished optimizer step)."""
        cfg, progress, stage = self.cfg, self.progress, run.stage
        loader = self.train_loader
        loader.sampler.set_epoch(index * EPOCH_KEY_STRIDE + progress.epoch, start=progress.batch * cfg.data.batch_size)
        steps_per_epoch = len(loader) + progress.batch
        run.distiller.train()
        watch = _NonFiniteWatch()
        t_last, n_last = time.perf_counter(), 0
        for batch in loader:
            lr = run.set_lr(progress.epoch + progress.batch / steps_per_epoch)
            losses = run.step(batch)
            progress.batch += 1
            n_last += len(batch)
            watch.update(losses, progress.global_step + 1)
            if run.pending == 0 and self._after_optimizer_step(watch, stage, losses, lr, n_last / (
                    time.perf_counter() - t_last + 1e-9), progress.batch == steps_per_epoch):
                t_last, n_last = time.perf_counter(), 0
            bar.update(1)
            # Checked before the next batch is drawn: preparing a batch draws its augmentation from the
            # device's RNG, and the checkpoint's RNG state must not include draws for an unused batch.
            if self._stop_requested and run.pending == 0 and progress.batch < steps_per_epoch:
                self._raise_if_non_finite(watch, stage)  # never save non-finite weights
                return False
        if run.flush():
            self._after_optimizer_step(watch, stage, losses, lr, n_last / (time.perf_counter() - t_last + 1e-9), True)
        self._raise_if_non_finite(watch, stage)
        return True

    def _after_optimizer_step(self, watch: _NonFiniteWatch, stage: StageConfig, losses: dict[str, Tensor],
                              lr: float, rate: float, epoch_end: bool) -> bool:
        """Count the step, run the callbacks and, at log intervals, check for NaN and log; True if logged."""
        progress = self.progress
        progress.global_step += 1
        for callback in self.callbacks:
            callback(self, progress.global_step)
        if progress.global_step % self.cfg.log.interval != 0 and not epoch_end:
            return False
        self._raise_if_non_finite(watch, stage)
        step_losses = {f"step/{k}": float(v) for k, v in losses.items()}
        self.metrics.scalars(step_losses | {"step/lr": lr, "step/samples_per_s": rate * self.world},
                             progress.global_step)
        return True

    def _kept(self) -> str:
        return (f"the last good checkpoint is kept in {self.run_dir}/checkpoints"
                if (self.run_dir / "checkpoints" / "last.pt").exists() else "no checkpoint was written yet")

    def _advice(self) -> str:
        if not (self.run_dir / "checkpoints" / "last.pt").exists():
            return "lower the learning rate or the term's weight (and consider PAD's log_var_floor or warmup_steps)"
        stage = self.progress.stage
        return (f"continue from it with a lower learning rate: the same command plus --resume "
                f"stages.{stage}.optimizer.lr=<lower>, or lower the term's weight in a new output_dir")

    def _raise_if_non_finite(self, watch: _NonFiniteWatch, stage: StageConfig) -> None:
        found = watch.bad()
        if found is None:
            return
        name, step = found
        raise NonFiniteLossError(f"loss '{name}' became NaN/inf in stage '{stage.name}' at global step {step}; "
                                 f"{self._kept()}; {self._advice()}")

    def _improved(self, val: dict[str, float]) -> bool:
        """Whether `val` beats the best so far; never when any of its metrics is NaN or inf."""
        if not all(math.isfinite(v) for v in val.values() if isinstance(v, int | float)):
            return False
        best, value = self.progress.best_metric, val[self.task.primary_metric]
        if best is None:
            return True
        return value > best if self.task.higher_is_better else value < best

    def _end_epoch(self, index: int, run: StageRun, seconds: float, steps_per_epoch: int) -> None:
        progress, stage = self.progress, run.stage
        meters = ddp.all_reduce_sum(run.take_meters())
        steps = max(float(meters.pop("steps", torch.ones(()))), 1.0)
        train = {k: float(v) / steps for k, v in meters.items()}
        ddp.broadcast_tensors(run.distiller.synced_buffers())
        val = evaluate(self.task, self.student, self.eval_loaders["val"]) if "val" in self.eval_loaders else None
        progress.epoch += 1
        progress.batch = 0
        improved = val is not None and self._improved(val)
        if improved:
            assert val is not None
            progress.best_metric = val[self.task.primary_metric]
            progress.best_at = [index, progress.epoch]
        samples = steps_per_epoch * self.cfg.data.batch_size * self.world
        record = {"event": "epoch", "stage": index, "stage_name": stage.name, "epoch": progress.epoch,
                  "global_step": progress.global_step, "lr": run.optimizer.param_groups[0]["lr"], "train": train,
                  "val": val, "time_s": round(seconds, 3), "samples_per_s": round(samples / max(seconds, 1e-9), 1)}
        # Order matters for a kill at any moment: the event first (a resume from the previous last.pt drops
        # it and replays the epoch), then last.pt, then best.pt (a resume repairs best.pt from last.pt).
        self.metrics.event(record, step=progress.global_step)
        self._save(run, "last")
        if improved:
            self._save(run, "best")
        if not self.quiet and self.main:
            terms = " ".join(f"{k}={v:.4f}" for k, v in train.items())
            shown = f" val {self.task.summary(val)}" if val is not None else ""
            print(f"[{stage.name}] epoch {progress.epoch}/{stage.epochs} {terms}{shown}", flush=True)

    def _save(self, run: StageRun, name: str) -> None:
        """Write a checkpoint (rank 0); never one that holds NaN/inf weights or state."""
        if not self.main:
            return
        state = {"model": ckpt.model_spec(self.cfg.student.model), "model_kwargs": self._model_kwargs,
                 "student": self.student.state_dict(),
                 **run.state_dict(), "progress": vars(self.progress).copy(), "rng": ckpt.rng_state()}
        bad = ckpt.non_finite({"student": state["student"], "terms": state["terms"]})
        if bad is not None:
            raise NonFiniteLossError(
                f"the weights became NaN/inf ('{bad}') in stage '{run.stage.name}' by global step "
                f"{self.progress.global_step} although the logged losses were finite; {self._kept()}; "
                f"{self._advice()}")
        ckpt.save(self.run_dir / "checkpoints" / f"{name}.pt", "run", **state)

    def _finish(self, student: nn.Module) -> dict[str, Any]:
        progress = self.progress
        final: dict[str, Any] = {"primary_metric": self.task.primary_metric, "best_val": progress.best_metric,
                                 "best_stage_epoch": progress.best_at, "engine": {"threads": self.threads,
                                                                            "precision": self.engine.precision}}
        split = "test" if self.cfg.eval_test else "val"
        final["split"] = split
        if split in self.eval_loaders:
            final["last"] = evaluate(self.task, student, self.eval_loaders[split])
            best_path = self.run_dir / "checkpoints" / "best.pt"
            if best_path.exists():  # the student is done training: evaluate the best weights in it
                ckpt.load_state_strict(student, ckpt.load(best_path)["student"], str(best_path))
                final["best"] = evaluate(self.task, student, self.eval_loaders[split])
        self.metrics.event({"event": "final", **final})
        if self.main:
            files.atomic_write_text(self.run_dir / "final.json",
                                    json.dumps(finite_json(final), indent=2, allow_nan=False) + "\n")
        return final
