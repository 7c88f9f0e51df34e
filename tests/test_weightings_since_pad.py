"""The weightings since PAD and PAD's ceiling: EA-KD (`entropy`) and WSLD (`wsld`) against their authors'
KD/DKD losses on hand-written logits, `inverse_discrepancy` and `variance_memory` against their formulas, how
weightings read task outputs (`WeightingInputs`), and a 2-process gloo run that keeps the memories alike."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from padkd.batch import Batch
from padkd.context import BuildContext, DataInfo
from padkd.discrepancy import Discrepancy, WeightingInputs
from padkd.distiller import Distiller, Term
from padkd.errors import PadkdError
from padkd.methods import METHODS
from padkd.tasks import TASKS
from padkd.validate import parse_checked
from padkd.weightings import WEIGHTINGS, VarianceMemory

# Three samples, four classes: hand-written logits and labels (sample 2: the teacher is wrong).
STUDENT = [[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-1.0, 3.0, 0.5, 0.2]]
TEACHER = [[4.0, 0.0, -2.0, 1.0], [0.0, 2.5, 0.5, -0.5], [1.0, 0.0, 2.0, 3.0]]
LABELS = [0, 1, 1]


def softmax(z: list[float], t: float = 1.0) -> list[float]:
    m = max(z)
    e = [math.exp((v - m) / t) for v in z]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def ent(z: list[float], t: float) -> float:
    """The authors' entropy: -Σ p log(p + 1e-10) of softmax(z / t)."""
    return -sum(p * math.log(p + 1e-10) for p in softmax(z, t))


def ea_weight(s: list[float], t: list[float], bound: float, temp: float = 3.0) -> float:
    h_t, h_s = ent(t, temp), ent(s, temp)
    return (h_t + h_t * h_s / bound) / 2


def inputs(index: list[int] | None = None) -> WeightingInputs:
    return WeightingInputs(index=torch.tensor(index or [0, 1, 2]), student_logits=torch.tensor(STUDENT),
                           teacher_logits=torch.tensor(TEACHER), targets=torch.tensor(LABELS))


def batch() -> Batch:
    return Batch(torch.zeros(3, 1), torch.tensor(LABELS), torch.arange(3))


def kd(temperature: float = 4.0) -> Tensor:
    method = METHODS.create("kd", {"temperature": temperature}, "m")
    return method(torch.tensor(STUDENT), torch.tensor(TEACHER), batch())


# ------------------------------------------------------------------------------------------ EA-KD
def test_entropy_weighted_kd_equals_the_authors_ea_kd_loss() -> None:
    # EA-KD's CIFAR-100 code: KD at T = 4, entropies at t = 3, H_ub = 100; loss = mean_i w_i T² KL_i
    expected = sum(ea_weight(s, t, 100.0) * 16 * kl(softmax(t, 4), softmax(s, 4))
                   for s, t in zip(STUDENT, TEACHER, strict=True)) / 3
    w = WEIGHTINGS.create("entropy", {"entropy_bound": 100.0}, "w")
    assert float(w(kd(), None, inputs()).loss) == pytest.approx(expected, rel=1e-5)
    # the default bound is log C (the authors' ImageNet value for C = 1000)
    expected_log = sum(ea_weight(s, t, math.log(4)) * 16 * kl(softmax(t, 4), softmax(s, 4))
                       for s, t in zip(STUDENT, TEACHER, strict=True)) / 3
    result = WEIGHTINGS.create("entropy", {}, "w")(kd(), None, inputs())
    assert float(result.loss) == pytest.approx(expected_log, rel=1e-5)
    raw = [ea_weight(s, t, math.log(4)) for s, t in zip(STUDENT, TEACHER, strict=True)]
    assert result.weight.tolist() == pytest.approx([v / (sum(raw) / 3) for v in raw], rel=1e-5)


