"""Feature-map methods AT, NST, AB, FT, FSP, VID, ReviewKD and OFD against their papers' formulas, written out
here per sample (loops and einsums), and their batch means against the reference implementations' batch losses."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.config import load_config
from padkd.context import BuildContext, DataInfo, StageClock
from padkd.discrepancy import Discrepancy
from padkd.distiller import Distiller, Term, carry_state
from padkd.errors import PadkdError
from padkd.methods import AB, AT, FSP, FT, METHODS, NST, VID, Method
from padkd.weightings import WEIGHTINGS

ROOT = Path(__file__).resolve().parents[1]
B = 3


def batch(n: int = B) -> Batch:
    return Batch(inputs=torch.zeros(n, 1), targets=torch.zeros(n, dtype=torch.long), index=torch.arange(n))


def built(method: Method, student: Any, teacher: Any) -> Method:
    ctx = BuildContext(student=student, teacher=teacher, batch=batch(), data=DataInfo(n_train=10), world_size=1,
                       student_model=nn.Linear(1, 1), teacher_model=nn.Linear(1, 1))
    method.build(ctx)
    return method


def maps(seed: int, *shapes: tuple[int, ...]) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


def _v(d: Tensor | Discrepancy) -> Tensor:
    """The discrepancy values `[B]` or `[B, P]`."""
    return Discrepancy.of(d).value


def uniform(d: Tensor | Discrepancy) -> Tensor:
    """The uniform weighting's loss plus the method's unweighted part, as the Distiller adds them."""
    d = Discrepancy.of(d)
    loss = WEIGHTINGS.create("uniform", {})(d).loss
    return loss if d.unweighted is None else loss + d.unweighted


def avg_pool_2x2(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def max_pool_2x2(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))


def test_registered_with_the_crd_benchmark_betas() -> None:
    expected = {"at": 1000.0, "nst": 50.0, "ab": 1.0, "ft": 200.0, "fsp": 50.0, "vid": 1.0}
    for name, beta in expected.items():
        cls = type(METHODS.create(name, {}, name))
        assert cls.default_weight == beta and cls.reference and cls.__doc__
    assert VID.signed and not any(c.signed for c in (AT, NST, AB, FT, FSP))


# -------------------------------------------------------------------------------------------- AT


def paper_attention(f: Tensor) -> Tensor:
    """Eq. 1-2: Q = Σ_c |A_c|², vectorised over positions and divided by its L2 norm (one sample `[C, H, W]`)."""
    q = (f.abs() ** 2).sum(0).reshape(-1)
    return q / math.sqrt(float((q * q).sum()))


def test_at_on_a_hand_made_case() -> None:
    # One channel, the activation at opposite corners: q_s = e1, q_t = e4.
    s = torch.zeros(1, 1, 2, 2)
    t = torch.zeros(1, 1, 2, 2)
    s[0, 0, 0, 0], t[0, 0, 1, 1] = 3.0, 0.5
    assert _v(AT()([s], [t], batch(1))).tolist() == [[pytest.approx(2 / 4)]]  # mean over 4 positions of (1, 0, 0, -1)²
    assert _v(AT(mode="paper")([s], [t], batch(1))).tolist() == [[pytest.approx(math.sqrt(2))]]


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_at_per_sample_matches_the_formula(mode: str) -> None:
    s = maps(0, (B, 2, 4, 4), (B, 3, 2, 2))
    t = maps(1, (B, 5, 2, 2), (B, 4, 2, 2))  # layer 0: the student's 4x4 map is pooled to 2x2
    d = _v(AT(mode=mode)(s, t, batch()))
    assert d.shape == (B, 2)
    for i in range(B):
        for j in range(2):
            fs = avg_pool_2x2(s[j])[i] if j == 0 else s[j][i]
            diff = paper_attention(fs) - paper_attention(t[j][i])
            value = float((diff**2).mean()) if mode == "code" else math.sqrt(float((diff**2).sum()))
            assert float(d[i, j]) == pytest.approx(value, rel=1e-5)


def test_at_uniform_equals_the_reference_batch_losses() -> None:
    s = maps(2, (B, 2, 3, 3), (B, 3, 2, 2))
    t = maps(3, (B, 6, 3, 3), (B, 4, 2, 2))

    def at_map(f: Tensor) -> Tensor:
        q = f.pow(2).mean(1).view(f.shape[0], -1)
        return q / q.norm(dim=1, keepdim=True)

    repdistiller = sum((at_map(a) - at_map(b)).pow(2).mean() for a, b in zip(s, t, strict=True))
    torch.testing.assert_close(uniform(AT()(s, t, batch())), repdistiller)
    paper = sum((at_map(a) - at_map(b)).norm(dim=1).sum() / B for a, b in zip(s, t, strict=True))  # torchdistill
    torch.testing.assert_close(uniform(AT(mode="paper")(s, t, batch())), paper)


def test_at_takes_a_single_tapped_layer() -> None:
    s, t = maps(4, (B, 2, 3, 3), (B, 5, 3, 3))
    torch.testing.assert_close(_v(AT()(s, t, batch())), _v(AT()([s], [t], batch())))


# ------------------------------------------------------------------------------------------- NST


def test_nst_on_a_hand_made_case() -> None:
    # One channel each, orthogonal unit maps: MMD² = k(t,t) + k(s,s) - 2 k(s,t) = 1 + 1 - 0.
    s = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 0.0], [0.0, 5.0]]]])
    assert _v(NST()([s], [t], batch(1))).tolist() == [[pytest.approx(2.0)]]
    assert _v(NST()([s], [s * 3], batch(1))).tolist() == [[pytest.approx(0.0, abs=1e-6)]]


@pytest.mark.parametrize(("degree", "coef"), [(2, 0.0), (1, 0.0), (3, 0.5)])
def test_nst_per_sample_is_the_mmd_of_the_channel_sets(degree: int, coef: float) -> None:
    s = maps(5, (B, 3, 4, 4), (B, 2, 3, 3))
    t = maps(6, (B, 4, 2, 2), (B, 5, 3, 3))
    d = _v(NST(degree=degree, coef=coef)(s, t, batch()))

    def k(x: Tensor, y: Tensor) -> float:
        return (float(x @ y) + coef) ** degree

    for i in range(B):
        for j in range(2):
            fs = avg_pool_2x2(s[j])[i] if j == 0 else s[j][i]
            xs = [c.reshape(-1) / c.norm() for c in fs]
            xt = [c.reshape(-1) / c.norm() for c in t[j][i]]
            mmd = (sum(k(a, b) for a in xt for b in xt) / len(xt) ** 2
                   + sum(k(a, b) for a in xs for b in xs) / len(xs) ** 2
                   - 2 * sum(k(a, b) for a in xs for b in xt) / (len(xs) * len(xt)))
            assert float(d[i, j]) == pytest.approx(mmd, rel=1e-4, abs=1e-6)


def test_nst_uniform_equals_repdistillers_batch_loss() -> None:
    s = maps(7, (B, 3, 3, 3), (B, 2, 2, 2))
    t = maps(8, (B, 4, 3, 3), (B, 6, 2, 2))

    def poly(a: Tensor, b: Tensor) -> Tensor:  # [B, Ca, Cb] of (a·b)²
        return torch.einsum("bip,bjp->bij", a, b).pow(2)

    ref = torch.zeros(())
    for a, b in zip(s, t, strict=True):
        a = torch.nn.functional.normalize(a.flatten(2), dim=2)
        b = torch.nn.functional.normalize(b.flatten(2), dim=2)
        ref = ref + poly(b, b).mean() + poly(a, a).mean() - 2 * poly(a, b).mean()
    torch.testing.assert_close(uniform(NST()(s, t, batch())), ref)


# -------------------------------------------------------------------------------------------- AB


def authors_margin_cost(source: Tensor, target: Tensor, margin: float) -> Tensor:
    """The authors' alternative L2 (element-wise, before the sum)."""
    return ((source + margin) ** 2 * ((source > -margin) & (target <= 0)).float()
            + (source - margin) ** 2 * ((source <= margin) & (target > 0)).float())


