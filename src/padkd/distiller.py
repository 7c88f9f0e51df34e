"""Distiller: owns teacher and student, taps their features and returns named losses.

The teacher is frozen here and only here: its parameters never require grad, it runs in eval mode
and under `no_grad` (train-mode BN is an explicit, logged option). Each term pairs a method (what
is matched) with a weighting (how samples count); the training loop only sees a dict of losses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from padkd.discrepancy import Discrepancy
from padkd.methods.base import Batch, Features, Method
from padkd.taps import OUTPUT, Taps, last_linear_input
from padkd.weighting import Uniform, Weighting

log = logging.getLogger(__name__)

TaskLoss = Callable[[Tensor, Batch], Tensor]


class Term(nn.Module):
    """One distillation term: `weight · weighting(method(student[tap], teacher[tap]))`."""

    def __init__(
        self,
        name: str,
        method: Method,
        weighting: Weighting | None = None,
        student: str | list[str] = OUTPUT,
        teacher: str | list[str] = OUTPUT,
        weight: float = 1.0,
        embedding: str | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.method = method
        self.weighting = weighting if weighting is not None else Uniform()
        self.student_tap = student
        self.teacher_tap = teacher
        self.weight = weight
        self.embedding_tap = embedding

    def paths(self, which: str) -> list[str]:
        tap = self.student_tap if which == "student" else self.teacher_tap
        return [tap] if isinstance(tap, str) else list(tap)


def _gather(values: dict[str, Tensor], tap: str | list[str]) -> Features:
    return values[tap] if isinstance(tap, str) else [values[p] for p in tap]


@dataclass
class DistillOutput:
    """A forward's result: student/teacher outputs, named (weighted) losses and per-term records."""

    student: Tensor
    teacher: Tensor | None
    losses: dict[str, Tensor]
    records: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        return torch.stack([v.float() for v in self.losses.values()]).sum()


class Distiller(nn.Module):
    """Teacher + student + terms (+ optional task loss) → named losses.

    Call `prepare(batch)` once before building the optimizer: it runs an example batch to create the
    terms' shape-dependent modules (connectors, PAD heads) and PAD's data-dependent initialisation.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        terms: list[Term] | None = None,
        task_loss: TaskLoss | None = None,
        task_weight: float = 1.0,
        embedding: str = "auto",
        teacher_train_bn: bool = False,
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
        self.task_loss = task_loss
        self.task_weight = task_weight
        self.teacher_train_bn = teacher_train_bn
        for term in terms:
            if term.embedding_tap is None and term.weighting.needs_embedding:
                term.embedding_tap = last_linear_input(student) if embedding == "auto" else embedding
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
            self._teacher_bn = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            self._bn_tracking = [m.track_running_stats for m in self._teacher_bn]
            if teacher_train_bn:
                log.warning("teacher BatchNorm runs in train mode (teacher_train_bn=True): its batch "
                            "statistics are used, its running statistics are not updated")
        self._student_paths = {OUTPUT} | {p for t in terms for p in t.paths("student")} | {
            t.embedding_tap for t in terms if t.embedding_tap}
        self._teacher_paths = {OUTPUT} | {p for t in terms for p in t.paths("teacher")}
        self._prepared = not terms

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Move/cast the teacher with the distiller although it is kept out of the module tree."""
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(False)
            if self.teacher_train_bn:
                # Train mode with tracking off: batch statistics, running statistics untouched.
                for m, tracking in zip(self._teacher_bn, self._bn_tracking, strict=True):
                    m.train(mode)
                    m.track_running_stats = tracking and not mode
        return self

    def _features(self, inputs: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        s_taps = Taps(self.student, self._student_paths, "student")
        try:
            s_values = s_taps.take(self.student(inputs))
        finally:
            s_taps.close()
        if self.teacher is None or not len(self.terms):  # no term reads the teacher: skip its forward
            return s_values, None
        t_taps = Taps(self.teacher, self._teacher_paths, "teacher")
        try:
            with torch.no_grad():
                t_values = t_taps.take(self.teacher(inputs))
        finally:
            t_taps.close()
        return s_values, t_values

    @torch.no_grad()
    def prepare(self, batch: Batch, carry: dict[str, dict[str, Tensor]] | None = None) -> None:
        """Build every term's shape-dependent modules from an example batch (idempotent).

        `carry` maps term names to method states to start from (e.g. the previous stage's connector),
        loaded before the weightings see their first discrepancies (PAD's data initialisation)."""
        if self._prepared:
            return
        was_training = self.training
        self.train(False)
        try:
            s_values, t_values = self._features(batch.inputs)
            assert t_values is not None or not len(self.terms)
            for term in self.terms:
                s, t = _gather(s_values, term.student_tap), _gather(t_values, term.teacher_tap)
                term.method.build(s, t)
                if carry and term.name in carry:
                    term.method.load_state_dict(carry[term.name])
                d = Discrepancy.of(term.method(s, t, batch))
                emb = s_values[term.embedding_tap] if term.embedding_tap else None
                term.weighting.build(d, emb)
        finally:
            self.train(was_training)
        self._prepared = True

    def forward(self, batch: Batch) -> DistillOutput:
        if not self._prepared:
            raise RuntimeError("Distiller.prepare(batch) must run once before the first forward")
        s_values, t_values = self._features(batch.inputs)
        losses: dict[str, Tensor] = {}
        records: dict[str, dict[str, Tensor]] = {}
        if self.task_loss is not None:
            losses["task"] = self.task_weight * self.task_loss(s_values[OUTPUT], batch)
        for term in self.terms:
            assert t_values is not None
            s, t = _gather(s_values, term.student_tap), _gather(t_values, term.teacher_tap)
            d = Discrepancy.of(term.method(s, t, batch))
            emb = s_values[term.embedding_tap] if term.embedding_tap else None
            result = term.weighting(d, emb)
            losses[term.name] = term.weight * result.loss
            rec = {"discrepancy": d.reduce_elements().detach().float(), "weight": result.weight.detach()}
            if result.log_var is not None:
                rec["log_var"] = result.log_var.detach()
            records[term.name] = rec
        teacher_out = t_values[OUTPUT] if t_values is not None else None
        return DistillOutput(student=s_values[OUTPUT], teacher=teacher_out, losses=losses, records=records)

    def aux_state_dict(self) -> dict[str, Tensor]:
        """State of the terms' trainable modules (connectors, PAD heads): saved, never exported."""
        return self.terms.state_dict()
