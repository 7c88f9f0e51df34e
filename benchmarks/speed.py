"""How fast is padkd? Four measurements in one run; within each, the variants run in rounds whose order is
shuffled, so machine noise hits all alike, and the median over rounds is reported.

1. PAD-L2 step / plain-L2 step, both through padkd (target <= 1.03): what PAD's variance head adds.
2. padkd's L2 step / the same step written by hand (target <= 1.05): what the toolkit's plumbing costs.
   (1) and (2) time single training steps of resnet56 -> resnet20 on one fixed batch (benchmarks/overhead.py's
   hand-written step and padkd steps, each variant in its own process per round), CE + L2 on the pooled
   embeddings, SGD.
3. Whole-pipeline training throughput, data loading and augmentation included, evaluation excluded: the
   CIFAR-100 KD recipe (src/padkd/recipes/cifar100/resnet56-resnet20/kd.yaml) against torchdistill's own example script
   (examples/torchvision/image_classification.py of github.com/yoshitomo-matsubara/torchdistill, passed with
   --torchdistill-script; without it that row is skipped) on the same generated CIFAR-100 files, the same models
   (resnet56 -> resnet20, random initialisation), batch, epochs, worker processes and threads; padkd at equal
   settings (fp32, no compile) and with --best options. Throughput is counted over the epochs after the first
   (warm-up, compilation): padkd's from its per-epoch training time (metrics.jsonl, the whole epoch),
   torchdistill's from the mean iteration time (data loading included) over the last 20 iterations of each
   epoch, which its MetricLogger prints at the epoch's last iteration.
4. Peak memory of each pipeline run: the peak RSS of its process (and peak allocated CUDA memory on a GPU).
5. The KD epoch against the student trained alone (src/padkd/recipes/cifar100/resnet56-resnet20/student.yaml, the same
   pipeline without a teacher) at equal settings (goal <= 2x the time): the teacher's forward is the floor of
   what distillation adds.

Each pipeline run is its own process. torchvision's CIFAR100 checks the files' MD5 sums against the original
archive's; the generated files have the format but not those bytes, so the torchdistill run disables that check
(and only that) before running the script unchanged.

    python benchmarks/speed.py [--torchdistill-script PATH] [--images 640] [--epochs 3] [--rounds 3] [--threads 2]
                               [--device cuda] [--json PATH]

`--device cuda` runs the pipeline rows on the GPU (the step rows stay on the CPU); `--json PATH` also writes every
measured number to PATH; `--teacher`/`--student` swap the pair's models (e.g. tiny ones for a dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402
from input_pipeline import cpu_name, write_cifar100  # noqa: E402

from padkd.engine.cpu import BF16_FLAGS, cpu_flags, resolve_precision  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "src" / "padkd" / "recipes" / "cifar100" / "resnet56-resnet20" / "kd.yaml"
#: The same protocol with the student trained alone (no teacher, no terms).
ALONE = ROOT / "src" / "padkd" / "recipes" / "cifar100" / "resnet56-resnet20" / "student.yaml"
#: The fastest padkd options measured on the CPU of docs/speed.md (pass --best to choose others).
BEST = ["engine.compile=true", "engine.channels_last=true"]
#: bf16 autocast in the NHWC layout: fast where the CPU has bf16 units (AMX), slower than fp32 where it has none.
BF16 = ["engine.precision=bf16", "engine.channels_last=true"]

# ---------------------------------------------------------------- (3), (4): the whole pipeline

_REPORT = """
import json, resource, torch
def report(**extra):
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print("SPEED_JSON " + json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                      "cuda_peak_mb": peak, **extra}), flush=True)
"""

_PADKD = """
import sys
torch.set_num_threads({threads})
from padkd.cli import main
rc = main({argv!r})
report(rc=rc)
"""

_TORCHDISTILL = """
import runpy, sys
import torchvision.datasets.cifar as cifar
cifar.check_integrity = lambda *args, **kwargs: True      # generated files: the format, not the archive's bytes
cifar.CIFAR10._check_integrity = lambda self: True
torch.set_num_threads({threads})
sys.argv = {argv!r}
error = None
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except BaseException as err:  # a crash after training still leaves its measured epochs in the log
    error = f"{{type(err).__name__}}: {{str(err)[:200]}}"
