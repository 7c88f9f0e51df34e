"""Weightings: PAD (formula, optimum, floor, init, warm-up, masks) and the hard-mining family."""

from __future__ import annotations

import math

import pytest
import torch

from padkd.context import StageClock
from padkd.discrepancy import Discrepancy
from padkd.distiller import Term
from padkd.errors import PadkdError
from padkd.methods import Hint
from padkd.weightings import DEFAULT_LOG_VAR_FLOOR, PAD, WEIGHTINGS

B, D, E = 8, 5, 3


def exact_pad(in_dim: int = D, out_dim: int = E, mode: str = "per_element", **kw) -> PAD:
    """PAD with the exact formula (eps negligible, no floor) and a random head."""
    opts = dict(mode=mode, eps=1e-30, init="reference", log_var_floor=None, warmup_steps=0)
    opts.update(kw)
    return PAD(in_dim, out_dim, **opts)


def identity_head_pad(dim: int, mode: str = "per_element", **kw) -> PAD:
    """PAD whose head returns its input unchanged in eval mode: log_var(s) == s."""
    opts = dict(eps=1e-30, init="reference", log_var_floor=None, warmup_steps=0)
    opts.update(kw)
    pad = PAD(dim, dim, mode=mode, **opts)
    linear, bn = pad.head
    with torch.no_grad():
        linear.weight.copy_(torch.eye(dim))
        linear.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_(1.0)
        bn.bias.zero_()
    bn.eps = 0.0
    return pad.eval()


# --------------------------------------------------------------------------------------------- PAD


def test_pad_per_element_matches_formula():
    torch.manual_seed(0)
    pad = exact_pad()
    emb = torch.randn(B, D)
    d = torch.rand(B, E) * 3
    out = pad(d, emb)
    s = pad.log_var(emb)  # training-mode BN: batch statistics, same as inside forward
    assert s.shape == (B, E)
    expected = (d * torch.exp(-s) + s).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    # records: 1/σ² and log σ², element-averaged, shape [B]; weight = 1/σ² relative to its batch mean
    inv_var = torch.exp(-s).mean(1).detach()
    torch.testing.assert_close(out.columns["inv_var"], inv_var)
    torch.testing.assert_close(out.columns["log_var"], s.mean(1).detach())
    torch.testing.assert_close(out.weight, inv_var / inv_var.mean())
    assert not out.weight.requires_grad and not out.columns["log_var"].requires_grad


def test_pad_eps_form_with_default_eps():
    torch.manual_seed(1)
    pad = PAD(D, E, init="reference", log_var_floor=None, warmup_steps=0)  # default eps
    assert pad.eps == 1e-6
    pad.eval()
    emb = torch.randn(B, D) * 0.1
    with torch.no_grad():
        pad.head[1].bias.fill_(-12.0)  # σ² ~ 6e-6: eps visibly matters
    d = torch.rand(B, E)
    out = pad(d, emb)
    s = pad.log_var(emb)
    expected = (d / (torch.exp(s) + 1e-6) + s).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-4)
    no_eps = (d * torch.exp(-s) + s).mean()
    assert (no_eps - out.loss).abs() > 1.0  # eps is really in the formula


def test_pad_per_sample_matches_formula():
    torch.manual_seed(2)
    pad = exact_pad(mode="per_sample")
    assert pad.head[0].out_features == 1
    emb = torch.randn(B, D)
    d = torch.rand(B, E) * 2
    out = pad(d, emb)
    s = pad.log_var(emb)
    assert s.shape == (B, 1)
    s = s[:, 0]
    expected = (d.mean(1) * torch.exp(-s) + s).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)


def test_pad_per_element_out_dim_mismatch_raises():
    pad = exact_pad(out_dim=4)
    with pytest.raises(PadkdError, match=r"E=3 elements .* per_sample"):
        pad(torch.rand(B, E), torch.randn(B, D))


def test_pad_needs_embedding():
    with pytest.raises(ValueError, match="embedding"):
        exact_pad()(torch.rand(B, E))


