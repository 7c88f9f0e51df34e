"""What does padkd cost per training step? Its step against the same step written by hand, as ratios.

The hand-written step: teacher forward under no_grad, student forward, CE + MSE between the linearly
mapped pooled student embedding and the teacher's (read with forward hooks registered once by hand),
backward, SGD. padkd's step: the same models, the same loss, through `Distiller` (persistent taps, the
task's calls) and `StageRun.step` (autocast scope, scaler, accumulation bookkeeping). Also timed: the same
padkd step with PAD instead of uniform weighting. The variants run in rounds inside one process, their
order shuffled each round, so machine noise hits all alike; the median over rounds is reported.

    python benchmarks/overhead.py [--pair resnet34-resnet18] [--rounds 7] [--steps 10]
"""

from __future__ import annotations

import argparse
import random
import statistics
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
from padkd.weighting import PAD, Uniform, Weighting

#: name → (teacher, student, image size, batch size, number of classes)
PAIRS: dict[str, tuple[dict, dict, int, int, int]] = {
    "resnet34-resnet18": ({"name": "torchvision", "arch": "resnet34"}, {"name": "torchvision", "arch": "resnet18"},
                          64, 32, 100),
    "resnet56-resnet20": ({"name": "resnet56"}, {"name": "resnet20"}, 32, 64, 100),
}


def last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def hand_written(teacher: nn.Module, student: nn.Module, batch: Batch, lr: float) -> Callable[[], None]:
    """The distillation step as one would write it without a toolkit."""
    feats: dict[str, Tensor] = {}
    last_linear(student).register_forward_hook(lambda m, i, o: feats.__setitem__("s", i[0]))
    last_linear(teacher).register_forward_hook(lambda m, i, o: feats.__setitem__("t", i[0]))
    s_dim, t_dim = last_linear(student).in_features, last_linear(teacher).in_features
    connector = nn.Linear(s_dim, t_dim)
    optimizer = torch.optim.SGD([*student.parameters(), *connector.parameters()], lr=lr, momentum=0.9,
                                weight_decay=5e-4)
    teacher.eval()
    student.train()

    def step() -> None:
        with torch.no_grad():
            teacher(batch.inputs)
        logits = student(batch.inputs)
        loss = F.cross_entropy(logits, batch.targets) + F.mse_loss(connector(feats["s"]), feats["t"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def padkd_step(teacher: nn.Module, student: nn.Module, batch: Batch, lr: float,
               weighting: Weighting | None = None) -> Callable[[], None]:
    """The same step through Distiller and StageRun (uniform weighting unless `weighting` is given)."""
    weighting = weighting or Uniform()
    distiller = Distiller(student, teacher, [Term("hint", Hint(), weighting, student="fc:in", teacher="fc:in",
                                                  weight=1.0)], task=Classification())
    distiller.prepare(batch)
    stage = StageConfig.model_validate({"epochs": 1, "optimizer": {"name": "sgd", "lr": lr}})
    run = StageRun(stage, distiller, EngineConfig(), torch.device("cpu"), world=1)
    distiller.train()
    return lambda: run.step(batch, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="resnet34-resnet18")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    teacher_spec, student_spec, size, batch_size, classes = PAIRS[args.pair]
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(batch_size, 3, size, size, generator=g),
                  torch.randint(0, classes, (batch_size,), generator=g), torch.arange(batch_size))

    def build(spec: dict) -> nn.Module:
        spec = dict(spec)
        return MODELS.build(spec.pop("name"), spec, "model", in_channels=3, num_classes=classes)

    steps: dict[str, Callable[[], None]] = {}
    for name, make in (("hand-written", lambda t, s: hand_written(t, s, batch, 0.05)),
                       ("padkd uniform", lambda t, s: padkd_step(t, s, batch, 0.05)),
                       ("padkd pad", lambda t, s: padkd_step(t, s, batch, 0.05, PAD(mode="per_sample")))):
        torch.manual_seed(0)
        steps[name] = make(build(teacher_spec), build(student_spec))

    def timed(name: str) -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            steps[name]()
        return (time.perf_counter() - start) / args.steps

    for name in steps:  # warm-up round, not timed
        timed(name)
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    rng = random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            times[name].append(timed(name))
    base = statistics.median(times["hand-written"])
    print(f"{args.pair}: batch {batch_size}, 3x{size}x{size}, {classes} classes, {torch.get_num_threads()} threads; "
          f"median of {args.rounds} rounds x {args.steps} steps, order shuffled each round")
    print(f"{'variant':16s} {'ms/step':>8s} {'vs hand-written':>16s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:16s} {1000 * median:8.1f} {median / base:15.3f}x")


if __name__ == "__main__":
    main()