def test_ab_on_a_hand_made_case() -> None:
    # Teacher on / off / on / off; student at -2 (off, beyond the margin), 0.5, 3 (on, beyond), 0.
    s = torch.tensor([-2.0, 0.5, 3.0, 0.0]).view(1, 4, 1, 1)
    t = torch.tensor([0.1, -1.0, 2.0, -0.5]).view(1, 4, 1, 1)
    ab = built(AB(margin=1.0, scale=1.0), [s], [t])
    # on: (-2 - 1)² = 9; off: (0.5 + 1)² = 2.25; on and past the margin: 0; off: (0 + 1)² = 1.
    assert _v(ab([s], [t], batch(1))).tolist() == [[pytest.approx(12.25)]]


@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_ab_per_sample_matches_the_authors_loss(margin: float) -> None:
    s = maps(9, (B, 4, 4, 4), (B, 3, 2, 2), (B, 2, 2, 2))
    t = maps(10, (B, 4, 4, 4), (B, 3, 2, 2), (B, 5, 2, 2))  # layer 2 needs a connector
    ab = built(AB(margin=margin), s, t)
    ab.eval()
    assert isinstance(ab.connectors[0], nn.Identity) and not isinstance(ab.connectors[2], nn.Identity)
    out = ab(s, t, batch())
    d = out.value.detach()
    assert d.shape == (B, 3)
    weights = [1 / 4, 1 / 2, 1.0]  # the authors' layer weights for three layers
    with torch.no_grad():
        sources = [ab.connectors[j](s[j]) for j in range(3)]
    for i in range(B):
        for j in range(3):
            cost = authors_margin_cost(sources[j][i], t[j][i], margin).sum()
            assert float(d[i, j]) == pytest.approx(weights[j] * float(cost) * 3 / 1000, rel=1e-5)
    # RepDistiller's batch loss: Σ_l w_l · Σ cost / B · 3/1000.
    ref = sum(w * authors_margin_cost(x, y, margin).sum() / B * 3 / 1000
              for w, x, y in zip(weights, sources, t, strict=True))
    torch.testing.assert_close(uniform(out).detach(), ref)