def test_identity_head_helper_is_identity():
    torch.manual_seed(3)
    pad = identity_head_pad(E)
    s = torch.randn(B, E)
    torch.testing.assert_close(pad.log_var(s), s)


@pytest.mark.parametrize("mode", ["per_element", "per_sample"])
def test_pad_gradient_vanishes_at_optimum(mode):
    torch.manual_seed(4)
    pad = identity_head_pad(E if mode == "per_element" else 1, mode=mode)
    if mode == "per_element":
        d = torch.rand(B, E) + 0.1
        s0 = d.log()
    else:
        d = torch.rand(B) + 0.1
        s0 = d.log().unsqueeze(1)

    def grad_at(s_value: torch.Tensor) -> torch.Tensor:
        s = s_value.clone().requires_grad_(True)
        pad(d, s).loss.backward()
        return s.grad

    g = grad_at(s0)
    assert g.abs().max() < 1e-6
    # d/ds [d e^{-s} + s] = 1 - d e^{-s}: negative below the optimum, positive above
    below, above = grad_at(s0 - 0.5), grad_at(s0 + 0.5)
    assert (below < 0).all() and (above > 0).all()
    n = d.numel()
    torch.testing.assert_close(above, (1 - d.reshape_as(s0) * torch.exp(-(s0 + 0.5))) / n)


def test_pad_soft_floor_bounds_loss():
    torch.manual_seed(5)
    f = -2.0
    pad = PAD(D, E, init="reference", log_var_floor=f, warmup_steps=0).eval()
    emb = torch.randn(64, D) * 3
    s = pad.log_var(emb)
    assert (s > f).all()
    raw = pad.head(emb)
    torch.testing.assert_close(s, f + torch.nn.functional.softplus(raw - f))
    # smooth: well above the floor s is the raw head output
    with torch.no_grad():
        pad.head[1].bias.fill_(40.0)
    torch.testing.assert_close(pad.log_var(emb), pad.head(emb))

    # d == 0 with a head pushed to very negative s
    with torch.no_grad():
        pad.head[1].bias.fill_(-50.0)
    zeros = torch.zeros(64, E)
    loss = pad(zeros, emb).loss
    assert loss >= f - 1e-6
    assert torch.isfinite(loss)

    ref = PAD.reference(D, E).eval()
    ref.load_state_dict(pad.state_dict())
    assert ref.log_var_floor is None
    ref_loss = ref(zeros, emb).loss
    assert ref_loss < f - 10  # unbounded below without the floor


def test_pad_default_floor_value():
    assert PAD().log_var_floor == pytest.approx(math.log(1e-3))
    assert PAD().warmup_steps == 100 and PAD.reference().warmup_steps == 0
    assert DEFAULT_LOG_VAR_FLOOR == pytest.approx(math.log(1e-3))
    assert PAD.reference().log_var_floor is None
    assert PAD.reference().init == "reference"


def test_pad_clamp():
    torch.manual_seed(6)
    pad = PAD(D, E, init="reference", log_var_floor=None, clamp=(-0.5, 0.5), warmup_steps=0).eval()
    s = pad.log_var(torch.randn(32, D) * 5)
    assert s.min() >= -0.5 and s.max() <= 0.5
    assert (s == 0.5).any() and (s == -0.5).any()
    with pytest.raises(ValueError):
        PAD(clamp=(1.0, 0.0))


def test_pad_invalid_options():
    with pytest.raises(ValueError, match="mode"):
        PAD(mode="per_pixel")
    with pytest.raises(ValueError, match="init"):
        PAD(init="zeros")


def test_pad_data_init_first_forward():
    torch.manual_seed(7)
    pad = PAD()  # default: init="data", head built lazily
    assert pad.init == "data"
    assert pad.head is None and not bool(pad.initialized)
    emb = torch.randn(B, D)
    d = torch.rand(B, E) * 4
    pad(d, emb)
    assert pad.head[0].in_features == D and pad.head[1].num_features == E
    assert bool(pad.initialized) and pad._ready
    expected = math.log(d.mean().item() + pad.eps)
    torch.testing.assert_close(pad.head[1].bias, torch.full((E,), expected))

    # a second forward (different d) does not re-initialise
    with torch.no_grad():
        pad.head[1].bias.fill_(0.25)
    pad(d * 100, emb)
    torch.testing.assert_close(pad.head[1].bias, torch.full((E,), 0.25))


