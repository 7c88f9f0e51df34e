"""Causal language modelling: next-token cross-entropy over real tokens; perplexity, bits per byte and the
student's agreement with its teacher over a whole split; records per sequence and per token.

Items are `({"input_ids", "attention_mask"}, labels, index)` with labels = input_ids and -100 where no loss
is taken (Hugging Face's convention); the task shifts by one, so position t predicts token t + 1.
Models are called as `model(input_ids=..., attention_mask=...)` and their `.logits` (or the tensor they
return) is the output. The evaluator compares the student with the run's teacher when the task has one
(`use_teacher`): top-1 agreement and the mean token KL(teacher ‖ student) at temperature 1.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.data import DataSplits
from padkd.distributed import all_reduce_sum
from padkd.errors import PadkdError
from padkd.methods.tokens import IGNORE, TopK, kl
from padkd.tasks.base import TASKS, Evaluator, Task

if TYPE_CHECKING:
    from padkd.lmcache import TeacherCache


def call_lm(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """Next-token logits `[B, T, V]` of a causal LM called with input_ids and attention_mask."""
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False) \
        if hasattr(model, "config") else model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return out if isinstance(out, Tensor) else out.logits


def shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Logits of positions 0..T-2, the tokens they predict (1..T-1) and the mask of real ones."""
    targets = labels[:, 1:]
    return logits[:, :-1], targets, targets != IGNORE


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per position `[B, T-1]`: the negative log-likelihood of the next token (0 where it is not real), mask."""
    z, targets, mask = shifted(logits, labels)
    b, t, v = z.shape
    nll = F.cross_entropy(z.float().reshape(b * t, v), targets.clamp_min(0).reshape(b * t), reduction="none").view(b, t)
    return torch.where(mask, nll, torch.zeros((), device=nll.device)), mask


class LanguageEvaluator(Evaluator):
    """Sums over the split's real tokens (reduced across ranks): NLL, count, and with a teacher the top-1
    agreements and KL(teacher ‖ student); bits per byte use the split's `n_bytes`."""

    def __init__(self, teacher: nn.Module | None) -> None:
        self.teacher = teacher
        self.sums: dict[str, Tensor] = {}
        self.n_bytes: float | None = None

    def attach(self, dataset: Any) -> None:
        n_bytes = getattr(dataset, "n_bytes", None)
        self.n_bytes = float(n_bytes) if n_bytes else None

    def update(self, output: Tensor, batch: Batch) -> None:
        nll, mask = token_nll(output, batch.targets)
        sums = {"nll": nll.sum(), "tokens": mask.sum().float()}
        if self.teacher is not None:
            teacher = call_lm(self.teacher, batch.inputs)
            z_s, _, _ = shifted(output, batch.targets)
            z_t, _, _ = shifted(teacher, batch.targets)
            agree = (z_s.argmax(-1) == z_t.argmax(-1)) & mask
            divergence = kl(F.log_softmax(z_t.float(), -1), F.log_softmax(z_s.float(), -1))
            sums |= {"agree": agree.sum().float(), "kl": torch.where(mask, divergence, 0.0).sum()}
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach()

    def compute(self) -> dict[str, float]:
        sums = all_reduce_sum(self.sums)
        n = max(float(sums.get("tokens", 0.0)), 1.0)
        nll = float(sums.get("nll", 0.0))
        out = {"loss": nll / n, "perplexity": math.exp(min(nll / n, 700.0))}
        if self.n_bytes:
            out["bpb"] = nll / math.log(2) / self.n_bytes
        if "agree" in sums:
            out |= {"teacher_agreement": 100.0 * float(sums["agree"]) / n, "teacher_kl": float(sums["kl"]) / n}
        return out