def test_ab_layer_weights_and_scale_options() -> None:
    s, t = maps(11, (B, 2, 2, 2), (B, 2, 2, 2)), maps(12, (B, 2, 2, 2), (B, 2, 2, 2))
    ab = built(AB(layer_weights=(1.0, 1.0), scale=1.0), s, t)
    ref = sum(authors_margin_cost(x, y, 1.0).sum() / B for x, y in zip(s, t, strict=True))  # torchdistill
    torch.testing.assert_close(uniform(ab(s, t, batch())), ref)
    with pytest.raises(ValueError, match="layer_weights has 1 entries for 2"):
        built(AB(layer_weights=(1.0,)), s, t)


def test_ab_refuses_a_student_tap_after_the_relu() -> None:
    s, t = maps(13, (B, 2, 2, 2), (B, 2, 2, 2))
    with pytest.raises(ValueError, match="pre-activations") as err:
        built(AB(), [s.relu()], [t])
    assert "\n" not in str(err.value)
    built(AB(check_preact=False), [s.relu()], [t])
    built(AB(), [s], [t.relu()])  # the teacher's sign is all that is read: a post-ReLU teacher is fine


# -------------------------------------------------------------------------------------------- FT


def ft_pair(seed: int) -> tuple[Tensor, Tensor]:
    s, t = maps(seed, (B, 3, 4, 4), (B, 4, 2, 2))
    return s, t


def test_ft_transfer_matches_the_authors_factor_loss() -> None:
    s, t = ft_pair(14)
    ft = built(FT(), s, t)
    ft.eval()
    d = ft(s, t, batch()).detach()
    assert d.shape == (B,)
    with torch.no_grad():
        factor_s = avg_pool_2x2(ft.translator(s))  # 4x4 → the teacher factor's 2x2
        factor_t = ft.paraphraser.encoder(t)
    assert factor_t.shape == (B, 2, 2, 2)  # rate 0.5 of 4 teacher channels
    for i in range(B):
        fs, ftv = factor_s[i].reshape(-1), factor_t[i].reshape(-1)
        value = (fs / fs.norm() - ftv / ftv.norm()).abs().mean()
        assert float(d[i]) == pytest.approx(float(value), rel=1e-5)
    flat = [x.flatten(1) / x.flatten(1).norm(dim=1, keepdim=True) for x in (factor_s, factor_t)]
    torch.testing.assert_close(uniform(d), nn.L1Loss()(*flat))  # the authors' loss (β aside)


