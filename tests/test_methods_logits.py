"""DKD, DIST, logit standardization, MLKD, CTKD and DIST+: values against the papers' and authors' formulas written
out per sample, batch means, warm-up, the CTKD curriculum and gradient reversal, PAD refusal."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from padkd.batch import Batch
from padkd.config import load_config
from padkd.context import StageClock
from padkd.discrepancy import Discrepancy
from padkd.distiller import Term
from padkd.errors import PadkdError
from padkd.methods import CTKD, DIST, DKD, KD, METHODS, MLKD
from padkd.validate import parse_checked
from padkd.weightings import WEIGHTINGS

ROOT = Path(__file__).resolve().parents[1]

# Three samples, four classes; sample 2's teacher is confident and wrong-ish, sample 1's logits tie.
S = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.3, 0.3, 0.3, 1.2], [-2.0, 4.0, 1.0, -0.5]])
T = torch.tensor([[3.0, 0.0, -1.0, 0.5], [1.0, -0.5, 0.3, 0.3], [0.0, 1.0, 6.0, -3.0]])
Y = torch.tensor([0, 3, 1])


def batch(targets: torch.Tensor | None = Y) -> Batch:
    n = 3 if targets is None else len(targets)
    return Batch(inputs=torch.zeros(n, 1), targets=targets, index=torch.arange(n))


def softmax(row: list[float], temp: float) -> list[float]:
    z = [math.exp(v / temp) for v in row]
    return [v / sum(z) for v in z]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def dkd_parts(s: list[float], t: list[float], y: int, temp: float) -> tuple[float, float]:
    """The paper's TCKD and NCKD of one sample (times T²): binary split, then renormalised non-targets."""
    p_s, p_t = softmax(s, temp), softmax(t, temp)
    tckd = kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
    hat_s = [p / (1 - p_s[y]) for j, p in enumerate(p_s) if j != y]
    hat_t = [p / (1 - p_t[y]) for j, p in enumerate(p_t) if j != y]
    return temp**2 * tckd, temp**2 * kl(hat_t, hat_s)


# ------------------------------------------------------------------------------------------- DKD


