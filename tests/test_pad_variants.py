"""The evidence study's PAD variants and data options: per-dimension PAD (no head), the scale-preserving
form, the head's own LR, a head on the connector output, per-element records, corrupted training sets
and the probe's LeNet. Formulas are written here from their definitions, not copied from the code."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from padkd.batch import Batch
from padkd.data import DATASETS
from padkd.discrepancy import Discrepancy
from padkd.distiller import Distiller, Term
from padkd.engine.records import collect
from padkd.errors import PadkdError
from padkd.methods import METHODS
from padkd.models import MODELS
from padkd.tasks import TASKS
from padkd.weightings import PAD, DimensionHead

B, E = 8, 5


def exact(**kw) -> PAD:
    opts = dict(eps=1e-30, init="reference", log_var_floor=None, warmup_steps=0)
    opts.update(kw)
    return PAD(**opts)


# ----------------------------------------------------------------------------------- per_dimension
def test_per_dimension_formula_and_no_embedding():
    torch.manual_seed(0)
    pad = exact(mode="per_dimension")
    assert not pad.needs_embedding
    d = torch.rand(B, E) * 2
    out = pad(d)  # no embedding needed: the parameters are built from d's shape
    assert isinstance(pad.head, DimensionHead) and pad.head.log_var.shape == (E,)
    with torch.no_grad():
        pad.head.log_var.copy_(torch.linspace(-1.0, 1.0, E))
    v = torch.linspace(-1.0, 1.0, E)
    out = pad(d)
    expected = (d * torch.exp(-v)[None] + v[None]).mean()
    torch.testing.assert_close(out.loss, expected)
    # one σ² per dimension: every sample has the same log σ² (mean over elements) and weight 1
    torch.testing.assert_close(out.columns["log_var"], torch.full((B,), float(v.mean())))
    torch.testing.assert_close(out.weight, torch.ones(B))
    torch.testing.assert_close(out.element_columns["log_var"], v[None].expand(B, E))


def test_per_dimension_optimum_is_the_mean_discrepancy_of_each_dimension():
    pad = exact(mode="per_dimension")
    d = torch.rand(B, E) + 0.1
    pad.build(Discrepancy(d), None)
    with torch.no_grad():
        pad.head.log_var.copy_(d.mean(0).log())  # σ²_e = mean_i d_ie
    pad(d).loss.backward()
    torch.testing.assert_close(pad.head.log_var.grad, torch.zeros(E), atol=1e-6, rtol=0)


def test_per_dimension_data_init_and_exchangeable_methods_refused():
    pad = PAD(mode="per_dimension", warmup_steps=0)
    d = torch.rand(B, E) + 0.5
    pad.build(Discrepancy(d), None)
    torch.testing.assert_close(pad.head.log_var.detach(), torch.full((E,), math.log(float(d.mean()) + 1e-6)))
    with pytest.raises(ValueError, match="per_dimension"):
        pad.check(METHODS.create("sp"))
    assert PAD(4, mode="per_dimension").head.log_var.shape == (4,)  # in_dim alone sizes the elements


# ----------------------------------------------------------------------------------- preserve_scale
def test_preserve_scale_gives_the_student_mean_one_weights_and_the_head_the_nll_gradient():
    torch.manual_seed(1)
    emb = torch.randn(B, 3)
    d_leaf = (torch.rand(B, E) * 2).requires_grad_()
    pad = exact(mode="per_element", preserve_scale=True)
    plain = exact(mode="per_element")
    pad.build(Discrepancy(d_leaf.detach()), emb)
    plain.build(Discrepancy(d_leaf.detach()), emb)
    plain.load_state_dict(pad.state_dict())
    out = pad(d_leaf, emb)
    s = pad.log_var(emb).detach()
    w = torch.exp(-s)
    value = (d_leaf.detach() * w + s).mean() + (d_leaf.detach() * w / w.mean()).mean()
    torch.testing.assert_close(out.loss, value)
    out.loss.backward()
    # d/d d_ie: the weights normalised to mean 1 over the batch's elements, divided by B·E (the mean)
    torch.testing.assert_close(d_leaf.grad, w / w.mean() / (B * E))
    # the head's parameters get exactly the plain NLL's gradient
    plain(d_leaf.detach(), emb).loss.backward()
    for a, b in zip(pad.head.parameters(), plain.head.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_preserve_scale_skips_masked_elements_in_the_mean_weight():
    torch.manual_seed(2)
    pad = exact(mode="per_dimension", preserve_scale=True)
    d = (torch.rand(B, E) + 0.1).requires_grad_()
    mask = torch.ones(B, E, dtype=torch.bool)
    mask[0, :2] = False
    pad.build(Discrepancy(d.detach(), mask), None)
    with torch.no_grad():
        pad.head.log_var.copy_(torch.linspace(-2.0, 1.0, E))
    pad(Discrepancy(d, mask)).loss.backward()
    w = torch.exp(-torch.linspace(-2.0, 1.0, E))[None].expand(B, E)
    per_sample_mean_w = torch.where(mask, w, 0.0).sum(1) / mask.sum(1)
    mean_w = per_sample_mean_w.mean()
    expected = torch.where(mask, w / mean_w / mask.sum(1, keepdim=True), 0.0) / B
    torch.testing.assert_close(d.grad, expected)


# ----------------------------------------------------------------------------------- head LR and input
def mlp(width_in: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(width_in, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def mlp_batch() -> Batch:
    torch.manual_seed(3)
    return Batch(inputs=torch.randn(B, 1, 2, 3), targets=torch.randint(0, 10, (B,)), index=torch.arange(B))


def test_head_lr_scale_multiplies_the_weighting_group_only():
    torch.manual_seed(4)
    student, teacher = mlp(6, 4), mlp(6, 7)
    pad = PAD(head_lr_scale=10.0)
    dist = Distiller(student, teacher, [Term("h", METHODS.create("hint"), pad, student="3:in", teacher="3:in",
                                            lr_scale=3.0)], task=TASKS.create("classification"))
    dist.prepare(mlp_batch())
    groups = {g["name"]: g for g in dist.param_groups()}
    assert groups["h"]["lr_scale"] == 3.0 and groups["h.weighting"]["lr_scale"] == 30.0
    assert {id(p) for p in groups["h.weighting"]["params"]} == {id(p) for p in pad.parameters()}
    assert {id(p) for p in groups["h"]["params"]} == {id(p) for p in dist.terms[0].method.parameters()}


def connector_distiller(detach_input: bool) -> tuple[Distiller, PAD]:
    torch.manual_seed(5)
    student, teacher = mlp(6, 4), mlp(6, 7)
    pad = PAD(init="reference", log_var_floor=None, warmup_steps=0, detach_input=detach_input)
    dist = Distiller(student, teacher, [Term("h", METHODS.create("hint"), pad, student="3:in", teacher="3:in",
                                             embedding="connector")], task=TASKS.create("classification"))
    dist.prepare(mlp_batch())
    return dist.train(), pad


def test_head_on_the_connector_output():
    dist, pad = connector_distiller(detach_input=False)
    assert pad.head[0].in_features == 7  # the connector's output width (the teacher's), not the student's 4
    batch = mlp_batch()
    out = dist(batch)
    emb, t = feats(dist, batch)
    z = dist.terms[0].method.connector(emb)
    s = pad.head(z)
    torch.testing.assert_close(out.losses["h"], ((z - t) ** 2 * torch.exp(-s) + s).mean())
    out.losses["h"].backward()
    attached = dist.terms[0].method.connector.weight.grad.clone()
    # detached: the connector gets gradient through d only
    dist, pad = connector_distiller(detach_input=True)
    dist(batch).losses["h"].backward()
    emb, t = feats(dist, batch)
    connector = dist.terms[0].method.connector
    connector.weight.grad = None
    z = connector(emb)
    s = pad.head(z.detach())
    ((z - t) ** 2 * torch.exp(-s) + s).mean().backward()
    only_d = connector.weight.grad.clone()
    connector.weight.grad = None
    dist.zero_grad()
    dist(batch).losses["h"].backward()
    torch.testing.assert_close(connector.weight.grad, only_d)
    assert not torch.allclose(attached, only_d)


def test_connector_embedding_needs_a_method_with_a_connector():
    torch.manual_seed(6)
    dist = Distiller(mlp(6, 4), mlp(6, 7), [Term("kd", METHODS.create("kd"), PAD(), embedding="connector")],
                     task=TASKS.create("classification"))
    with pytest.raises(PadkdError, match="embedding 'connector'.*has none"):
        dist.prepare(mlp_batch())


# ----------------------------------------------------------------------------------- element records
def test_records_average_per_element_discrepancy_and_log_var_over_samples():
    torch.manual_seed(7)
    student, teacher = mlp(6, 4), mlp(6, 7)
    pad = PAD(init="reference", log_var_floor=None, warmup_steps=0)
    dist = Distiller(student, teacher, [Term("h", METHODS.create("hint"), pad, student="3:in", teacher="3:in")],
                     task=TASKS.create("classification"))
    batches = [mlp_batch(), Batch(inputs=torch.randn(3, 1, 2, 3), targets=torch.zeros(3, dtype=torch.long),
                                  index=torch.arange(B, B + 3))]
    dist.prepare(batches[0])
    table, elements = collect(dist, TASKS.create("classification"), batches)
    assert len(table["index"]) == B + 3 and set(elements) == {"h"}
    dist.eval()
    with torch.no_grad():
        d = torch.cat([dist.terms[0].method(*feats(dist, b), b) for b in batches])
        s = torch.cat([pad.log_var(feats(dist, b)[0]) for b in batches])
    torch.testing.assert_close(elements["h"]["discrepancy"], d.mean(0))
    torch.testing.assert_close(elements["h"]["log_var"], s.mean(0))
    torch.testing.assert_close(elements["h"]["inv_var"], torch.exp(-s).mean(0))
    torch.testing.assert_close(elements["h"]["element"], torch.arange(7))


def feats(dist: Distiller, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and teacher's fc inputs on `batch` (eval mode)."""
    s, t = dist.student, dist.teacher
    return s[2](s[1](s[0](batch.inputs))), t[2](t[1](t[0](batch.inputs)))