def test_ft_repdistiller_variant() -> None:
    s, t = ft_pair(15)
    ft = built(FT(factor="attention", reconstruction="mse", translator_bn=True), s, t)
    ft.eval()
    assert any(isinstance(m, nn.BatchNorm2d) for m in ft.translator.modules())
    with torch.no_grad():
        factor_s, factor_t = avg_pool_2x2(ft.translator(s)), ft.paraphraser.encoder(t)

    def factor(f: Tensor) -> Tensor:  # RepDistiller's FactorTransfer.factor
        q = f.pow(2).mean(1).view(f.shape[0], -1)
        return q / q.norm(dim=1, keepdim=True)

    torch.testing.assert_close(uniform(ft(s, t, batch())), (factor(factor_s) - factor(factor_t)).abs().mean())


@pytest.mark.parametrize(("reconstruction", "loss"), [("l1", nn.L1Loss()), ("mse", nn.MSELoss())])
def test_ft_paraphraser_mode_trains_the_autoencoder_only(reconstruction: str, loss: nn.Module) -> None:
    s, t = ft_pair(16)
    s.requires_grad_(True)
    ft = built(FT(mode="paraphraser", reconstruction=reconstruction), s, t)
    assert ft.translator is None and all(p.requires_grad for p in ft.paraphraser.parameters())
    ft.train()
    d = ft(s, t, batch())
    with torch.no_grad():
        rec = ft.paraphraser(t)
    for i in range(B):
        err = (rec[i] - t[i]).abs()
        expected = float((err if reconstruction == "l1" else err**2).mean())
        assert float(d[i].detach()) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(uniform(d), loss(rec, t))
    uniform(d).backward()
    assert s.grad is None, "the paraphraser stage must not send gradients to the student"
    assert all(p.grad is not None for p in ft.paraphraser.parameters())
    assert int(ft.paraphraser_steps) == 1
    ft.eval()
    ft(s, t, batch())
    assert int(ft.paraphraser_steps) == 1, "eval forwards count no training step"


def test_ft_transfer_freezes_its_paraphraser_and_leaves_it_out_of_the_optimizer() -> None:
    s, t = ft_pair(17)
    ft = built(FT(), s, t)
    distiller = Distiller(nn.Linear(2, 2), nn.Linear(2, 2), [Term("ft", ft)])
    distiller.train()
    assert not ft.paraphraser.training and ft.translator.training
    assert not any(p.requires_grad for p in ft.paraphraser.parameters())
    groups = distiller.param_groups()
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in ft.paraphraser.parameters()}
    assert {id(p) for p in ft.translator.parameters()} <= in_optimizer


