"""CRD: the memory update, the NCE loss against a computation from the paper, eval-mode safety, label-exact
negatives, the fixed-size queue, an exact resume and a 2-process gloo run that keeps the ranks' memories alike."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.context import BuildContext, DataInfo
from padkd.errors import PadkdError
from padkd.methods import CRD, METHODS
from padkd.weightings import Uniform

ROOT = Path(__file__).resolve().parents[1]


def built(targets: Tensor | None, n_train: int | None = None, s_dim: int = 12, t_dim: int = 20,
          **options: Any) -> CRD:
    """A CRD built for a training set with labels `targets` (or `n_train` unlabelled samples)."""
    method = METHODS.create("crd", options, "method crd")
    n = len(targets) if targets is not None else n_train
    assert n is not None
    ctx = BuildContext(student=torch.zeros(2, s_dim), teacher=torch.zeros(2, t_dim),
                       batch=Batch(torch.zeros(2, 1), torch.zeros(2), torch.arange(2)),
                       data=DataInfo(n_train=n, num_classes=None, train_targets=targets), world_size=1,
                       student_model=nn.Linear(1, 1), teacher_model=nn.Linear(1, 1))
    method.build(ctx)
    return method  # type: ignore[return-value]


def identity_heads(method: CRD) -> None:
    """Embeddings = the L2-normalised inputs (inputs of width feat_dim)."""
    with torch.no_grad():
        for head in (method.embed_s, method.embed_t):
            head.weight.copy_(torch.eye(method.feat_dim))
            head.bias.zero_()


def batch_of(index: list[int] | Tensor) -> Batch:
    index = torch.as_tensor(index, dtype=torch.long)
    return Batch(torch.zeros(len(index), 1), torch.zeros(len(index), dtype=torch.long), index)


def unit(*xs: float) -> Tensor:
    v = torch.tensor(xs)
    return v / v.norm()


# ---------------------------------------------------------------- the memory update


def test_bank_update_is_the_momentum_average_renormalised() -> None:
    method = built(None, n_train=4, s_dim=2, t_dim=2, feat_dim=2, nce_k=2, nce_m=0.75, mode="uniform")
    identity_heads(method)
    with torch.no_grad():
        method.memory_s.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        method.memory_t.copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [0.8, 0.6]]))
    before_s, before_t = method.memory_s.clone(), method.memory_t.clone()
    student = torch.tensor([[0.0, 3.0], [2.0, 0.0]])  # embeds to (0, 1) and (1, 0)
    teacher = torch.tensor([[5.0, 0.0], [0.0, 0.5]])  # embeds to (1, 0) and (0, 1)
    method.train()
    method(student, teacher, batch_of([1, 3]))
    # row 1: 0.75·(1, 0) + 0.25·(0, 1) = (0.75, 0.25), renormalised
    torch.testing.assert_close(method.memory_s[1], unit(0.75, 0.25))
    torch.testing.assert_close(method.memory_s[3], unit(0.75 * 0.6 + 0.25, 0.75 * 0.8))
    torch.testing.assert_close(method.memory_t[1], unit(0.25, -0.75))
    torch.testing.assert_close(method.memory_t[3], unit(0.75 * 0.8, 0.75 * 0.6 + 0.25))
    for row in (0, 2):  # rows of samples not in the batch stay as they were
        assert torch.equal(method.memory_s[row], before_s[row]) and torch.equal(method.memory_t[row], before_t[row])


def test_a_sample_twice_in_a_batch_takes_its_last_embedding() -> None:
    method = built(None, n_train=3, s_dim=2, t_dim=2, feat_dim=2, nce_k=2, nce_m=0.5, mode="uniform")
    identity_heads(method)
    with torch.no_grad():
        method.memory_s.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))
    method.train()
    method(torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, -1.0]]), torch.ones(3, 2), batch_of([2, 0, 2]))
    torch.testing.assert_close(method.memory_s[2], unit(0.5, -0.5))  # the last of the two, not (0.5, 0.5)
    torch.testing.assert_close(method.memory_s[0], unit(0.5, 0.5))


# ---------------------------------------------------------------- the NCE loss


def _paper_nce(score_pos: float, score_neg: float, k: int, n: int, z: float, t: float) -> float:
    """NCE of one anchor with k equal negatives (CRD paper, Eq. 18): P = exp(score/t)/Z, the posterior
    of "from the data" is h = P / (P + k/n); loss = -log h(pos) - Σ_neg log(1 - h(neg))."""
    def h(score: float) -> float:
        p = math.exp(score / t) / z
        return p / (p + k / n)

    return -math.log(h(score_pos)) - k * math.log(1.0 - h(score_neg))


def test_nce_loss_on_a_hand_made_case() -> None:
    # Six samples in two classes; every teacher row of a class holds the same key, so the exact
    # negatives of each anchor score the same whichever rows are drawn.
    targets = torch.tensor([0, 0, 0, 1, 1, 1])
    method = built(targets, s_dim=2, t_dim=2, feat_dim=2, nce_k=100, nce_t=0.5)
    assert method.k == 3  # clipped: each anchor has 3 samples of the other class
    identity_heads(method)
    a, b = unit(1.0, 0.0), unit(0.6, 0.8)
    c, e = unit(0.0, 1.0), unit(-0.8, 0.6)
    with torch.no_grad():
        method.memory_t.copy_(torch.stack([a, a, a, b, b, b]))
        method.memory_s.copy_(torch.stack([c, c, c, e, e, e]))
    v_s = torch.stack([unit(1.0, 1.0), unit(-1.0, 2.0)])  # anchors of samples 0 (class 0) and 4 (class 1)
    v_t = torch.stack([unit(2.0, -1.0), unit(0.0, 1.0)])
    method.train()
    out = method(v_s * 3.0, v_t * 0.5, batch_of([0, 4]))  # the heads normalise the scale away
    assert out.sum_elements  # the two anchors' losses add up to the sample's
    d = out.value

    def dot(x: Tensor, y: Tensor) -> float:
        return float(x @ y)

    # Z (fixed on this first training call) = n · mean of exp(score/t) over both anchors' 1 + K scores.
    z_s = 6 * (math.exp(dot(v_s[0], a) / 0.5) + 3 * math.exp(dot(v_s[0], b) / 0.5)
               + math.exp(dot(v_s[1], b) / 0.5) + 3 * math.exp(dot(v_s[1], a) / 0.5)) / 8
    z_t = 6 * (math.exp(dot(v_t[0], c) / 0.5) + 3 * math.exp(dot(v_t[0], e) / 0.5)
               + math.exp(dot(v_t[1], e) / 0.5) + 3 * math.exp(dot(v_t[1], c) / 0.5)) / 8
    torch.testing.assert_close(method.z, torch.tensor([z_s, z_t]))
    expected = torch.tensor([
        [_paper_nce(dot(v_s[0], a), dot(v_s[0], b), 3, 6, z_s, 0.5),
         _paper_nce(dot(v_t[0], c), dot(v_t[0], e), 3, 6, z_t, 0.5)],
        [_paper_nce(dot(v_s[1], b), dot(v_s[1], a), 3, 6, z_s, 0.5),
         _paper_nce(dot(v_t[1], e), dot(v_t[1], c), 3, 6, z_t, 0.5)],
    ])
    assert d.shape == (2, 2) and (d >= 0).all()
    torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-6)


def _authors_batch_loss(e: Tensor, z: float, k: int, n: int) -> Tensor:
    """The authors' batch form: -(Σ_b log D1 + Σ_b Σ_k log D0) / B, with D computed from x = e / Z."""
    x, m, pn, eps = e / z, k, 1.0 / n, 1e-7
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + m * pn + eps))
    log_d0 = torch.log((m * pn) / (x[:, 1:] + m * pn + eps))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


