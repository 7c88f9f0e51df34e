"""Token-level methods for causal language models: per-token divergences `[B, T]` with the padding mask.

Position t of a sequence holds the model's prediction of token t + 1, so a position counts (mask True) when
its next token is real: `labels[:, t + 1] != -100` (the last position never counts). That is the set of
positions the task's cross-entropy uses, TRL's `labels != -100` after the shift and DistiLLM's label mask.
Masked positions hold 0 and take part in no reduction (`padkd.discrepancy.Discrepancy`), so every weighting
applies per token; under `uniform` a sequence's discrepancy is the mean over its real tokens and the loss
the mean over sequences, which is the token mean of TRL and DistiLLM whenever sequences hold equally many
real tokens (packed blocks), docs/language.md.

All distributions are `softmax(logits / T)` in fp32; every divergence is multiplied by T² (Hinton's
convention, 1 at the default T = 1, which is GKD's and DistiLLM's setting). The teacher may also be an
offline cache's top-k (`TopK`): the divergence is then taken between the two distributions coarsened to the
k cached tokens plus one bin for the rest of the vocabulary, which is exact when k is the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.context import BuildContext, Features
from padkd.discrepancy import Discrepancy
from padkd.errors import PadkdError
from padkd.methods.base import METHODS, Method

#: Where the log of an empty bin is clamped, so that 0 · log 0 terms stay 0 in values and gradients.
LOG_FLOOR = -1e4
#: The least mass of the student's rest-of-vocabulary bin against a cached top-k (the bin is computed from the
#: k cached tokens' mass; below 1e-7 that difference is rounding, and the floor keeps its gradient finite).
REST_FLOOR = 1e-7
IGNORE = -100


@dataclass
class TopK:
    """A teacher's cached distribution at each position: its top-k `values` (logits / T, `[B, T, k]`), their
    vocabulary `indices` (`[B, T, k]`, long) and the `logsumexp` over the whole vocabulary (`[B, T]`), from
    which the k probabilities and the remaining mass `1 - Σ p` are exact."""

    values: Tensor
    indices: Tensor
    logsumexp: Tensor
    #: The temperature the cache's values were divided by.
    temperature: float = 1.0


def token_mask(batch: Batch, batch_size: int, length: int, device: torch.device) -> Tensor:
    """`[B, T]` bool: positions whose next token is real (labels shifted by one; the last position never).
    Without `[B, T]` labels, positions before a real token of the attention mask, or every position."""
    labels = batch.targets
    if isinstance(labels, Tensor) and labels.shape == (batch_size, length) and not labels.is_floating_point():
        real = labels != IGNORE
    elif isinstance(batch.inputs, dict) and "attention_mask" in batch.inputs:
        real = batch.inputs["attention_mask"].bool()
    else:
        return torch.ones(batch_size, length, dtype=torch.bool, device=device)
    mask = torch.zeros(batch_size, length, dtype=torch.bool, device=device)
    mask[:, :-1] = real[:, 1:].to(device)
    return mask


def _bins(student: Tensor, teacher: Tensor | TopK, temperature: float) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities over the same bins: the vocabulary, or for a cached teacher its
    k tokens plus the rest of the vocabulary as one bin (left out when k is the vocabulary: exact)."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1).clamp_min(LOG_FLOOR)  # -inf logits (a masked
    if not isinstance(teacher, TopK):  # vocabulary entry) become probability 0 with a finite log
        return log_s, F.log_softmax(teacher.float() / temperature, dim=-1).clamp_min(LOG_FLOOR)
    if abs(teacher.temperature - temperature) > 1e-12:
        raise PadkdError(f"the teacher cache holds logits at temperature {teacher.temperature:g} but the method uses "
                         f"{temperature:g}; set task.cache_temperature to the method's and cache the teacher again")
    log_t = teacher.values.float() - teacher.logsumexp.float()[..., None]
    picked = log_s.gather(-1, teacher.indices.long())
    if teacher.indices.shape[-1] == student.shape[-1]:
        return picked, log_t
    return torch.cat([picked, _rest(picked, REST_FLOOR)], -1), torch.cat([log_t, _rest(log_t, 0.0)], -1)


def _rest(log_p: Tensor, floor: float) -> Tensor:
    """`log(1 - Σ p)` `[..., 1]` of k log-probabilities, summed in float64 (k values: cheap); the mass is at
    least `floor` (0: exact, its log floored at LOG_FLOOR), so the log and its gradient stay finite."""
    held = log_p.double().logsumexp(-1, keepdim=True).clamp_max(math.log1p(-floor) if floor > 0 else 0.0)
    return torch.log(-torch.expm1(held)).clamp_min(LOG_FLOOR).to(log_p.dtype)


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """`KL(p ‖ q)` over the last dim from finite log-probabilities (a probability of 0 is exp(LOG_FLOOR) = 0)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def log_mix(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """`log(w p + (1 - w) q)` for 0 < w < 1, in log space."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def divergence(kind: str, log_s: Tensor, log_t: Tensor, coefficient: float = 0.5) -> Tensor:
    """Per-position divergence between teacher `log_t` and student `log_s` (log-probabilities, last dim).

    forward: KL(t ‖ s). reverse: KL(s ‖ t). jsd (β = coefficient, GKD/TRL): with M = β t + (1-β) s,
    β KL(t ‖ M) + (1-β) KL(s ‖ M); β = 0 is forward KL, β = 1 reverse KL (TRL's endpoints).
    skew (α, DistiLLM's SKL): KL(t ‖ α t + (1-α) s). skew_reverse (α, SRKL): KL(s ‖ (1-α) t + α s)."""
    c = coefficient
    if kind == "forward" or (kind == "jsd" and c == 0) or (kind == "skew" and c == 0):
        return kl(log_t, log_s)
    if kind == "reverse" or (kind == "jsd" and c == 1) or (kind == "skew_reverse" and c == 0):
        return kl(log_s, log_t)
    if kind == "jsd":
        mix = log_mix(log_t, log_s, c)
        return c * kl(log_t, mix) + (1 - c) * kl(log_s, mix)
    if kind == "skew":
        return kl(log_t, log_mix(log_t, log_s, c))
    if kind == "skew_reverse":
        return kl(log_s, log_mix(log_s, log_t, c))
    raise ValueError(f"unknown divergence '{kind}'")


def _example_logits(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    student = torch.randn(batch_size, 5, 11, generator=generator)
    return student, 2 * torch.randn(batch_size, 5, 11, generator=generator)


class TokenDivergence(Method):
    """Base of the per-token divergences between the student's and the teacher's next-token distributions."""

    kind: str = "forward"
    coefficient_name: str = ""

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Features, Features]:
        return _example_logits(batch_size, generator)

    def __init__(self, temperature: float = 1.0, coefficient: float = 0.5) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 <= coefficient <= 1:
            raise ValueError(f"{self.coefficient_name or 'coefficient'} must be in [0, 1], got {coefficient}")
        self.temperature = temperature
        self.coefficient = coefficient

    def forward(self, student: Tensor, teacher: Tensor | TopK, batch: Batch) -> Discrepancy:  # type: ignore[override]
        if student.dim() != 3:
            raise ValueError(f"{type(self).__name__} reads next-token logits [B, T, V], got {tuple(student.shape)}")
        b, t, _ = student.shape
        with torch.autocast(device_type=student.device.type, enabled=False):
            log_s, log_t = _bins(student, teacher, self.temperature)
            d = divergence(self.kind, log_s, log_t, self.coefficient).clamp_min(0) * self.temperature**2
        mask = token_mask(batch, b, t, student.device)
        return Discrepancy(torch.where(mask, d, torch.zeros((), device=d.device)), mask=mask)


@METHODS.register("forward_kl")
class ForwardKL(TokenDivergence):
    """Token KD: per token `T² KL(p_T ‖ p_S)` of the next-token distributions at temperature T."""

    reference = "Hinton et al. 2015, per token (Kim & Rush, Sequence-Level Knowledge Distillation, EMNLP 2016)"
    kind = "forward"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__(temperature)


@METHODS.register("reverse_kl")
class ReverseKL(TokenDivergence):
    """Reverse KL per token, `T² KL(p_S ‖ p_T)`: mode-seeking, as in MiniLLM and GKD's β = 1."""

    reference = "Gu, Dong, Wei, Huang. MiniLLM: Knowledge Distillation of Large Language Models. ICLR 2024"
    kind = "reverse"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__(temperature)


@METHODS.register("jsd")
class JSD(TokenDivergence):
    """Generalized JSD per token: `β KL(p_T ‖ M) + (1-β) KL(p_S ‖ M)`, M = β p_T + (1-β) p_S (TRL's GKD)."""

    reference = "Agarwal et al. On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes " \
                "(GKD). ICLR 2024"
    kind = "jsd"
    coefficient_name = "beta"

    def __init__(self, beta: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__(temperature, beta)
        self.beta = beta


@METHODS.register("skew_kl")
class SkewKL(TokenDivergence):
    """Skew KL per token (DistiLLM's SKL): `KL(p_T ‖ α p_T + (1-α) p_S)`, gradients through the mixture."""

    reference = "Ko, Kim, Chen, Yun. DistiLLM: Towards Streamlined Distillation for Large Language Models. ICML 2024"
    kind = "skew"
    coefficient_name = "alpha"

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0) -> None:
        super().__init__(temperature, alpha)
        self.alpha = alpha


@METHODS.register("skew_reverse_kl")
class SkewReverseKL(TokenDivergence):
    """Skew reverse KL per token (DistiLLM's SRKL): `KL(p_S ‖ (1-α) p_T + α p_S)`."""

    reference = SkewKL.reference
    kind = "skew_reverse"
    coefficient_name = "alpha"

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0) -> None:
        super().__init__(temperature, alpha)
        self.alpha = alpha


@METHODS.register("token_hint")
class TokenHint(Method):
    """Hidden-state hint per token: `mean_c (W h_S + b - h_T)²` at each position, W a learned linear connector
    from the student's width to the teacher's (FitNets' hint, applied token by token)."""

    reference = "Romero et al. FitNets: Hints for Thin Deep Nets. ICLR 2015 (per token as in TinyBERT, 2020)"

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Features, Features]:
        return (torch.randn(batch_size, 5, 6, generator=generator), torch.randn(batch_size, 5, 8, generator=generator))

    def __init__(self, connector: Literal["linear", "identity"] = "linear") -> None:
        super().__init__()
        self.connector_kind = connector
        self.connector: nn.Module = nn.Identity()

    def build(self, ctx: BuildContext) -> None:
        s, t = ctx.student, ctx.teacher
        if not isinstance(s, Tensor) or not isinstance(t, Tensor) or s.dim() != 3 or t.dim() != 3:
            raise ValueError("token_hint reads hidden states [B, T, D] of student and teacher (tap block{k} or "
                             "final_norm)")
        if self.connector_kind == "identity":
            if s.shape[-1] != t.shape[-1]:
                raise ValueError(f"connector identity needs equal widths, got {s.shape[-1]} and {t.shape[-1]}; "
                                 "use connector: linear")
            return
        self.connector = nn.Linear(s.shape[-1], t.shape[-1])

    def connector_output(self, student: Features) -> Tensor | None:
        return self.connector(student)

    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Discrepancy:  # type: ignore[override]
        if isinstance(teacher, TopK):
            raise ValueError("token_hint needs the teacher's hidden states; an offline cache holds only logits")
        b, t, _ = student.shape
        with torch.autocast(device_type=student.device.type, enabled=False):
            d = (self.connector(student.float()) - teacher.float()).pow(2).mean(-1)
        mask = token_mask(batch, b, t, student.device)
        return Discrepancy(torch.where(mask, d, torch.zeros((), device=d.device)), mask=mask)