def test_ft_carry_brings_the_trained_paraphraser_and_a_fresh_translator(caplog: pytest.LogCaptureFixture) -> None:
    s, t = ft_pair(18)
    stage1 = built(FT(mode="paraphraser"), s, t)
    stage1.train()
    optimizer = torch.optim.SGD(stage1.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        stage1(s, t, batch()).mean().backward()
        optimizer.step()
    torch.manual_seed(0)
    stage2 = built(FT(), s, t)
    fresh = {k: v.clone() for k, v in stage2.state_dict().items() if k.startswith("translator.")}
    carry_state(stage2, stage1.state_dict(), "ft")
    for key, value in stage1.state_dict().items():
        assert torch.equal(stage2.state_dict()[key], value), key
    for key, value in fresh.items():
        assert torch.equal(stage2.state_dict()[key], value), key
    assert int(stage2.paraphraser_steps) == 3
    with caplog.at_level(logging.WARNING, logger="padkd.methods.features"):
        stage2(s, t, batch())
        assert not caplog.records
        built(FT(), s, t)(s, t, batch())  # never carried: warns once
        assert "never trained" in caplog.text


def test_ft_needs_one_map_per_side() -> None:
    s, t = ft_pair(19)
    with pytest.raises(ValueError, match="one feature map"):
        built(FT(), [s, s], t)
    with pytest.raises(PadkdError, match="mode"):
        METHODS.create("ft", {"mode": "init"}, "ft")


# ------------------------------------------------------------------------------------------- FSP


def paper_fsp(f1: Tensor, f2: Tensor) -> Tensor:
    """Eq. 1 for one sample: G_ij = Σ_{s,t} F1_{s,t,i} F2_{s,t,j} / (h·w)."""
    return torch.einsum("ihw,jhw->ij", f1, f2) / (f1.shape[1] * f1.shape[2])


@pytest.mark.parametrize(("norm", "pool"), [("mse", "avg"), ("frobenius", "avg"), ("mse", "max")])
def test_fsp_per_sample_matches_the_formula(norm: str, pool: str) -> None:
    shapes = ((B, 2, 4, 4), (B, 3, 4, 4), (B, 4, 2, 2))
    s, t = maps(20, *shapes), maps(21, *shapes)  # equal widths: the paper's setting, no connector
    fsp = built(FSP(norm=norm, pool=pool), s, t)
    assert all(isinstance(c, nn.Identity) for c in fsp.connectors)
    d = _v(fsp(s, t, batch()))
    assert d.shape == (B, 2)
    down = avg_pool_2x2 if pool == "avg" else max_pool_2x2
    for i in range(B):
        pairs = [((s[0][i], s[1][i]), (t[0][i], t[1][i])),
                 ((down(s[1])[i], s[2][i]), (down(t[1])[i], t[2][i]))]  # 4x4 with 2x2: pooled to 2x2
        for j, ((a_s, b_s), (a_t, b_t)) in enumerate(pairs):
            sq = (paper_fsp(a_s, b_s) - paper_fsp(a_t, b_t)) ** 2
            value = sq.mean() if norm == "mse" else sq.sum()
            assert float(d[i, j]) == pytest.approx(float(value), rel=1e-5)


def test_fsp_uniform_equals_repdistillers_batch_loss_and_connectors() -> None:
    s = maps(22, (B, 2, 2, 2), (B, 3, 2, 2))
    t = maps(23, (B, 2, 2, 2), (B, 6, 2, 2))
    fsp = built(FSP(), s, t)
    assert isinstance(fsp.connectors[0], nn.Identity) and fsp.connectors[1].out_channels == 6
    with torch.no_grad():
        s1 = fsp.connectors[1](s[1])

    def repdistiller_fsp(bot: Tensor, top: Tensor) -> Tensor:
        return (bot.unsqueeze(1).flatten(3) * top.unsqueeze(2).flatten(3)).mean(-1)  # [B, C_top, C_bot]

    ref = (repdistiller_fsp(s[0], s1) - repdistiller_fsp(t[0], t[1])).pow(2).mean()
    torch.testing.assert_close(uniform(fsp(s, t, batch())), ref)
    with pytest.raises(ValueError, match="connector='none'"):
        built(FSP(connector="none"), s, t)
    with pytest.raises(ValueError, match="at least 2"):
        built(FSP(), s[:1], t[:1])


# ------------------------------------------------------------------------------------------- VID


@pytest.mark.parametrize("init_var", [5.0, 0.5])
def test_vid_splits_the_gaussian_nll_into_weighted_and_unweighted_parts(init_var: float) -> None:
    s = maps(24, (B, 2, 4, 4), (B, 3, 2, 2))
    t = maps(25, (B, 5, 2, 2), (B, 4, 2, 2))
    vid = built(VID(init_var=init_var), s, t)
    with torch.no_grad():  # a per-channel variance that is not constant
        vid.log_scales[1].add_(torch.linspace(-1, 1, 4))
    d = vid(s, t, batch())
    assert isinstance(d, Discrepancy) and d.value.shape == (B, 2)
    variances = [torch.log(1 + torch.exp(a.detach())) + 1e-5 for a in vid.log_scales]
    torch.testing.assert_close(variances[0], torch.full((5,), init_var))
    with torch.no_grad():
        means = [vid.regressors[0](avg_pool_2x2(s[0])), vid.regressors[1](s[1])]
    for i in range(B):
        for j in range(2):
            weighted = sum(float(((means[j][i, c] - t[j][i, c]) ** 2).mean() / variances[j][c])
                           for c in range(t[j].shape[1])) / t[j].shape[1] / 2
            assert float(d.value[i, j].detach()) == pytest.approx(weighted, rel=1e-5)
    log_part = sum(float(torch.log(v).mean()) / 2 for v in variances)
    assert float(d.unweighted.detach()) == pytest.approx(log_part, rel=1e-5)
    assert (float(d.unweighted.detach()) < 0) == (init_var < 1)  # the signed part; d itself stays >= 0
    # RepDistiller's VIDLoss summed over layers: mean of ½((μ - t)²/σ² + log σ²).
    ref = sum((0.5 * ((m - y) ** 2 / v.view(1, -1, 1, 1) + v.log().view(1, -1, 1, 1))).mean()
              for m, y, v in zip(means, t, variances, strict=True))
    torch.testing.assert_close(uniform(d), ref)


def test_vid_variance_learns_through_the_unweighted_part() -> None:
    s, t = maps(26, (B, 2, 2, 2)), maps(27, (B, 3, 2, 2))
    vid = built(VID(mid_channels=7), s, t)
    assert vid.regressors[0][0].out_channels == 7
    d = vid(s, t, batch())
    d.unweighted.backward()
    assert vid.log_scales[0].grad is not None and (vid.log_scales[0].grad > 0).all()


# ------------------------------------------------------------------------------------------ ReviewKD


def block_mean(x: Tensor, size: int) -> Tensor:
    """Average pooling of a square map to `size` x `size` by block means (the map's side a multiple of size)."""
    b, c, h, _ = x.shape
    k = h // size
    return x.reshape(b, c, size, k, size, k).mean(dim=(3, 5))


@pytest.mark.parametrize(("side", "weights"), [(8, {8: 1, 4: 1 / 2, 2: 1 / 4, 1: 1 / 8}),
                                               (4, {4: 1, 2: 1 / 2, 1: 1 / 4}), (2, {2: 1, 1: 1 / 2}), (1, {1: 1})])
def test_hcl_weights_the_pooled_levels_as_the_authors(side: int, weights: dict[int, float]) -> None:
    from padkd.methods.reviewkd import hcl

    fs, ft = maps(4, (B, 3, side, side), (B, 3, side, side))
    got = hcl(fs, ft)
    for i in range(B):
        total = sum(w * float(((block_mean(fs, k) - block_mean(ft, k))[i] ** 2).mean()) for k, w in weights.items())
        assert float(got[i]) == pytest.approx(total / sum(weights.values()), rel=1e-5)


def authors_review_loss(method: Method, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """The ReviewKD authors' forward and loss, written out: fuse from the deepest level up (the deeper result
    resized to each level, mixed by the two attention maps, resized to the teacher's size), then the sum over
    levels of `hcl` with batch-mean squared errors."""
    xs = [x if x.dim() == 4 else x[:, :, None, None] for x in student][::-1]
    ts = [x if x.dim() == 4 else x[:, :, None, None] for x in teacher]
    results: list[Tensor] = []
    residual = None
    for k, (x, abf) in enumerate(zip(xs, method.abfs, strict=True)):
        n, _, h, w = x.shape
        y = abf.conv1(x)
        if k > 0:
            r = F.interpolate(residual, (h, w), mode="nearest")
            z = abf.att(torch.cat([y, r], dim=1))
            y = y * z[:, 0].view(n, 1, h, w) + r * z[:, 1].view(n, 1, h, w)
        size = ts[len(ts) - 1 - k].shape[-2:]
        if y.shape[-2:] != size:
            y = F.interpolate(y, size, mode="nearest")
        results.insert(0, abf.conv2(y))
        residual = y
    loss = torch.zeros(())
    for fs, ft in zip(results, ts, strict=True):
        level, cnt, tot = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= fs.shape[2]:
                continue
            cnt /= 2.0
            level = level + F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size)) * cnt
            tot += cnt
        loss = loss + level / tot
    return loss