def test_entropy_weighted_dkd_equals_the_authors_ea_dkd_loss() -> None:
    alpha, beta, temp = 1.0, 8.0, 4.0

    def dkd_row(s: list[float], t: list[float], y: int) -> float:
        ps, pt = softmax(s, temp), softmax(t, temp)
        bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
        rest = [k for k in range(4) if k != y]
        ns, nt = softmax([s[k] for k in rest], temp), softmax([t[k] for k in rest], temp)
        return (alpha * kl(bt, bs) + beta * kl(nt, ns)) * temp**2

    expected = sum(ea_weight(s, t, 100.0) * dkd_row(s, t, y)
                   for s, t, y in zip(STUDENT, TEACHER, LABELS, strict=True)) / 3
    d = METHODS.create("dkd", {"alpha": alpha, "beta": beta, "temperature": temp}, "m")(
        torch.tensor(STUDENT), torch.tensor(TEACHER), batch())
    w = WEIGHTINGS.create("entropy", {"entropy_bound": 100.0}, "w")
    assert float(w(d, None, inputs()).loss) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------ WSLD
def wsld_weight(s: list[float], t: list[float], y: int) -> float:
    ce_s, ce_t = -math.log(softmax(s)[y]), -math.log(softmax(t)[y])
    return 1 - math.exp(-max(ce_s / (ce_t + 1e-7), 0.0))


def test_wsld_weighted_kd_has_the_authors_weights_and_gradient() -> None:
    temp = 2.0  # the authors' T (their α = 2.5 is the term weight)
    weights = [wsld_weight(s, t, y) for s, t, y in zip(STUDENT, TEACHER, LABELS, strict=True)]
    # their soft loss is T² mean_i w_i CE(p_t, p_s); padkd's KD is T² KL = T² (CE - H(p_t)), whose gradient is the same
    expected = sum(w * temp**2 * kl(softmax(t, temp), softmax(s, temp))
                   for w, s, t in zip(weights, STUDENT, TEACHER, strict=True)) / 3
    student = torch.tensor(STUDENT, requires_grad=True)
    d = METHODS.create("kd", {"temperature": temp}, "m")(student, torch.tensor(TEACHER), batch())
    result = WEIGHTINGS.create("wsld", {}, "w")(d, None, inputs())
    assert float(result.loss.detach()) == pytest.approx(expected, rel=1e-5)
    result.loss.backward()
    theirs = torch.tensor(STUDENT, requires_grad=True)
    soft = -(torch.softmax(torch.tensor(TEACHER) / temp, 1) * torch.log_softmax(theirs / temp, 1)).sum(1)
    (temp**2 * (torch.tensor(weights) * soft).mean()).backward()
    torch.testing.assert_close(student.grad, theirs.grad, rtol=1e-5, atol=1e-7)
    assert weights[2] < 0.5 < weights[1]  # the teacher's error counts least, the student's worst fit most


def test_normalize_rescales_the_published_weights_to_mean_one() -> None:
    d = kd()
    for name in ("entropy", "wsld"):
        raw = WEIGHTINGS.create(name, {}, "w")(d, None, inputs())
        normed = WEIGHTINGS.create(name, {"normalize": True}, "w")(d, None, inputs())
        torch.testing.assert_close(normed.weight, raw.weight)
        assert float(normed.loss) == pytest.approx(float((raw.weight * d).mean()), rel=1e-6)


# ------------------------------------------------------------------------------------------ task outputs
def test_a_task_without_logits_is_refused_at_config_check_and_by_the_distiller() -> None:
    raw = {"output_dir": "unused", "data": {"name": "digits"}, "task": {"name": "retrieval"},
           "student": {"model": {"name": "cnn_embedding"}}, "teacher": {"model": {"name": "cnn_embedding"}},
           "stages": [{"epochs": 1, "terms": [{"method": {"name": "rkd"},
                                               "weighting": {"name": "wsld"}}]}]}
    with pytest.raises(PadkdError, match=r"^stages\[0\]\.terms\[0\]\.weighting: the weighting reads the "
                       r"student_logits, targets, teacher_logits of each sample, which task 'retrieval' does not"):
        parse_checked(raw)
    term = Term("kd", METHODS.create("kd", {}, "m"), WEIGHTINGS.create("entropy", {}, "w"))
    with pytest.raises(PadkdError, match="term 'kd': the weighting reads the student_logits, teacher_logits"):
        Distiller(nn.Linear(4, 3), nn.Linear(4, 3), [term])  # no task: the outputs mean nothing to it


