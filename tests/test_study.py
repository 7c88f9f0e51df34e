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
                  teacher_epochs=1, ceiling_seeds=2)


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


def test_the_weightings_factor_pairs_every_weighting_with_its_control_and_the_lever(tiny: None) -> None:
    runs = plan.Plan()
    teacher = plan.digits_teacher(runs, TINY)
    f = factors.factor_weightings(runs, TINY, teacher, ("data", "mnist-teacher"))
    by_label: dict[str, list[factors.Row]] = {}
    for row in f.rows:
        by_label.setdefault(row.label, []).append(row)
    crossed = list(factors.CROSSED)
    assert list(by_label) == ["digits, hint, stage 2: − uniform", "digits, kd, stage 2: − uniform",
                              "MNIST 1000, hint, stage 2: − uniform", "digits, hint, single stage: − uniform",
                              "digits, kd, single stage: − uniform", "digits, single stage (CE 0.1): − KD"]
    for label, rows in by_label.items():
        if "stage 2" in label:
            assert [r.value for r in rows] == ["no term", *crossed]
            # one control and one stage-1 run per seed, shared by every arm of that seed
            assert len({tuple(r.control.values()) for r in rows}) == 1
            for r in rows:
                for seed, key in r.treatment.items():
                    assert runs.specs[key].fork == runs.specs[r.control[seed]].fork is not None
        elif "single stage:" in label:
            assert [r.value for r in rows] == (["no term"] if "hint" in label else []) + crossed
    seeds = {label: len(rows[0].treatment) for label, rows in by_label.items()}
    assert seeds["digits, hint, stage 2: − uniform"] == TINY.ceiling_seeds
    assert seeds["MNIST 1000, hint, stage 2: − uniform"] == min(TINY.seeds, 5)
    dropped = runs.specs[by_label["digits, kd, stage 2: − uniform"][0].treatment[0]].raw
    assert dropped["stages"][1]["terms"] == [] and dropped["stages"][0]["terms"][0]["method"]["name"] == "kd"
    alone, *weighted = by_label["digits, hint, single stage: − uniform"]
    assert runs.specs[alone.treatment[0]].raw["stages"][0]["terms"] == []
    for row in weighted:
        raw = runs.specs[row.treatment[0]].raw
        term = raw["stages"][0]["terms"][0]
        assert term["weighting"] == factors.CROSSED[row.value]  # each at mean-1 weights (preserve_scale, normalize)
        assert ("train" in raw["records"]["splits"]) == (row.value in factors.LEARNED)
    assert factors.CROSSED["pad"]["preserve_scale"] and factors.CROSSED["entropy"]["normalize"]
    ls = runs.specs[by_label["digits, single stage (CE 0.1): − KD"][0].treatment[0]].raw["stages"][0]
    control = runs.specs[by_label["digits, single stage (CE 0.1): − KD"][0].control[0]].raw["stages"][0]
    assert ls["task_weight"] == control["task_weight"] == 0.1
    assert ls["terms"][0]["method"] == {**control["terms"][0]["method"], "standardize": True}
    assert "MNIST 1000" not in {r.label.split(",")[0] for r in factors.factor_weightings(
        plan.Plan(), TINY, teacher, None).rows}


def test_memory_statistics_come_from_the_training_records(tmp_path: Path) -> None:
    from padkd.engine.records import write_csv
    from padkd.study.analyse import head_stats, learned_records

    rec = tmp_path / "k" / "s0" / "records"
    rec.mkdir(parents=True)
    d = torch.tensor([1.0, 2.0, 4.0, 8.0])
    write_csv({"index": torch.arange(4), "hint.discrepancy": d, "hint.weight": torch.ones(4)},
              rec / "1-stage2-test.csv")
    log_var = torch.tensor([0.0, 0.5, 1.0, float("nan")])  # sample 3 never seen
    write_csv({"index": torch.arange(4), "hint.discrepancy": d, "hint.weight": torch.ones(4),
               "hint.log_var": log_var}, rec / "1-stage2-train.csv")
    records = learned_records(tmp_path, "k/s0")
    assert records is not None and "hint.log_var" in records
    stats = head_stats(records, None)
    assert stats["rho"] == pytest.approx(1.0) and stats["sd_log_var"] == pytest.approx(float(torch.tensor(
        [0.0, 0.5, 1.0]).std(unbiased=False)))