def test_reviewkd_uniform_equals_the_authors_loss() -> None:
    s = [*maps(5, (B, 4, 8, 8), (B, 6, 4, 4), (B, 8, 2, 2)), maps(6, (B, 8))[0]]  # the last: a pooled [B, C]
    t = [*maps(7, (B, 5, 8, 8), (B, 7, 4, 4), (B, 9, 1, 1)), maps(8, (B, 9))[0]]
    method = built(METHODS.create("reviewkd", {"max_mid_channels": 6}, "r"), s, t)
    assert [abf.att is None for abf in method.abfs] == [True, False, False, False]  # the deepest has no fusion
    assert [abf.conv1[0].out_channels for abf in method.abfs] == [6] * 4  # min(6, 8 channels of the deepest)
    assert [abf.conv2[0].out_channels for abf in method.abfs] == [9, 9, 7, 5]
    method.eval()
    with torch.no_grad():
        d = Discrepancy.of(method(s, t, batch()))
        assert d.sum_elements and d.value.shape == (B, 4)
        torch.testing.assert_close(uniform(d), authors_review_loss(method, s, t), rtol=1e-5, atol=1e-6)


def test_reviewkd_levels_and_warmup() -> None:
    s, t = maps(9, (B, 2, 4, 4), (B, 3, 2, 2)), maps(10, (B, 2, 4, 4))
    with pytest.raises(ValueError, match="same number"):
        built(METHODS.create("reviewkd", {}, "r"), s, t)
    clock = StageClock(steps_per_epoch=10)
    assert Term("r", METHODS.create("reviewkd", {}, "r")).ramp_steps(clock) == 200  # the authors' 20 epochs