def test_the_distiller_passes_detached_logits_and_labels_of_its_batch() -> None:
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    term = Term("kd", METHODS.create("kd", {}, "m"), WEIGHTINGS.create("wsld", {}, "w"))
    distiller = Distiller(student, teacher, [term], task=TASKS.create("classification"))
    b = Batch(torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0]), torch.arange(5))
    distiller.prepare(b)
    out = distiller(b)
    with torch.no_grad():
        ce_s = nn.functional.cross_entropy(student(b.inputs), b.targets, reduction="none")
        ce_t = nn.functional.cross_entropy(teacher(b.inputs), b.targets, reduction="none")
    raw = 1 - torch.exp(-ce_s / (ce_t + 1e-7))
    torch.testing.assert_close(out.records["kd"]["weight"], raw / raw.mean())
    out.total.backward()  # the weights are detached: only the student's KD gradient flows
    assert student.weight.grad is not None and teacher.weight.grad is None


# ------------------------------------------------------------------------------------------ the ceiling
def test_inverse_discrepancy_is_the_harmonic_mean_and_takes_an_exponent() -> None:
    d = torch.tensor([1.0, 2.0, 4.0, 0.5])
    result = WEIGHTINGS.create("inverse_discrepancy", {}, "w")(d)
    # w ∝ 1/d = [1, 1/2, 1/4, 2], sum 3.75: w = (4/3.75)·[1, 1/2, 1/4, 2]; loss = mean(w d) = 4/3.75
    assert result.weight.tolist() == pytest.approx([4 / 3.75, 2 / 3.75, 1 / 3.75, 8 / 3.75])
    assert float(result.loss) == pytest.approx(4 / 3.75)
    # exponent 2: 1/d² = [1, 1/4, 1/16, 4], sum 5.3125; loss = mean(w d) = (1 + 1/2 + 1/4 + 2) / 5.3125
    squared = WEIGHTINGS.create("inverse_discrepancy", {"exponent": 2.0}, "w")(d)
    assert float(squared.loss) == pytest.approx(3.75 / 5.3125)
    # a sample matched exactly counts as floor × mean d, not as infinitely important
    zero = WEIGHTINGS.create("inverse_discrepancy", {"floor": 0.5}, "w")(torch.tensor([0.0, 1.0, 2.0, 1.0]))
    # mean d = 1, floor 0.5: d counts as [0.5, 1, 2, 1], 1/d = [2, 1, 1/2, 1], sum 4.5
    assert zero.weight.tolist() == pytest.approx([8 / 4.5, 4 / 4.5, 2 / 4.5, 4 / 4.5])


def memory(n: int = 6, **options) -> VarianceMemory:
    w = WEIGHTINGS.create("variance_memory", options, "w")
    ctx = BuildContext(student=None, teacher=None, batch=Batch(torch.zeros(1), torch.zeros(1), torch.zeros(1)),
                       data=DataInfo(n_train=n), world_size=1, student_model=nn.Linear(1, 1), teacher_model=None)
    w.build(Discrepancy(torch.ones(2)), None, ctx)
    w.train()
    return w  # type: ignore[return-value]


def seen(index: list[int]) -> WeightingInputs:
    return WeightingInputs(index=torch.tensor(index))


def test_variance_memory_learns_each_samples_nll_by_index() -> None:
    w = memory(eps=1e-12)
    first = w(torch.tensor([1.0, 2.0, 4.0]), None, seen([0, 1, 2]))
    assert float(first.loss) == pytest.approx(3 / (1 + 0.5 + 0.25))  # first sight: σ² = d, the harmonic mean
    assert w.log_var[:3].tolist() == pytest.approx([0.0, math.log(2), math.log(4)])
    assert w.seen.tolist() == [True, True, True, False, False, False]
    second = w(torch.tensor([4.0, 1.0]), None, seen([0, 1]))
    # weights from the memory before the update: 1/σ² = [1, 1/2], mean 3/4 → w = [4/3, 2/3]
    assert second.weight.tolist() == pytest.approx([4 / 3, 2 / 3])
    assert float(second.loss) == pytest.approx((4 / 3 * 4 + 2 / 3 * 1) / 2)
    # one NLL step of lr 0.5: s ← s - 0.5 (1 - d/σ²), never past log d
    # sample 0: d/σ² = 4, step min(1.5, log 4) = log 4; sample 1: d/σ² = 1/2, step -0.25
    assert w.log_var[:3].tolist() == pytest.approx([math.log(4), math.log(2) - 0.25, math.log(4)])
    assert second.columns["log_var"].tolist() == pytest.approx([0.0, math.log(2)])