def test_pad_data_init_centres_sigma_on_mean_discrepancy():
    torch.manual_seed(8)
    pad = PAD(D, E, warmup_steps=0)
    d = torch.rand(256, E) * 2 + 1
    emb = torch.randn(256, D)
    out = pad(d, emb)
    # BN in training mode: batch-mean of log σ² equals the bias (geometric centre)
    assert out.columns["log_var"].mean().item() == pytest.approx(math.log(d.mean().item()), abs=1e-3)


def test_pad_build_initialises_and_state_dict_restores_flag():
    torch.manual_seed(9)
    pad = PAD(D, E, warmup_steps=0)
    d = Discrepancy(torch.rand(B, E) + 0.5)
    pad.build(d, torch.randn(B, D))
    assert bool(pad.initialized) and pad._ready
    torch.testing.assert_close(pad.head[1].bias, torch.full((E,), math.log(d.value.mean().item() + 1e-6)))
    with torch.no_grad():
        pad.head[1].bias.fill_(3.0)

    fresh = PAD(D, E)
    assert not fresh._ready
    fresh.load_state_dict(pad.state_dict())
    assert fresh._ready and bool(fresh.initialized)
    fresh(torch.rand(B, E) * 50, torch.randn(B, D))  # training forward: must not re-initialise
    torch.testing.assert_close(fresh.head[1].bias, torch.full((E,), 3.0))

    # and the other way: loading an uninitialised state clears the flag
    pad.load_state_dict(PAD(D, E).state_dict())
    assert not pad._ready and not bool(pad.initialized)


def test_pad_reference_init_leaves_bias_zero():
    torch.manual_seed(10)
    pad = PAD(init="reference")
    pad(torch.rand(B, E) + 3, torch.randn(B, D))
    torch.testing.assert_close(pad.head[1].bias, torch.zeros(E))
    assert not bool(pad.initialized)


def test_pad_eval_forward_does_not_initialise_built_head():
    pad = PAD(D, E, warmup_steps=0).eval()
    pad(torch.rand(B, E) + 3, torch.randn(B, D))
    assert not pad._ready
    torch.testing.assert_close(pad.head[1].bias, torch.zeros(E))


@pytest.mark.parametrize("warmup", [1, 4])
def test_pad_warmup_is_its_terms_ramp_in_optimizer_steps(warmup):
    """PAD declares its warm-up; the term ramps it: (min(k, N) + 1) / (N + 1) at optimizer step k."""
    torch.manual_seed(11)
    pad = PAD(D, E, init="reference", warmup_steps=warmup)
    term = Term("hint", Hint(), pad)
    assert term.ramp_steps(StageClock()) == warmup
    assert Term("hint", Hint(), pad, warmup_steps=0).ramp_steps(StageClock()) == 0  # the term's setting wins
    full = pad(torch.rand(B, E) + 2.0, torch.randn(B, D)).loss  # loss clearly non-zero; PAD itself does not ramp
    for k in range(warmup + 3):
        expected = full * (min(k, warmup) + 1) / (warmup + 1)
        torch.testing.assert_close(term.ramped(full, k, warmup), expected)
    assert "step" not in pad.state_dict()  # the clock is the stage's, not the weighting's


@pytest.mark.parametrize("detach", [True, False])
def test_pad_detach_input(detach):
    torch.manual_seed(12)
    pad = PAD(D, E, detach_input=detach, warmup_steps=0)
    emb = torch.randn(B, D, requires_grad=True)
    d = torch.rand(B, E, requires_grad=True)
    pad(d, emb).loss.backward()
    assert d.grad is not None and d.grad.abs().sum() > 0
    assert pad.head[0].weight.grad is not None and pad.head[0].weight.grad.abs().sum() > 0
    if detach:
        assert emb.grad is None
    else:
        assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_pad_feature_map_embedding_is_pooled():
    torch.manual_seed(13)
    pad = exact_pad().eval()
    fmap = torch.randn(B, D, 4, 4)
    torch.testing.assert_close(pad.log_var(fmap), pad.log_var(fmap.mean((2, 3))))