# ----------------------------------------------------------------------------------------------- OFD


def tail_mean(mean: float, std: float) -> float:
    """E[x | x < 0] for x ~ N(mean, std²), by the trapezoid rule on a fine grid (independent of the closed form)."""
    n, lo = 200_000, mean - 12 * std
    xs = [lo + (0 - lo) * k / n for k in range(n + 1)]
    pdf = [math.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for x in xs]
    h = (0 - lo) / n
    mass = h * (sum(pdf) - 0.5 * (pdf[0] + pdf[-1]))
    first = h * (sum(x * p for x, p in zip(xs, pdf, strict=True)) - 0.5 * (xs[0] * pdf[0] + xs[-1] * pdf[-1]))
    return first / mass


def test_ofd_margin_is_the_expected_negative_response() -> None:
    from padkd.methods.ofd import margin

    assert margin(0.0, 1.0) == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-9)
    for mean, std in [(-1.0, 2.0), (0.5, 0.3), (1.5, 1.0)]:
        assert margin(mean, std) == pytest.approx(tail_mean(mean, std), rel=1e-6)
        assert margin(mean, -std) == margin(mean, std)  # |γ| is the std
    assert margin(4.0, 1.0) == -3.0  # P(x < 0) = 3e-5 <= 0.001: the authors' -3 std


def _bn_teacher(gamma: list[float], beta: list[float]) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(1, len(gamma), 1), nn.BatchNorm2d(len(gamma)))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor(gamma))
        net[1].bias.copy_(torch.tensor(beta))
    return net


def _ofd(student: Any, teacher: Any, options: dict[str, Any], teacher_model: nn.Module | None = None) -> Method:
    method = METHODS.create("ofd", options, "ofd")
    ctx = BuildContext(student=student, teacher=teacher, batch=batch(len(_layers_of(student)[0])),
                       data=DataInfo(n_train=10), world_size=1, student_model=nn.Linear(1, 1),
                       teacher_model=teacher_model)
    method.build(ctx)
    return method


def _layers_of(x: Any) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


def test_ofd_partial_l2_on_a_hand_made_case() -> None:
    # One channel, six neurons; the teacher's BN (γ = 1, β = 0) gives the margin m = -sqrt(2/π) ≈ -0.798.
    t = torch.tensor([1.0, -0.2, -2.0, -0.5, -2.0, 0.3]).view(1, 1, 2, 3)
    r = torch.tensor([0.5, -1.0, -1.5, 0.0, 0.0, 2.0]).view(1, 1, 2, 3)
    method = _ofd([r], [t], {"teacher_bn": ["1"]}, _bn_teacher([1.0], [0.0]))
    method.connectors[0] = nn.Identity()  # read the rule on the student's own values
    m = -math.sqrt(2 / math.pi)
    # t > 0: (r - t)²; m < t <= 0 with r <= t: free; t < m with r <= m: free; otherwise (r - max(t, m))².
    expected = (0.5 - 1.0) ** 2 + 0 + 0 + (0.0 + 0.5) ** 2 + (0.0 - m) ** 2 + (2.0 - 0.3) ** 2
    assert _v(method([r], [t], batch(1))).tolist() == [[pytest.approx(expected, rel=1e-6)]]


