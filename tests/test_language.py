"""Language modelling: token-level divergences against their formulas on hand-written distributions, the mask
over tokens, PAD and hard mining per token, the Hugging Face models and their taps, the task's loss and
evaluator (perplexity, bits per byte, agreement) on hand-computable logits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from padkd.batch import Batch, stack_collate
from padkd.discrepancy import Discrepancy
from padkd.errors import PadkdError
from padkd.methods import METHODS
from padkd.methods.tokens import TopK, token_mask
from padkd.models import MODELS
from padkd.taps import Taps
from padkd.tasks import TASKS
from padkd.weightings import PAD, WEIGHTINGS

T_PROBS = [0.7, 0.2, 0.1]
S_PROBS = [0.4, 0.4, 0.2]


def kl_list(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def mix(p: list[float], q: list[float], w: float) -> list[float]:
    return [w * a + (1 - w) * b for a, b in zip(p, q, strict=True)]


def one_token(student: list[float], teacher: list[float]) -> tuple[torch.Tensor, torch.Tensor, Batch]:
    """Logits `[1, 2, V]` (position 0 = the distributions; position 1 the last, never counted), labels all real."""
    s = torch.tensor([[student, [1 / len(student)] * len(student)]]).log()
    t = torch.tensor([[teacher, [1 / len(teacher)] * len(teacher)]]).log()
    batch = Batch(inputs={"input_ids": torch.zeros(1, 2, dtype=torch.long),
                          "attention_mask": torch.ones(1, 2, dtype=torch.long)},
                  targets=torch.zeros(1, 2, dtype=torch.long), index=torch.tensor([0]))
    return s, t, batch


@pytest.mark.parametrize(("name", "options", "expected"), [
    ("forward_kl", {}, kl_list(T_PROBS, S_PROBS)),
    ("reverse_kl", {}, kl_list(S_PROBS, T_PROBS)),
    ("jsd", {"beta": 0.5}, 0.5 * kl_list(T_PROBS, mix(T_PROBS, S_PROBS, 0.5))
     + 0.5 * kl_list(S_PROBS, mix(T_PROBS, S_PROBS, 0.5))),
    ("jsd", {"beta": 0.9}, 0.9 * kl_list(T_PROBS, mix(T_PROBS, S_PROBS, 0.9))
     + 0.1 * kl_list(S_PROBS, mix(T_PROBS, S_PROBS, 0.9))),
    ("jsd", {"beta": 0.0}, kl_list(T_PROBS, S_PROBS)),  # TRL's endpoints: β = 0 forward, β = 1 reverse KL
    ("jsd", {"beta": 1.0}, kl_list(S_PROBS, T_PROBS)),
    ("skew_kl", {"alpha": 0.1}, kl_list(T_PROBS, mix(T_PROBS, S_PROBS, 0.1))),
    ("skew_reverse_kl", {"alpha": 0.1}, kl_list(S_PROBS, mix(T_PROBS, S_PROBS, 0.9))),
])
def test_divergences_equal_their_formulas(name: str, options: dict, expected: float) -> None:
    s, t, batch = one_token(S_PROBS, T_PROBS)
    d = METHODS.create(name, options)(s, t, batch)
    assert d.mask.tolist() == [[True, False]]
    assert d.value[0, 0].item() == pytest.approx(expected, rel=1e-5)
    assert d.value[0, 1].item() == 0.0


def test_temperature_multiplies_the_kl_of_softened_distributions_by_t_squared() -> None:
    s, t, batch = one_token(S_PROBS, T_PROBS)
    # softmax(log p / 2) ∝ sqrt(p)
    soft_t = [math.sqrt(p) / sum(math.sqrt(q) for q in T_PROBS) for p in T_PROBS]
    soft_s = [math.sqrt(p) / sum(math.sqrt(q) for q in S_PROBS) for p in S_PROBS]
    d = METHODS.create("forward_kl", {"temperature": 2.0})(s, t, batch)
    assert d.value[0, 0].item() == pytest.approx(4 * kl_list(soft_t, soft_s), rel=1e-5)
    r = METHODS.create("reverse_kl", {"temperature": 2.0})(s, t, batch)
    assert r.value[0, 0].item() == pytest.approx(4 * kl_list(soft_s, soft_t), rel=1e-5)


def test_mask_counts_positions_whose_next_token_is_real() -> None:
    labels = torch.tensor([[5, 6, 7, -100, -100], [5, 6, 7, 8, 9]])
    batch = Batch(inputs={}, targets=labels, index=torch.arange(2))
    assert token_mask(batch, 2, 5, torch.device("cpu")).tolist() == [
        [True, True, False, False, False], [True, True, True, True, False]]


def test_uniform_loss_over_padded_sequences_is_the_mean_of_sequence_means() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    labels = torch.tensor([[1, 2, -100, -100], [1, 2, 3, 4]])  # 1 and 3 counted positions
    batch = Batch(inputs={}, targets=labels, index=torch.arange(2))
    d = METHODS.create("forward_kl")(s, t, batch)
    per_token = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
    expected = (per_token[0, 0] + (per_token[1, 0] + per_token[1, 1] + per_token[1, 2]) / 3) / 2
    assert WEIGHTINGS.create("uniform")(d).loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_jsd_equals_trls_token_mean_on_full_blocks() -> None:
    """TRL's GKD loss (sum over real tokens / their number, F.kl_div as TRL writes it) on full blocks."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    labels = torch.ones(3, 5, dtype=torch.long)
    beta = 0.3
    log_s, log_t = F.log_softmax(s[:, :-1], -1), F.log_softmax(t[:, :-1], -1)
    b = torch.tensor(beta)
    m = torch.logsumexp(torch.stack([log_s + torch.log1p(-b), log_t + torch.log(b)]), dim=0)
    trl = beta * F.kl_div(m, log_t, reduction="none", log_target=True) + \
        (1 - beta) * F.kl_div(m, log_s, reduction="none", log_target=True)
    trl_loss = trl.sum() / (3 * 4)
    d = METHODS.create("jsd", {"beta": beta})(s, t, Batch(inputs={}, targets=labels, index=torch.arange(3)))
    assert WEIGHTINGS.create("uniform")(d).loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)


