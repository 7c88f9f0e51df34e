"""Contrastive methods: CRD, NCE between student and teacher embeddings with negatives from a memory.

Tian, Krishnan, Isola. Contrastive Representation Distillation. ICLR 2020 (arXiv 1910.10699). The
formula, the memory update and the normalisation constant Z follow the authors' RepDistiller code
(`crd/criterion.py`, `crd/memory.py`); docs/methods-crd.md gives the derivation and the DDP behaviour.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.context import BuildContext
from padkd.discrepancy import Discrepancy
from padkd.distributed import all_gather_cat
from padkd.errors import PadkdError
from padkd.methods.base import METHODS, Method

#: The authors' eps inside the NCE ratios (`crd/criterion.py`).
NCE_EPS = 1e-7


def _class_blocks(labels: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows sorted by label (`order`) and each label's block in that order (`starts`, `counts`)."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=bins)
    return order, torch.cumsum(counts, 0) - counts, counts


def _other_class_rows(order: Tensor, starts: Tensor, counts: Tensor, y: Tensor, k: int) -> Tensor:
    """`[B, k]` rows drawn uniformly, with replacement, among the rows whose label differs from `y[b]`:
    a uniform position in the sorted order with the anchor's own block cut out."""
    m = order.numel()
    n_own, start = counts[y].unsqueeze(1), starts[y].unsqueeze(1)
    room = m - n_own
    u = (torch.rand(y.shape[0], k, device=order.device) * room).long()
    u = torch.minimum(u, (room - 1).clamp_min(0))
    pos = u + n_own * (u >= start).long()
    return order[pos.clamp_max(m - 1)]  # clamp: a queue holding only the anchor's class (documented)


