"""The demos: resumable (finished runs reused, the interrupted one resumed, by the command the interruption
names), quick reports labelled as smoke tests, the detection demo's report and figures, and the retrieval
figure's choice of queries."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

from padkd.cli import main
from padkd.demos import fresh_output
from padkd.errors import PadkdError


def test_a_demo_folder_is_kept_unless_asked(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(PadkdError, match="--resume to continue the demo in it, --overwrite to replace it"):
        fresh_output(tmp_path, overwrite=False)
    with pytest.raises(PadkdError, match="pass one"):
        fresh_output(tmp_path, overwrite=True, resume=True)
    fresh_output(tmp_path, overwrite=False, resume=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_retrieval_queries_are_those_the_models_differ_on() -> None:
    from padkd.demos.retrieval import pick_queries

    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    same = torch.tensor([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]])  # every neighbour of the class
    other = same.clone()
    other[4] = torch.tensor([0, 1])  # query 4: this model finds two of another class
    other[1] = torch.tensor([2, 3])  # query 1: one of another class
    assert pick_queries({"a": same, "b": other}, labels, 2) == [4, 1]


def _interrupt_trainer(monkeypatch: pytest.MonkeyPatch, which: int) -> None:
    """Make the `which`-th Trainer (counted from 1) stop after its first optimizer step, as Ctrl-C does."""
    from padkd.engine.trainer import Trainer

    original = Trainer._train_epoch
    seen: set[int] = set()

    def train_epoch(self: Trainer, *args: Any) -> bool:
        seen.add(id(self))
        if len(seen) == which:
            self.request_stop()
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_train_epoch", train_epoch)


@pytest.mark.slow  # four retrieval runs of four batches (one interrupted and resumed)
def test_an_interrupted_demo_resumes_by_the_command_it_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--task", "retrieval", "--quick", "--seeds", "1", "--quiet", "--out", str(out)]
    with monkeypatch.context() as patch:
        _interrupt_trainer(patch, 3)  # teacher, student alone, then RKD is interrupted
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "checkpoint saved" in err and "continue the demo with: " in err, err
    resume = err.strip().split("continue the demo with: ")[1]
    assert resume == shlex.join(["padkd", "demo", "--task", "retrieval", "--out", str(out), "--seeds", "1",
                                 "--quick", "--resume"])
    finished = {name: (out / name / "final.json").read_text() for name in ("teacher", "seed0/none")}
    assert not (out / "seed0" / "rkd" / "final.json").exists() and (out / "seed0" / "rkd" / "checkpoints").is_dir()

    assert main(shlex.split(resume)[1:]) == 0
    capsys.readouterr()
    for name, text in finished.items():  # reused as they were, not trained again
        assert (out / name / "final.json").read_text() == text
        assert "resume" not in (out / name / "metrics.jsonl").read_text()
    events = [json.loads(line) for line in (out / "seed0" / "rkd" / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("resume") == 1
    results = json.loads((out / "results.json").read_text())
    assert results["reused_runs"] == 2 and set(results["last"]) == {"none", "rkd", "pad_rkd"}
    report = (out / "report.md").read_text()
    assert "reused 2 finished run(s)" in report and str(tmp_path) not in report
    assert str(tmp_path) not in (out / "results.json").read_text()
    assert "padkd demo --task retrieval --out . --seeds 1 --quick" in report
    assert "QUICK RUN" in report and "| better |" not in report

    # `padkd report` on the demo's real retrieval runs, by Recall@1.
    assert main(["report", *(str(out / "seed0" / m) for m in ("none", "rkd")), "--out", str(tmp_path / "rep")]) == 0
    reported = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert reported["metric"] == "recall@1" and sorted(reported["last"][m]["0"] for m in reported["methods"]) == \
        sorted(results["last"][m]["0"] for m in ("none", "rkd"))
    capsys.readouterr()

    # Finished runs are reused only with the options that trained them.
    assert main([a for a in argv if a != "--quick"] + ["--resume"]) == 2
    assert "the demo's options differ from those this folder was trained with" in capsys.readouterr().err


@pytest.mark.slow  # four tiny detector runs: ~25 s on a busy 2-core machine
def test_detection_demo_writes_the_report_and_says_its_data_are_synthetic(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import padkd.demos.detection as demo

    monkeypatch.setattr(demo, "schedule", lambda quick: {"train": 8, "val": 4, "teacher_epochs": 1,
                                                         "student_epochs": 1})
    results = demo.run_detection_demo(tmp_path / "demo", seeds=1, quick=True)
    out, err = capsys.readouterr()
    assert "SYNTHETIC" in out and "SYNTHETIC" in err and "QUICK RUN" in out
    assert set(results["last"]) == {"none", "fgfi", "pad_fgfi"} and results["synthetic"] is True
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["last"] == results["last"] and saved["metric"] == "mAP" and "SYNTHETIC" in saved["data"]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "SYNTHETIC" in report and "QUICK RUN" in report and str(tmp_path) not in report
    for figure in ("detections", "learning_curves", "sigma_vs_error"):
        assert f"](plots/{figure}.png)" in report and (tmp_path / "demo" / "plots" / f"{figure}.png").stat().st_size
    assert "| AP75 |" in report.replace(" AP75 ", "| AP75 |")  # every COCO stat the demo names
    info = json.loads((tmp_path / "demo" / "data" / "annotations" / "instances_val.json").read_text())["info"]
    assert "SYNTHETIC" in info["description"]
    with pytest.raises(PadkdError, match="--overwrite"):
        demo.run_detection_demo(tmp_path / "demo", quick=True)
    # `padkd report` on the demo's real detection runs (no validation split: `"val": null` epochs).
    runs = [str(tmp_path / "demo" / "seed0" / m) for m in ("none", "fgfi", "pad_fgfi")]
    assert main(["report", *runs, "--out", str(tmp_path / "rep")]) == 0
    reported = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert reported["metric"] == "mAP" and reported["task"] == "detection" and len(reported["methods"]) == 3
    assert str(tmp_path) not in (tmp_path / "rep" / "report.md").read_text()
    assert reported["last"] == {m: {"0": saved["last"][k]["0"]} for m, k in zip(reported["methods"], saved["last"],
                                                                                 strict=True)}


def test_demos_train_on_one_thread_unless_threads_are_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    from padkd.demos import single_thread
    from padkd.engine.cpu import ENV, choose_threads

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with single_thread():
        assert choose_threads(4) == (1, "--threads")  # wins over a config's engine.threads, as --threads does
    assert ENV not in os.environ  # restored
    monkeypatch.setenv(ENV, "3")
    with single_thread():
        assert choose_threads() == (3, "--threads")
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with single_thread():
        assert choose_threads() == (2, "OMP_NUM_THREADS")
