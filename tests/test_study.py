"""`padkd study`: the plan shares identical runs, a forked stage 2 equals the uninterrupted two-stage run,
and a tiny study runs end to end through the command line (the only part of the study that runs in CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from padkd.cli import main
from padkd.report.stats import paired_ci
from padkd.study import factors, plan, run, run_study

TINY = plan.Mode("quick", seeds=2, headline_seeds=2, method_seeds=2, e1=1, e2=1, widths=((2, 4),), weights=(30.0,),
                  subsets=(150,), stage2=((1, 0.005),), head_lr=(1.0,), methods=("hint",),
                  weightings=("uniform", "pad"), corruptions=(("noise", 0.1),), mnist_subsets=(), stall_seeds=0,
                  teacher_epochs=1)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(plan.MODES, "quick", TINY)
    monkeypatch.setattr(plan, "TEACHER", {"name": "cnn", "widths": [4, 8]})
    monkeypatch.setattr(plan, "STUDENT", {"name": "cnn", "widths": [2, 4]})


def test_plan_shares_stage1_and_identical_runs(tiny: None) -> None:
    runs = plan.Plan()
    teacher = plan.digits_teacher(runs, TINY)
    l2 = plan.two_stage(0, teacher, stage1=[plan.hint()], stage2=[plan.hint()], mode=TINY)
    pad = plan.two_stage(0, teacher, stage1=[plan.hint()], stage2=[plan.hint(1.0, plan.PAD)], mode=TINY)
    a, b = runs.add(l2, fork=True), runs.add(pad, fork=True)
    assert runs.add(json.loads(json.dumps(l2)), fork=True) == a and a != b
    assert runs.specs[a].fork == runs.specs[b].fork is not None  # one stage-1 run for both arms of seed 0
    assert teacher in runs.specs[runs.specs[a].fork].deps
    other_seed = runs.add(plan.two_stage(1, teacher, stage1=[plan.hint()], stage2=[plan.hint()], mode=TINY),
                          fork=True)
    assert other_seed.split("/")[0] == a.split("/")[0] and other_seed.endswith("/s1")
    assert len(runs.specs) == 6  # the teacher; stage 1 of seeds 0 and 1; L2 and PAD of seed 0; L2 of seed 1
    with pytest.raises(Exception, match="unknown factor"):
        factors.build_plan(TINY, None, ["nope"])


def test_a_time_budget_stops_starting_runs_and_a_rerun_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    clock = [0.0]
    trained: list[str] = []

    def fake_execute(run_dir: str, raw: dict, fork_dir: str | None) -> dict:
        trained.append(Path(run_dir).parent.name)
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / "final.json").write_text("{}")
        clock[0] += 10.0  # each run takes 10 s
        return {}

    monkeypatch.setattr(run, "execute", fake_execute)
    monkeypatch.setattr(run.time, "perf_counter", lambda: clock[0])
    runs = plan.Plan()
    keys = [runs.add({"name": f"run{i}", "seed": 0, "stages": [{"epochs": i + 1}]}) for i in range(5)]
    said: list[str] = []
    assert run.run_plan(runs, tmp_path, 1, said.append, budget_s=25.0) == {}
    assert len(trained) == 3 and said[-1] == "[study] 3/5 runs (30s)"
    assert any("time budget of 0.416667 min reached: 2 runs not started" in line for line in said)
    assert run.run_plan(runs, tmp_path, 1, said.append) == {}  # the rerun trains the two left
    assert sorted(trained) == sorted(k.split("/")[0] for k in keys) and "3 runs already finished" in said[-3]
    with pytest.raises(Exception, match="--minutes must be a positive"):
        run_study(tmp_path / "x", minutes=0)


@pytest.mark.slow
def test_forked_stage2_equals_the_uninterrupted_run(tiny: None, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    runs = plan.Plan()
    teacher = plan.digits_teacher(runs, TINY)
    run.execute(str(tmp_path / "teacher"), {**runs.specs[teacher].raw}, None)
    raw = plan.two_stage(3, str(tmp_path / "teacher"), stage1=[plan.hint()],
                         stage2=[plan.hint(1.0, plan.PAD)], mode=TINY)
    whole = run.execute(str(tmp_path / "whole"), raw, None)
    first = {**raw, "stages": raw["stages"][:1]}
    run.execute(str(tmp_path / "stage1"), first, None)
    forked = run.execute(str(tmp_path / "forked"), raw, str(tmp_path / "stage1"))
    assert forked["last"] == whole["last"]
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "forked" / "checkpoints" / "last.pt", weights_only=True)
    for key, value in a["student"].items():
        torch.testing.assert_close(b["student"][key], value, rtol=0, atol=0)
    for key, value in a["terms"].items():
        torch.testing.assert_close(b["terms"][key], value, rtol=0, atol=0)
    epochs = [json.loads(line) for line in (tmp_path / "forked" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["epoch"]) for e in epochs if e["event"] == "epoch"] == [(0, 1), (1, 1)]


@pytest.mark.slow
def test_study_command_smoke(tiny: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    code = main(["study", "--mode", "quick", "--out", str(out), "--jobs", "1", "--only", "corrupt", "--quiet"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    rows = results["factors"]["corrupt"]["rows"]
    assert [r["label"] for r in rows] == ["L2 − none", "PAD − L2"] and all(r["n"] == 2 for r in rows)
    # the paired difference is the one of the runs' own final.json files
    specs = factors.factor_corrupt(plan.Plan(), TINY, plan.digits_teacher(plan.Plan(), TINY)).rows
    for row, spec in zip(rows, specs, strict=True):
        t = [json.loads((out / "runs" / spec.treatment[s] / "final.json").read_text())["last"]["top1"] for s in (0, 1)]
        c = [json.loads((out / "runs" / spec.control[s] / "final.json").read_text())["last"]["top1"] for s in (0, 1)]
        diff, low, high = paired_ci(t, c)
        assert row["diff"] == pytest.approx(diff) and row["low"] == pytest.approx(low)
    sigma = results["factors"]["corrupt"]["sigma"]["10% noise images"]
    assert sigma["n"] == 2 and set(sigma["d_log_var"]) == {"mean", "low", "high"}
    text = (out / "study.md").read_text()
    assert "Corrupted and mislabelled" in text and "](figures/corrupt.png)" in text
    assert (out / "figures" / "corrupt.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "reports" / "corrupt" / "report.md").is_file()
    # a rerun reuses every finished run
    assert main(["study", "--mode", "quick", "--out", str(out), "--jobs", "1", "--only", "corrupt"]) == 0
    assert "0 to train" in capsys.readouterr().err
