"""Distiller: owns teacher and student, taps their features and returns named losses.

The teacher is frozen here and only here: its parameters never require grad, it runs in eval mode
and under `no_grad` (train-mode BN is an explicit, logged option). Each term pairs a method (what
is matched) with a weighting (how samples count); the training step only sees a dict of losses.
How the models are called is the task's business (`Task.forward`, `Task.teacher_forward`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from padkd import placement
from padkd.batch import Batch
from padkd.context import BuildContext, DataInfo, Features, StageClock
from padkd.discrepancy import Discrepancy, WeightingInputs
from padkd.errors import PadkdError, did_you_mean
from padkd.methods.base import Method
from padkd.taps import OUTPUT, Taps, default_embedding
from padkd.tasks.base import Task
from padkd.weightings import Uniform, Weighting

log = logging.getLogger(__name__)

#: A term's `embedding` that means: the student's features after the method's connector
#: (`Method.connector_output`), not a tapped module (the MNIST probe's PAD head reads its connector output).
CONNECTOR = "connector"


class Term(nn.Module):
    """One distillation term: `weight · ramp · weighting(method(student[tap], teacher[tap]))`.

    `weight` defaults to the method's `default_weight`. `carry`: start the method's modules (a
    connector) from the previous stage's term of the same name and `signature` (every tensor the previous
    state holds is loaded; modules new in this stage keep their fresh initialisation). `lr_scale`
    multiplies the LR of the term's modules (0 freezes them).

    The warm-up ramp is the same for every term and counts optimizer steps k of the stage: the term is
    multiplied by `(min(k, N) + 1) / (N + 1)`. N is `warmup_steps`, or `warmup_epochs` converted with the
    stage's epoch length; with neither, the longer of the method's default (DKD: 20 epochs) and the
    weighting's (PAD: 100 steps).
    """

    def __init__(
        self,
        name: str,
        method: Method,
        weighting: Weighting | None = None,
        student: str | list[str] = OUTPUT,
        teacher: str | list[str] = OUTPUT,
        weight: float | None = None,
        embedding: str | None = None,
        carry: bool = True,
        lr_scale: float = 1.0,
        warmup_epochs: float | None = None,
        signature: str | None = None,
        warmup_steps: int | None = None,
    ) -> None:
        super().__init__()
        if lr_scale < 0:
            raise ValueError(f"term '{name}': lr_scale must be >= 0, got {lr_scale}")
        if warmup_steps is not None and warmup_epochs is not None:
            raise ValueError(f"term '{name}': give warmup_steps or warmup_epochs, not both")
        self.name = name
        self.method = method
        self.weighting = weighting if weighting is not None else Uniform()
        self.weighting.check(method)
        self.student_tap = student
        self.teacher_tap = teacher
        self.weight = method.default_weight if weight is None else weight
        self.embedding_tap = embedding
        self.carry = carry
        self.lr_scale = lr_scale
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = warmup_steps
        self.signature = signature or json.dumps([type(method).__qualname__, student, teacher])

    def student_paths(self) -> list[str]:
        return [self.student_tap] if isinstance(self.student_tap, str) else list(self.student_tap)

    def teacher_paths(self) -> list[str]:
        return [self.teacher_tap] if isinstance(self.teacher_tap, str) else list(self.teacher_tap)

    def ramp_steps(self, clock: StageClock) -> int:
        """N, the optimizer steps over which this term ramps in (see the class docstring)."""
        what = f"term '{self.name}': warmup_epochs"
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.warmup_epochs is not None:
            return clock.steps(self.warmup_epochs, what)
        return max(clock.steps(self.method.warmup_epochs, what), self.weighting.warmup_steps)

    def ramped(self, loss: Tensor, step: int, steps: int) -> Tensor:
        """`loss` times the ramp at optimizer step `step` of a ramp over `steps` steps."""
        return loss * (min(step, steps) + 1) / (steps + 1) if steps > 0 else loss


def carry_state(method: Method, previous: dict[str, Tensor], term: str) -> None:
    """Load every tensor of the previous stage's method state into `method` (shapes must agree);
    tensors the previous stage did not have keep their fresh values."""
    own = method.state_dict()
    clash = [k for k in previous if k in own and own[k].shape != previous[k].shape]
    if clash or not set(previous) <= set(own):
        detail = f"shape of {clash[0]}" if clash else f"no {sorted(set(previous) - set(own))[0]}"
        raise PadkdError(f"term '{term}': cannot carry the previous stage's modules ({detail}); "
                         "set carry: false for this term")
    method.load_state_dict(own | previous)


def _gather(values: dict[str, Any], tap: str | list[str]) -> Features:
    return values[tap] if isinstance(tap, str) else [values[p] for p in tap]


@dataclass
class DistillOutput:
    """A forward's result: student/teacher outputs, named (weighted) losses and per-term records."""

    student: Any
    teacher: Any | None
    losses: dict[str, Tensor]
    records: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    #: Per term, per-element quantities `[B, E]` (the discrepancy; PAD's log σ²) of methods whose
    #: elements have a fixed meaning (feature dimensions), which records average over samples.
    element_records: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    #: Per term with a masked `[B, E]` discrepancy (tokens of padded sequences): its values, its mask and the
    #: weighting's per-element columns, for the task's per-element table (`Task.element_rows`).
    masked_elements: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        """The loss to back-propagate: the sum of the named losses (each already weighted), in fp32."""
        return torch.stack([v.float() for v in self.losses.values()]).sum()