@pytest.mark.parametrize("memory", ["bank", "queue"])
def test_uniform_batch_mean_is_the_authors_crd_loss(memory: str) -> None:
    torch.manual_seed(0)
    targets = torch.arange(40) % 4
    method = built(targets, memory=memory, queue_size=16, nce_k=10)
    seen: dict[str, Tensor] = {}
    scores = method._scores

    def spy(*args: Any) -> tuple[Tensor, Tensor]:
        seen["e_s"], seen["e_t"] = scores(*args)
        return seen["e_s"], seen["e_t"]

    method._scores = spy  # type: ignore[method-assign]
    method.train()
    for _ in range(2):  # the second call uses the Z fixed by the first
        d = method(torch.randn(8, 12), torch.randn(8, 20), batch_of(torch.randperm(40)[:8]))
    z_s, z_t = (float(v) for v in method.z)
    crd = _authors_batch_loss(seen["e_s"], z_s, 10, 40) + _authors_batch_loss(seen["e_t"], z_t, 10, 40)
    torch.testing.assert_close(Uniform()(d).loss, crd, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- state: eval mode, Z, resume


def test_eval_forwards_change_neither_memory_nor_z() -> None:
    torch.manual_seed(0)
    method = built(torch.arange(30) % 3, nce_k=8)
    s, t = torch.randn(6, 12, requires_grad=True), torch.randn(6, 20)
    method.eval()
    fresh = copy.deepcopy(method.state_dict())
    d = method(s, t, batch_of([0, 1, 2, 3, 4, 5]))  # before any training Z is estimated, never stored
    d.value.sum().backward()
    with torch.no_grad():
        method(s, t, batch_of([100, 101, 102, 103, 104, 105]))  # another split's indices: ignored in eval
    assert all(torch.equal(fresh[k], v) for k, v in method.state_dict().items())
    assert (method.z == -1).all()
    method.train()
    method(s, t, batch_of([0, 1, 2, 3, 4, 5]))
    z = method.z.clone()
    assert (z > 0).all()
    trained = copy.deepcopy(method.state_dict())
    method.eval()
    method(s, t, batch_of([6, 7, 8, 9, 10, 11]))
    assert all(torch.equal(trained[k], v) for k, v in method.state_dict().items())
    method.train()
    method(s, t, batch_of([6, 7, 8, 9, 10, 11]))
    assert torch.equal(method.z, z)  # fixed by the first training call
    assert not torch.equal(method.memory_s, trained["memory_s"])


@pytest.mark.parametrize("memory", ["bank", "queue"])
def test_resume_from_the_state_dict_is_exact(memory: str) -> None:
    targets = torch.arange(30) % 3
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(5, 12, generator=g), torch.randn(5, 20, generator=g), torch.randperm(30, generator=g)[:5])
            for _ in range(3)]
    torch.manual_seed(0)
    a = built(targets, nce_k=8, memory=memory, queue_size=12)
    a.train()
    for s, t, index in data[:2]:
        a(s, t, batch_of(index))
    saved = copy.deepcopy(a.state_dict())
    assert (saved["z"] > 0).all()
    torch.manual_seed(7)
    out_a = a(data[2][0], data[2][1], batch_of(data[2][2]))

    torch.manual_seed(1)  # another initialisation, replaced by the saved state
    b = built(targets, nce_k=8, memory=memory, queue_size=12)
    b.load_state_dict(saved)
    b.train()
    torch.manual_seed(7)
    out_b = b(data[2][0], data[2][1], batch_of(data[2][2]))
    torch.testing.assert_close(out_b, out_a)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value)