@METHODS.register("crd")
class CRD(Method):
    """CRD: per-sample NCE losses of the student anchor and the teacher anchor against a memory, `[B, 2]`.

    Both sides are embedded by `Linear + L2 normalisation` into `feat_dim`. For sample i, the student
    anchor `v_s,i` scores its positive (the teacher memory's entry of i) and `K` negatives (other teacher
    entries) by `exp(v·k / nce_t) / Z_s`; the teacher anchor does the same against the student memory.
    With `c = K / n_train` (K noise samples from a uniform noise distribution over the training set),
    sample i's NCE loss is `-log(P_0 / (P_0 + c + eps)) - Σ_k log(c / (P_k + c + eps))`. Element 0 is the
    student anchor's, element 1 the teacher anchor's, parts that add up (`sum_elements`) to the authors'
    `s_loss + t_loss`, so the batch mean under `uniform` is RepDistiller's `CRDLoss`.

    `memory="bank"`: one momentum-updated entry per training sample and side (`nce_m`), found by
    `batch.index`. `memory="queue"`: a FIFO of the last `queue_size` embeddings per side (MoCo style);
    the positive is then the other side's current embedding of the sample. `mode`: "exact" draws
    negatives from other classes (RepDistiller's default); "relax" also takes the positive from a random
    sample of the anchor's class (bank only); "uniform" draws negatives from the whole memory.

    Memory and Z change only in training mode; under DDP every rank applies every rank's samples, so the
    memories stay identical without a broadcast. In eval mode (records of any split) the positive is the
    other side's current embedding and negatives come uniformly from the memory: indices and labels of
    another split say nothing about the bank.
    """

    reference = "Tian, Krishnan, Isola. Contrastive Representation Distillation. ICLR 2020"
    default_weight = 0.8  # β of the CRD benchmark (RepDistiller)
    stochastic = True
    sync_buffers = False

    def __init__(self, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5,
                 mode: Literal["exact", "relax", "uniform"] = "exact",
                 memory: Literal["bank", "queue"] = "bank", queue_size: int = 16384) -> None:
        super().__init__()
        if feat_dim < 1 or nce_k < 1 or queue_size < 1:
            raise ValueError(f"crd: feat_dim, nce_k and queue_size must be >= 1, got {feat_dim}, {nce_k}, {queue_size}")
        if nce_t <= 0 or not 0 <= nce_m < 1:
            raise ValueError(f"crd: need nce_t > 0 and 0 <= nce_m < 1, got nce_t={nce_t}, nce_m={nce_m}")
        if memory == "queue" and mode == "relax":
            raise ValueError("crd: mode 'relax' takes positives from the bank's entries of other samples; "
                             "use mode 'exact' with memory 'queue'")
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = feat_dim, nce_k, nce_t, nce_m
        self.mode, self.memory_kind, self.queue_size = mode, memory, queue_size
        self.embed_s: nn.Module = nn.Identity()
        self.embed_t: nn.Module = nn.Identity()
        self.n_data = 0
        self.k = 0
        self.num_classes = 0
        self._z_known: bool | None = None  # cache of `z > 0`, so training reads no tensor per step

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return (torch.randn(batch_size, 12, generator=generator), torch.randn(batch_size, 20, generator=generator))

    def build(self, ctx: BuildContext) -> None:
        if not isinstance(ctx.student, Tensor) or not isinstance(ctx.teacher, Tensor):
            raise PadkdError("crd reads one embedding per side: tap one layer each (e.g. student: fc:in)")
        d = self.feat_dim
        self.embed_s = nn.Linear(ctx.student.flatten(1).shape[1], d)
        self.embed_t = nn.Linear(ctx.teacher.flatten(1).shape[1], d)
        n = self.n_data = ctx.data.n_train
        if self.mode != "uniform":
            targets = ctx.data.train_targets
            if targets is None or len(targets) != n:
                raise PadkdError(f"crd: mode '{self.mode}' draws negatives from other classes but the data set "
                                 "gives no training labels; set mode: uniform")
            targets = targets.long().clone()
            self.num_classes = int(targets.max()) + 1
            self.register_buffer("targets", targets, persistent=False)
        rows = n if self.memory_kind == "bank" else self.queue_size
        if self.memory_kind == "queue" or self.mode == "uniform":
            allowed = rows
        else:
            order, starts, counts = _class_blocks(targets, self.num_classes)
            for name, value in (("order", order), ("starts", starts), ("counts", counts)):
                self.register_buffer(name, value, persistent=False)
            allowed = n - int(counts.max())
            if allowed < 1:
                raise PadkdError(f"crd: every training sample has the same class, so mode '{self.mode}' has "
                                 "no negatives; set mode: uniform")
        self.k = min(self.nce_k, allowed)
        stdv = 1.0 / math.sqrt(d / 3)  # the authors' initialisation: uniform rows of expected norm 1
        self.register_buffer("memory_s", torch.rand(rows, d).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(rows, d).mul_(2 * stdv).sub_(stdv))
        if self.memory_kind == "queue":
            self.register_buffer("queue_labels", torch.full((rows,), -1, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        #: Z of the student anchor and of the teacher anchor; -1 until the first training forward.
        self.register_buffer("z", torch.full((2,), -1.0))
        self._z_known = False

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._z_known = None  # a loaded Z may or may not be set: read it once

    def _z_ready(self) -> bool:
        if self._z_known is None:
            self._z_known = bool((self.z > 0).all())
        return self._z_known

    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Discrepancy:  # type: ignore[override]
        with torch.autocast(device_type=student.device.type, enabled=False):
            v_s = F.normalize(self.embed_s(student.flatten(1).float()), dim=1)
            v_t = F.normalize(self.embed_t(teacher.flatten(1).float()), dim=1)
            if self.training:
                return self._train_forward(v_s, v_t, batch.index)
            rows = torch.randint(0, self.memory_s.shape[0], (len(v_s), self.k), device=v_s.device)
            e_s, e_t = self._scores(v_s, v_t, v_t.detach(), v_s.detach(), rows)
            z = self.z if self._z_ready() else self._z_estimate(e_s, e_t)
            return self._nce(e_s, e_t, z)

    def _scores(self, v_s: Tensor, v_t: Tensor, pos_t: Tensor, pos_s: Tensor, rows: Tensor,
                snapshot: bool = False) -> tuple[Tensor, Tensor]:
        """`exp(score / nce_t)`, `[B, 1 + K]` per anchor: the positive key first, then memory `rows`.

        `snapshot`: score against copies of the memories, which autograd keeps while `_update` changes
        the memories in place (cheaper than gathering `B·(K+1)` key rows whenever `B·(K+1) > rows`)."""
        memory_s, memory_t = self.memory_s, self.memory_t
        if snapshot:
            memory_s, memory_t = memory_s.clone(), memory_t.clone()
        neg_s = torch.gather(v_s @ memory_t.T, 1, rows)  # student anchor against teacher keys
        neg_t = torch.gather(v_t @ memory_s.T, 1, rows)
        e_s = torch.cat([(v_s * pos_t).sum(1, keepdim=True), neg_s], 1).div(self.nce_t).exp()
        e_t = torch.cat([(v_t * pos_s).sum(1, keepdim=True), neg_t], 1).div(self.nce_t).exp()
        return e_s, e_t

    def _z_estimate(self, e_s: Tensor, e_t: Tensor) -> Tensor:
        """The authors' Z: mean exp-score of a batch times the number of training samples."""
        return torch.stack([e_s.mean(), e_t.mean()]).detach() * self.n_data

    def _nce(self, e_s: Tensor, e_t: Tensor, z: Tensor) -> Discrepancy:
        """Per-sample NCE loss of each anchor (scores `[B, 1 + K]`) → `[B, 2]` parts that add up."""
        c = self.k / self.n_data  # K · P_n with the uniform noise distribution P_n = 1 / n_train

        def loss(e: Tensor, z_side: Tensor) -> Tensor:
            p = e / z_side
            pos = torch.log(p[:, 0]) - torch.log(p[:, 0] + c + NCE_EPS)
            neg = (math.log(c) - torch.log(p[:, 1:] + c + NCE_EPS)).sum(1)
            return -(pos + neg)

        return Discrepancy(torch.stack([loss(e_s, z[0]), loss(e_t, z[1])], 1), sum_elements=True)

    def _train_forward(self, v_s: Tensor, v_t: Tensor, index: Tensor) -> Discrepancy:
        snapshot = torch.is_grad_enabled()
        y = self.targets[index] if self.mode != "uniform" else None
        if self.memory_kind == "queue":
            rows = self._queue_negatives(y, len(index))
            e_s, e_t = self._scores(v_s, v_t, v_t.detach(), v_s.detach(), rows, snapshot)
        else:
            pos = index
            if y is None:
                rows = torch.randint(0, self.n_data, (len(index), self.k), device=index.device)
            else:
                rows = _other_class_rows(self.order, self.starts, self.counts, y, self.k)
                if self.mode == "relax":  # the positive: a random sample of the anchor's class
                    own = self.counts[y]
                    pick = (torch.rand(len(y), device=y.device) * own).long().clamp_max(own - 1)
                    pos = self.order[self.starts[y] + pick]
            e_s, e_t = self._scores(v_s, v_t, self.memory_t[pos], self.memory_s[pos], rows, snapshot)
        if not self._z_ready():  # fixed once, on the first training forward, alike on every rank
            self.z.copy_(all_gather_cat(self._z_estimate(e_s, e_t).unsqueeze(0)).mean(0))
            self._z_known = True
        out = self._nce(e_s, e_t, self.z)
        self._update(index, v_s, v_t)
        return out

    def _queue_negatives(self, y: Tensor | None, b: int) -> Tensor:
        q = self.memory_s.shape[0]
        if y is None:
            return torch.randint(0, q, (b, self.k), device=self.memory_s.device)
        order, starts, counts = _class_blocks(self.queue_labels + 1, self.num_classes + 1)  # -1: never filled
        return _other_class_rows(order, starts, counts, y + 1, self.k)

    @torch.no_grad()
    def _update(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """Apply every rank's (index, embeddings), in rank order, to this rank's memory."""
        index = all_gather_cat(index)
        keys = all_gather_cat(torch.cat([v_s, v_t], 1))
        d = self.feat_dim
        if self.memory_kind == "queue":
            q = self.memory_s.shape[0]
            labels = self.targets[index] if self.mode != "uniform" else torch.full_like(index, -1)
            keys, labels = keys[-q:], labels[-q:]
            slots = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % q
            self.memory_s.index_copy_(0, slots, keys[:, :d])
            self.memory_t.index_copy_(0, slots, keys[:, d:])
            self.queue_labels.index_copy_(0, slots, labels)
            self.queue_ptr.copy_((self.queue_ptr + len(keys)) % q)
            return
        # A sample present twice (DistributedSampler padding) takes its last embedding in both rows,
        # so index_copy_ writes equal values and every rank ends up with the same bank.
        order = torch.arange(len(index), device=index.device)
        last = torch.where(index[:, None] == index[None, :], order, -1).amax(1)
        keys = keys[last]
        m = self.nce_m
        for bank, new in ((self.memory_s, keys[:, :d]), (self.memory_t, keys[:, d:])):
            bank.index_copy_(0, index, F.normalize(bank[index] * m + new * (1 - m), dim=1))
