"""SP, CC, RKD, PKT: rows against the papers' formulas written as loops over pairs, batch means, PAD per sample."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.config import load_config
from padkd.context import BuildContext, DataInfo
from padkd.discrepancy import Discrepancy
from padkd.methods import CC, METHODS, PKT, RKD, SP
from padkd.weightings import WEIGHTINGS

ROOT = Path(__file__).resolve().parents[1]
B = 4
G = torch.Generator().manual_seed(0)
FS = torch.randn(B, 3, generator=G)  # student embeddings (width 3)
FT = torch.randn(B, 5, generator=G)  # teacher embeddings (width 5)


def batch(n: int = B) -> Batch:
    return Batch(inputs=torch.zeros(n, 1), targets=torch.zeros(n, dtype=torch.long), index=torch.arange(n))


def rows(f: torch.Tensor) -> list[list[float]]:
    return f.flatten(1).tolist()


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def uniform_loss(d: torch.Tensor | Discrepancy) -> float:
    return float(WEIGHTINGS.create("uniform", {})(d).loss)


# -------------------------------------------------------------------------------------------- SP


def sp_rows(fs: torch.Tensor, ft: torch.Tensor) -> list[list[float]]:
    """(Ĝ_t[i, j] - Ĝ_s[i, j])² with Ĝ the Gram matrix with L2-normalised rows (Tung & Mori, eq. 2-4)."""

    def normalised_gram(f: list[list[float]]) -> list[list[float]]:
        g = [[dot(a, b) for b in f] for a in f]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = normalised_gram(rows(fs)), normalised_gram(rows(ft))
    return [[(gt[i][j] - gs[i][j]) ** 2 for j in range(len(gs))] for i in range(len(gs))]


def test_sp_rows_and_batch_loss() -> None:
    fs, ft = torch.randn(B, 2, 3, 3, generator=G), torch.randn(B, 4, 2, 2, generator=G)
    d = SP()(fs, ft, batch())
    expected = sp_rows(fs, ft)
    torch.testing.assert_close(d, torch.tensor(expected), rtol=1e-4, atol=1e-6)
    # The paper's loss: squared Frobenius norm of the difference over B².
    assert uniform_loss(d) == pytest.approx(sum(map(sum, expected)) / B**2, rel=1e-4)


def test_sp_is_zero_for_features_that_differ_by_a_scale() -> None:
    assert torch.allclose(SP()(FT, 3 * FT, batch()), torch.zeros(B, B), atol=1e-7)


# -------------------------------------------------------------------------------------------- CC


def cc_matrix(f: torch.Tensor, gamma: float, order: int) -> list[list[float]]:
    """Peng et al. eq. 7: exp(-2γ) Σ_p (2γ)^p / p! (f̂_i · f̂_j)^p on L2-normalised f̂."""
    unit = [[v / math.sqrt(dot(a, a)) for v in a] for a in rows(f)]
    return [[math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * dot(a, b) ** p
                                         for p in range(order + 1)) for b in unit] for a in unit]


@pytest.mark.parametrize(("gamma", "order"), [(0.4, 2), (1.0, 3)])
def test_cc_rows_and_batch_loss(gamma: float, order: int) -> None:
    d = CC(gamma=gamma, order=order, embed=None)(FS, FT, batch())
    cs, ct = cc_matrix(FS, gamma, order), cc_matrix(FT, gamma, order)
    expected = [[(ct[i][j] - cs[i][j]) ** 2 for j in range(B)] for i in range(B)]
    torch.testing.assert_close(d, torch.tensor(expected), rtol=1e-4, atol=1e-7)
    assert uniform_loss(d) == pytest.approx(sum(map(sum, expected)) / B**2, rel=1e-4)


def test_cc_expansion_approaches_the_gaussian_kernel() -> None:
    unit = F.normalize(FT, dim=1)
    kernel = torch.exp(-0.4 * torch.cdist(unit, unit).pow(2))
    torch.testing.assert_close(CC(gamma=0.4, order=12, embed=None).correlation(FT), kernel, rtol=1e-5, atol=1e-6)


def test_cc_builds_linear_embeddings_for_both_networks() -> None:
    cc = METHODS.create("cc", {})
    assert (cc.gamma, cc.order, cc.embed, cc.default_weight) == (0.4, 2, 128, 0.02)
    ctx = BuildContext(student=FS, teacher=FT, batch=batch(), data=DataInfo(n_train=B), world_size=1,
                       student_model=nn.Linear(1, 1), teacher_model=nn.Linear(1, 1))
    cc.build(ctx)
    assert (cc.embed_s.in_features, cc.embed_s.out_features) == (3, 128)
    assert (cc.embed_t.in_features, cc.embed_t.out_features) == (5, 128)
    expected = CC(embed=None)(cc.embed_s(FS).detach(), cc.embed_t(FT).detach(), batch())
    torch.testing.assert_close(cc(FS, FT, batch()).detach(), expected)


# ------------------------------------------------------------------------------------------- RKD


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def rkd_parts(fs: torch.Tensor, ft: torch.Tensor) -> tuple[list[list[float]], list[list[list[float]]]]:
    """Huber terms of Park et al.: pair distances over their mean (i ≠ j), and cosines at vertex i of (j, i, k)."""

    def psi_d(f: list[list[float]]) -> list[list[float]]:
        n = len(f)
        dist = [[math.dist(a, b) for b in f] for a in f]
        mu = sum(dist[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mu for v in row] for row in dist]

    def psi_a(f: list[list[float]]) -> list[list[list[float]]]:
        n = len(f)
        out = [[[0.0] * n for _ in range(n)] for _ in range(n)]
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if i in (j, k):
                        continue  # a zero edge: both networks give 0
                    u = [a - b for a, b in zip(f[j], f[i], strict=True)]
                    v = [a - b for a, b in zip(f[k], f[i], strict=True)]
                    out[i][j][k] = dot(u, v) / math.sqrt(dot(u, u) * dot(v, v))
        return out

    s, t = rows(fs), rows(ft)
    ds, dt = psi_d(s), psi_d(t)
    as_, at = psi_a(s), psi_a(t)
    n = len(s)
    dist = [[huber(ds[i][j] - dt[i][j]) for j in range(n)] for i in range(n)]
    angle = [[[huber(as_[i][j][k] - at[i][j][k]) for k in range(n)] for j in range(n)] for i in range(n)]
    return dist, angle


@pytest.mark.parametrize("scale", [1.0, 5.0])  # scale 5: distances differ by more than the Huber knee
def test_rkd_rows_and_batch_loss(scale: float) -> None:
    fs = FS.clone()
    fs[0] *= scale
    out = RKD()(fs, FT, batch())
    assert out.sum_elements  # distance and angle add up to the row's loss
    d = out.value
    dist, angle = rkd_parts(fs, FT)
    assert d.shape == (B, 2)
    for i in range(B):
        assert float(d[i, 0]) == pytest.approx(25 * sum(dist[i]) / B, rel=1e-4, abs=1e-6)
        assert float(d[i, 1]) == pytest.approx(50 * sum(map(sum, angle[i])) / B**2, rel=1e-4, abs=1e-6)
    # The authors' loss: 25 · mean over all B² distance terms + 50 · mean over all B³ angle terms.
    loss_d = sum(map(sum, dist)) / B**2
    loss_a = sum(sum(map(sum, plane)) for plane in angle) / B**3
    assert uniform_loss(out) == pytest.approx(25 * loss_d + 50 * loss_a, rel=1e-4)


def test_rkd_part_weights_and_batch_size_one() -> None:
    full, scaled = RKD()(FS, FT, batch()).value, RKD(distance_weight=1.0, angle_weight=0.0)(FS, FT, batch()).value
    torch.testing.assert_close(scaled[:, 0] * 25, full[:, 0])
    assert torch.equal(scaled[:, 1], torch.zeros(B))
    with pytest.raises(ValueError, match="at least 2 samples"):
        RKD()(FS[:1], FT[:1], batch(1))


# ------------------------------------------------------------------------------------------- PKT


def pkt_rows(fs: torch.Tensor, ft: torch.Tensor, eps: float = 1e-7) -> list[float]:
    """Passalis & Tefas: rescaled cosine kernels as conditional probabilities, row-wise KL(teacher ‖ student)."""

    def conditional(f: list[list[float]]) -> list[list[float]]:
        k = [[(1 + dot(a, b) / (math.sqrt(dot(a, a)) * math.sqrt(dot(b, b)))) / 2 for b in f] for a in f]
        return [[v / sum(row) for v in row] for row in k]

    p, q = conditional(rows(fs)), conditional(rows(ft))
    n = len(p)
    return [sum(q[i][j] * math.log((q[i][j] + eps) / (p[i][j] + eps)) for j in range(n)) / n for i in range(n)]


def test_pkt_rows_and_batch_loss() -> None:
    d = PKT()(FS, FT, batch())
    expected = pkt_rows(FS, FT)
    assert d.shape == (B,)
    torch.testing.assert_close(d, torch.tensor(expected), rtol=1e-4, atol=1e-7)
    # The authors' loss is the mean over all B² entries, i.e. the mean of the rows' sums over B.
    assert uniform_loss(d) == pytest.approx(sum(expected) / B, rel=1e-4)


# --------------------------------------------------------------------------- weighting and flags


def test_elements_flags_and_default_weights() -> None:
    flags = {name: METHODS.create(name, {}) for name in ("sp", "cc", "rkd", "pkt")}
    assert {n: m.elements for n, m in flags.items()} == {"sp": "exchangeable", "cc": "exchangeable",
                                                          "rkd": "fixed", "pkt": "fixed"}
    assert {n: m.default_weight for n, m in flags.items()} == {"sp": 3000.0, "cc": 0.02, "rkd": 1.0, "pkt": 30000.0}
    assert all(m.reference for m in flags.values())


@pytest.mark.parametrize("method", [SP(), CC(embed=None), RKD(), PKT()], ids=["sp", "cc", "rkd", "pkt"])
def test_pad_per_sample_weights_the_rows(method: torch.nn.Module) -> None:
    fs = FS.clone().requires_grad_(True)
    emb = torch.randn(B, 7, generator=torch.Generator().manual_seed(1))
    pad = WEIGHTINGS.create("pad", {"mode": "per_sample"}, "w")
    pad.check(method)
    d = Discrepancy.of(method(fs, FT, batch()))
    pad.build(d, emb)
    result = pad(d, emb)
    assert torch.isfinite(result.loss)
    result.loss.backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    if method.elements == "exchangeable":
        with pytest.raises(ValueError, match="per_sample"):
            WEIGHTINGS.create("pad", {}, "w").check(method)


@pytest.mark.parametrize("name", ["sp", "cc", "rkd", "pkt"])
def test_example_configs_parse(name: str) -> None:
    cfg = load_config(ROOT / "src" / "padkd" / "recipes" / "methods" / f"{name}.yaml")
    assert any(term.method.name == name for stage in cfg.stages for term in stage.terms)