@TASKS.register("language_modeling")
class LanguageModeling(Task):
    """Causal LM: next-token cross-entropy (mean over the batch's real tokens); perplexity selects models.

    `token_records`: how many sequences (the first by index) of a recorded split get a per-token table
    (token, next token, log-probabilities, each term's discrepancy and PAD's log σ²) beside the
    per-sequence records. `teacher_cache`: the folder of a cache written by `padkd cache-teacher` (logits
    divided by `cache_temperature`); training steps then read the teacher's next-token distribution from it
    (top-k + remaining mass) instead of running the teacher. Evaluation and records still run the teacher.
    """

    primary_metric = "perplexity"
    higher_is_better = False
    model_fields = frozenset({"vocab_size"})

    def __init__(self, token_records: int = 8, teacher_cache: str | None = None, cache_k: int = 32,
                 cache_temperature: float = 1.0) -> None:
        if token_records < 0 or cache_k < 1 or not cache_temperature > 0:
            raise ValueError(f"token_records must be >= 0, cache_k >= 1 and cache_temperature > 0, got "
                             f"{token_records}, {cache_k}, {cache_temperature}")
        self.token_records = token_records
        self.teacher_cache = teacher_cache
        self.cache_k = cache_k
        self.cache_temperature = cache_temperature
        self.teacher: nn.Module | None = None
        self.cache: TeacherCache | None = None
        self._training = False

    def model_kwargs(self, data: DataSplits) -> dict[str, Any]:
        if not data.num_classes:
            raise ValueError("language_modeling needs a text data set (its vocabulary size is num_classes)")
        return {"vocab_size": data.num_classes}

    def use_teacher(self, teacher: nn.Module | None, data: DataSplits | None = None) -> None:
        """Keep the teacher for the evaluator; with `teacher_cache`, open the cache for this teacher and data
        (a cache made for another teacher, tokenizer, data or temperature is refused in one line)."""
        self.teacher = teacher
        if self.teacher_cache is None:
            return
        if teacher is None or data is None:
            raise PadkdError("task.teacher_cache: a cached teacher needs the run's teacher (its identity); "
                             "configure teacher.model and teacher.checkpoint")
        from padkd.lmcache import TeacherCache

        self.cache = TeacherCache.open(self.teacher_cache, self.cache_identity(teacher, data))

    def cache_identity(self, teacher: nn.Module, data: DataSplits) -> dict[str, str]:
        """What a teacher cache must have been made for: this teacher's weights, the tokenizer, the training
        split's tokens and the temperature."""
        from padkd.data.text import tokenizer_identity
        from padkd.lmcache import dataset_identity, model_identity

        tokenizer = getattr(data, "tokenizer", None)
        return {"teacher": model_identity(teacher),
                "tokenizer": tokenizer_identity(tokenizer) if tokenizer is not None else "none",
                "data": dataset_identity(data.split("train")), "temperature": str(float(self.cache_temperature))}

    @property
    def student_taps(self) -> frozenset[str]:  # type: ignore[override]
        # With a cache the teacher "runs" after the student, so it knows whether this forward is training.
        return frozenset({"output"}) if self.cache is not None else frozenset()

    def forward(self, model: nn.Module, batch: Batch, *, training: bool) -> Tensor:
        self._training = training
        return call_lm(model, batch.inputs)

    def teacher_forward(self, teacher: nn.Module, batch: Batch, student_values: dict[str, Any]) -> Any:
        if self.cache is not None and self._training:
            values, indices, lse = self.cache.lookup(batch.index.cpu())
            device = batch.index.device
            return TopK(values.to(device), indices.to(device), lse.to(device), self.cache.temperature)
        return call_lm(teacher, batch.inputs)

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        nll, mask = token_nll(output, batch.targets)
        return nll.sum() / mask.sum().clamp_min(1)

    def evaluator(self) -> Evaluator:
        return LanguageEvaluator(self.teacher)

    def record_columns(self, student: Tensor, teacher: Any | None, batch: Batch) -> dict[str, Tensor]:
        nll, mask = token_nll(student, batch.targets)
        count = mask.sum(1)
        row = {"tokens": count, "student_nll": nll.sum(1) / count.clamp_min(1)}
        if isinstance(teacher, Tensor):
            t_nll, _ = token_nll(teacher, batch.targets)
            z_s, _, _ = shifted(student, batch.targets)
            z_t, _, _ = shifted(teacher, batch.targets)
            agree = ((z_s.argmax(-1) == z_t.argmax(-1)) & mask).sum(1)
            divergence = torch.where(mask, kl(F.log_softmax(z_t.float(), -1), F.log_softmax(z_s.float(), -1)), 0.0)
            row |= {"teacher_nll": t_nll.sum(1) / count.clamp_min(1),
                    "teacher_agreement": agree.float() / count.clamp_min(1),
                    "teacher_kl": divergence.sum(1) / count.clamp_min(1)}
        return row

    def element_rows(self, student: Any, teacher: Any | None, batch: Batch,
                     elements: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """One row per real position of the batch's sequences with index < `token_records`: the sequence,
        position, token, next token, the student's (and teacher's) log-probability of the next token, and
        each term's per-token discrepancy and weighting columns (PAD: log σ²)."""
        keep = batch.index < self.token_records
        if not bool(keep.any()):
            return {}
        ids, labels = batch.inputs["input_ids"], batch.targets
        _, targets, mask = shifted(student, labels)
        b, t = ids.shape
        log_p = F.log_softmax(student[:, :-1].float(), -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
        columns = {"sequence": batch.index[:, None].expand(b, t - 1), "position": torch.arange(t - 1, device=ids.device)
                   .expand(b, t - 1), "token": ids[:, :-1], "next_token": targets, "student_logp": log_p}
        if isinstance(teacher, Tensor):
            columns["teacher_logp"] = F.log_softmax(teacher[:, :-1].float(), -1).gather(
                -1, targets.clamp_min(0)[..., None]).squeeze(-1)
        for term, values in elements.items():
            for key, value in values.items():
                if key != "mask" and value.dim() == 2 and value.shape[1] == t:
                    columns[f"{term}.{key}"] = value[:, :-1]
        rows = mask & keep[:, None]
        return {key: value[rows] for key, value in columns.items()}

    def summary(self, metrics: dict[str, float]) -> str:
        text = f"ppl={metrics['perplexity']:.4g}"
        if "bpb" in metrics:
            text += f" bpb={metrics['bpb']:.4g}"
        if "teacher_agreement" in metrics:
            text += f" agree={metrics['teacher_agreement']:.3g}%"
        return text


@torch.no_grad()
def write_teacher_cache(teacher: nn.Module, loader: Any, writer: Any, k: int, temperature: float) -> int:
    """Run `teacher` once over every batch of `loader` (the training split in order, no augmentation) and
    write each position's top-k logits / T, their ids and the logsumexp with `writer` (a
    `padkd.lmcache.TeacherCacheWriter`); returns the number of sequences written."""
    from padkd.lmcache import topk_entries

    was_training = teacher.training
    teacher.eval()
    count = 0
    try:
        for batch in loader:
            values, indices, lse = topk_entries(call_lm(teacher, batch.inputs), k, temperature)
            writer.write(batch.index, values, indices, lse)
            count += len(batch)
    finally:
        teacher.train(was_training)
    return count