def test_pad_masked_elements_do_not_change_loss():
    torch.manual_seed(14)
    pad = exact_pad().eval()
    emb = torch.randn(B, D)
    d = torch.rand(B, E)
    mask = torch.rand(B, E) > 0.3
    mask[:, 0] = True  # every sample keeps one element
    out1 = pad(Discrepancy(d, mask), emb).loss
    out2 = pad(Discrepancy(torch.where(mask, d, d + 100.0), mask), emb).loss
    torch.testing.assert_close(out1, out2)
    s = pad.log_var(emb)
    nll = d * torch.exp(-s) + s
    m = mask.float()
    expected = ((nll * m).sum(1) / m.sum(1)).mean()
    torch.testing.assert_close(out1, expected)


def test_pad_fully_masked_sample_excluded_from_batch_mean():
    torch.manual_seed(15)
    pad = exact_pad().eval()
    emb = torch.randn(B, D)
    d = torch.rand(B, E)
    mask = torch.ones(B, E, dtype=torch.bool)
    mask[2] = False
    mask[5] = False
    out = pad(Discrepancy(d, mask), emb)
    s = pad.log_var(emb)
    nll = (d * torch.exp(-s) + s).mean(1)
    keep = mask.any(1)
    torch.testing.assert_close(out.loss, nll[keep].mean())
    assert out.loss != nll.mean()


def test_pad_masked_nonfinite_elements_ignored():
    torch.manual_seed(16)
    pad = exact_pad().eval()
    emb = torch.randn(B, D)
    d = torch.rand(B, E)
    mask = torch.ones(B, E, dtype=torch.bool)
    mask[0, 1] = False
    d_bad = d.clone()
    d_bad[0, 1] = float("inf")
    assert torch.isfinite(pad(Discrepancy(d_bad, mask), emb).loss)


def test_pad_data_init_ignores_fully_masked_samples():
    torch.manual_seed(17)
    pad = PAD(D, E, warmup_steps=0)
    d = torch.rand(B, E) + 1.0
    mask = torch.ones(B, E, dtype=torch.bool)
    mask[: B // 2] = False
    pad.build(Discrepancy(d, mask), torch.randn(B, D))
    expected = math.log(d[B // 2 :].mean().item() + pad.eps)
    torch.testing.assert_close(pad.head[1].bias, torch.full((E,), expected))


# --------------------------------------------------------------------------------- hard mining

D_KNOWN = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0, 0.2, 4.0, 0.7])
FAMILY = ["uniform", "focal", "ohem", "softmax_hard", "softmax_easy", "polynomial", "discard_hardest"]


def weights_of(name: str, d: torch.Tensor = D_KNOWN, **options) -> torch.Tensor:
    return WEIGHTINGS.create(name, options)(d).weight


@pytest.mark.parametrize("name", FAMILY)
def test_family_weights_mean_one_and_detached(name):
    d = D_KNOWN.clone().requires_grad_(True)
    out = WEIGHTINGS.create(name, {})(d)
    w = out.weight
    assert w.shape == d.shape
    assert not w.requires_grad
    assert (w >= 0).all()
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(out.loss, (w * D_KNOWN).mean())
    out.loss.backward()
    # weights are constants: dL/dd_i = w_i / N exactly
    torch.testing.assert_close(d.grad, w / len(d))


@pytest.mark.parametrize("name", FAMILY)
def test_family_per_element_discrepancy_reduced_first(name):
    torch.manual_seed(18)
    d = torch.rand(B, E)
    a = WEIGHTINGS.create(name, {})(d)
    b = WEIGHTINGS.create(name, {})(d.mean(1))
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.weight, b.weight)