report(error=error)
"""

_TORCHDISTILL_CONFIG = """\
datasets:
  cifar100/train: !import_call
    key: torchvision.datasets.CIFAR100
    init:
      kwargs:
        root: {root}
        train: True
        download: False
        transform: !import_call
          key: torchvision.transforms.Compose
          init:
            kwargs:
              transforms:
                - !import_call {{key: torchvision.transforms.RandomCrop, init: {{kwargs: {{size: 32, padding: 4}}}}}}
                - !import_call {{key: torchvision.transforms.RandomHorizontalFlip, init: {{kwargs: {{p: 0.5}}}}}}
                - !import_call {{key: torchvision.transforms.ToTensor, init: }}
                - !import_call {{key: torchvision.transforms.Normalize, init: {{kwargs: &normalize
                    {{mean: [0.5071, 0.4867, 0.4408], std: [0.2675, 0.2565, 0.2761]}}}}}}
  cifar100/test: !import_call
    key: torchvision.datasets.CIFAR100
    init:
      kwargs:
        root: {root}
        train: False
        download: False
        transform: !import_call
          key: torchvision.transforms.Compose
          init:
            kwargs:
              transforms:
                - !import_call {{key: torchvision.transforms.ToTensor, init: }}
                - !import_call {{key: torchvision.transforms.Normalize, init: {{kwargs: *normalize}}}}
models:
  teacher_model:
    key: {teacher}
    kwargs: {{num_classes: 100, pretrained: False}}
    src_ckpt:
  student_model:
    key: {student}
    kwargs: {{num_classes: 100, pretrained: False}}
    src_ckpt:
    dst_ckpt: {out}/student.pt
train:
  log_freq: {log_freq}
  num_epochs: {epochs}
  train_data_loader:
    dataset_id: cifar100/train
    sampler: {{class_or_func: !import_get {{key: torch.utils.data.RandomSampler}}, kwargs: }}
    kwargs: {{batch_size: {batch}, num_workers: {workers}, pin_memory: {pin}, drop_last: True}}
    cache_output:
  val_data_loader:
    dataset_id: cifar100/test
    sampler: &val_sampler {{class_or_func: !import_get {{key: torch.utils.data.SequentialSampler}}, kwargs: }}
    kwargs: {{batch_size: 256, num_workers: {workers}, pin_memory: {pin}, drop_last: False}}
  teacher:
    forward_proc: forward_batch_only
    sequential: []
    wrapper: DataParallel
    requires_grad: False
    frozen_modules: []
  student:
    forward_proc: forward_batch_only
    adaptations:
    sequential: []
    wrapper: DistributedDataParallel
    requires_grad: True
    frozen_modules: []
  optimizer: {{key: SGD, kwargs: {{lr: 0.05, momentum: 0.9, weight_decay: 0.0005}}}}
  scheduler: {{key: MultiStepLR, kwargs: {{milestones: [150, 180, 210], gamma: 0.1}}}}
  criterion:
    key: WeightedSumLoss
    kwargs:
      sub_terms:
        kd:
          criterion:
            key: KDLoss
            kwargs:
              student_module_path: .
              student_module_io: output
              teacher_module_path: .
              teacher_module_io: output
              temperature: 4.0
              alpha: 0.1
              reduction: batchmean
          weight: 1.0
test:
  test_data_loader:
    dataset_id: cifar100/test
    sampler: *val_sampler
    kwargs: {{batch_size: 256, num_workers: {workers}, pin_memory: {pin}, drop_last: False}}
"""

#: torchdistill's MetricLogger line: `Epoch: [1]  [39/40]  ... time: 0.3012  data: 0.0101`, where `time` is the mean
#: seconds per iteration (data loading included) over the last 20 iterations.
_ITERATION = re.compile(r"Epoch: \[(\d+)\]\s+\[\s*(\d+)/(\d+)\].*?time: ([\d.]+)")


def _run(code: str, threads: int) -> dict:
    """Run `code` in a fresh Python process (with `report()` defined); its SPEED_JSON line (peak memory, errors)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", _REPORT + code], env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SPEED_JSON ")]
    if not lines:
        raise RuntimeError(f"benchmark process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("SPEED_JSON "))


def run_padkd(args: argparse.Namespace, data: Path, out: Path, extra: list[str], alone: bool = False) -> dict:
    """One padkd pipeline run of the KD recipe (random teacher), or of the student alone; its throughput."""
    models = [f"student.model.name={args.student}"]
    if not alone:
        models += [f"teacher.model.name={args.teacher}", "teacher.checkpoint=null"]
    argv = ["train", str(ALONE if alone else RECIPE), f"output_dir={out}", f"data.root={data}",
            f"data.batch_size={args.batch}", f"data.num_workers={args.workers}", f"device={args.device}", *models,
            f"stages.0.epochs={args.epochs}", "records.splits=[]", "log.tensorboard=false", "log.progress=none",
            *extra, "--quiet"]
    result = _run(_PADKD.format(threads=args.threads, argv=argv), args.threads)
    if result["rc"] != 0:
        raise RuntimeError(f"padkd train failed with exit code {result['rc']}")
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["event"] == "epoch"]
    steps = [b["global_step"] - a["global_step"] for a, b in zip(epochs, epochs[1:], strict=False)]
    images = sum(s * args.batch for s in steps)
    result["images_per_s"] = images / sum(e["time_s"] for e in epochs[1:])
    return result