class Distiller(nn.Module):
    """Teacher + student + terms (+ the task's loss) → named losses.

    Call `prepare(batch, data)` once before building the optimizer: it runs an example batch to
    create the terms' shape-dependent modules (connectors, PAD heads), carries modules over from the
    previous stage's distiller, and runs PAD's data-dependent initialisation. Taps are installed here
    once and removed by `close()`, unless `taps` (student's, teacher's) are given: the trainer installs
    one pair for the whole run, before any compiled forward, because compiled code does not see hooks
    added later (dynamo does not guard on submodule hooks).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        terms: list[Term] | None = None,
        task: Task | None = None,
        task_weight: float = 1.0,
        embedding: str = "auto",
        teacher_train_bn: bool = False,
        student_mode: Literal["train", "eval"] = "train",
        taps: tuple[Taps, Taps | None] | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        terms = terms or []
        if terms and teacher is None:
            raise ValueError("distillation terms need a teacher")
        names = [t.name for t in terms]
        if len(set(names)) != len(names) or "task" in names:
            raise ValueError(f"term names must be unique and not 'task', got {names}")
        self.student = student
        # Kept out of the module tree: never in the optimizer, DDP or the distiller's state_dict.
        self._teacher = [teacher] if teacher is not None else []
        self.terms = nn.ModuleList(terms)
        #: None: models are called as `model(batch.inputs)` and there is no task loss.
        self.task = task
        self._caller = task if task is not None else Task()
        self.task_weight = task_weight
        self.teacher_train_bn = teacher_train_bn
        self.student_mode = student_mode
        for t in terms:  # a weighting that reads logits or labels needs a task that has them
            try:
                t.weighting.check_inputs(self._caller.weighting_inputs, type(self._caller).__name__)
            except ValueError as err:
                raise PadkdError(f"term '{t.name}': {err}") from None
        #: The task fields some weighting reads (none: no WeightingInputs beyond index and split are made).
        self._weighting_inputs = frozenset().union(*(t.weighting.needs for t in terms))
        #: Where each PAD-like weighting reads the student embedding (term name → tap path).
        self.embedding_taps = {
            t.name: t.embedding_tap or (default_embedding(student) if embedding == "auto" else embedding)
            for t in terms if t.weighting.needs_embedding}
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
            self._teacher_bn = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            self._bn_tracking = [m.track_running_stats for m in self._teacher_bn]
            if teacher_train_bn:
                log.warning("teacher BatchNorm runs in train mode (teacher_train_bn=True): its batch "
                            "statistics are used, its running statistics are not updated")
        #: The tap paths this distiller reads on each model (the student's include what the task's teacher
        #: forward reads from it; a PAD head on a connector's output reads no tap).
        self.student_paths = {p for t in terms for p in t.student_paths()} | (
            set(self.embedding_taps.values()) - {CONNECTOR})
        if teacher is not None and terms:
            self.student_paths |= set(self._caller.student_taps)
        self.teacher_paths = {p for t in terms for p in t.teacher_paths()}
        self._owns_taps = taps is None
        if taps is None:
            taps = (Taps(student, self.student_paths, "student"),
                    Taps(teacher, self.teacher_paths, "teacher") if teacher is not None and terms else None)
        elif not self.student_paths <= set(taps[0].paths) | {OUTPUT} or (
                taps[1] is not None and not self.teacher_paths <= set(taps[1].paths) | {OUTPUT}):
            raise ValueError("the taps given to the Distiller do not hold every path its terms read")
        self._student_taps, self._teacher_taps = taps[0], taps[1] if terms else None
        self._prepared = not terms
        #: The stage's clock: the trainer passes the optimizer step to `forward`; without it, each training
        #: forward counts as one step (a loop of one's own that steps the optimizer after every batch).
        self.clock = StageClock(steps_per_epoch=steps_per_epoch)
        try:
            self._ramps = {t.name: t.ramp_steps(self.clock) for t in terms}
        except ValueError as err:
            raise PadkdError(str(err)) from None

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Move/cast the teacher with the distiller although it is kept out of the module tree."""
        super()._apply(fn, recurse)
        if self.teacher is not None and not placement.is_placed(self.teacher):  # a placed one stays put
            self.teacher._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.student.train(mode and self.student_mode == "train")
        if self.teacher is not None:
            self.teacher.train(False)
            if self.teacher_train_bn:
                # Train mode with tracking off: batch statistics, running statistics untouched.
                for m, tracking in zip(self._teacher_bn, self._bn_tracking, strict=True):
                    m.train(mode)
                    m.track_running_stats = tracking and not mode
        return self

    def close(self) -> None:
        """Remove the hooks of the taps this distiller installed itself (the stage is over)."""
        if self._owns_taps:
            self._student_taps.close()
            if self._teacher_taps is not None:
                self._teacher_taps.close()

    def _features(self, batch: Batch) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Tapped values of the student and the teacher (None when no term reads the teacher).

        The teacher runs first unless its forward reads student taps: its short-lived activations are then
        freed before the student's saved ones exist, which lowers peak memory and, on CPU, keeps glibc
        from returning the freed pages to the OS and faulting them back in every step (docs/speed.md)."""
        runs_teacher = self._teacher_taps is not None
        teacher_first = runs_teacher and not self._caller.student_taps
        t_values = self._teacher_values(batch, {}) if teacher_first else None
        with self._student_taps.capture():
            s_out = self._caller.forward(self.student, batch, training=self.training)
        s_values = self._student_taps.values(s_out)
        if runs_teacher and not teacher_first:
            t_values = self._teacher_values(batch, s_values)
        return s_values, t_values

    def _teacher_values(self, batch: Batch, s_values: dict[str, Any]) -> dict[str, Any]:
        assert self._teacher_taps is not None and self.teacher is not None
        with torch.no_grad(), self._teacher_taps.capture():
            t_out = self._caller.teacher_forward(self.teacher, batch, s_values)
        return placement.home(self._teacher_taps.values(t_out), self.teacher)

    @torch.no_grad()
    def prepare(self, batch: Batch, data: DataInfo | None = None, world_size: int = 1,
                previous: Distiller | None = None) -> None:
        """Build every term's modules from an example batch (idempotent), in eval mode (no state changes).

        `previous`: the last stage's distiller; terms with `carry` load the method state of its term of
        the same name and signature before the weightings see their first discrepancies."""
        if self._prepared:
            return
        data = data or DataInfo(n_train=len(batch))
        carried = {t.name: t for t in previous.terms} if previous is not None else {}
        device = next(iter(self.student.parameters()), torch.empty(0)).device
        was_training = self.training
        self.train(False)
        try:
            s_values, t_values = self._features(batch)
            assert t_values is not None
            for term in self.terms:
                s, t = _gather(s_values, term.student_tap), _gather(t_values, term.teacher_tap)
                ctx = BuildContext(student=s, teacher=t, batch=batch, data=data, world_size=world_size,
                                   student_model=self.student, teacher_model=self.teacher, clock=self.clock)
                try:
                    term.method.build(ctx)
                except ValueError as err:
                    raise PadkdError(f"term '{term.name}': {err}") from None
                term.method.to(device)
                source = carried.get(term.name)
                if term.carry and source is not None and source.signature == term.signature:
                    carry_state(term.method, source.method.state_dict(), term.name)
                d = Discrepancy.of(term.method(s, t, batch))
                term.weighting.build(d, self._embedding(term, s_values, s), ctx)
                term.weighting.to(device)
        finally:
            self.train(was_training)
        self._prepared = True

    def _embedding(self, term: Term, s_values: dict[str, Any], student: Features) -> Tensor | None:
        """What the term's learned weighting reads: a tapped student value, or the method's connector output."""
        tap = self.embedding_taps.get(term.name)
        if tap != CONNECTOR:
            return s_values[tap] if tap is not None else None
        out = term.method.connector_output(student)
        if out is None:
            raise PadkdError(f"term '{term.name}': embedding '{CONNECTOR}' reads the student's features after the "
                             f"method's connector, but method '{type(term.method).__name__}' has none; tap a "
                             "student module instead (e.g. embedding: fc:in)")
        return out

    def _inputs(self, batch: Batch, s_values: dict[str, Any], t_values: dict[str, Any], split: str) -> WeightingInputs:
        """The detached task outputs the terms' weightings read (only the fields some weighting needs)."""
        fields = {"student_logits": lambda: s_values[OUTPUT], "teacher_logits": lambda: t_values[OUTPUT],
                  "targets": lambda: batch.targets}
        taken = {name: fields[name]().detach() for name in self._weighting_inputs}
        return WeightingInputs(index=batch.index, split=split, **taken)

    def forward(self, batch: Batch, step: int | None = None, split: str = "train") -> DistillOutput:
        """Losses on `batch`. `step`: the optimizer steps completed in the stage, which drive the terms'
        warm-up ramps (with gradient accumulation, several forwards share one step); None: this distiller
        counts one step per training forward. `split`: where `batch` comes from (records of other splits),
        for weightings that remember training samples by index."""
        if not self._prepared:
            raise RuntimeError("Distiller.prepare(batch) must run once before the first forward")
        if step is not None:
            self.clock.step = step
        s_values, t_values = self._features(batch)
        losses: dict[str, Tensor] = {}
        records: dict[str, dict[str, Tensor]] = {}
        elements: dict[str, dict[str, Tensor]] = {}
        masked: dict[str, dict[str, Tensor]] = {}
        # A zero-weighted task loss (an init stage) is not computed: 0 × an overflowing loss would be NaN.
        if self.task is not None and (self.task_weight != 0 or not self.terms):
            losses["task"] = self.task_weight * self.task.loss(s_values[OUTPUT], batch)
        inputs = self._inputs(batch, s_values, t_values, split) if self.terms and t_values is not None else None
        for term in self.terms:
            assert t_values is not None
            s, t = _gather(s_values, term.student_tap), _gather(t_values, term.teacher_tap)
            d = Discrepancy.of(term.method(s, t, batch))
            embedding = self._embedding(term, s_values, s)
            weighting = term.weighting
            result = (weighting(d, embedding, inputs) if weighting.reads_inputs or weighting.needs
                      else weighting(d, embedding))
            loss = result.loss if d.unweighted is None else result.loss + d.unweighted.float()
            losses[term.name] = term.weight * term.ramped(loss, self.clock.step, self._ramps[term.name])
            records[term.name] = {"discrepancy": d.reduce_elements().detach().float(),
                                  "weight": result.weight.detach()} | result.columns
            if term.method.elements == "fixed" and d.elements > 1 and d.mask is None:
                elements[term.name] = {"discrepancy": d.value.detach().float()} | result.element_columns
            elif d.mask is not None and d.elements > 1:
                masked[term.name] = {"discrepancy": d.value.detach().float(), "mask": d.mask} | result.element_columns
        if step is None and self.training:
            self.clock.step += 1
        teacher_out = t_values[OUTPUT] if t_values is not None else None
        return DistillOutput(student=s_values[OUTPUT], teacher=teacher_out, losses=losses, records=records,
                             element_records=elements, masked_elements=masked)

    def check_trainable(self, trainable: list[str] | None) -> None:
        """Every entry of a stage's `trainable` list must name a module of the student (ValueError)."""
        modules = dict(self.student.named_modules())
        for path in trainable or []:
            if path not in modules or not path:
                raise ValueError(f"no student module '{path}'{did_you_mean(path, [m for m in modules if m])}")

    def param_groups(self, trainable: list[str] | None = None) -> list[dict[str, Any]]:
        """Optimizer groups: the student's trainable parameters (all, or those under the module paths
        in `trainable`, never those the model lists in `padkd_frozen`), then each term's modules at
        `lr_scale` (0 = frozen, left out). Parameters left out get `requires_grad=False` for this stage,
        so no gradient is computed for them."""
        self.check_trainable(trainable)
        groups = []
        student = []
        # A model may keep some parameters frozen by design (a detector's first backbone stages).
        frozen = set(getattr(self.student, "padkd_frozen", ()))
        for name, p in self.student.named_parameters():
            train = (trainable is None or any(name == m or name.startswith(f"{m}.") for m in trainable)) \
                and name not in frozen
            p.requires_grad_(train)
            if train:
                student.append(p)
        if student:
            groups.append({"params": student, "lr_scale": 1.0, "name": "student"})
        for term in self.terms:
            # a method may freeze its own modules; a weighting's groups (a PAD head) say their own multiples
            parts = [(term.name, [p for p in term.method.parameters() if p.requires_grad], term.lr_scale)]
            parts += [(f"{term.name}.{name}", params, term.lr_scale * scale)
                      for name, params, scale in term.weighting.param_groups()]
            for name, params, scale in parts:
                if scale == 0:
                    for p in params:
                        p.requires_grad_(False)
                elif params:
                    groups.append({"params": params, "lr_scale": scale, "name": name})
        return groups

    def synced_buffers(self) -> list[Tensor]:
        """Buffers every rank must hold alike before evaluation and saving (BatchNorm statistics of the
        student and of the terms), without the rank-local state a method keeps itself (memory banks)."""
        buffers = list(self.student.buffers())
        for term in self.terms:
            buffers += list(term.weighting.buffers())
            if term.method.sync_buffers:
                buffers += list(term.method.buffers())
        return buffers

    @property
    def find_unused_parameters(self) -> bool:
        """Whether DDP must look for parameters that a forward left unused."""
        return bool(self.task is not None and self.task.find_unused_parameters) or any(
            t.method.unused_parameters for t in self.terms)

    def terms_state_dict(self) -> dict[str, Tensor]:
        """State of the terms' modules (connectors, PAD heads, memory banks): saved, never exported."""
        return self.terms.state_dict()