def test_ofd_uniform_equals_the_authors_loss_with_connectors_and_layer_weights() -> None:
    s = maps(11, (B, 2, 4, 4), (B, 3, 2, 2))
    t = maps(12, (B, 3, 4, 4), (B, 2, 2, 2))
    teacher = nn.ModuleDict({"a": _bn_teacher([1.0, 0.5, 2.0], [0.2, -0.3, 1.0]),
                             "b": _bn_teacher([0.8, 1.5], [0.0, 3.0])})
    method = _ofd(s, t, {"teacher_bn": ["a.1", "b.1"]}, teacher)
    method.eval()
    from padkd.methods.ofd import margin

    with torch.no_grad():
        d = Discrepancy.of(method(s, t, batch()))
        assert d.sum_elements and d.value.shape == (B, 2)
        total = torch.zeros(())
        for k, (fs, ft, bn) in enumerate(zip(s, t, (teacher["a"][1], teacher["b"][1]), strict=True)):
            m = torch.tensor([margin(float(b), float(g)) for g, b in zip(bn.weight, bn.bias, strict=True)])
            target = torch.max(ft, m.view(1, -1, 1, 1))
            src = method.connectors[k](fs)
            loss = F.mse_loss(src, target, reduction="none") * ((src > target) | (target > 0)).float()
            total = total + loss.sum() / 2 ** (2 - k - 1)
        torch.testing.assert_close(uniform(d), total / B, rtol=1e-5, atol=1e-6)  # the authors' sum / batch size


def test_ofd_margins_from_the_build_batch_and_its_errors() -> None:
    s, t = maps(13, (B, 2, 3, 3)), maps(14, (B, 2, 3, 3))
    method = _ofd(s, t, {})  # teacher_bn: null
    from padkd.methods.ofd import margin

    x = t[0].transpose(0, 1).flatten(1)
    expected = [margin(float(a), float(b)) for a, b in zip(x.mean(1), x.std(1), strict=True)]
    assert method.margins()[0].flatten().tolist() == pytest.approx(expected, rel=1e-5)
    teacher = _bn_teacher([1.0, 1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="one per layer"):
        _ofd(s, t, {"teacher_bn": ["1", "1"]}, teacher)
    with pytest.raises(ValueError, match="affine BatchNorm of the teacher with 2 channels"):
        _ofd(s, t, {"teacher_bn": ["0"]}, teacher)
    with pytest.raises(ValueError, match="'nope'"):
        _ofd(s, t, {"teacher_bn": ["nope"]}, teacher)


# --------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["at", "nst", "ab", "ft", "fsp", "vid", "reviewkd", "ofd"])
def test_example_config_parses_and_uses_the_method(name: str, tmp_path: Path) -> None:
    cfg = load_config(ROOT / "src" / "padkd" / "recipes" / "methods" / f"{name}.yaml", [f"output_dir={tmp_path}"])
    methods = [term.method.name for stage in cfg.stages for term in stage.terms]
    assert name in methods
    assert cfg.student.model.options["widths"] == [4, 8]
    if name in ("ab", "fsp", "ft"):  # an init stage without cross-entropy, the student in eval mode
        init = cfg.stages[0]
        assert init.task_weight == 0 and init.student_mode == "eval" and init.trainable is not None
    if name == "ft":
        assert [s.terms[0].method.options["mode"] for s in cfg.stages] == ["paraphraser", "transfer"]
        assert cfg.stages[0].trainable == [] and cfg.stages[1].terms[0].carry
        assert cfg.stages[0].terms[0].signature() == cfg.stages[1].terms[0].signature()