def run_torchdistill(args: argparse.Namespace, data: Path, out: Path) -> dict:
    out.mkdir(parents=True)
    steps = args.images // args.batch
    config = out / "config.yaml"
    config.write_text(_TORCHDISTILL_CONFIG.format(root=data, out=out, log_freq=max(steps - 1, 1), epochs=args.epochs,
                                                  batch=args.batch, workers=args.workers,
                                                  pin=args.device == "cuda", teacher=args.teacher,
                                                  student=args.student))
    log = out / "run.log"
    argv = [str(args.torchdistill_script), "--config", str(config), "--device", args.device, "--run_log", str(log),
            "--seed", "0"]
    result = _run(_TORCHDISTILL.format(threads=args.threads, argv=argv), args.threads)
    mean_iteration: dict[int, float] = {}
    for match in _ITERATION.finditer(log.read_text() if log.exists() else ""):
        epoch, index, total, average = match.groups()
        if int(index) == int(total) - 1:
            mean_iteration[int(epoch)] = float(average)  # the mean over the epoch's last 20 iterations
    measured = [mean_iteration[e] for e in range(1, args.epochs) if e in mean_iteration]
    if len(measured) != args.epochs - 1:
        raise RuntimeError(f"torchdistill's log {log} lacks the last iteration of an epoch; error: {result['error']}")
    result["images_per_s"] = args.batch / statistics.mean(measured)
    return result


