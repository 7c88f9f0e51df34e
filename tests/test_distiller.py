"""Distiller: frozen teacher, taps, named losses, per-sample records, terms' state, carry, PAD end to end."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.distiller import Distiller, Term
from padkd.errors import PadkdError
from padkd.methods import KD, FitNet, Hint
from padkd.taps import Taps, default_embedding
from padkd.tasks import Classification
from padkd.weightings import PAD, WEIGHTINGS

B, IN, CLASSES = 16, 10, 4


def ce(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(out, batch.targets)


CLS = Classification()


def teacher_mlp() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(IN, 16), bn=nn.BatchNorm1d(16), act=nn.ReLU(), fc=nn.Linear(16, CLASSES)
        )
    )


def student_mlp(width: int = 8) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(fc1=nn.Linear(IN, width), bn=nn.BatchNorm1d(width), act=nn.ReLU(), fc=nn.Linear(width, CLASSES))
    )


class TinyCNN(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, stride=2), nn.BatchNorm2d(channels), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def mlp_batch(seed: int = 0, n: int = B) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return Batch(inputs=x, targets=y, index=torch.arange(n) + 100 * seed)


def cnn_batch(seed: int = 0, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        inputs=torch.randn(n, 3, 8, 8, generator=g),
        targets=torch.randint(0, CLASSES, (n,), generator=g),
        index=torch.arange(n),
    )


def mlp_distiller(**kw) -> Distiller:
    torch.manual_seed(0)
    teacher, student = teacher_mlp(), student_mlp()
    # give the teacher non-trivial running statistics
    with torch.no_grad():
        teacher.bn.running_mean.uniform_(-1, 1)
        teacher.bn.running_var.uniform_(0.5, 2)
    terms = [
        Term("kd", KD(), student="output", teacher="output"),
        Term("hint", Hint(), WEIGHTINGS.create("pad"), student="fc:in", teacher="fc:in"),
    ]
    return Distiller(student, teacher, terms=terms, task=CLS, **kw)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith(skip):
            continue
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------ teacher


def test_teacher_untouched_by_training_step():
    dist = mlp_distiller()
    teacher = dist.teacher
    b = mlp_batch()
    dist.prepare(b)
    before = snapshot(teacher)
    s_before = snapshot(dist.student)
    opt = torch.optim.SGD(dist.parameters(), lr=0.5)
    dist.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    for step in range(3):
        out = dist(mlp_batch(step))
        opt.zero_grad()
        out.total.backward()
        opt.step()
    assert_same_state(before, snapshot(teacher))
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    # the student did train
    assert any(not torch.equal(s_before[k], v) for k, v in snapshot(dist.student).items())
    # teacher parameters are invisible to the optimizer and to the distiller's state dict
    t_ids = {id(p) for p in teacher.parameters()}
    assert not t_ids & {id(p) for p in dist.parameters()}
    sd = dist.state_dict()
    assert not any(k.startswith("_teacher") or k.startswith("teacher") for k in sd)
    t_ptrs = {v.data_ptr() for v in teacher.state_dict().values()}
    assert not t_ptrs & {v.data_ptr() for v in sd.values()}
    assert out.teacher is not None and not out.teacher.requires_grad


def test_teacher_bn_running_stats_unchanged_in_train_mode():
    dist = mlp_distiller()
    b = mlp_batch()
    dist.prepare(b)
    dist.train()
    before = snapshot(dist.teacher)
    out = dist(b)
    assert_same_state(before, snapshot(dist.teacher))
    # teacher ran in eval mode: its output equals a plain eval forward
    with torch.no_grad():
        torch.testing.assert_close(out.teacher, dist.teacher.eval()(b.inputs))


def test_teacher_train_bn_uses_batch_stats_but_keeps_running_stats():
    dist = mlp_distiller(teacher_train_bn=True)
    b = mlp_batch()
    dist.prepare(b)
    dist.train()
    bns = [m for m in dist.teacher.modules() if isinstance(m, nn.BatchNorm1d)]
    assert bns and all(m.training for m in bns)
    assert not dist.teacher.fc.training and not dist.teacher.training
    before = snapshot(dist.teacher)
    out = dist(b)
    # running statistics untouched (num_batches_tracked is a counter, not a statistic)
    assert_same_state(before, snapshot(dist.teacher), skip=("num_batches_tracked",))
    # ... and the forward really used batch statistics
    t = dist.teacher
    with torch.no_grad():
        h = t.fc1(b.inputs)
        h = F.batch_norm(h, None, None, t.bn.weight, t.bn.bias, training=True, eps=t.bn.eps)
        expected = t.fc(t.act(h))
    torch.testing.assert_close(out.teacher, expected)
    # eval switches the teacher's BN back to eval
    dist.eval()
    assert not any(m.training for m in dist.teacher.modules())


def test_teacher_train_bn_cnn_running_stats_unchanged():
    torch.manual_seed(1)
    teacher, student = TinyCNN(6), TinyCNN(4)
    dist = Distiller(
        student, teacher,
        terms=[Term("fit", FitNet(), WEIGHTINGS.create("pad", {"mode": "per_sample"}),
                    student="features.3", teacher="features.3")],
        teacher_train_bn=True,
    )
    b = cnn_batch()
    dist.prepare(b)
    dist.train()
    stats = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k}
    out = dist(b)
    out.total.backward()
    for k, v in teacher.state_dict().items():
        if "running" in k:
            assert torch.equal(stats[k], v), k
    assert out.records["fit"]["discrepancy"].shape == (8,)


def test_distiller_moves_teacher_with_it():
    dist = mlp_distiller()
    dist.double()
    assert all(p.dtype == torch.float64 for p in dist.teacher.parameters())
    assert all(p.dtype == torch.float64 for p in dist.student.parameters())


# ------------------------------------------------------------------------------- construction


def test_forward_before_prepare_raises():
    dist = mlp_distiller()
    with pytest.raises(RuntimeError, match="prepare"):
        dist(mlp_batch())


def test_no_terms_needs_no_prepare():
    torch.manual_seed(2)
    dist = Distiller(student_mlp(), task=CLS)
    b = mlp_batch()
    out = dist(b)
    assert list(out.losses) == ["task"] and out.teacher is None and out.records == {}
    torch.testing.assert_close(out.total, ce(dist.student(b.inputs), b))


def test_bad_term_configs_raise():
    with pytest.raises(ValueError, match="teacher"):
        Distiller(student_mlp(), None, terms=[Term("kd", KD())])
    with pytest.raises(ValueError, match="unique"):
        Distiller(student_mlp(), teacher_mlp(), terms=[Term("kd", KD()), Term("kd", KD())])
    with pytest.raises(ValueError, match="task"):
        Distiller(student_mlp(), teacher_mlp(), terms=[Term("task", KD())])


def test_losses_and_records():
    dist = mlp_distiller(task_weight=0.5)
    b = mlp_batch()
    dist.prepare(b)
    dist.train()
    out = dist(b)
    assert list(out.losses) == ["task", "kd", "hint"]
    torch.testing.assert_close(out.losses["task"], 0.5 * ce(out.student, b))
    torch.testing.assert_close(out.total, sum(out.losses.values()))
    assert set(out.records) == {"kd", "hint"}
    assert set(out.records["kd"]) == {"discrepancy", "weight"}
    assert set(out.records["hint"]) == {"discrepancy", "weight", "log_var", "inv_var"}
    for rec in out.records.values():
        for v in rec.values():
            assert v.shape == (B,) and not v.requires_grad
    # KD record equals the method's own per-sample value; uniform weights are 1
    kd = KD()(out.student.detach(), out.teacher, b)
    torch.testing.assert_close(out.records["kd"]["discrepancy"], kd)
    torch.testing.assert_close(out.records["kd"]["weight"], torch.ones(B))
    torch.testing.assert_close(out.losses["kd"], kd.mean())
    # PAD record: inv_var = mean_e exp(-log σ²) ≥ exp(-mean log σ²) (Jensen); weight = inv_var / its batch
    # mean, the same meaning (relative weight, mean 1) as under every other weighting
    rec = out.records["hint"]
    assert (rec["inv_var"] > 0).all()
    assert (rec["inv_var"] >= torch.exp(-rec["log_var"]) - 1e-6).all()
    torch.testing.assert_close(rec["weight"], rec["inv_var"] / rec["inv_var"].mean())


def test_term_weight_scales_loss():
    torch.manual_seed(3)
    teacher, student = teacher_mlp(), student_mlp()
    b = mlp_batch()
    d1 = Distiller(student, teacher, terms=[Term("kd", KD(), weight=1.0)])
    d3 = Distiller(student, teacher, terms=[Term("kd", KD(), weight=3.0)])
    d1.prepare(b)
    d3.prepare(b)
    torch.testing.assert_close(d3(b).losses["kd"], 3 * d1(b).losses["kd"])


def test_terms_state_dict_holds_heads_and_connectors():
    dist = mlp_distiller()
    dist.prepare(mlp_batch())
    aux = dist.terms_state_dict()
    assert "1.weighting.head.0.weight" in aux
    assert "1.weighting.head.1.running_var" in aux
    assert "1.weighting.initialized" in aux and bool(aux["1.weighting.initialized"])
    assert "1.method.connector.weight" in aux and aux["1.method.connector.weight"].shape == (16, 8)
    assert aux["1.weighting.head.0.weight"].shape == (16, 8)  # embedding width 8 → E = 16
    student_keys = set(dist.student.state_dict())
    assert not any("weighting" in k or "connector" in k or "head" in k for k in student_keys)
    assert student_keys == set(student_mlp().state_dict())
    # aux parameters train with the student
    ids = {id(p) for p in dist.parameters()}
    pad = dist.terms[1].weighting
    assert all(id(p) in ids for p in pad.parameters())
    assert all(id(p) in ids for p in dist.terms[1].method.connector.parameters())


def test_prepare_initialises_pad_from_data_without_touching_student_bn():
    dist = mlp_distiller()
    b = mlp_batch()
    s_before = snapshot(dist.student)
    dist.train()
    dist.prepare(b)
    assert dist.training  # restored
    assert_same_state(s_before, snapshot(dist.student))
    pad = dist.terms[1].weighting
    assert pad._ready and dist.clock.step == 0  # prepare runs in eval mode: no step counted
    # the bias is log of the mean hint discrepancy measured in eval mode
    with torch.no_grad():
        dist.eval()
        out = dist(b)
    expected = torch.log(out.records["hint"]["discrepancy"].mean() + pad.eps)
    torch.testing.assert_close(pad.head[1].bias, expected.expand(16), rtol=1e-5, atol=1e-5)


def test_prepare_is_idempotent():
    dist = mlp_distiller()
    b = mlp_batch()
    dist.prepare(b)
    connector = dist.terms[1].method.connector
    aux = {k: v.clone() for k, v in dist.terms_state_dict().items()}
    dist.prepare(b)
    assert dist.terms[1].method.connector is connector
    assert_same_state(aux, dist.terms_state_dict())


# ---------------------------------------------------------------------------------------- taps


def test_bad_tap_path_did_you_mean():
    student = student_mlp()
    with pytest.raises(PadkdError, match="no module 'fcc'; did you mean 'fc'"):
        Taps(student, {"fcc:in"}, "student")
    with pytest.raises(PadkdError, match="suffix"):
        Taps(student, {"fc:out"}, "student")
    with pytest.raises(PadkdError, match="student tap 'fc1x'.*did you mean 'fc1'"):
        Distiller(student, teacher_mlp(), terms=[Term("h", Hint(), student="fc1x", teacher="fc1")])


def test_tap_captures_module_input_and_output():
    torch.manual_seed(4)
    student = student_mlp().eval()
    taps = Taps(student, {"fc:in", "fc1", "output"}, "student")
    x = torch.randn(B, IN)
    with taps.capture():
        out = student(x)
    values = taps.values(out)
    assert set(values) == {"fc:in", "fc1", "output"}
    expected_in = student.act(student.bn(student.fc1(x)))
    torch.testing.assert_close(values["fc:in"], expected_in)
    torch.testing.assert_close(values["fc1"], student.fc1(x))
    assert values["output"] is out
    # outside capture() nothing is recorded; close() removes the hooks
    student(x)
    assert taps._calls == {}
    taps.close()
    assert not student.fc._forward_hooks


class Twice(nn.Module):
    """A module whose `act` runs twice and whose `pair` returns a dict (an FPN-like pytree)."""

    padkd_taps = {"first": "act#0", "levels": "pair"}

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(3, 3), nn.Linear(3, 3), nn.ReLU()
        self.pair = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x))
        g = self.act(self.b(h))
        self.pair({"p3": h, "p4": g})
        return g


def test_taps_keep_every_call_of_a_repeated_module_and_pytree_values():
    model = Twice()
    x = torch.randn(2, 3)
    taps = Taps(model, {"act#0", "act#1", "act#*", "first", "levels"}, "student")
    with taps.capture():
        out = model(x)
    values = taps.values(out)
    first = model.act(model.a(x))
    torch.testing.assert_close(values["act#0"], first)
    torch.testing.assert_close(values["act#1"], out)
    torch.testing.assert_close(values["first"], first)
    assert [v.shape for v in values["act#*"]] == [(2, 3), (2, 3)]
    assert set(values["levels"]) == {"p3", "p4"}
    plain = Taps(model, {"act"}, "student")
    with plain.capture():
        model(x)
    with pytest.raises(PadkdError, match=r"ran 2 times in one forward; tap 'act#0' … 'act#1'"):
        plain.values(None)
    late = Taps(model, {"act#2"}, "teacher")
    with late.capture():
        model(x)
    with pytest.raises(PadkdError, match="ran 2 time"):
        late.values(None)


def test_taps_are_installed_once_per_distiller_and_removed_by_close():
    dist = mlp_distiller()
    b = mlp_batch()
    dist.prepare(b)
    hooks = [len(m._forward_hooks) for m in dist.student.modules()]
    for _ in range(3):
        dist(b)
    assert [len(m._forward_hooks) for m in dist.student.modules()] == hooks and sum(hooks) > 0
    dist.close()
    for m in list(dist.student.modules()) + list(dist.teacher.modules()):
        assert not m._forward_hooks


def test_embedding_auto_picks_pooled_alias_or_last_linear_input():
    assert default_embedding(student_mlp()) == "fc:in"
    assert default_embedding(TinyCNN(3)) == "fc:in"
    assert default_embedding(Twice()) == "b:in"
    aliased = TinyCNN(3)
    aliased.padkd_taps = {"pooled": "pool"}
    assert default_embedding(aliased) == "pooled"
    with pytest.raises(PadkdError, match="nn.Linear"):
        default_embedding(nn.Sequential(nn.Conv2d(3, 3, 1)))
    dist = mlp_distiller()
    assert dist.embedding_taps == {"hint": "fc:in"}  # uniform KD needs none
    explicit = Distiller(
        student_mlp(), teacher_mlp(),
        terms=[Term("h", Hint(), PAD(), student="fc:in", teacher="fc:in", embedding="fc1")],
    )
    assert explicit.embedding_taps == {"h": "fc1"}
    named = Distiller(
        student_mlp(), teacher_mlp(), embedding="fc1",
        terms=[Term("h", Hint(), PAD(), student="fc:in", teacher="fc:in")],
    )
    assert named.embedding_taps == {"h": "fc1"}


def test_pad_reads_the_tapped_embedding():
    """The PAD head sees the student's `fc:in` tensor and gradients flow back into the student."""
    dist = mlp_distiller()
    b = mlp_batch()
    dist.prepare(b)
    dist.train()
    out = dist(b)
    pad = dist.terms[1].weighting
    pad.zero_grad()
    dist.student.zero_grad()
    out.losses["hint"].backward()
    assert pad.head[0].weight.grad.abs().sum() > 0
    assert dist.student.fc1.weight.grad.abs().sum() > 0
    assert dist.student.fc.weight.grad is None  # fc is after the tap; only KD/task reach it