def test_variance_memory_ema_and_the_pad_scale() -> None:
    w = memory(update="ema", momentum=0.9, preserve_scale=False, eps=1e-12)
    w(torch.tensor([1.0, 2.0]), None, seen([3, 4]))
    out = w(torch.tensor([4.0, 1.0]), None, seen([3, 4]))
    # PAD's form with σ² = [1, 2] from the first sight: mean(d/σ² + log σ²)
    assert float(out.loss) == pytest.approx((4 / 1 + 0 + 1 / 2 + math.log(2)) / 2)
    assert w.log_var[3:5].exp().tolist() == pytest.approx([0.9 * 1 + 0.1 * 4, 0.9 * 2 + 0.1 * 1])


def test_variance_memory_in_eval_is_frozen_and_knows_only_training_samples() -> None:
    w = memory()
    w(torch.tensor([1.0, 2.0, 4.0]), None, seen([0, 1, 2]))
    w.eval()
    state = {k: v.clone() for k, v in w.state_dict().items()}
    assert set(state) == {"log_var", "seen"}  # buffers: in every checkpoint of the terms
    train = w(torch.tensor([3.0, 3.0, 3.0, 3.0]), None, seen([0, 1, 2, 5]))
    assert train.columns["log_var"][:3].tolist() == pytest.approx(state["log_var"][:3].tolist())
    assert math.isnan(float(train.columns["log_var"][3]))  # never seen in training
    test = w(torch.tensor([3.0, 1.0]), None, WeightingInputs(index=torch.tensor([0, 1]), split="test"))
    assert test.weight.tolist() == [1.0, 1.0] and float(test.loss) == pytest.approx(2.0) and not test.columns
    for key, value in w.state_dict().items():
        assert torch.equal(value, state[key])
    with pytest.raises(PadkdError, match="holds 6 training samples but got indices up to 9"):
        w(torch.tensor([1.0]), None, seen([9]))


# ------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        w = memory(20)
        g = torch.Generator().manual_seed(100 + rank)  # different samples on each rank
        for _ in range(4):
            index = torch.randperm(20, generator=g)[:5]  # the ranks' samples may overlap
            w(torch.rand(5, generator=g) + 0.1, None, WeightingInputs(index=index))
        torch.save(w.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch (about 4 s of CPU each)
def test_two_gloo_ranks_keep_identical_memories(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between the ranks"
    # each update is the one of a single process that saw both ranks' samples at once
    single = memory(20)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    for _ in range(4):
        parts = [(torch.randperm(20, generator=g)[:5], torch.rand(5, generator=g) + 0.1) for g in gens]
        single._learn(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    torch.testing.assert_close(single.log_var, a["log_var"])
    assert a["seen"].sum() > 10


def test_records_carry_the_memory_of_training_samples_only() -> None:
    from padkd.engine.records import collect

    torch.manual_seed(0)
    term = Term("hint", METHODS.create("hint", {}, "m"), WEIGHTINGS.create("variance_memory", {}, "w"))
    distiller = Distiller(nn.Linear(4, 3), nn.Linear(4, 3), [term], task=TASKS.create("classification"))
    batches = [Batch(torch.randn(4, 4), torch.tensor([0, 1, 2, 1]), torch.arange(4) + 4 * k) for k in range(2)]
    distiller.prepare(batches[0], DataInfo(n_train=8, num_classes=3))
    distiller.train()
    for b in batches:
        distiller(b)
    memory_log_var = term.weighting.log_var.clone()
    table, _ = collect(distiller, TASKS.create("classification"), batches, "train")
    torch.testing.assert_close(table["hint.log_var"], memory_log_var)
    test, _ = collect(distiller, TASKS.create("classification"), batches, "test")
    assert "hint.log_var" not in test and test["hint.weight"].tolist() == [1.0] * 8
    assert torch.equal(term.weighting.log_var, memory_log_var)  # records change no memory