@pytest.mark.parametrize(("alpha", "beta", "temp"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_parts_match_the_paper_per_sample(alpha: float, beta: float, temp: float) -> None:
    out = DKD(alpha=alpha, beta=beta, temperature=temp)(S, T, batch())
    assert out.sum_elements  # the two parts add up to the sample's loss
    d = out.value
    assert d.shape == (3, 2)
    for i in range(3):
        tckd, nckd = dkd_parts(S[i].tolist(), T[i].tolist(), int(Y[i]), temp)
        assert float(d[i, 0]) == pytest.approx(alpha * tckd, rel=1e-4, abs=1e-7)
        assert float(d[i, 1]) == pytest.approx(beta * nckd, rel=1e-4, abs=1e-7)


def test_dkd_uniform_loss_is_the_authors_batch_loss() -> None:
    alpha, beta, temp = 1.0, 8.0, 4.0
    d = DKD(alpha, beta, temp)(S, T, batch())
    parts = [dkd_parts(S[i].tolist(), T[i].tolist(), int(Y[i]), temp) for i in range(3)]
    # mdistiller: KL(sum) / B for each part, then alpha * TCKD + beta * NCKD.
    expected = alpha * sum(p[0] for p in parts) / 3 + beta * sum(p[1] for p in parts) / 3
    loss = WEIGHTINGS.create("uniform", {})(d).loss
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_dkd_with_unit_coefficients_recovers_kd_by_the_papers_identity() -> None:
    # KD = TCKD + (1 - p_t[target]) · NCKD (Zhao et al., eq. 4).
    d = DKD(alpha=1.0, beta=1.0, temperature=2.0)(S, T, batch()).value
    p_t_target = torch.softmax(T / 2.0, dim=1)[torch.arange(3), Y]
    torch.testing.assert_close(d[:, 0] + (1 - p_t_target) * d[:, 1], KD(2.0)(S, T, batch()))


def test_dkd_is_zero_when_the_student_matches_and_stable_for_confident_teachers() -> None:
    assert torch.equal(DKD()(T, T.clone(), batch()).value, torch.zeros(3, 2))
    huge = torch.tensor([[80.0, -80.0, 0.0, 0.0]] * 3)  # p_t[target] rounds to 1 in fp32
    s = S.clone().requires_grad_(True)
    d = DKD(temperature=1.0)(s, huge, batch(torch.tensor([0, 0, 0]))).value
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(s.grad).all()


def test_dkd_warmup_ramps_the_term_through_the_term_ramp() -> None:
    """DKD's published 20-epoch warm-up is the term's ramp, in optimizer steps of the stage's epochs."""
    clock = StageClock(steps_per_epoch=10)
    assert Term("dkd", DKD()).ramp_steps(clock) == 200
    assert Term("dkd", METHODS.create("dkd", {"warmup_epochs": 4})).ramp_steps(clock) == 40
    assert Term("dkd", DKD(), warmup_epochs=0).ramp_steps(clock) == 0  # a term's own setting wins
    assert Term("dkd", DKD(), warmup_steps=7).ramp_steps(clock) == 7
    with pytest.raises(ValueError, match="epoch length is unknown"):
        Term("dkd", DKD()).ramp_steps(StageClock())


def test_dkd_defaults_and_target_check() -> None:
    dkd = METHODS.create("dkd", {})
    assert (dkd.alpha, dkd.beta, dkd.temperature, dkd.warmup_epochs, dkd.default_weight) == (1.0, 8.0, 4.0, 20.0, 1.0)
    with pytest.raises(ValueError, match="class-index targets"):
        dkd(S, T, batch(targets=None))


# ------------------------------------------------------------------------------------------ DIST


def dist_by_hand(s: torch.Tensor, t: torch.Tensor, tau: float) -> tuple[list[float], float]:
    """(1 - Pearson) per sample over classes, and 1 - mean over classes of Pearson over the batch, times τ²."""
    y_s = [softmax(row, tau) for row in s.tolist()]
    y_t = [softmax(row, tau) for row in t.tolist()]
    inter = [tau**2 * (1 - np.corrcoef(a, b)[0, 1]) for a, b in zip(y_s, y_t, strict=True)]
    columns = range(len(y_s[0]))
    rho = [np.corrcoef([r[c] for r in y_s], [r[c] for r in y_t])[0, 1] for c in columns]
    return inter, tau**2 * (1 - sum(rho) / len(rho))


def test_dist_inter_part_per_sample_and_the_authors_loss() -> None:
    inter, intra = dist_by_hand(S, T, 4.0)
    d = DIST(beta=1.5, tau=4.0, intra=False)(S, T, batch())
    assert d.shape == (3,)
    np.testing.assert_allclose(d.numpy(), 1.5 * np.array(inter), rtol=1e-4)
    full = DIST(beta=1.5, gamma=0.5, tau=4.0)(S, T, batch())
    assert full.value.shape == (3, 2) and full.sum_elements
    np.testing.assert_allclose(full.reduce_elements().numpy(), 1.5 * np.array(inter) + 0.5 * intra, rtol=1e-4)
    loss = WEIGHTINGS.create("uniform", {})(full).loss
    # The authors' batch loss: beta * tau² (1 - mean_i rho_i) + gamma * tau² (1 - mean_c rho_c).
    assert float(loss) == pytest.approx(1.5 * sum(inter) / 3 + 0.5 * intra, rel=1e-4)


def test_dist_defaults_follow_the_authors_cifar_recipe() -> None:
    dist = METHODS.create("dist", {})
    assert (dist.beta, dist.gamma, dist.tau, dist.intra, dist.default_weight) == (1.0, 1.0, 4.0, True, 2.0)
    assert dist.unit == "batch" and METHODS.create("dist", {"intra": False}).unit == "sample"


def _config(method: dict, weighting: dict) -> dict:
    return {"output_dir": "unused", "data": {"name": "digits"}, "student": {"model": {"name": "cnn"}},
            "teacher": {"model": {"name": "cnn"}},
            "stages": [{"epochs": 1, "terms": [{"method": method, "weighting": weighting}]}]}


@pytest.mark.parametrize("weighting", ["pad", "ohem"])
def test_dist_with_the_intra_part_is_refused_by_pad_and_ohem_at_config_check(weighting: str) -> None:
    with pytest.raises(PadkdError, match=r"^stages\[0\]\.terms\[0\]\.weighting: .*only weighting 'uniform'") as err:
        parse_checked(_config({"name": "dist"}, {"name": weighting}))
    assert "\n" not in str(err.value)
    parse_checked(_config({"name": "dist", "intra": False}, {"name": weighting}))
    parse_checked(_config({"name": "dist"}, {"name": "uniform"}))


def test_dist_intra_needs_two_samples() -> None:
    with pytest.raises(ValueError, match="intra: false"):
        DIST()(S[:1], T[:1], batch(Y[:1]))
    assert DIST(intra=False)(S[:1], T[:1], batch(Y[:1])).shape == (1,)


def test_dist_pad_weights_the_per_sample_part() -> None:
    s = S.clone().requires_grad_(True)
    d = DIST(intra=False)(s, T, batch())
    emb = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    pad = WEIGHTINGS.create("pad", {}, "w")
    pad.check(DIST(intra=False))
    pad.build(Discrepancy(d), emb)
    pad(d, emb).loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["dkd", "dist"])
def test_example_configs_parse(name: str) -> None:
    cfg = load_config(ROOT / "src" / "padkd" / "recipes" / "methods" / f"{name}.yaml")
    assert any(term.method.name == name for stage in cfg.stages for term in stage.terms)


# ---------------------------------------------------------------------- logit standardization (LS)


def z_score(row: list[float]) -> list[float]:
    """The LS authors' z-score of one row: unbiased std, 1e-7 added to it."""
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (std + 1e-7) for v in row]