def test_uniform_loss_is_mean():
    torch.manual_seed(19)
    d = torch.rand(B, E)
    out = WEIGHTINGS.create("uniform", {})(d)
    torch.testing.assert_close(out.loss, d.mean())
    torch.testing.assert_close(out.weight, torch.ones(B))
    assert out.columns == {}


def _order(d: torch.Tensor) -> torch.Tensor:
    return d.argsort()


def test_focal_weights_increase_with_d():
    w = weights_of("focal", gamma=2.0)
    ws = w[_order(D_KNOWN)]
    assert (ws.diff() > 0).all()
    expected = D_KNOWN**2 / (D_KNOWN**2).sum() * len(D_KNOWN)
    torch.testing.assert_close(w, expected)


def test_softmax_hard_weights_increase_with_d():
    w = weights_of("softmax_hard", temperature=1.0)
    assert (w[_order(D_KNOWN)].diff() > 0).all()
    expected = torch.softmax(D_KNOWN / D_KNOWN.mean(), 0) * len(D_KNOWN)
    torch.testing.assert_close(w, expected)


def test_softmax_easy_weights_decrease_with_d():
    w = weights_of("softmax_easy", temperature=0.5)
    assert (w[_order(D_KNOWN)].diff() < 0).all()
    expected = torch.softmax(-D_KNOWN / (0.5 * D_KNOWN.mean()), 0) * len(D_KNOWN)
    torch.testing.assert_close(w, expected)


def test_softmax_temperature_flattens():
    sharp = weights_of("softmax_hard", temperature=0.5)
    flat = weights_of("softmax_hard", temperature=5.0)
    assert sharp.std() > flat.std()


def test_polynomial_weights_decrease_with_d():
    w = weights_of("polynomial", gamma=1.0)
    ws = w[_order(D_KNOWN)]
    assert (ws.diff() < 0).all()
    assert w[D_KNOWN.argmax()] == 0
    raw = 1 - D_KNOWN / D_KNOWN.max()
    torch.testing.assert_close(w, raw / raw.sum() * len(D_KNOWN))


def test_polynomial_all_equal_falls_back_to_uniform():
    w = weights_of("polynomial", torch.full((6,), 0.3))
    torch.testing.assert_close(w, torch.ones(6))


@pytest.mark.parametrize("fraction,k", [(0.3, 3), (0.5, 4), (0.01, 1), (1.0, 8)])
def test_ohem_keeps_top_fraction(fraction, k):
    w = weights_of("ohem", fraction=fraction)
    kept = set(torch.nonzero(w).flatten().tolist())
    assert len(kept) == k == max(1, math.ceil(fraction * len(D_KNOWN)))
    assert kept == set(D_KNOWN.topk(k).indices.tolist())
    torch.testing.assert_close(w[w > 0], torch.full((k,), len(D_KNOWN) / k))


@pytest.mark.parametrize("fraction,k", [(0.3, 2), (0.1, 0), (0.5, 4)])
def test_discard_hardest_zeros_largest(fraction, k):
    w = weights_of("discard_hardest", fraction=fraction)
    dropped = set(torch.nonzero(w == 0).flatten().tolist())
    assert len(dropped) == k == math.floor(fraction * len(D_KNOWN))
    assert dropped == (set(D_KNOWN.topk(k).indices.tolist()) if k else set())
    n = len(D_KNOWN)
    torch.testing.assert_close(w[w > 0], torch.full((n - k,), n / (n - k)))


def test_family_masked_sample_gets_zero_weight():
    d = D_KNOWN.clone()
    mask = torch.ones(len(d), dtype=torch.bool)
    mask[D_KNOWN.argmax()] = False  # hide the hardest sample
    for name in FAMILY:
        out = WEIGHTINGS.create(name, {})(Discrepancy(d, mask))
        w = out.weight
        assert w[~mask].eq(0).all(), name
        assert w[mask].mean().item() == pytest.approx(1.0, abs=1e-5), name
        torch.testing.assert_close(out.loss, (w * d)[mask].sum() / mask.sum(), msg=name)
    # ohem never selects the masked sample even though it holds the largest value
    w = WEIGHTINGS.create("ohem", {"fraction": 0.25})(Discrepancy(d, mask)).weight
    assert set(torch.nonzero(w).flatten().tolist()) == {4, 3}