# ---------------------------------------------------------------- negatives


class _RowSpy:
    """Records the memory rows (and their labels at scoring time) that each training forward draws."""

    def __init__(self, method: CRD, labels: str) -> None:
        self.method, self.labels, self.calls = method, labels, []
        self.scores = method._scores
        method._scores = self  # type: ignore[method-assign]

    def __call__(self, v_s: Tensor, v_t: Tensor, pos_t: Tensor, pos_s: Tensor, rows: Tensor,
                 snapshot: bool = False) -> tuple[Tensor, Tensor]:
        labels = getattr(self.method, self.labels).clone()
        self.calls.append((rows.clone(), labels[rows], pos_t.clone(), self.method.memory_t.clone()))
        return self.scores(v_s, v_t, pos_t, pos_s, rows, snapshot)


def test_exact_negatives_never_come_from_the_anchors_class() -> None:
    torch.manual_seed(0)
    targets = torch.tensor([0] * 5 + [1] * 3 + [2] * 12 + [3] * 4)[torch.randperm(24)]
    method = built(targets, nce_k=500)
    assert method.k == 24 - 12  # clipped to the fewest other-class samples any anchor has
    spy = _RowSpy(method, "targets")
    method.train()
    index = torch.arange(24)
    method(torch.randn(24, 12), torch.randn(24, 20), batch_of(index))
    rows, labels, _, _ = spy.calls[0]
    assert (labels != targets[index][:, None]).all()
    for i in range(24):  # every other-class sample can be drawn (uniform with replacement, 12 draws)
        allowed = (targets != targets[i]).nonzero().flatten()
        assert set(rows[i].tolist()) <= set(allowed.tolist())
    drawn = torch.bincount(rows[targets[index] == 2].flatten(), minlength=24)
    assert (drawn[targets != 2] > 0).all()  # 12 · 12 draws over 12 rows of other classes


def test_relax_positives_come_from_the_anchors_class() -> None:
    torch.manual_seed(0)
    targets = torch.arange(20) % 4
    method = built(targets, nce_k=8, mode="relax")
    spy = _RowSpy(method, "targets")
    method.train()
    index = torch.arange(8)
    method(torch.randn(8, 12), torch.randn(8, 20), batch_of(index))
    _, labels, pos_t, memory_t = spy.calls[0]
    owner = torch.cdist(pos_t, memory_t).argmin(1)  # which bank row each positive key is
    assert (targets[owner] == targets[index]).all() and (labels != targets[index][:, None]).all()


