"""What does padkd cost per training step? Its step against the same step written by hand, as ratios.

The hand-written step: teacher forward under no_grad, student forward, CE + MSE between the linearly
mapped pooled student embedding and the teacher's (read with forward hooks registered once by hand),
backward, SGD. padkd's step: the same models, the same loss, through `Distiller` (persistent taps, the
task's calls) and `StageRun.step` (autocast scope, scaler, accumulation bookkeeping); also with PAD
(default options) instead of uniform weighting. "hand-written, student first" is the hand-written step
with the two forwards swapped: on CPU, glibc's malloc returns the teacher's freed activations to the OS
when they sit above the student's saved ones and faults them back in on the next step, which this row
shows in its page-fault count (padkd runs the teacher first for that reason, docs/speed.md). "top pad"
is padkd's step in a process started with `MALLOC_TOP_PAD_` set, which stops that trimming altogether.

Each variant runs in its own process, once per round, the order shuffled each round, so neither machine
noise nor one variant's heap layout favours another; each process times `--steps` steps after warm-up
and counts its minor page faults. Medians over the rounds are reported.

    python benchmarks/overhead.py [--pair resnet56-resnet20] [--rounds 5] [--steps 10] [--threads 2]
    python benchmarks/overhead.py --variants "padkd L2" "padkd PAD-L2" --rounds 10   # PAD's cost alone
    python benchmarks/overhead.py --profile "padkd PAD-L2" --steps 4     # where one variant's time goes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.config import EngineConfig, StageConfig
from padkd.distiller import Distiller, Term
from padkd.engine.stage import StageRun
from padkd.methods import Hint
from padkd.models import MODELS
from padkd.tasks import Classification
from padkd.weightings import PAD, Uniform, Weighting

#: name → (teacher, student, image size, batch size, number of classes)
PAIRS: dict[str, tuple[dict, dict, int, int, int]] = {
    "resnet34-resnet18": ({"name": "torchvision", "arch": "resnet34"}, {"name": "torchvision", "arch": "resnet18"},
                          64, 32, 100),
    "resnet56-resnet20": ({"name": "resnet56"}, {"name": "resnet20"}, 32, 64, 100),
}
LR = 0.05


def last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def hand_written(teacher: nn.Module, student: nn.Module, batch: Batch, student_first: bool = False
                 ) -> Callable[[], None]:
    """The distillation step as one would write it without a toolkit."""
    feats: dict[str, Tensor] = {}
    last_linear(student).register_forward_hook(lambda m, i, o: feats.__setitem__("s", i[0]))
    last_linear(teacher).register_forward_hook(lambda m, i, o: feats.__setitem__("t", i[0]))
    s_dim, t_dim = last_linear(student).in_features, last_linear(teacher).in_features
    connector = nn.Linear(s_dim, t_dim)
    optimizer = torch.optim.SGD([*student.parameters(), *connector.parameters()], lr=LR, momentum=0.9,
                                weight_decay=5e-4)
    teacher.eval()
    student.train()

    def step() -> None:
        if not student_first:
            with torch.no_grad():
                teacher(batch.inputs)
        logits = student(batch.inputs)
        if student_first:
            with torch.no_grad():
                teacher(batch.inputs)
        loss = F.cross_entropy(logits, batch.targets) + F.mse_loss(connector(feats["s"]), feats["t"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def padkd_step(teacher: nn.Module, student: nn.Module, batch: Batch, weighting: Weighting | None = None
               ) -> Callable[[], None]:
    """The same step through Distiller and StageRun (uniform weighting unless `weighting` is given)."""
    weighting = weighting or Uniform()
    distiller = Distiller(student, teacher, [Term("hint", Hint(), weighting, student="fc:in", teacher="fc:in",
                                                  weight=1.0)], task=Classification())
    distiller.prepare(batch)
    stage = StageConfig.model_validate({"epochs": 1, "optimizer": {"name": "sgd", "lr": LR}})
    run = StageRun(stage, distiller, EngineConfig(), torch.device("cpu"), world=1)
    distiller.train()
    return lambda: run.step(batch, 0)


VARIANTS: dict[str, Callable[[nn.Module, nn.Module, Batch], Callable[[], None]]] = {
    "hand-written": hand_written,
    "hand-written, student first": lambda t, s, b: hand_written(t, s, b, student_first=True),
    "padkd L2": padkd_step,
    "padkd PAD-L2": lambda t, s, b: padkd_step(t, s, b, PAD()),
    "padkd L2, top pad 512 MiB": padkd_step,
}
#: Environment a variant's process gets: glibc keeps 512 MiB above the heap's top instead of trimming it,
#: so freed pages are not returned to the OS and faulted back (a CPU setting for the user's shell).
VARIANT_ENV: dict[str, dict[str, str]] = {"padkd L2, top pad 512 MiB": {"MALLOC_TOP_PAD_": str(512 * 2**20)}}


def child(pair: str, variant: str, steps: int, warmup: int = 3, profile: bool = False) -> dict[str, float]:
    """Build one variant in this process, warm it up, time `steps` steps: seconds and minor page faults per step.
    `profile`: also print torch.profiler's table of the timed steps (operators by self CPU time)."""
    teacher_spec, student_spec, size, batch_size, classes = PAIRS[pair]
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(batch_size, 3, size, size, generator=g),
                  torch.randint(0, classes, (batch_size,), generator=g), torch.arange(batch_size))

    def build(spec: dict) -> nn.Module:
        spec = dict(spec)
        return MODELS.create(spec.pop("name"), spec, "model", in_channels=3, num_classes=classes)

    torch.manual_seed(0)
    step = VARIANTS[variant](build(teacher_spec), build(student_spec), batch)
    for _ in range(warmup):
        step()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    with profiler or contextlib.nullcontext():
        for _ in range(steps):
            step()
    seconds = (time.perf_counter() - start) / steps
    if profiler is not None:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))
    return {"seconds": seconds, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps}


def measure(pair: str, names: list[str], rounds: int, steps: int, threads: int, seed: int = 0
            ) -> dict[str, dict[str, float]]:
    """Median seconds and minor page faults per step of each variant, one process per variant and round."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    order, rng = list(names), random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--pair", pair, "--steps", str(steps),
                                   "--threads", str(threads)], env=env | VARIANT_ENV.get(name, {}),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"variant {name!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(proc.stdout.splitlines()[-1]))
    return {name: {key: statistics.median(r[key] for r in values) for key in ("seconds", "faults")}
            for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="resnet56-resnet20")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants to time (default: all)")
    parser.add_argument("--profile", choices=sorted(VARIANTS), help="profile this variant's timed steps instead")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child or args.profile:
        print(json.dumps(child(args.pair, args.child or args.profile, args.steps, profile=args.profile is not None)))
        return
    result = measure(args.pair, args.variants, args.rounds, args.steps, args.threads)
    _, _, size, batch_size, classes = PAIRS[args.pair]
    print(f"{args.pair}: batch {batch_size}, 3x{size}x{size}, {classes} classes, {args.threads} threads; median of "
          f"{args.rounds} rounds x {args.steps} steps, one process per variant and round, order shuffled each round")
    reference = "hand-written" if "hand-written" in result else args.variants[0]
    print(f"{'variant':28s} {'ms/step':>8s} {'vs ' + reference:>16s} {'page faults/step':>17s}")
    base = result[reference]["seconds"]
    for name, r in result.items():
        print(f"{name:28s} {1000 * r['seconds']:8.1f} {r['seconds'] / base:15.3f}x {r['faults']:17.0f}")


if __name__ == "__main__":
    main()