@pytest.mark.parametrize(
    "name,options",
    [
        ("ohem", {"fraction": 0}),
        ("ohem", {"fraction": 1.5}),
        ("discard_hardest", {"fraction": 1.0}),
        ("discard_hardest", {"fraction": -0.1}),
        ("softmax_hard", {"temperature": 0}),
        ("softmax_easy", {"temperature": -1}),
    ],
)
def test_family_invalid_options_raise(name, options):
    key = next(iter(options))
    with pytest.raises((ValueError, PadkdError), match=key):
        WEIGHTINGS.create(name, options)


# ------------------------------------------------------------------------------------ registry


def test_registry_names():
    assert set(FAMILY) | {"pad"} <= set(WEIGHTINGS.names())


def test_registry_unknown_name_did_you_mean():
    with pytest.raises(PadkdError, match="did you mean 'pad'") as err:
        WEIGHTINGS.create("pda", {}, where="distill.terms[0].weighting")
    assert "distill.terms[0].weighting" in str(err.value)
    assert "unknown weighting 'pda'" in str(err.value)


def test_registry_unknown_name_lists_allowed():
    with pytest.raises(PadkdError, match="allowed: .*uniform"):
        WEIGHTINGS.create("zzzzzzzz", {})


def test_registry_unknown_option_suggests():
    with pytest.raises(PadkdError, match="gama: unknown option; did you mean 'gamma'"):
        WEIGHTINGS.create("focal", {"gama": 2.0}, where="w")
    with pytest.raises(PadkdError, match="unknown option; did you mean 'warmup_steps'"):
        WEIGHTINGS.create("pad", {"warmup_step": 10})


def test_registry_wrong_type_names_key():
    with pytest.raises(PadkdError, match=r"w\.gamma"):
        WEIGHTINGS.create("focal", {"gamma": "abc"}, where="w")


def test_registry_coerces_types():
    pad = WEIGHTINGS.create("pad", {"clamp": [-3, 3], "warmup_steps": 5, "mode": "per_sample"})
    assert pad.clamp == (-3.0, 3.0) and isinstance(pad.clamp, tuple)
    assert pad.warmup_steps == 5 and pad.mode == "per_sample"
    with pytest.raises(PadkdError, match="mode"):
        WEIGHTINGS.create("pad", {"mode": "per_pixel"})


def test_registry_unknown_option_on_uniform():
    with pytest.raises(PadkdError, match="unknown option"):
        WEIGHTINGS.create("uniform", {"gama": 1})


def test_parts_that_add_up_are_summed_by_every_weighting() -> None:
    """`sum_elements`: a sample's discrepancy is the sum of its parts (RKD distance + angle), under
    uniform and hard mining alike; PAD sums the per-part NLL and starts σ² at the mean part value."""
    d = torch.tensor([[1.0, 3.0], [2.0, 6.0], [0.5, 0.5]])
    parts = Discrepancy(d, sum_elements=True)
    assert WEIGHTINGS.create("uniform", {})(parts).loss.item() == pytest.approx((4 + 8 + 1) / 3)
    ohem = WEIGHTINGS.create("ohem", {"fraction": 0.3})(parts)  # keeps the sample whose parts add to 8
    assert ohem.loss.item() == pytest.approx(8.0 * 3 / 3) and ohem.weight.tolist() == [0.0, 3.0, 0.0]
    pad = exact_pad(in_dim=2, out_dim=2)
    emb = torch.randn(3, 2)
    out = pad(parts, emb)
    s = pad.log_var(emb)
    torch.testing.assert_close(out.loss, (d * torch.exp(-s) + s).sum(1).mean())
    torch.testing.assert_close(out.columns["log_var"], s.mean(1).detach())
    fresh = PAD(2, 2, warmup_steps=0)
    fresh.build(parts, emb)
    assert fresh.head[1].bias[0].item() == pytest.approx(math.log(d.mean().item() + fresh.eps), rel=1e-5)
