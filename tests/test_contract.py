"""The method contract, checked for every registered method and every registered weighting (plugins too).

Each method is fed its own `example_features` (logits by default, feature maps or lists where the
method reads them) through `build(ctx)` and `forward`, and must: return `[B]` or `[B, E]` with dim 0
the sample and values >= 0 (a signed part only as `unweighted`, and only when declared); send gradients
to the student features and its own parameters; change no state in eval mode; permute its rows with the
batch; work under bf16/fp16 autocast; handle batch sizes 1 and 2 or refuse them with a clear message;
and reduce to a finite loss under every weighting that accepts it, while the others refuse it at
config check with one line.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from padkd.batch import Batch, tree_leaves, tree_map
from padkd.context import BuildContext, DataInfo
from padkd.discrepancy import Discrepancy, WeightingInputs
from padkd.errors import PadkdError
from padkd.methods import METHODS, Method
from padkd.validate import parse_checked
from padkd.weightings import WEIGHTINGS

B = 8
NUM_CLASSES = 10
N_TRAIN = 50


def make_case(name: str, batch_size: int = B, seed: int = 0) -> tuple[Method, Any, Any, Batch, BuildContext]:
    """A freshly built method with example features and a batch of `batch_size` (labels, indices)."""
    g = torch.Generator().manual_seed(seed)
    method = METHODS.create(name, {}, f"method {name}")
    student, teacher = type(method).example_features(batch_size, g)
    student = tree_map(lambda t: t.clone().requires_grad_(t.is_floating_point()), student)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    index = torch.randperm(N_TRAIN, generator=g)[:batch_size]
    batch = Batch(inputs=torch.zeros(batch_size, 1), targets=targets, index=index)
    train_targets = torch.randint(0, NUM_CLASSES, (N_TRAIN,), generator=g)
    train_targets[index] = targets
    ctx = BuildContext(student=student, teacher=teacher, batch=batch,
                       data=DataInfo(n_train=N_TRAIN, num_classes=NUM_CLASSES, train_targets=train_targets),
                       world_size=1, student_model=nn.Linear(2, 2), teacher_model=nn.Linear(2, 2))
    method.build(ctx)
    return method, student, teacher, batch, ctx


def permuted(tree: Any, perm: Tensor) -> Any:
    return tree_map(lambda t: t[perm].detach().requires_grad_(t.requires_grad), tree)


def discrepancy(method: Method, student: Any, teacher: Any, batch: Batch) -> Discrepancy:
    d = Discrepancy.of(method(student, teacher, batch))
    assert d.value.shape[0] == len(batch), f"dim 0 must be the sample: {tuple(d.value.shape)}"
    return d


METHOD_NAMES = METHODS.names()


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_shape_sign_and_unweighted_part(name: str) -> None:
    method, s, t, batch, _ = make_case(name)
    method.train()
    d = discrepancy(method, s, t, batch)
    assert d.value.dim() in (1, 2)
    assert d.value.dtype == torch.float32, "reductions must run in fp32"
    assert torch.isfinite(d.value).all()
    assert (d.value >= 0).all(), "discrepancies are >= 0; a signed part goes to Discrepancy.unweighted"
    if not method.signed:
        assert d.unweighted is None, "only methods that declare signed = True return an unweighted part"
    else:
        assert d.unweighted is not None and d.unweighted.dim() == 0


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_gradients_reach_the_student_and_own_modules_only(name: str) -> None:
    method, s, t, batch, _ = make_case(name)
    method.train()
    t_before = [x.clone() for x in tree_leaves(t)]
    d = discrepancy(method, s, t, batch)
    loss = d.value.sum() + (d.unweighted if d.unweighted is not None else 0)
    loss.backward()
    grads = [x.grad for x in tree_leaves(s) if x.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the student"
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    for p in method.parameters():
        if p.requires_grad:
            assert p.grad is not None, "a trainable module of the method got no gradient"
    for before, after in zip(t_before, tree_leaves(t), strict=True):
        assert after.grad is None and torch.equal(before, after), "the teacher's features were touched"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_eval_mode_changes_no_state(name: str) -> None:
    method, s, t, batch, _ = make_case(name)
    method.eval()
    before = copy.deepcopy(method.state_dict())
    with torch.no_grad():
        discrepancy(method, s, t, batch)
    after = method.state_dict()
    assert list(before) == list(after)
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed in eval mode"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_permuting_the_batch_permutes_the_rows(name: str) -> None:
    method, s, t, batch, _ = make_case(name)
    method.eval()
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(1))
    pbatch = Batch(batch.inputs[perm], batch.targets[perm], batch.index[perm])
    with torch.no_grad():
        torch.manual_seed(0)
        d = discrepancy(method, s, t, batch)
        torch.manual_seed(0)
        dp = discrepancy(method, permuted(s, perm), permuted(t, perm), pbatch)
    rows, prows = d.reduce_elements(), dp.reduce_elements()
    if method.stochastic:  # sampled negatives: the same distribution of rows, not the same values
        assert rows.mean() == pytest.approx(float(prows.mean()), rel=0.5)
        return
    torch.testing.assert_close(prows, rows[perm], rtol=1e-4, atol=1e-5)
    if method.elements == "fixed":
        torch.testing.assert_close(dp.value, d.value[perm], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_low_precision_inputs_under_autocast(name: str, dtype: torch.dtype) -> None:
    method, s, t, batch, _ = make_case(name)
    method.train()
    low_s = tree_map(lambda x: x.detach().to(dtype).requires_grad_(True) if x.is_floating_point() else x, s)
    low_t = tree_map(lambda x: x.to(dtype) if x.is_floating_point() else x, t)
    with torch.autocast("cpu", dtype=dtype):
        d = discrepancy(method, low_s, low_t, batch)
    assert d.value.dtype == torch.float32
    assert torch.isfinite(d.value).all()
    d.value.sum().backward()


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_tiny_batches_work_or_say_why(name: str, size: int) -> None:
    try:
        method, s, t, batch, _ = make_case(name, batch_size=size)
        method.train()
        d = discrepancy(method, s, t, batch)
    except (ValueError, PadkdError) as err:
        assert str(err) and "\n" not in str(err)
        return
    assert torch.isfinite(d.value).all() and (d.value >= 0).all()


def _embedding(batch_size: int) -> Tensor:
    return torch.randn(batch_size, 6, generator=torch.Generator().manual_seed(2), requires_grad=True)


def _inputs(batch: Batch) -> WeightingInputs:
    """What a classification task supplies to weightings: class logits of both models, labels, indices."""
    g = torch.Generator().manual_seed(3)
    n = len(batch)
    return WeightingInputs(index=batch.index, student_logits=torch.randn(n, NUM_CLASSES, generator=g),
                           teacher_logits=torch.randn(n, NUM_CLASSES, generator=g) * 3, targets=batch.targets)


@pytest.mark.parametrize("weighting", WEIGHTINGS.names())
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_weighting_reduces_or_refuses_every_method(name: str, weighting: str) -> None:
    method, s, t, batch, ctx = make_case(name)
    w = WEIGHTINGS.create(weighting, {}, "weighting")
    try:
        w.check(method)
    except ValueError as err:
        assert "\n" not in str(err)
        refused = True
    else:
        refused = False
    if refused:  # the config check says so in one line, before anything trains
        raw = {"output_dir": "unused", "data": {"name": "digits"}, "student": {"model": {"name": "cnn"}},
               "teacher": {"model": {"name": "cnn"}},
               "stages": [{"epochs": 1, "terms": [{"method": {"name": name}, "weighting": {"name": weighting}}]}]}
        with pytest.raises(PadkdError, match=r"^stages\[0\]\.terms\[0\]\.weighting: "):
            parse_checked(raw)
        return
    method.train()
    w.train()
    d = discrepancy(method, s, t, batch)
    emb = _embedding(B)
    w.build(d, emb, ctx)
    result = w(d, emb, _inputs(batch))
    assert result.loss.dim() == 0 and torch.isfinite(result.loss)
    assert result.weight.shape == (B,)
    valid = d.sample_mask()
    mean_weight = result.weight[valid].mean() if valid is not None else result.weight.mean()
    assert float(mean_weight) == pytest.approx(1.0, rel=1e-4)  # the records' weight column: mean 1
    result.loss.backward()
    # A second batch of another size: the element count of a fixed-element method does not change.
    method2, s2, t2, batch2, _ = make_case(name, batch_size=B - 3, seed=5)
    method2.load_state_dict(method.state_dict())
    d2 = discrepancy(method2, s2, t2, batch2)
    assert torch.isfinite(w(d2, _embedding(B - 3), _inputs(batch2)).loss)


def test_pad_per_element_refuses_exchangeable_elements() -> None:
    class Rows(Method):
        elements = "exchangeable"

        def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Tensor:
            return (torch.cdist(student, student) - torch.cdist(teacher, teacher)).pow(2)

    pad = WEIGHTINGS.create("pad", {}, "w")
    with pytest.raises(ValueError, match="per_sample"):
        pad.check(Rows())
    WEIGHTINGS.create("pad", {"mode": "per_sample"}, "w").check(Rows())


def test_batch_level_methods_accept_only_uniform() -> None:
    class Whole(Method):
        unit = "batch"

    WEIGHTINGS.create("uniform", {}, "w").check(Whole())
    for name in set(WEIGHTINGS.names()) - {"uniform"}:
        with pytest.raises(ValueError, match="only weighting 'uniform'"):
            WEIGHTINGS.create(name, {}, "w").check(Whole())
