"""The Python side of benchmarks/gpu_check.sh: what the shell script cannot check by exit codes alone.

    python benchmarks/gpu_steps.py missing                  # pyproject requirements not installed, one a line
    python benchmarks/gpu_steps.py data DIR IMAGES TEST     # generated CIFAR-100 files; torch's version, GPU seen
    python benchmarks/gpu_steps.py train --run-dir DIR --result FILE [--expect-scaler] [--process-group nccl|gloo]
                                         CONFIG [OVERRIDE ...]
    python benchmarks/gpu_steps.py summary --out DIR --steps TSV --work DIR --mode gpu|dry-run --budget S --seconds S

`train` runs `padkd train` in this process (so that it can read the peak CUDA memory afterwards), then checks the
run: exit status 0, every logged loss finite, a final test metric, and with `--expect-scaler` an fp16 gradient
scaler saved in the checkpoint with a finite positive scale. With `--process-group`, it first joins the process
group torchrun describes with that backend and all-reduces one tensor on its device; padkd then trains in that
process (with one rank padkd itself runs as a single process: no DDP wrapper, its collectives are local).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The statuses a step can end with.
STATUSES = ("pass", "fail", "skip", "timeout")


def missing_requirements(pyproject: Path = ROOT / "pyproject.toml") -> tuple[list[str], list[str]]:
    """What the check runs on (the project's dependencies and the dev extra's pytest) with no installed
    distribution, and notes on installed ones whose version is outside the declared range (used as they are)."""
    import tomllib
    from importlib import metadata

    project = tomllib.loads(pyproject.read_text())["project"]
    dev = project["optional-dependencies"]["dev"]
    wanted = [*project["dependencies"], *(r for r in dev if r.split(">")[0].split("=")[0].strip() == "pytest")]
    missing, notes = [], []
    for requirement in wanted:
        name = requirement.split(";")[0]
        for stop in "<>=!~[ ":
            name = name.split(stop)[0]
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        try:
            from packaging.requirements import Requirement
        except ImportError:  # no packaging: presence is all that is checked
            continue
        if not Requirement(requirement).specifier.contains(version, prereleases=True):
            notes.append(f"{name} {version} is outside '{requirement}' (used as installed)")
    return missing, notes


def _finite(tree: Any) -> bool:
    if isinstance(tree, dict):
        return all(_finite(v) for v in tree.values())
    if isinstance(tree, float | int) and not isinstance(tree, bool):
        return math.isfinite(tree)
    return True


def check_run(run_dir: Path, expect_scaler: bool) -> list[str]:
    """What is wrong with a finished padkd run (empty: nothing)."""
    problems = []
    final = run_dir / "final.json"
    if not final.is_file():
        return [f"no {final.name} in {run_dir.name}"]
    last = json.loads(final.read_text()).get("last")
    if not last or not _finite(last):
        problems.append("no finite final test metrics")
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e.get("event") == "epoch"]
    if not epochs:
        problems.append("no epoch was logged")
    if not all(_finite(e["train"]) for e in epochs):
        problems.append("a logged training loss is not finite")
    if expect_scaler:
        import torch

        scaler = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu").get("scaler")
        scale = (scaler or {}).get("scale")
        if not isinstance(scale, float) or not math.isfinite(scale) or scale <= 0:
            problems.append(f"the checkpoint holds no usable fp16 gradient scaler (scale {scale!r})")
    return problems


def _join_group(backend: str) -> str:
    """Join torchrun's process group with `backend`, all-reduce one tensor on this rank's device, leave."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    value = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(value)
    dist.barrier()
    expected = world * (world + 1) / 2
    dist.destroy_process_group()
    if not torch.all(value == expected):
        raise RuntimeError(f"{backend} all_reduce gave {value.tolist()}, expected {expected}")
    return f"{backend} process group of {world} rank(s) on {device}: all_reduce and barrier ok"


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    notes = []
    result: dict[str, Any] = {"run_dir": args.run_dir.name}
    try:
        if args.process_group:
            notes.append(_join_group(args.process_group))
        from padkd.cli import main

        rc = main(["train", args.config, f"output_dir={args.run_dir}", *args.overrides, "--quiet"])
    except Exception as err:  # noqa: BLE001  (the step fails with the reason in its summary line)
        rc, notes = 1, [*notes, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    problems = [f"padkd train exited with {rc}"] if rc else check_run(args.run_dir, args.expect_scaler)
    if (args.run_dir / "metrics.jsonl").is_file():
        epochs = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
        result["epoch_seconds"] = [e["time_s"] for e in epochs if e.get("event") == "epoch"]
    if (args.run_dir / "final.json").is_file():
        result["final"] = json.loads((args.run_dir / "final.json").read_text()).get("last")
    result["ok"] = not problems
    result["detail"] = "; ".join(notes + (problems or ["finite losses, run finished"]))
    args.result.write_text(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def machine() -> dict[str, Any]:
    """The interpreter, torch and accelerator the check ran on."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": None, "cpus": os.cpu_count(),
                            "cuda": False, "gpu": None}
    try:
        import torch
    except ImportError:  # a failed set-up still gets its summary
        torch = None
    if torch is not None:
        info |= {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info |= {"gpu": torch.cuda.get_device_name(), "cuda_runtime": torch.version.cuda,
                 "gpu_memory_mb": round(torch.cuda.get_device_properties(0).total_memory / 2**20)}
        if torch.distributed.is_nccl_available():
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    try:
        info["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def cmd_summary(args: argparse.Namespace) -> int:
    steps = []
    for line in args.steps.read_text().splitlines():
        name, status, seconds, detail = line.split("\t", 3)
        step: dict[str, Any] = {"name": name, "status": status, "seconds": float(seconds), "detail": detail}
        result = args.work / f"{name}.result.json"
        if status in ("pass", "fail") and result.is_file():  # a train step's own findings
            found = json.loads(result.read_text())
            step["detail"] = found["detail"]
            step |= {k: v for k, v in found.items() if k not in ("ok", "run_dir", "detail")}
        steps.append(step)
    speed = args.work / "speed.json"
    summary = {"mode": args.mode, "budget_s": args.budget, "seconds": args.seconds, "machine": machine(),
               "steps": steps, "speed": json.loads(speed.read_text()) if speed.is_file() else None}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text(markdown(summary))
    print((args.out / "summary.md").read_text(), end="")
    return 1 if any(s["status"] in ("fail", "timeout") for s in steps) else 0


def markdown(summary: dict[str, Any]) -> str:
    """The summary as a page: the machine, one row per step, the speed table when it ran."""
    m = summary["machine"]
    where = f"{m['gpu']} ({m.get('gpu_memory_mb')} MiB), CUDA {m.get('cuda_runtime')}, NCCL {m.get('nccl')}" \
        if m["gpu"] else "no GPU"
    lines = [f"# padkd GPU check ({summary['mode']})", "",
             f"- Machine: {where}; torch {m['torch']}, Python {m['python']}, {m['cpus']} CPUs; commit {m['commit']}",
             f"- Took {summary['seconds']:.0f} s of a {summary['budget_s']:.0f} s budget", *(
                 ["- A dry run: tiny sizes on the CPU check this script's logic; its timings say nothing of padkd's "
                  "speed"] if summary["mode"] == "dry-run" else []), "",
             "| step | status | seconds | peak CUDA MiB | detail |", "|---|---|---|---|---|"]
    for s in summary["steps"]:
        peak = s.get("cuda_peak_mb")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {'' if peak is None else peak} | "
                     f"{s['detail'].replace('|', '/')} |")
    speed = summary["speed"]
    if speed:
        lines += ["", f"Pipeline ({speed['settings']['teacher']} -> {speed['settings']['student']}, "
                  f"{speed['settings']['images']} images, batch {speed['settings']['batch']}, device "
                  f"{speed['settings']['device']}):", "",
                  "| variant | images/s | min | max | peak CUDA MiB | peak RSS MiB |", "|---|---|---|---|---|---|"]
        for name, r in speed["pipeline"].items():
            lines.append(f"| {name} | {r['images_per_s']:.1f} | {r['min']:.1f} | {r['max']:.1f} | "
                         f"{'' if r['cuda_peak_mb'] is None else round(r['cuda_peak_mb'])} | {r['peak_rss_mb']:.0f} |")
        lines += [""] + [f"- {k}: {v:.2f}" for k, v in speed["ratios"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("missing")
    p = sub.add_parser("data")
    p.add_argument("root", type=Path)
    p.add_argument("images", type=int)
    p.add_argument("test_images", type=int)
    p = sub.add_parser("train")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--expect-scaler", action="store_true")
    p.add_argument("--process-group", choices=["nccl", "gloo"])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("summary")
    for name in ("out", "steps", "work"):
        p.add_argument(f"--{name}", type=Path, required=True)
    p.add_argument("--mode", choices=["gpu", "dry-run"], required=True)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    if args.command == "missing":
        missing, notes = missing_requirements()
        for requirement in missing:
            print(requirement)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        return 0
    if args.command == "data":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import torch
        from speed import write_data

        import padkd.cli  # noqa: F401  (the set-up's check that padkd imports)

        write_data(args.root, args.images, args.test_images)
        print(torch.__version__, torch.cuda.is_available())
        return 0
    return cmd_train(args) if args.command == "train" else cmd_summary(args)


if __name__ == "__main__":
    sys.exit(main())
