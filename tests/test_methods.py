"""Methods return per-sample discrepancies: KD, Hint, FitNet."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.context import BuildContext, DataInfo
from padkd.discrepancy import Discrepancy
from padkd.methods import KD, METHODS, FitNet, Hint
from padkd.weightings import WEIGHTINGS

B = 6


def batch(n: int = B) -> Batch:
    return Batch(inputs=None, targets=None, index=torch.arange(n))


def ctx(student: torch.Tensor, teacher: torch.Tensor) -> BuildContext:
    """A build context holding only example features (what these methods read)."""
    b = batch(len(student))
    return BuildContext(student=student, teacher=teacher, batch=b, data=DataInfo(n_train=len(student)),
                        world_size=1, student_model=nn.Identity(), teacher_model=nn.Identity())


def test_registry_has_methods():
    assert {"kd", "hint", "fitnet"} <= set(METHODS.names())
    kd = METHODS.create("kd", {"temperature": 2})
    assert isinstance(kd, KD) and kd.temperature == 2.0


# -------------------------------------------------------------------------------------------- KD


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_per_sample_is_scaled_kl(T):
    torch.manual_seed(0)
    s, t = torch.randn(B, 10) * 3, torch.randn(B, 10) * 3
    d = KD(temperature=T)(s, t, batch())
    assert d.shape == (B,)
    p_t = F.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1)
    torch.testing.assert_close(d, kl * T * T)
    ref = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
    torch.testing.assert_close(d.mean(), ref)
    assert (d >= 0).all()


def test_kd_uniform_weighting_equals_batchmean():
    torch.manual_seed(1)
    s, t = torch.randn(B, 7), torch.randn(B, 7)
    loss = WEIGHTINGS.create("uniform", {})(KD(4.0)(s, t, batch())).loss
    ref = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
    torch.testing.assert_close(loss, ref)


def test_kd_zero_when_equal():
    torch.manual_seed(2)
    s = torch.randn(B, 10)
    d = KD()(s, s.clone(), batch())
    assert torch.equal(d, torch.zeros(B))


def test_kd_gradient_only_to_student():
    torch.manual_seed(3)
    s = torch.randn(B, 5, requires_grad=True)
    t = torch.randn(B, 5)
    KD(2.0)(s, t, batch()).sum().backward()
    # d/ds of T² KL = T (p_s - p_t) per row
    expected = 2.0 * (F.softmax(s.detach() / 2, 1) - F.softmax(t / 2, 1))
    torch.testing.assert_close(s.grad, expected)


def test_kd_fp16_inputs_computed_in_fp32():
    torch.manual_seed(4)
    s, t = torch.randn(B, 10).half(), torch.randn(B, 10).half()
    d = KD()(s, t, batch())
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, KD()(s.float(), t.float(), batch()))


def test_kd_invalid_temperature():
    with pytest.raises(ValueError, match="temperature"):
        KD(0.0)


# ------------------------------------------------------------------------------------------ Hint


def test_hint_connector_for_different_widths():
    torch.manual_seed(5)
    s, t = torch.randn(B, 4), torch.randn(B, 9)
    hint = Hint()
    assert isinstance(hint.connector, nn.Identity)
    hint.build(ctx(s, t))
    assert isinstance(hint.connector, nn.Linear)
    assert (hint.connector.in_features, hint.connector.out_features) == (4, 9)
    d = hint(s, t, batch())
    assert d.shape == (B, 9)
    torch.testing.assert_close(d, (hint.connector(s) - t) ** 2)
    # the batch-and-element mean is the usual MSE hint
    torch.testing.assert_close(d.mean(), F.mse_loss(hint.connector(s), t))


def test_hint_equal_widths_auto_is_identity():
    torch.manual_seed(6)
    s, t = torch.randn(B, 8), torch.randn(B, 8)
    hint = Hint(connector="auto")
    hint.build(ctx(s, t))
    assert isinstance(hint.connector, nn.Identity)
    assert len(list(hint.parameters())) == 0
    torch.testing.assert_close(hint(s, t, batch()), (s - t) ** 2)
    assert torch.equal(hint(t, t, batch()), torch.zeros(B, 8))


def test_hint_linear_connector_forced():
    hint = Hint(connector="linear")
    hint.build(ctx(torch.randn(B, 8), torch.randn(B, 8)))
    assert isinstance(hint.connector, nn.Linear)


def test_hint_none_with_different_widths_raises():
    with pytest.raises(ValueError, match="connector='none'"):
        Hint(connector="none").build(ctx(torch.randn(B, 4), torch.randn(B, 9)))
    hint = Hint(connector="none")
    hint.build(ctx(torch.randn(B, 4), torch.randn(B, 4)))  # equal widths are fine
    assert isinstance(hint.connector, nn.Identity)


def test_hint_pools_feature_maps():
    torch.manual_seed(7)
    s, t = torch.randn(B, 3, 5, 5), torch.randn(B, 6, 2, 2)
    hint = Hint()
    hint.build(ctx(s, t))
    assert hint.connector.in_features == 3 and hint.connector.out_features == 6
    d = hint(s, t, batch())
    assert d.shape == (B, 6)
    torch.testing.assert_close(d, (hint.connector(s.mean((2, 3))) - t.mean((2, 3))) ** 2)


def test_hint_gradient_reaches_student_and_connector():
    torch.manual_seed(8)
    s = torch.randn(B, 4, requires_grad=True)
    t = torch.randn(B, 5)
    hint = Hint()
    hint.build(ctx(s.detach(), t))
    hint(s, t, batch()).mean().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert hint.connector.weight.grad is not None


def test_hint_discrepancy_is_valid_contract():
    d = Discrepancy.of(Hint()(torch.randn(B, 3), torch.randn(B, 3), batch()))
    assert d.value.shape[0] == B and d.elements == 3


# ---------------------------------------------------------------------------------------- FitNet


def test_fitnet_build_regressor_with_bn():
    torch.manual_seed(9)
    s, t = torch.randn(B, 3, 4, 4), torch.randn(B, 5, 4, 4)
    fit = FitNet()
    fit.build(ctx(s, t))
    conv, bn = fit.regressor
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    assert (conv.in_channels, conv.out_channels) == (3, 5)
    assert conv.bias is None
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 5
    d = fit(s, t, batch())
    assert d.shape == (B, 5 * 4 * 4)
    torch.testing.assert_close(d, ((fit.regressor(s) - t) ** 2).flatten(1))


def test_fitnet_without_bn():
    torch.manual_seed(10)
    fit = FitNet(batchnorm=False)
    s, t = torch.randn(B, 3, 4, 4), torch.randn(B, 2, 4, 4)
    fit.build(ctx(s, t))
    assert isinstance(fit.regressor, nn.Sequential) and len(fit.regressor) == 1
    conv = fit.regressor[0]
    assert conv.bias is not None
    torch.testing.assert_close(fit(s, t, batch()), ((conv(s) - t) ** 2).flatten(1))


@pytest.mark.parametrize("hs,ht", [(8, 4), (4, 8)])
def test_fitnet_pools_to_smaller_map(hs, ht):
    torch.manual_seed(11)
    s, t = torch.randn(B, 3, hs, hs), torch.randn(B, 5, ht, ht)
    fit = FitNet(batchnorm=False)
    fit.build(ctx(s, t))
    small = min(hs, ht)
    d = fit(s, t, batch())
    assert d.shape == (B, 5 * small * small)
    rs = fit.regressor(s)
    rs = F.adaptive_avg_pool2d(rs, small) if hs > small else rs
    tt = F.adaptive_avg_pool2d(t, small) if ht > small else t
    torch.testing.assert_close(d, ((rs - tt) ** 2).flatten(1))


def test_fitnet_pools_non_square_maps():
    torch.manual_seed(12)
    s, t = torch.randn(B, 3, 8, 4), torch.randn(B, 5, 4, 4)
    fit = FitNet(batchnorm=False)
    fit.build(ctx(s, t))
    d = fit(s, t, batch())
    assert d.shape == (B, 5 * 4 * 4)


@pytest.mark.parametrize(
    "s_shape,t_shape", [((B, 8), (B, 3, 4, 4)), ((B, 3, 4, 4), (B, 8)), ((B, 3, 4), (B, 3, 4))]
)
def test_fitnet_non_4d_raises_helpful(s_shape, t_shape):
    with pytest.raises(ValueError, match=r"\[B, C, H, W\].*hint"):
        FitNet().build(ctx(torch.randn(*s_shape), torch.randn(*t_shape)))


def test_fitnet_gradient_reaches_student_not_teacher():
    torch.manual_seed(13)
    s = torch.randn(B, 3, 4, 4, requires_grad=True)
    t = torch.randn(B, 5, 4, 4, requires_grad=True)
    fit = FitNet()
    fit.build(ctx(s.detach(), t.detach()))
    fit(s, t.detach(), batch()).mean().backward()
    assert s.grad.abs().sum() > 0
    assert fit.regressor[0].weight.grad is not None
    assert t.grad is None