def test_token_hint_is_the_mse_of_the_connected_hidden_state_per_token() -> None:
    from padkd.context import BuildContext, DataInfo

    hint = METHODS.create("token_hint")
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    batch = Batch(inputs={}, targets=torch.tensor([[1, 1, 1], [1, 1, -100]]), index=torch.arange(2))
    hint.build(BuildContext(student=s, teacher=t, batch=batch, data=DataInfo(n_train=2), world_size=1,
                            student_model=torch.nn.Linear(1, 1), teacher_model=None))
    d = hint(s, t, batch)
    w, bias = hint.connector.weight, hint.connector.bias
    assert d.value[0, 1].item() == pytest.approx(((s[0, 1] @ w.T + bias - t[0, 1]) ** 2).mean().item(), rel=1e-5)
    assert d.mask.tolist() == [[True, True, False], [True, False, False]]


# ------------------------------------------------------------------------------------- cached teacher


def test_cached_top_k_with_k_equal_to_the_vocabulary_is_exact() -> None:
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 4, 9, generator=g), (torch.randn(2, 4, 9, generator=g) * 8).round() / 8  # fp16-exact
    batch = Batch(inputs={}, targets=torch.ones(2, 4, dtype=torch.long), index=torch.arange(2))
    values, indices = t.half().topk(9, dim=-1)
    cached = TopK(values, indices.int(), t.logsumexp(-1))
    for name in ("forward_kl", "reverse_kl", "jsd"):
        method = METHODS.create(name)
        assert torch.allclose(method(s, cached, batch).value, method(s, t, batch).value, atol=1e-6), name


def test_cached_top_k_is_the_divergence_of_the_coarsened_distributions() -> None:
    """k < V: the k cached tokens plus one bin for the rest, on both sides."""
    s, t, batch = one_token([0.1, 0.3, 0.6], [0.5, 0.3, 0.2])
    values, indices = t.topk(2, dim=-1)
    cached = TopK(values.half(), indices.int(), t.logsumexp(-1))
    d = METHODS.create("forward_kl")(s, cached, batch)
    # teacher bins: tokens 0, 1 and the rest (token 2); the student's over the same bins
    assert d.value[0, 0].item() == pytest.approx(kl_list([0.5, 0.3, 0.2], [0.1, 0.3, 0.6]), rel=1e-3)
    s2, t2, batch2 = one_token([0.1, 0.3, 0.3, 0.3], [0.4, 0.3, 0.2, 0.1])
    values, indices = t2.topk(2, dim=-1)
    d2 = METHODS.create("forward_kl")(s2, TopK(values.half(), indices.int(), t2.logsumexp(-1)), batch2)
    assert d2.value[0, 0].item() == pytest.approx(kl_list([0.4, 0.3, 0.3], [0.1, 0.3, 0.6]), rel=1e-3)