def test_queue_exact_negatives_skip_queued_keys_of_the_anchors_class() -> None:
    torch.manual_seed(0)
    targets = torch.arange(60) % 3
    method = built(targets, nce_k=6, memory="queue", queue_size=9)
    spy = _RowSpy(method, "queue_labels")
    method.train()
    for step in range(5):
        index = torch.randperm(60)[:4]
        method(torch.randn(4, 12), torch.randn(4, 20), batch_of(index))
        _, labels, _, _ = spy.calls[step]
        assert (labels != targets[index][:, None]).all()  # -1 (never filled) counts as another class
    assert (method.queue_labels >= 0).all()


def test_queue_memory_does_not_grow_with_the_data_set() -> None:
    small = built(torch.arange(20) % 2, memory="queue", queue_size=8, nce_k=4, feat_dim=3)
    large = built(torch.arange(5000) % 2, memory="queue", queue_size=8, nce_k=4, feat_dim=3)
    size = {k: v.shape for k, v in small.state_dict().items()}
    assert size == {k: v.shape for k, v in large.state_dict().items()}
    assert size["memory_s"] == size["memory_t"] == (8, 3)
    assert large.state_dict()["memory_s"].shape[0] == 8
    bank = built(torch.arange(5000) % 2, nce_k=4, feat_dim=3)
    assert bank.state_dict()["memory_s"].shape == (5000, 3)
    # FIFO: after 3 batches of 5 (15 keys), slot j holds the newest key i with i % 8 == j.
    torch.manual_seed(0)
    large.train()
    keys = []
    for _ in range(3):
        s, t = torch.randn(5, 12), torch.randn(5, 20)
        large(s, t, batch_of(torch.randperm(5000)[:5]))
        keys.append(F.normalize(large.embed_s(s), dim=1).detach())
    keys_all = torch.cat(keys)
    assert int(large.queue_ptr) == 15 % 8
    for i in range(7, 15):
        torch.testing.assert_close(large.memory_s[i % 8], keys_all[i])
    assert large.state_dict()["memory_s"].shape == (8, 3)


# ---------------------------------------------------------------- options and config


def test_bad_options_say_how_to_fix_them() -> None:
    with pytest.raises(PadkdError, match="use mode 'exact' with memory 'queue'"):
        METHODS.create("crd", {"mode": "relax", "memory": "queue"}, "method crd")
    with pytest.raises(PadkdError, match="set mode: uniform"):
        built(None, n_train=10)
    with pytest.raises(PadkdError, match="same class"):
        built(torch.zeros(10, dtype=torch.long))
    built(None, n_train=10, mode="uniform")


def test_example_configs_parse() -> None:
    from padkd.config import load_config

    for name in ("crd.yaml", "crd_pad.yaml"):
        cfg = load_config(ROOT / "src" / "padkd" / "recipes" / "methods" / name, ["output_dir=unused"])
        term = cfg.stages[-1].terms[0]
        assert term.method.name == "crd" and term.student == "fc:in"


# ---------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for memory in ("bank", "queue"):
            torch.manual_seed(0)  # the same initial memories on both ranks
            method = built(torch.arange(40) % 4, nce_k=6, memory=memory, queue_size=24)
            method.train()
            torch.manual_seed(10 + rank)  # different negatives on each rank
            g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
            for _ in range(3):
                index = torch.randperm(40, generator=g)[:5]  # ranks' samples may overlap
                s = torch.randn(5, 12, generator=g, requires_grad=True)
                method(s, torch.randn(5, 20, generator=g), batch_of(index)).value.sum().backward()
            results[memory] = method.state_dict()
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch (about 4 s of CPU each)
def test_two_gloo_ranks_keep_identical_memories(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for memory in ("bank", "queue"):
        a, b = ranks[0][memory], ranks[1][memory]
        for key in a:
            assert torch.equal(a[key], b[key]), f"{memory}: {key} differs between the ranks"
        # One process that sees both ranks' batches, rank 0's first, ends with the same memories.
        torch.manual_seed(0)
        single = built(torch.arange(40) % 4, nce_k=6, memory=memory, queue_size=24)
        single.train()
        gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
        for _ in range(3):
            parts = [(torch.randperm(40, generator=g)[:5], torch.randn(5, 12, generator=g),
                      torch.randn(5, 20, generator=g)) for g in gens]
            single(torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]),
                   batch_of(torch.cat([p[0] for p in parts])))
        torch.testing.assert_close(single.memory_s, a["memory_s"])
        torch.testing.assert_close(single.memory_t, a["memory_t"])
        assert not torch.equal(a["memory_s"], built_fresh_memory(memory))


def built_fresh_memory(memory: str) -> Tensor:
    torch.manual_seed(0)
    return built(torch.arange(40) % 4, nce_k=6, memory=memory, queue_size=24).memory_s