# ----------------------------------------------------------------------------------- corrupted data
def test_digits_train_subset_and_corruption():
    clean = DATASETS.create("digits", {}, "data")
    sub = DATASETS.create("digits", {"train_subset": 100}, "data")
    assert len(sub.train) == 100
    torch.testing.assert_close(sub.test.images * sub.normalization[1][0] + sub.normalization[0][0],
                               clean.test.images * clean.normalization[1][0] + clean.normalization[0][0])
    bad = DATASETS.create("digits", {"noise_fraction": 0.1, "label_noise": 0.2, "corrupt_seed": 3}, "data")
    n = len(clean.train)
    assert int(bad.train.noisy.sum()) == round(0.1 * n) and int(bad.train.flipped.sum()) == round(0.2 * n)
    assert not (bad.train.noisy & bad.train.flipped).any()
    # flipped labels always change; the others and every clean image stay as they were
    assert (bad.train.labels[bad.train.flipped] != clean.train.labels[bad.train.flipped]).all()
    torch.testing.assert_close(bad.train.labels[~bad.train.flipped], clean.train.labels[~bad.train.flipped])
    torch.testing.assert_close(bad.train.clean_labels, clean.train.labels)
    torch.testing.assert_close(bad.train.images[~bad.train.noisy], clean.train.images[~bad.train.noisy])
    torch.testing.assert_close(bad.test.images, clean.test.images)
    torch.testing.assert_close(bad.train_targets, bad.train.labels)
    # noise images are uniform pixels in [0, 1] before normalisation
    mean, std = clean.normalization[0][0], clean.normalization[1][0]
    raw = bad.train.images[bad.train.noisy] * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5 and abs(float(raw.mean()) - 0.5) < 0.05
    again = DATASETS.create("digits", {"noise_fraction": 0.1, "label_noise": 0.2, "corrupt_seed": 3}, "data")
    assert torch.equal(again.train.noisy, bad.train.noisy) and torch.equal(again.train.labels, bad.train.labels)
    with pytest.raises(PadkdError, match="noise_fraction"):
        DATASETS.create("digits", {"noise_fraction": 0.6, "label_noise": 0.5}, "data")
    with pytest.raises(PadkdError, match="train_subset"):
        DATASETS.create("digits", {"train_subset": 0}, "data")


def test_mnist_corruption_on_tiny_idx_files(tmp_path: Path):
    from test_data import write_mnist

    write_mnist(tmp_path)
    clean = DATASETS.create("mnist", {"root": str(tmp_path), "val_size": 5}, "data")
    bad = DATASETS.create("mnist", {"root": str(tmp_path), "val_size": 5, "noise_fraction": 0.2,
                                   "label_noise": 0.2}, "data")
    assert int(bad.train.noisy.sum()) == 3 and int(bad.train.flipped.sum()) == 3  # round(0.2 * 15)
    torch.testing.assert_close(bad.val.images, clean.val.images)
    torch.testing.assert_close(bad.train.images[~bad.train.noisy], clean.train.images[~bad.train.noisy])
    assert (bad.train.labels[bad.train.flipped] != clean.train.labels[bad.train.flipped]).all()


# ----------------------------------------------------------------------------------- the probe's LeNet
def test_lenet_is_the_probe_network():
    torch.manual_seed(8)
    net = MODELS.create("lenet", {"channels": [2, 4], "hidden": 16}, "model", in_channels=1, num_classes=10)
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(2, 1, 3, 3), (2,), (4, 2, 3, 3), (4,), (16, 196), (16,), (10, 16), (10,)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