def test_student_without_linear_and_no_pad():
    student = nn.Sequential(nn.Conv2d(3, CLASSES, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    teacher = nn.Sequential(nn.Conv2d(3, CLASSES, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    dist = Distiller(student, teacher, terms=[Term("kd", KD())])
    dist.prepare(cnn_batch())
    assert dist(cnn_batch()).losses["kd"].shape == ()


# -------------------------------------------------------------------------------- end to end


def test_pad_trains_end_to_end():
    torch.manual_seed(5)
    teacher = teacher_mlp()
    with torch.no_grad():
        teacher.bn.running_var.fill_(1.0)
    student = student_mlp(width=12)
    dist = Distiller(
        student, teacher,
        terms=[Term("hint", Hint(), WEIGHTINGS.create("pad"), student="fc:in", teacher="fc:in")],
        task=CLS,
    )
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, IN, generator=g)
    with torch.no_grad():
        y = teacher.eval()(x).argmax(1)
    b = Batch(inputs=x, targets=y, index=torch.arange(64))
    dist.prepare(b)
    opt = torch.optim.Adam(dist.parameters(), lr=1e-2)
    dist.train()
    totals, hint_d = [], []
    for _ in range(50):
        out = dist(b)
        assert torch.isfinite(out.total)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        totals.append(out.total.item())
        hint_d.append(out.records["hint"]["discrepancy"].mean().item())
    assert sum(totals[-5:]) / 5 < sum(totals[:5]) / 5 - 0.5
    assert hint_d[-1] < 0.5 * hint_d[0]  # the student really mimics the teacher's features
    assert dist.clock.step == 50  # one step per training forward without a trainer


def test_uniform_and_pad_give_same_records_shape_on_cnn_kd():
    torch.manual_seed(7)
    teacher, student = TinyCNN(6), TinyCNN(4)
    dist = Distiller(
        student, teacher,
        terms=[
            Term("kd", KD(2.0), WEIGHTINGS.create("focal")),
            Term("kd_pad", KD(2.0), WEIGHTINGS.create("pad", {"mode": "per_sample"})),
        ],
        task=CLS,
    )
    b = cnn_batch()
    dist.prepare(b)
    dist.train()
    out = dist(b)
    assert set(out.losses) == {"task", "kd", "kd_pad"}
    torch.testing.assert_close(out.records["kd"]["discrepancy"], out.records["kd_pad"]["discrepancy"])
    assert out.records["kd"]["weight"].mean().item() == pytest.approx(1.0, abs=1e-5)
    assert dist.terms[1].weighting.head[0].in_features == 4  # TinyCNN(4).fc:in
    assert out.records["kd"]["discrepancy"].shape == (8,)


# ------------------------------------------------------------------------- the seam and stages


class TruncatedTeacher(Classification):
    """A task whose teacher runs only up to `bn` and reads the student's tapped `fc1` output."""

    student_taps = frozenset({"fc1"})

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[set[str]] = []

    def teacher_forward(self, teacher, batch, student_values):
        self.seen.append(set(student_values))
        return teacher.bn(teacher.fc1(batch.inputs))


def test_task_calls_the_models_and_the_teacher_can_read_student_values():
    torch.manual_seed(8)
    task = TruncatedTeacher()
    dist = Distiller(student_mlp(), teacher_mlp(), task=task,
                     terms=[Term("h", Hint(), student="fc1", teacher="bn")])
    b = mlp_batch()
    dist.prepare(b)
    out = dist(b)
    assert task.seen[-1] == {"output", "fc1"}
    t = dist.teacher
    torch.testing.assert_close(out.teacher, t.bn(t.fc1(b.inputs)))
    expected = (dist.terms[0].method.connector(dist.student.fc1(b.inputs)) - out.teacher).pow(2).mean()
    torch.testing.assert_close(out.losses["h"], expected)


@pytest.mark.parametrize("reads_student", [False, True])
def test_teacher_runs_first_unless_its_forward_reads_student_taps(reads_student: bool):
    """Teacher first frees its activations before the student's graph exists (peak memory, CPU page faults)."""
    order: list[str] = []
    student, teacher = student_mlp(), teacher_mlp()
    student.register_forward_pre_hook(lambda m, i: order.append("student"))
    teacher.register_forward_pre_hook(lambda m, i: order.append("teacher"))
    task = TruncatedTeacher() if reads_student else Classification()
    if reads_student:  # the truncated teacher calls its submodules: hook the first one it runs
        teacher.fc1.register_forward_pre_hook(lambda m, i: order.append("teacher"))
    dist = Distiller(student, teacher, task=task, terms=[Term("h", Hint(), student="fc1", teacher="bn")])
    b = mlp_batch()
    dist.prepare(b)
    order.clear()
    dist(b)
    assert order == (["student", "teacher"] if reads_student else ["teacher", "student"])


class SignedMethod(Hint):
    signed = True

    def forward(self, student, teacher, batch):
        d = super().forward(student, teacher, batch)
        from padkd.discrepancy import Discrepancy

        return Discrepancy(d, unweighted=torch.tensor(-0.25))


def test_unweighted_part_is_added_after_the_weighting_and_ramp_scales_the_term():
    torch.manual_seed(9)
    b = mlp_batch()
    dist = Distiller(student_mlp(), teacher_mlp(),
                     terms=[Term("s", SignedMethod(), WEIGHTINGS.create("ohem", {"fraction": 0.5}),
                                 student="fc:in", teacher="fc:in", weight=2.0, warmup_epochs=1.5)],
                     steps_per_epoch=2)  # a ramp over 1.5 epochs of 2 optimizer steps: N = 3
    dist.prepare(b)
    dist.train()
    plain = dist(b, step=10**6)
    d = plain.records["s"]["discrepancy"]
    top = d.topk(B // 2).values
    torch.testing.assert_close(plain.losses["s"], 2.0 * (top.sum() / B * 2 - 0.25))  # OHEM weights 2 on half
    for step, factor in ((0, 0.25), (1, 0.5), (3, 1.0), (9, 1.0)):
        torch.testing.assert_close(dist(b, step=step).losses["s"], factor * plain.losses["s"])


def test_without_a_step_each_training_forward_counts_one_and_eval_counts_none():
    b = mlp_batch()
    dist = Distiller(student_mlp(), teacher_mlp(), terms=[Term("h", Hint(), student="fc:in", teacher="fc:in",
                                                               warmup_steps=2)])
    dist.prepare(b)
    dist.train()
    full = dist(b, step=5).losses["h"]
    dist.clock.step = 0
    ramped = [dist(b).losses["h"] for _ in range(3)]
    for k, loss in enumerate(ramped):
        torch.testing.assert_close(loss, full * (min(k, 2) + 1) / 3)
    dist.eval()
    dist(b)
    assert dist.clock.step == 3


class FrozenPart(Hint):
    """A method that freezes one of its own modules (as FT freezes its paraphraser)."""

    def build(self, ctx):
        super().build(ctx)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_follow_trainable_lr_scale_and_frozen_method_modules():
    torch.manual_seed(10)
    dist = Distiller(student_mlp(), teacher_mlp(), terms=[
        Term("a", FrozenPart(), student="fc:in", teacher="fc:in", lr_scale=0.1),
        Term("b", Hint(), PAD(), student="fc1", teacher="fc1", lr_scale=0.0)])
    dist.prepare(mlp_batch())
    groups = dist.param_groups(trainable=["fc1"])
    assert [g["name"] for g in groups] == ["student", "a"]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in dist.student.fc1.parameters()}
    assert not dist.student.fc.weight.requires_grad and dist.student.fc1.weight.requires_grad
    assert groups[1]["lr_scale"] == 0.1
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in dist.terms[0].method.connector.parameters()}
    assert not any(p.requires_grad for p in dist.terms[1].parameters())
    assert len(dist.param_groups(trainable=None)[0]["params"]) == len(list(dist.student.parameters()))


def test_student_mode_eval_keeps_student_bn_statistics():
    dist = mlp_distiller(student_mode="eval")
    b = mlp_batch()
    dist.prepare(b)
    before = snapshot(dist.student)
    dist.train()
    assert not dist.student.training and dist.terms[1].training
    dist(b)
    assert_same_state(before, snapshot(dist.student))


def test_carry_loads_what_the_previous_stage_had_and_keeps_new_modules_fresh():
    torch.manual_seed(11)
    teacher, student = teacher_mlp(), student_mlp()
    b = mlp_batch()
    first = Distiller(student, teacher, terms=[Term("h", Hint(), student="fc:in", teacher="fc:in")])
    first.prepare(b)
    with torch.no_grad():
        first.terms[0].method.connector.weight.fill_(0.5)
    second = Distiller(student, teacher, terms=[Term("h", FrozenPart(), student="fc:in", teacher="fc:in")])
    second.terms[0].signature = first.terms[0].signature
    second.prepare(b, previous=first)
    assert torch.equal(second.terms[0].method.connector.weight, first.terms[0].method.connector.weight)
    assert second.terms[0].method.frozen.weight.shape == (2, 2)  # new in this stage, fresh
    off = Distiller(student, teacher, terms=[Term("h", Hint(), student="fc:in", teacher="fc:in", carry=False)])
    off.prepare(b, previous=first)
    assert not torch.equal(off.terms[0].method.connector.weight, first.terms[0].method.connector.weight)
    wide = Distiller(student_mlp(width=5), teacher, terms=[Term("h", Hint(), student="fc:in", teacher="fc:in")])
    with pytest.raises(PadkdError, match="cannot carry.*carry: false"):
        wide.prepare(mlp_batch(), previous=first)


def test_a_tap_overwritten_by_an_in_place_op_is_an_error_and_copy_keeps_it():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU(inplace=True)).eval()
    x = torch.randn(4, 3)
    taps = Taps(model, {"1"}, "student")
    with taps.capture():
        model(x)
    with pytest.raises(PadkdError, match=r"changed in place .* tap '1:copy'"):
        taps.values(None)
    copying = Taps(model, {"1:copy"}, "student")
    with copying.capture():
        model(x)
    preact = copying.values(None)["1:copy"]
    torch.testing.assert_close(preact, model[1](model[0](x)))
    assert (preact < 0).any()  # the pre-activation, not the ReLU's output


def test_a_weighting_with_the_two_argument_forward_still_works():
    """Plugins written before `inputs` existed define forward(d, embedding): the Distiller calls them so."""
    from padkd.discrepancy import Discrepancy
    from padkd.weightings import WeightedLoss, Weighting

    class Halves(Weighting):
        def forward(self, d, embedding=None):
            per_sample = Discrepancy.of(d).reduce_elements()
            return WeightedLoss(loss=0.5 * per_sample.mean(), weight=torch.ones_like(per_sample))

    torch.manual_seed(3)
    teacher, student = teacher_mlp(), student_mlp()
    b = mlp_batch()
    plain = Distiller(student, teacher, terms=[Term("kd", KD())])
    halved = Distiller(student, teacher, terms=[Term("kd", KD(), Halves())])
    plain.prepare(b)
    halved.prepare(b)
    torch.testing.assert_close(halved(b).losses["kd"], 0.5 * plain(b).losses["kd"])


def test_a_bf16_teacher_stays_bf16_and_gives_fp32_values_close_to_the_fp32_teacher():
    """teacher.precision: bf16 (padkd.placement): the teacher keeps its dtype when the distiller is cast,
    callers get fp32 outputs and tapped values, and KD moves by no more than bf16's rounding."""
    import copy

    from padkd import placement

    torch.manual_seed(4)
    teacher, student = teacher_mlp(), student_mlp()
    b = mlp_batch()
    fp32 = Distiller(student, teacher, terms=[Term("kd", KD()), Term("hint", Hint(), student="fc:in",
                                                                     teacher="fc:in")])
    half_teacher = placement.place(copy.deepcopy(teacher), "cpu", "bf16", home="cpu")
    bf16 = Distiller(student, half_teacher, terms=[Term("kd", KD()), Term("hint", Hint(), student="fc:in",
                                                                          teacher="fc:in")])
    fp32.prepare(b)
    bf16.prepare(b)
    bf16.double().float()  # casting the distiller leaves a placed teacher as it was placed
    assert all(p.dtype == torch.bfloat16 for p in half_teacher.parameters())
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert half_teacher(b.inputs).dtype == torch.float32
    out, ref = bf16(b), fp32(b)
    for name in ("kd", "hint"):
        assert out.losses[name].dtype == torch.float32
        torch.testing.assert_close(out.losses[name], ref.losses[name], rtol=0.05, atol=0.02)
    assert not torch.equal(out.losses["kd"], ref.losses["kd"])  # the teacher really ran in bf16