def test_standardize_is_the_authors_z_score_per_row() -> None:
    from padkd.methods.logits import standardize

    out = standardize(S)
    for i in range(3):
        assert out[i].tolist() == pytest.approx(z_score(S[i].tolist()), abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 logits"):
        standardize(S[:, :1])


@pytest.mark.parametrize("temp", [2.0, 4.0])
def test_kd_with_logit_standardization_per_sample(temp: float) -> None:
    d = KD(temperature=temp, standardize=True)(S, T, batch())
    for i in range(3):
        p_s, p_t = softmax(z_score(S[i].tolist()), temp), softmax(z_score(T[i].tolist()), temp)
        assert float(d[i]) == pytest.approx(temp**2 * kl(p_t, p_s), rel=1e-5)
    # LS removes each row's shift and scale: KD + LS cannot see them, plain KD does.
    scaled = 3.0 * S + torch.tensor([[1.0], [-2.0], [5.0]])
    torch.testing.assert_close(KD(temp, standardize=True)(scaled, T, batch()), d, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(KD(temp)(scaled, T, batch()), KD(temp)(S, T, batch()))


def test_dkd_with_logit_standardization_per_sample() -> None:
    d = DKD(alpha=1.0, beta=8.0, temperature=2.0, standardize=True)(S, T, batch()).value
    for i in range(3):
        tckd, nckd = dkd_parts(z_score(S[i].tolist()), z_score(T[i].tolist()), int(Y[i]), 2.0)
        assert float(d[i, 0]) == pytest.approx(tckd, rel=1e-4, abs=1e-7)
        assert float(d[i, 1]) == pytest.approx(8.0 * nckd, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("name", ["kd_ls", "dkd_ls"])
def test_ls_is_one_config_line(name: str) -> None:
    cfg = load_config(ROOT / "src" / "padkd" / "recipes" / "methods" / f"{name}.yaml")
    (term,) = cfg.stages[0].terms
    assert term.method.name == name.removesuffix("_ls") and term.method.options["standardize"] is True
    assert term.method.options["temperature"] == 2.0 and term.weight == 9.0  # the LS authors' base recipe


# ------------------------------------------------------------------------------------------ MLKD


def gram(rows: list[list[float]]) -> list[list[float]]:
    return [[sum(a * b for a, b in zip(r, q, strict=True)) for q in rows] for r in rows]


def transpose(rows: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*rows, strict=True)]


def mlkd_by_hand(s: torch.Tensor, t: torch.Tensor, temps: tuple[float, ...]) -> tuple[list[float], list[float], float]:
    """Instance KL (× T²), batch-Gram rows and the class-Gram loss, summed over the temperatures, unmasked."""
    n, c = s.shape
    inst, rows, whole = [0.0] * n, [0.0] * n, 0.0
    for temp in temps:
        p = [softmax(r, temp) for r in s.tolist()]
        q = [softmax(r, temp) for r in t.tolist()]
        for i in range(n):
            inst[i] += temp**2 * kl(q[i], p[i])
        gp, gq = gram(p), gram(q)
        for i in range(n):
            rows[i] += sum((gq[i][j] - gp[i][j]) ** 2 for j in range(n))
        mp, mq = gram(transpose(p)), gram(transpose(q))
        whole += sum((mq[a][b] - mp[a][b]) ** 2 for a in range(c) for b in range(c)) / c
    return inst, rows, whole


def test_mlkd_parts_per_sample_and_the_authors_masked_loss() -> None:
    temps = (2.0, 3.0, 4.0, 5.0, 6.0)
    out = MLKD()(S, T, batch())
    assert out.sum_elements and out.value.shape == (3, 3)
    inst, rows, whole = mlkd_by_hand(S, T, temps)
    # The teacher's confidences (max softmax) of the three samples, and the summed probability per class.
    p_t = [softmax(r, 1.0) for r in T.tolist()]
    conf = sorted(max(r) for r in p_t)
    kept = sum(v <= conf[1] for v in conf) / 3  # the median of three values is the middle one: 2 of 3
    per_class = sorted(sum(r[k] for r in p_t) for k in range(4))
    kept_c = sum(v <= (per_class[1] + per_class[2]) / 2 for v in per_class) / 4  # 2 of 4
    assert (kept, kept_c) == (2 / 3, 1 / 2)
    np.testing.assert_allclose(out.value[:, 0].numpy(), kept * np.array(inst), rtol=1e-5)
    np.testing.assert_allclose(out.value[:, 1].numpy(), kept * np.array(rows), rtol=1e-5)
    np.testing.assert_allclose(out.value[:, 2].numpy(), [kept_c * whole] * 3, rtol=1e-5)
    # The authors' loss (weak view): Σ_T [mean_i KD_i · f + Σ_ij ΔG² / B · f + Σ ΔM² / C · f_c].
    expected = kept * sum(inst) / 3 + kept * sum(rows) / 3 + kept_c * whole
    assert float(WEIGHTINGS.create("uniform", {})(out).loss) == pytest.approx(expected, rel=1e-5)


def test_mlkd_levels_mask_and_standardization() -> None:
    inst, rows, _ = mlkd_by_hand(S, T, (4.0,))
    d = MLKD(temperatures=(4.0,), levels=("batch", "instance"), mask="none")(S, T, batch())
    np.testing.assert_allclose(d.value.numpy(), np.stack([inst, rows], axis=1), rtol=1e-5)  # instance first
    ls = MLKD(temperatures=(4.0,), levels=("instance", "batch"), mask="none", standardize=True)(S, T, batch())
    ls_inst = [16.0 * kl(softmax(z_score(b), 4.0), softmax(z_score(a), 4.0)) for a, b in zip(S.tolist(), T.tolist(),
                                                                                              strict=True)]
    np.testing.assert_allclose(ls.value[:, 0].numpy(), ls_inst, rtol=1e-5)
    torch.testing.assert_close(ls.value[:, 1], d.value[:, 1])  # LS touches the instance part only
    assert MLKD().unit == "batch" and MLKD(levels=("instance", "batch")).unit == "sample"
    with pytest.raises(ValueError, match="levels"):
        MLKD(levels=("instance", "instance"))
    with pytest.raises(ValueError, match="temperatures"):
        MLKD(temperatures=())


def test_mlkd_class_part_is_refused_by_pad_at_config_check() -> None:
    with pytest.raises(PadkdError, match=r"levels: \[instance, batch\]"):
        parse_checked(_config({"name": "mlkd"}, {"name": "pad"}))
    parse_checked(_config({"name": "mlkd", "levels": ["instance", "batch"]}, {"name": "pad", "mode": "per_sample"}))


# ------------------------------------------------------------------------------------------ CTKD


def test_ctkd_curriculum_is_a_pure_function_of_the_step() -> None:
    from padkd.methods.logits import curriculum_lambda

    def lam(step: int, kind: str = "cosine", steps: int = 100) -> float:
        return curriculum_lambda(step, steps, kind, 1.0)

    assert [lam(s) for s in (0, 50, 100, 250)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert [lam(s, "linear") for s in (0, 25, 100, 200)] == pytest.approx([0.0, 0.25, 1.0, 1.0])
    # The authors' cosine value at 1-based epoch i of a 10-epoch curriculum, reached after i epochs of steps.
    for i in range(1, 11):
        assert lam(i * 782, steps=7820) == pytest.approx((1 - math.cos(i * math.pi / 10)) / 2, abs=1e-6)
    assert lam(0, steps=0) == 1.0
    assert curriculum_lambda(50, 100, "cosine", 0.4) == pytest.approx(0.2)


def test_ctkd_global_temperature_per_sample_and_its_reversed_gradient() -> None:
    ctkd = CTKD(curriculum_steps=10)
    ctkd.train()
    with torch.no_grad():
        ctkd.theta.fill_(0.3)
    ctkd.clock.step = 5  # half-way: λ = 1/2
    s = S.clone().requires_grad_(True)
    d = ctkd(s, T, batch())
    tau = 1.0 + 20.0 / (1.0 + math.exp(-0.3))
    for i in range(3):  # fp32 log-softmax differences at τ ≈ 12: agreement to 1e-4 relative
        expected = tau**2 * kl(softmax(T[i].tolist(), tau), softmax(S[i].tolist(), tau))
        assert float(d[i].detach()) == pytest.approx(expected, rel=1e-4)
    d.sum().backward()
    # Without reversal, d(loss)/dθ by central differences of the same loss at θ ± h.
    def loss_at(theta: float) -> float:
        t = 1.0 + 20.0 / (1.0 + math.exp(-theta))
        return sum(t**2 * kl(softmax(T[i].tolist(), t), softmax(S[i].tolist(), t)) for i in range(3))

    h = 1e-4
    slope = (loss_at(0.3 + h) - loss_at(0.3 - h)) / (2 * h)
    assert float(ctkd.theta.grad) == pytest.approx(-0.5 * slope, rel=1e-3)  # reversed, times λ
    s2 = S.clone().requires_grad_(True)
    KD(temperature=tau)(s2, T, batch()).sum().backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-4, atol=1e-6)  # the student sees plain KD at τ


def test_ctkd_temperature_climbs_the_loss_while_the_student_descends_it() -> None:
    ctkd = CTKD(curriculum_steps=0)  # λ = 1 from the first step
    ctkd.train()
    s = torch.nn.Parameter(S.clone())
    opt = torch.optim.SGD([s, *ctkd.parameters()], lr=0.5)
    theta0 = float(ctkd.theta.detach())
    before = float(ctkd(s, T, batch()).mean().detach())
    opt.zero_grad()
    ctkd(s, T, batch()).mean().backward()
    opt.step()
    ctkd.eval()
    with torch.no_grad():
        after_student = float(KD(temperature=1.0 + 20.0 / (1.0 + math.exp(-theta0)))(s, T, batch()).mean())
        new_theta = float(ctkd(S, T, batch()).mean())  # the new θ on the old student
    # The student's step lowered the loss at the old temperature; θ's step raised it for the old student.
    assert after_student < before < new_theta and float(ctkd.theta.detach()) != theta0


def test_ctkd_instance_mode_starts_at_the_global_temperature_and_trains_its_mlp() -> None:
    from padkd.context import BuildContext, DataInfo

    ctkd = CTKD(mode="instance", curriculum_steps=0, hidden=8)
    ctx = BuildContext(student=S, teacher=T, batch=batch(), data=DataInfo(n_train=3), world_size=1,
                       student_model=torch.nn.Linear(1, 1), teacher_model=torch.nn.Linear(1, 1))
    ctkd.build(ctx)
    ctkd.train()
    d = ctkd(S.clone().requires_grad_(True), T, batch())
    torch.testing.assert_close(d, CTKD()(S, T, batch()))  # every sample at τ0 = 1 + 20 sigmoid(1)
    d.sum().backward()
    assert ctkd.mlp is not None and ctkd.mlp[2].weight.grad.abs().sum() > 0
    assert set(ctkd.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}


def test_ctkd_reads_the_stage_clock_and_trains_in_its_own_checkpointed_group() -> None:
    from padkd.distiller import Distiller

    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    example = Batch(inputs=torch.randn(5, 4), targets=torch.tensor([0, 1, 2, 0, 1]), index=torch.arange(5))
    ctkd = CTKD(curriculum_epochs=2)
    distiller = Distiller(student, teacher, [Term("ctkd", ctkd, lr_scale=0.5)], steps_per_epoch=5)
    distiller.prepare(example)
    assert ctkd.clock is distiller.clock and ctkd.curriculum_steps == 10  # 2 epochs of 5 optimizer steps
    groups = {g["name"]: g for g in distiller.param_groups()}
    assert groups["ctkd"]["params"] == [ctkd.theta] and groups["ctkd"]["lr_scale"] == 0.5
    distiller.train()
    distiller(example, step=5).losses["ctkd"].backward()  # half-way through the curriculum: λ = 1/2
    grad = float(ctkd.theta.grad)
    ctkd.theta.grad = None
    distiller(example, step=10).losses["ctkd"].backward()  # λ = 1
    assert float(ctkd.theta.grad) == pytest.approx(2 * grad, rel=1e-5)
    assert set(distiller.terms_state_dict()) == {"0.method.theta"}  # the step is the clock's, saved by the trainer
    with pytest.raises(PadkdError, match="curriculum_epochs"):
        Distiller(student, teacher, [Term("ctkd", CTKD(curriculum_epochs=2))]).prepare(example)
    with pytest.raises(ValueError, match="not both"):
        CTKD(curriculum_epochs=2, curriculum_steps=10)
    assert CTKD().curriculum_steps == 7820


def test_ctkd_with_logit_standardization() -> None:
    tau = 1.0 + 20.0 / (1.0 + math.exp(-1.0))
    d = CTKD(standardize=True)(S, T, batch()).detach()
    for i in range(3):
        p_s, p_t = softmax(z_score(S[i].tolist()), tau), softmax(z_score(T[i].tolist()), tau)
        assert float(d[i]) == pytest.approx(tau**2 * kl(p_t, p_s), rel=1e-4)  # τ ≈ 15.6: fp32 rounding


# ----------------------------------------------------------------------------------------- DIST+

# Maps of the three samples: 3 channels on 2x2 locations on both sides (seeded, no constant location).
FS, FT = torch.randn(2, 3, 3, 2, 2, generator=torch.Generator().manual_seed(0)).unbind(0)


def dist_plus_by_hand(fs: torch.Tensor, ft: torch.Tensor) -> tuple[list[float], float, list[float]]:
    """torchdistill's channel correlations (mean over locations, per sample), its spatial relation, and
    1 − ρ per sample: the channel Pearson at each location over channels, the spatial one over the batch."""
    n, _, h, w = fs.shape
    rho = [np.mean([np.corrcoef(fs[i, :, y, x], ft[i, :, y, x])[0, 1] for y in range(h) for x in range(w)])
           for i in range(n)]
    agg_s, agg_t = fs.sum(1).numpy(), ft.sum(1).numpy()
    rho_hw = [np.corrcoef(agg_s[:, y, x], agg_t[:, y, x])[0, 1] for y in range(h) for x in range(w)]
    return rho, 1 - float(np.mean(rho_hw)), [1 - r for r in rho]


def test_dist_plus_parts_per_sample_match_torchdistills_formula() -> None:
    fs, ft = FS, FT
    rho, spatial, channel = dist_plus_by_hand(fs, ft)
    inter, intra = dist_by_hand(S, T, 1.0)
    method = METHODS.create("dist_plus", {})
    d = method([S, fs], [T, ft], batch())
    assert d.sum_elements and d.value.shape == (3, 4) and method.unit == "batch"
    expected = np.stack([2.0 * np.array(inter), [2.0 * intra] * 3, channel, [spatial] * 3], axis=1)
    np.testing.assert_allclose(d.value.numpy(), expected, rtol=1e-4, atol=1e-6)
    # torchdistill's DISTPlusLoss: β τ²(1 − mean ρ_i) + γ τ²(1 − mean ρ_c) + ι mean ρ_channel + κ spatial.
    torchdistill = 2.0 * np.mean(inter) + 2.0 * intra + np.mean(rho) + spatial
    signed = METHODS.create("dist_plus", {"channel_sign": "torchdistill"})([S, fs], [T, ft], batch())
    np.testing.assert_allclose(signed.value[:, 2].numpy(), [1 + r for r in rho], rtol=1e-4)
    loss = float(WEIGHTINGS.create("uniform", {})(signed).loss)
    assert loss == pytest.approx(torchdistill + 1.0, rel=1e-4)  # the same loss, 1 apart (ι · 1)


def test_dist_plus_per_sample_variant_and_connector() -> None:
    from padkd.context import BuildContext, DataInfo

    method = METHODS.create("dist_plus", {"intra": False, "spatial": False, "tau": 4.0, "beta": 1.0, "iota": 0.5})
    assert method.unit == "sample"
    wide = FT.repeat(1, 2, 1, 1)
    ctx = BuildContext(student=[S, FS], teacher=[T, wide], batch=batch(), data=DataInfo(n_train=3),
                       world_size=1, student_model=torch.nn.Linear(1, 1), teacher_model=torch.nn.Linear(1, 1))
    method.build(ctx)  # 3 student channels, 6 teacher channels: a 1x1 conv + BN connector
    assert isinstance(method.connector, torch.nn.Sequential)
    method.eval()
    with torch.no_grad():
        d = method([S, FS], [T, wide], batch()).value
    inter, _ = dist_by_hand(S, T, 4.0)
    np.testing.assert_allclose(d[:, 0].numpy(), inter, rtol=1e-4)
    with torch.no_grad():
        mapped = method.connector(FS)
    np.testing.assert_allclose(d[:, 1].numpy(), 0.5 * np.array(dist_plus_by_hand(mapped, wide)[2]),
                               rtol=1e-4, atol=1e-6)
    none = METHODS.create("dist_plus", {"connector": "none"})
    with pytest.raises(ValueError, match="connector"):
        none.build(ctx)
    with pytest.raises(ValueError, match=r"\[logits, feature map\]"):
        method(S, T, batch())
