"""How fast is padkd's language-model distillation? One training step (forward, backward, AdamW) on one fixed
batch of token blocks, timed for each variant in its own process per round; rounds shuffle the order so that
machine noise hits all alike, and ratios are medians over rounds of the same round's times.

Variants (GPT-2-style teacher and student from padkd's model registry, the demo's sizes by default):
- `hand-written KD`: the step written with transformers and torch alone: teacher forward under no_grad, student
  forward, next-token CE + token forward KL (mean over real tokens), backward, step;
- `padkd KD`: the same step through padkd (Distiller + StageRun, task language_modeling, method forward_kl);
- `padkd cached KD`: padkd reading the teacher's top-k from an offline cache (padkd.lmcache) instead of running
  the teacher (skipped when padkd.lmcache is not installed);
- `padkd student alone`: padkd's step without a teacher (the floor of what distillation adds).
Targets: padkd KD / hand-written KD <= 1.05; cached KD / student alone <= 1.15. Each variant also reports
tokens per second and the peak resident memory of its process (and peak CUDA memory on a GPU).

    python benchmarks/language_speed.py [--rounds 5] [--steps 20] [--warmup 10] [--threads 2] [--batch 16] [--block 128]
                                        [--k 32] [--device cpu] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.config import EngineConfig, StageConfig
from padkd.distiller import Distiller, Term
from padkd.engine.stage import StageRun
from padkd.methods import METHODS
from padkd.models import MODELS
from padkd.tasks import TASKS

TEACHER = {"n_layer": 4, "n_embd": 128, "n_head": 4}
STUDENT = {"n_layer": 2, "n_embd": 64, "n_head": 4}
VOCAB = 260  # a byte-level tokenizer's size (256 bytes and a few specials)
LR = 3e-3


def make_batch(batch: int, block: int, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, block), generator=g)
    mask = torch.ones(batch, block, dtype=torch.long)
    return Batch({"input_ids": ids, "attention_mask": mask}, ids.clone(), torch.arange(batch)).to(device)


def hand_written(teacher: nn.Module, student: nn.Module, batch: Batch, cache_dir: Path, k: int
                 ) -> Callable[[], None]:
    """The KD step written with transformers directly."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR)
    ids, mask, labels = batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.targets
    real = labels[:, 1:] != -100

    def step() -> None:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        s_logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        ce = F.cross_entropy(s_logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        log_t, log_s = F.log_softmax(t_logits, -1), F.log_softmax(s_logits, -1)
        kd = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
        loss = ce + (kd * real).sum() / real.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _padkd(teacher: nn.Module | None, student: nn.Module, batch: Batch, task_options: dict) -> Callable[[], None]:
    task = TASKS.create("language_modeling", task_options)
    if task_options.get("teacher_cache") is not None:
        task.use_teacher(teacher, _Data(batch))
    terms = [Term("kd", METHODS.create("forward_kl"), weight=1.0)] if teacher is not None else []
    distiller = Distiller(student, teacher, terms, task=task)
    distiller.prepare(batch)
    stage = StageConfig.model_validate({"epochs": 1, "optimizer": {"name": "adamw", "lr": LR}})
    run = StageRun(stage, distiller, EngineConfig(), batch.index.device, world=1)
    distiller.train()
    return lambda: run.step(batch)


class _Data:
    """The one-batch training split, for the cache's identity (its items are the batch's rows)."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.tokenizer = None

    def split(self, name: str) -> list:
        ids, mask, labels = (t.cpu() for t in (self.batch.inputs["input_ids"], self.batch.inputs["attention_mask"],
                                               self.batch.targets))
        return [({"input_ids": ids[i], "attention_mask": mask[i]}, labels[i], i) for i in range(len(ids))]


def cached(teacher: nn.Module, student: nn.Module, batch: Batch, cache_dir: Path, k: int) -> Callable[[], None]:
    """padkd's KD step reading the teacher from an offline cache written here first (not timed)."""
    from padkd.tasks.language import write_teacher_cache

    lmcache = importlib.import_module("padkd.lmcache")  # lmdata's format (optional until it is installed)
    task = TASKS.create("language_modeling", {"teacher_cache": str(cache_dir), "cache_k": k})
    with lmcache.TeacherCacheWriter(cache_dir, n_items=len(batch), seq_len=batch.targets.shape[1], k=k,
                            identity=task.cache_identity(teacher, _Data(batch))) as writer:
        write_teacher_cache(teacher, [batch], writer, k, 1.0)
    return _padkd(teacher, student, batch, {"teacher_cache": str(cache_dir), "cache_k": k})


VARIANTS: dict[str, Callable[[nn.Module, nn.Module, Batch, Path, int], Callable[[], None]]] = {
    "hand-written KD": hand_written,
    "padkd KD": lambda t, s, b, c, k: _padkd(t, s, b, {}),
    "padkd cached KD": cached,
    "padkd student alone": lambda t, s, b, c, k: _padkd(None, s, b, {}),
}


def child(variant: str, steps: int, batch_size: int, block: int, k: int, device: str, warmup: int) -> dict:
    """Build one variant in this process, warm it up, time `steps` steps."""
    dev = torch.device(device)
    batch = make_batch(batch_size, block, dev)
    torch.manual_seed(0)
    teacher = MODELS.create("gpt2", TEACHER | {"n_positions": block}, "teacher", vocab_size=VOCAB).to(dev).eval()
    teacher.requires_grad_(False)
    student = MODELS.create("gpt2", STUDENT | {"n_positions": block}, "student", vocab_size=VOCAB).to(dev).train()
    with tempfile.TemporaryDirectory(prefix="lm-speed-") as tmp:
        step = VARIANTS[variant](teacher, student, batch, Path(tmp) / "cache", k)
        for _ in range(warmup):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
    return {"seconds": seconds, "tokens_per_s": batch_size * block / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None}


def available() -> list[str]:
    try:
        importlib.import_module("padkd.lmcache")
    except ImportError:
        return [name for name in VARIANTS if name != "padkd cached KD"]
    return list(VARIANTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (allocator and caches warm up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--k", type=int, default=32, help="logits per token in the cache")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write every number to this file")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.block, args.k, args.device, args.warmup)))
        return
    names = available()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict]] = {name: [] for name in names}
    order, rng = list(names), random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps),
                                   "--warmup", str(args.warmup),
                                   "--threads", str(args.threads), "--batch", str(args.batch), "--block",
                                   str(args.block), "--k", str(args.k), "--device", args.device],
                                  env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"variant {name!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(proc.stdout.splitlines()[-1]))

    def ratio(a: str, b: str) -> float | None:
        if a not in runs or b not in runs:
            return None
        return statistics.median(x["seconds"] / y["seconds"] for x, y in zip(runs[a], runs[b], strict=True))

    summary = {name: {key: statistics.median(r[key] for r in values) if values[0][key] is not None else None
                      for key in values[0]} for name, values in runs.items()}
    ratios = {"padkd KD / hand-written KD": ratio("padkd KD", "hand-written KD"),
              "padkd cached KD / padkd student alone": ratio("padkd cached KD", "padkd student alone"),
              "padkd cached KD / padkd KD": ratio("padkd cached KD", "padkd KD"),
              "padkd KD / padkd student alone": ratio("padkd KD", "padkd student alone")}
    print(f"teacher gpt2 {TEACHER}, student gpt2 {STUDENT}, vocabulary {VOCAB}, batch {args.batch} x {args.block} "
          f"tokens, cache k={args.k}, {args.device}, {args.threads} threads; median of {args.rounds} rounds x "
          f"{args.steps} steps, one process per variant and round, order shuffled each round")
    print(f"{'variant':22s} {'ms/step':>8s} {'tokens/s':>9s} {'peak RSS MB':>12s} {'peak CUDA MB':>13s}")
    for name, r in summary.items():
        cuda = f"{r['cuda_peak_mb']:13.0f}" if r["cuda_peak_mb"] is not None else f"{'-':>13s}"
        print(f"{name:22s} {1000 * r['seconds']:8.1f} {r['tokens_per_s']:9.0f} {r['peak_rss_mb']:12.0f} {cuda}")
    for name, value in ratios.items():
        if value is not None:
            print(f"{name:40s} {value:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "variants": summary, "ratios": ratios,
                                               "rounds": runs}, indent=2))


if __name__ == "__main__":
    main()
