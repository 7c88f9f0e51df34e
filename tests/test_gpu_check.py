"""benchmarks/gpu_check.sh: its dry run (the check's own logic on the CPU, tiny sizes) writes a summary of every
step, its helper checks runs and requirements as it says, and bad arguments stop it with one line."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["setup", "cuda_tests", "teacher", "amp_bf16", "amp_fp16", "ddp", "torchdistill", "speed", "compile"]


def _helper():
    spec = importlib.util.spec_from_file_location("gpu_steps", ROOT / "benchmarks" / "gpu_steps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bash() -> None:
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")


@pytest.mark.parametrize(("argv", "message"), [
    (["--budget", "soon"], "--budget needs whole seconds, got 'soon'"),
    (["--wheels", "/no/such/folder"], "--wheels: '/no/such/folder' is not a folder of wheel files"),
    (["--gpu"], "unknown argument '--gpu'"),
])
def test_bad_arguments_stop_with_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    _bash()
    proc = subprocess.run(["bash", str(SCRIPT), *argv, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "usage:" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_requirements_and_version_notes(tmp_path: Path) -> None:
    pytest.importorskip("packaging")
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["numpy>=1.0", "pyyaml>=999", "padkd-no-such-dist>=1"]\n'
                         '[project.optional-dependencies]\ndev = ["pytest>=1", "ruff-no-such-dist>=1"]\n')
    missing, notes = _helper().missing_requirements(pyproject)
    assert missing == ["padkd-no-such-dist>=1"]  # the dev extra counts for pytest alone
    assert len(notes) == 1 and notes[0].startswith("pyyaml ") and "outside 'pyyaml>=999'" in notes[0]


def _run_dir(root: Path, loss: float, scale: float | None = None) -> Path:
    root.mkdir()
    (root / "final.json").write_text(json.dumps({"last": {"top1": 12.5, "loss": 4.6}}))
    epochs = [{"event": "teacher"}, {"event": "epoch", "train": {"task": 4.7, "l2": loss}, "time_s": 1.0}]
    (root / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    if scale is not None:
        import torch

        (root / "checkpoints").mkdir()
        torch.save({"scaler": {"scale": scale}}, root / "checkpoints" / "last.pt")
    return root


def test_check_run_finds_non_finite_losses_and_a_missing_scaler(tmp_path: Path) -> None:
    check = _helper().check_run
    assert check(_run_dir(tmp_path / "good", 2.3, scale=65536.0), expect_scaler=True) == []
    assert check(_run_dir(tmp_path / "nan", float("nan")), expect_scaler=False) == [
        "a logged training loss is not finite"]
    assert check(_run_dir(tmp_path / "scale", 2.3, scale=float("inf")), expect_scaler=True) == [
        "the checkpoint holds no usable fp16 gradient scaler (scale inf)"]
    assert check(tmp_path / "absent", expect_scaler=False) == ["no final.json in absent"]


@pytest.mark.slow
def test_a_spent_budget_skips_the_steps_and_still_writes_the_summary(tmp_path: Path) -> None:
    _bash()
    env = {**os.environ, "PADKD_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--budget", "1", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert [s["name"] for s in steps] == STEPS and steps[0]["status"] == "pass"
    for step in steps[1:]:
        assert step["status"] == "skip" and step["seconds"] == 0, step
    assert all(s["detail"].startswith("budget spent") for s in steps if s["name"] in ("cuda_tests", "teacher", "speed"))
    assert steps[3]["detail"] == "needs the teacher run, which did not pass"


@pytest.mark.slow
def test_dry_run_writes_a_summary_of_every_step(tmp_path: Path) -> None:
    _bash()
    env = {**os.environ, "PADKD_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + (tmp_path / "gpu_check.log").read_text()[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "dry-run" and summary["budget_s"] == 1200 and 0 < summary["seconds"] <= 1200
    assert summary["machine"]["torch"] and summary["machine"]["cpus"] >= 1
    steps = {s["name"]: s for s in summary["steps"]}
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert {s["status"] for s in summary["steps"]} <= {"pass", "skip"}
    if not summary["machine"]["cuda"]:
        assert steps["cuda_tests"]["status"] == "skip" and "needs CUDA" in steps["cuda_tests"]["detail"]
        assert "skipped" in steps["cuda_tests"]["detail"]
    assert steps["torchdistill"]["status"] == "skip" and "--torchdistill-script" in steps["torchdistill"]["detail"]
    for name in ("teacher", "amp_bf16", "amp_fp16", "ddp", "compile"):
        step = steps[name]
        assert step["status"] == "pass", step
        assert step["final"]["top1"] >= 0 and all(t > 0 for t in step["epoch_seconds"])
    assert len(steps["amp_bf16"]["epoch_seconds"]) == 2 and len(steps["compile"]["epoch_seconds"]) == 2
    assert steps["ddp"]["detail"] == ("gloo process group of 1 rank(s) on cpu: all_reduce and barrier ok; "
                                      "finite losses, run finished")
    speed = summary["speed"]
    assert speed["settings"]["device"] == "cpu" and speed["settings"]["teacher"] == "resnet8"
    assert set(speed["pipeline"]) == {"padkd fp32", "padkd best", "padkd bf16", "student alone"}
    assert all(r["images_per_s"] > 0 and r["cuda_peak_mb"] is None for r in speed["pipeline"].values())
    alone, kd = speed["pipeline"]["student alone"]["images_per_s"], speed["pipeline"]["padkd fp32"]["images_per_s"]
    assert speed["ratios"]["kd_over_student_alone"] == pytest.approx(alone / kd)
    page = (tmp_path / "summary.md").read_text()
    assert page.startswith("# padkd GPU check (dry-run)") and all(f"| {name} | " in page for name in STEPS)
    assert "its timings say nothing of padkd's speed" in page
    log = (tmp_path / "gpu_check.log").read_text()
    assert "NCCL needs CUDA" in log and "peak CUDA memory needs CUDA" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "summary.json", "summary.md"]