def write_data(root: Path, images: int, test_images: int) -> None:
    """CIFAR-100 in the authors' layout, with `meta` (torchvision's CIFAR100 reads the class names)."""
    write_cifar100(root, images, test_images, seed=0)
    meta = {"fine_label_names": [f"class{k}" for k in range(100)],
            "coarse_label_names": [f"super{k}" for k in range(20)]}
    (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps(meta, protocol=2))


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torchdistill-script", type=Path, help="torchdistill's examples/torchvision/"
                        "image_classification.py (its repository's file; torchdistill itself must be installed)")
    parser.add_argument("--images", type=int, default=640, help="generated training images")
    parser.add_argument("--test-images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per pipeline run; the first is not counted")
    parser.add_argument("--rounds", type=int, default=3, help="pipeline rounds (each runs every variant once)")
    parser.add_argument("--step-rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per step round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (both pipelines)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--best", nargs="*", default=BEST, help="padkd overrides of the 'padkd best' variant")
    parser.add_argument("--skip-steps", action="store_true", help="only the pipeline measurements")
    parser.add_argument("--teacher", default="resnet56", help="the teacher's model name (padkd's and torchdistill's)")
    parser.add_argument("--student", default="resnet20", help="the student's model name")
    parser.add_argument("--json", type=Path, help="also write the measured numbers to this file")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is not counted)")
    machine = (torch.cuda.get_device_name() if args.device == "cuda" else
               f"CPU {cpu_name()} ({os.cpu_count()} cores visible)")
    bf16 = sorted(cpu_flags() & set(BF16_FLAGS))
    print(f"padkd speed: {machine}, torch {torch.__version__}, {args.threads} thread(s), {args.workers} workers, "
          f"device {args.device}")
    print(f"CPU bf16 units: {', '.join(bf16) if bf16 else 'none (bf16 is emulated: slower than fp32)'}; "
          f"precision: auto trains in {resolve_precision('auto', torch.device(args.device))} on this device")

    if not args.skip_steps:
        if args.device == "cuda":
            print("steps (1), (2): timed on the CPU only")
        step = overhead.measure("resnet56-resnet20", ["hand-written", "padkd L2", "padkd PAD-L2"],
                                args.step_rounds, args.steps, args.threads)
        print(f"\n1-2. one training step, resnet56 -> resnet20, batch 64, 3x32x32, CE + L2 on the pooled embeddings; "
              f"median of {args.step_rounds} rounds x {args.steps} steps, one process per variant and round, order "
              "shuffled each round")
        print(f"{'variant':20s} {'ms/step':>8s} {'page faults/step':>17s}")
        for name, r in step.items():
            print(f"{name:20s} {1000 * r['seconds']:8.1f} {r['faults']:17.0f}")
        seconds = {name: r["seconds"] for name, r in step.items()}
        print(f"(1) PAD-L2 step / L2 step:          {seconds['padkd PAD-L2'] / seconds['padkd L2']:.3f}  "
              "(target <= 1.03)")
        print(f"(2) padkd step / hand-written step: {seconds['padkd L2'] / seconds['hand-written']:.3f}  "
              f"(target <= 1.05)")

    variants: dict[str, Callable[[Path, Path], dict]] = {
        "padkd fp32": lambda data, out: run_padkd(args, data, out, []),
        "padkd best": lambda data, out: run_padkd(args, data, out, list(args.best)),
        "padkd bf16": lambda data, out: run_padkd(args, data, out, list(BF16)),
        "student alone": lambda data, out: run_padkd(args, data, out, [], alone=True),
    }
    if args.torchdistill_script is not None:
        import torchdistill

        tag = f"torchdistill {torchdistill.__version__}"
        variants[tag] = lambda data, out: run_torchdistill(args, data, out)
    results: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_data(data, args.images, args.test_images)
        order, rng = list(variants), random.Random(1)
        for round_index in range(args.rounds):
            rng.shuffle(order)
            for name in order:
                out = Path(tmp) / f"{name.replace(' ', '_')}-{round_index}"
                results[name].append(variants[name](data, out))
    print(f"\n3-5. whole pipeline, CIFAR-100 KD {args.teacher} -> {args.student}: {args.images} generated training "
          f"images, batch {args.batch}, {args.epochs} epochs (the first not counted), evaluation excluded; median of "
          f"{args.rounds} rounds, order shuffled each round")
    print(f"'padkd best' = {' '.join(args.best) or '(no overrides)'}; 'padkd bf16' = {' '.join(BF16)}; "
          f"'student alone' = {ALONE.name}, fp32")
    memory = "peak CUDA MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"{'variant':22s} {'images/s':>9s} {'min':>8s} {'max':>8s} {memory:>14s}  note")
    rows: dict[str, dict] = {}
    for name, runs in results.items():
        values = [r["images_per_s"] for r in runs]
        errors = sorted({r["error"] for r in runs if r.get("error")})
        rows[name] = {"images_per_s": statistics.median(values), "min": min(values), "max": max(values),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                      "cuda_peak_mb": max((r["cuda_peak_mb"] for r in runs if r["cuda_peak_mb"] is not None),
                                          default=None), "error": errors[0] if errors else None}
        row = rows[name]
        peak = row["cuda_peak_mb"] if args.device == "cuda" else row["peak_rss_mb"]
        note = f"exited with {row['error']}" if row["error"] else ""
        print(f"{name:22s} {row['images_per_s']:9.1f} {row['min']:8.1f} {row['max']:8.1f} {peak:14.0f}  {note}")
    rate = {name: row["images_per_s"] for name, row in rows.items()}
    # time per image is 1 / rate: the KD epoch takes rate(alone) / rate(KD) times the student's own epoch
    ratios = {"kd_over_student_alone": rate["student alone"] / rate["padkd fp32"]}
    tag = next((name for name in rate if name.startswith("torchdistill")), None)
    if tag is None:
        print("(3) torchdistill: skipped; pass --torchdistill-script PATH (examples/torchvision/"
              "image_classification.py of github.com/yoshitomo-matsubara/torchdistill)")
    else:
        ratios |= {"padkd_fp32_over_torchdistill": rate["padkd fp32"] / rate[tag],
                   "padkd_bf16_over_torchdistill": rate["padkd bf16"] / rate[tag],
                   "padkd_best_over_torchdistill": rate["padkd best"] / rate[tag]}
        print(f"(3) padkd fp32 / {tag}: {ratios['padkd_fp32_over_torchdistill']:.2f}x  (target >= 1.0)")
        print(f"(3) padkd best / {tag}: {ratios['padkd_best_over_torchdistill']:.2f}x  (target >= 1.5)")
        print(f"(3) padkd bf16 / {tag}: {ratios['padkd_bf16_over_torchdistill']:.2f}x")
    ratios["bf16_over_fp32"] = rate["padkd bf16"] / rate["padkd fp32"]
    print(f"(3) padkd bf16 / padkd fp32: {ratios['bf16_over_fp32']:.2f}x  (bf16 units: {', '.join(bf16) or 'none'})")
    print(f"(5) padkd KD epoch / student-alone epoch: {ratios['kd_over_student_alone']:.2f}x the time  (goal <= 2)")
    if args.json is not None:
        settings = {k: v for k, v in vars(args).items() if k in ("images", "test_images", "batch", "epochs", "rounds",
                                                                 "threads", "workers", "device", "best", "teacher",
                                                                 "student")}
        args.json.write_text(json.dumps({"machine": machine, "cpu_bf16_flags": bf16, "torch": torch.__version__,
                                         "settings": settings,
                                         "pipeline": rows, "ratios": ratios}, indent=2) + "\n")

if __name__ == "__main__":
    main()