def test_cache_at_another_temperature_is_refused() -> None:
    s, t, batch = one_token(S_PROBS, T_PROBS)
    values, indices = t.topk(3, dim=-1)
    with pytest.raises(PadkdError, match="temperature"):
        METHODS.create("forward_kl", {"temperature": 2.0})(s, TopK(values, indices, t.logsumexp(-1)), batch)


# ------------------------------------------------------------------------------------- weightings per token


def test_pad_gradient_wrt_log_var_vanishes_at_sigma2_equal_d_per_token() -> None:
    d_values = torch.tensor([[0.5, 2.0, 0.1], [1.5, 0.3, 4.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    pad = PAD(mode="per_element", head="token", init="reference", log_var_floor=None, eps=1e-12,
              warmup_steps=0)
    pad.build(Discrepancy(d_values, mask), torch.zeros(2, 3, 1))
    with torch.no_grad():
        pad.head.linear.weight.fill_(1.0)
        pad.head.linear.bias.zero_()
    embedding = d_values.log()[..., None].requires_grad_(True)  # so log σ² = log d at every token
    result = pad(Discrepancy(d_values, mask), embedding)
    (grad,) = torch.autograd.grad(result.loss, embedding)
    assert grad.abs().max().item() < 1e-6
    # off the optimum the gradient is 1 - d/σ² per real token (scaled by the means), 0 at the masked one
    shifted = (d_values.log() + 1.0)[..., None].requires_grad_(True)
    (grad,) = torch.autograd.grad(pad(Discrepancy(d_values, mask), shifted).loss, shifted)
    expected = (1 - math.exp(-1.0)) / torch.tensor([[3.0, 3, 3], [2, 2, 1]]) / 2
    assert torch.allclose(grad[..., 0], torch.where(mask, expected, 0.0), atol=1e-6)


def test_masked_tokens_take_no_part_in_pad() -> None:
    mask = torch.tensor([[True, True, False]])
    d1, d2 = torch.tensor([[0.5, 2.0, 0.1]]), torch.tensor([[0.5, 2.0, 1e6]])
    pad = PAD(head="token", warmup_steps=0)
    emb = torch.randn(1, 3, 4)
    pad.build(Discrepancy(d1, mask), emb)
    a, b = pad(Discrepancy(d1, mask), emb), pad(Discrepancy(d2, mask), emb)
    assert a.loss.item() == pytest.approx(b.loss.item())
    values = d2.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(pad(Discrepancy(values, mask), emb).loss, values)
    assert grad[0, 2].item() == 0.0 and grad[0, 0].item() > 0


@pytest.mark.parametrize("name", ["ohem", "focal", "softmax_hard", "discard_hardest", "polynomial"])
def test_hard_mining_over_tokens_ignores_masked_tokens(name: str) -> None:
    weighting = WEIGHTINGS.create(name, {"granularity": "element"})
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    values = torch.tensor([[0.5, 2.0, 100.0, 50.0], [1.0, 0.2, 3.0, 70.0]], requires_grad=True)
    result = weighting(Discrepancy(values, mask))
    (grad,) = torch.autograd.grad(result.loss, values)
    assert (grad[~mask] == 0).all()
    assert torch.isfinite(result.loss)
    # the same loss whatever the masked tokens hold
    other = weighting(Discrepancy(torch.where(mask, values, 0.0).detach(), mask)).loss
    assert result.loss.item() == pytest.approx(other.item())


# ------------------------------------------------------------------------------------- models and taps


def test_gpt2_and_llama_take_input_ids_and_mask_and_expose_taps() -> None:
    ids = torch.randint(0, 20, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    task = TASKS.create("language_modeling")
    batch = Batch(inputs={"input_ids": ids, "attention_mask": mask}, targets=ids, index=torch.arange(2))
    for name, options in (("gpt2", {"n_layer": 2, "n_embd": 8, "n_head": 2, "n_positions": 8}),
                          ("llama", {"n_layer": 2, "n_embd": 8, "n_head": 2, "n_kv_head": 1, "n_positions": 8})):
        model = MODELS.create(name, options, "model", vocab_size=20).eval()
        taps = Taps(model, {"block1", "final_norm", "logits"}, "student")
        with taps.capture():
            out = task.forward(model, batch, training=False)
        values = taps.values(out)
        taps.close()
        assert out.shape == (2, 6, 20)
        assert values["block1"].shape == values["final_norm"].shape == (2, 6, 8)
        assert torch.equal(values["logits"], out)


def test_a_saved_model_loads_and_a_vocabulary_mismatch_is_one_line(tmp_path: Path) -> None:
    model = MODELS.create("gpt2", {"n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 8}, "model", vocab_size=20)
    model.save_pretrained(tmp_path / "lm")
    loaded = MODELS.create("hf_causal_lm", {"path": str(tmp_path / "lm")}, "model", vocab_size=20)
    ids = torch.randint(0, 20, (1, 5))
    assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    with pytest.raises(PadkdError, match="vocabulary has 20 tokens but the data's tokenizer has 30") as err:
        MODELS.create("hf_causal_lm", {"path": str(tmp_path / "lm")}, "teacher.model", vocab_size=30)
    assert "\n" not in str(err.value)
    with pytest.raises(PadkdError, match="no config.json"):
        MODELS.create("hf_causal_lm", {"path": str(tmp_path)}, "model", vocab_size=20)


# ------------------------------------------------------------------------------------- task and evaluator


def _items(n: int, length: int) -> list:
    out = []
    for i in range(n):
        ids = torch.arange(length) % 5
        mask = torch.ones(length, dtype=torch.long)
        mask[length - i:] = 0  # sequence i has i padded positions
        out.append(({"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100), i))
    return out


def test_loss_and_evaluator_on_uniform_logits() -> None:
    """Uniform logits over V: every real next token costs log V, so perplexity = V exactly."""
    task = TASKS.create("language_modeling")
    batch = stack_collate(_items(3, 6))
    logits = torch.zeros(3, 6, 5, requires_grad=True)
    assert task.loss(logits, batch).item() == pytest.approx(math.log(5))
    evaluator = task.evaluator()

    class Split:
        n_bytes = 40

    evaluator.attach(Split())
    evaluator.update(logits.detach(), batch)
    metrics = evaluator.compute()
    n_predicted = 5 + 4 + 3  # real tokens after the first, per sequence
    assert metrics["perplexity"] == pytest.approx(5.0)
    assert metrics["bpb"] == pytest.approx(n_predicted * math.log(5) / math.log(2) / 40)
    assert "teacher_agreement" not in metrics


def test_evaluator_compares_with_the_teacher() -> None:
    task = TASKS.create("language_modeling")
    teacher = MODELS.create("gpt2", {"n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 8}, "m", vocab_size=5)
    task.use_teacher(teacher.eval())
    batch = stack_collate(_items(3, 6))
    evaluator = task.evaluator()
    with torch.no_grad():
        evaluator.update(task.forward(teacher, batch, training=False), batch)
    metrics = evaluator.compute()
    assert metrics["teacher_agreement"] == 100.0 and metrics["teacher_kl"] == pytest.approx(0.0, abs=1e-6)
    columns = task.record_columns(torch.zeros(3, 6, 5), torch.zeros(3, 6, 5), batch)
    assert columns["tokens"].tolist() == [5, 4, 3]
    assert columns["student_nll"] == pytest.approx(torch.full((3,), math.log(5)))


def test_minus_infinity_logits_are_probability_zero() -> None:
    """A vocabulary entry masked to -inf in both models adds nothing (no NaN in value or gradient)."""
    s, t, batch = one_token([0.5, 0.3, 0.2], [0.6, 0.2, 0.2])
    s[0, 0, 2] = t[0, 0, 2] = float("-inf")
    s.requires_grad_(True)
    for name in ("forward_kl", "reverse_kl", "jsd"):
        d = METHODS.create(name)(s, t, batch)
        (grad,) = torch.autograd.grad(d.value.sum(), s)
        assert torch.isfinite(d.value).all() and torch.isfinite(grad).all(), name
    d = METHODS.create("forward_kl")(s, t, batch)
    assert d.value[0, 0].item() == pytest.approx(kl_list([0.75, 0.25], [0.625, 0.375]), rel=1e-5)


def test_a_bf16_teacher_lm_returns_fp32_logits_on_the_callers_device() -> None:
    """teacher.precision: bf16 on a transformers model: its ModelOutput comes back in fp32, near the fp32 logits."""
    from padkd import placement

    torch.manual_seed(0)
    model = MODELS.create("gpt2", {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 16}, "teacher.model",
                          vocab_size=50)
    ids = torch.randint(0, 50, (2, 16))
    reference = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    placement.place(model, "cpu", "bf16", home="cpu")
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert next(model.parameters()).dtype == torch.bfloat16 and logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, rtol=0.05, atol=0.05)
