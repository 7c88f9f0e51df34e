"""The training engine: LR schedule, samplers, checkpoints, run outputs, resume, guards, NaN, DDP."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from padkd import checkpoint as ckpt
from padkd.config import SchedulerConfig, dump_config, parse_config
from padkd.data.samplers import EpochSampler, ShardSampler
from padkd.engine.logging import read_metrics
from padkd.engine.stage import lr_factor
from padkd.engine.trainer import Interrupted, Trainer
from padkd.errors import NonFiniteLossError, PadkdError

STEPS_PER_EPOCH = 16  # 1079 digits training images, batch 64, drop_last
TEST_SIZE = 359
TIMING_KEYS = ("time_s", "samples_per_s")


def run(raw: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return Trainer(parse_config(raw), quiet=True, **kwargs).run().final


def stop_at(step: int) -> Callable[[Trainer, int], None]:
    """A callback asking the trainer to stop (as Ctrl-C does) after global step `step`."""

    def callback(trainer: Trainer, global_step: int) -> None:
        if global_step == step:
            trainer.request_stop()

    return callback


def interrupt_then_resume(raw: dict[str, Any], step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run until `step`, check the interruption, resume; returns (interrupted checkpoint, final)."""
    cfg = parse_config(raw)
    with pytest.raises(Interrupted, match=r"--resume"):
        Trainer(cfg, quiet=True, callbacks=[stop_at(step)]).run()
    last = Path(raw["output_dir"]) / "checkpoints" / "last.pt"
    interrupted = ckpt.load(last)
    final = Trainer(parse_config(copy.deepcopy(raw)), resume=True, quiet=True).run().final
    return interrupted, final


def epoch_events(run_dir: Path) -> list[dict[str, Any]]:
    events = [e for e in read_metrics(run_dir) if e["event"] == "epoch"]
    return [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in events]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def last_checkpoint(run_dir: Path) -> dict[str, Any]:
    return ckpt.load(run_dir / "checkpoints" / "last.pt")


def yaml_load(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory, distill_config) -> tuple[Path, dict[str, Any]]:
    """The uninterrupted two-stage reference run (L2 hint 2 epochs, then PAD-L2 1 epoch)."""
    run_dir = tmp_path_factory.mktemp("run_a") / "run"
    final = run(distill_config(run_dir))
    return run_dir, final


# ---------------------------------------------------------------- LR schedule


def test_cosine_goes_from_one_to_the_floor() -> None:
    s = SchedulerConfig(name="cosine", min_lr=0.001)
    assert lr_factor(s, 0.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(s, 10.0, 10, 0.1) == pytest.approx(0.01)
    assert lr_factor(s, 5.0, 10, 0.1) == pytest.approx(0.01 + 0.99 * 0.5)
    values = [lr_factor(s, e / 4, 10, 0.1) for e in range(41)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert lr_factor(SchedulerConfig(name="cosine"), 3.0, 3, 0.05) == pytest.approx(0.0, abs=1e-12)


def test_warmup_ramps_linearly_then_follows_the_schedule() -> None:
    s = SchedulerConfig(name="cosine", warmup_epochs=2, min_lr=0.0)
    ramp = [lr_factor(s, e, 10, 0.1) for e in (0.0, 0.5, 1.0, 1.5)]
    steps = np.diff(ramp)
    assert np.allclose(steps, 0.25) and ramp[0] < 0.01
    assert all(0 < r < 1 for r in ramp)
    assert lr_factor(s, 2.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(s, 6.0, 10, 0.1) == pytest.approx(0.5)
    assert lr_factor(s, 10.0, 10, 0.1) == pytest.approx(0.0, abs=1e-12)
    constant = SchedulerConfig(name="constant", warmup_epochs=1)
    assert lr_factor(constant, 0.5, 3, 0.1) == pytest.approx(0.501)
    assert lr_factor(constant, 1.0, 3, 0.1) == 1.0


def test_multistep_multiplies_by_gamma_at_each_milestone() -> None:
    s = SchedulerConfig(name="multistep", milestones=[2, 4], gamma=0.1)
    assert lr_factor(s, 0.0, 6, 0.1) == 1.0
    assert lr_factor(s, 1.99, 6, 0.1) == 1.0
    assert lr_factor(s, 2.0, 6, 0.1) == pytest.approx(0.1)
    assert lr_factor(s, 3.5, 6, 0.1) == pytest.approx(0.1)
    assert lr_factor(s, 4.0, 6, 0.1) == pytest.approx(0.01)
    assert lr_factor(s, 5.9, 6, 0.1) == pytest.approx(0.01)


def test_constant_stays_one() -> None:
    s = SchedulerConfig(name="constant")
    assert {lr_factor(s, e / 3, 5, 0.1) for e in range(16)} == {1.0}


# ---------------------------------------------------------------- samplers


def test_epoch_sampler_order_depends_only_on_seed_and_epoch() -> None:
    a, b = EpochSampler(100, shuffle=True, seed=3), EpochSampler(100, shuffle=True, seed=3)
    a.set_epoch(1)
    torch.manual_seed(123)  # the global RNG plays no part
    first = list(a)
    torch.manual_seed(456)
    b.set_epoch(1)
    assert list(b) == first
    assert sorted(first) == list(range(100)) and first != list(range(100))
    b.set_epoch(2)
    assert list(b) != first
    other_seed = EpochSampler(100, shuffle=True, seed=4)
    other_seed.set_epoch(1)
    assert list(other_seed) != first
    assert list(EpochSampler(7, shuffle=False, seed=0)) == list(range(7))


def test_epoch_sampler_start_skips_exactly() -> None:
    s = EpochSampler(1079, shuffle=True, seed=0)
    s.set_epoch(5)
    full = list(s)
    for start in (0, 1, 64, 640, 1078):
        s.set_epoch(5, start=start)
        assert list(s) == full[start:]
        assert len(s) == 1079 - start
    s.set_epoch(5)  # a later epoch starts from the beginning again
    assert list(s) == full


def test_epoch_sampler_shards_cover_the_set() -> None:
    size = 1079
    shards = []
    for rank in range(2):
        s = EpochSampler(size, shuffle=True, seed=1, rank=rank, world=2)
        s.set_epoch(0)
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == 540
    assert set(shards[0]) | set(shards[1]) == set(range(size))
    assert len(set(shards[0]) & set(shards[1])) <= 1  # only the padding sample repeats
    for rank in range(2):  # resuming a rank mid-epoch skips within its own shard
        s = EpochSampler(size, shuffle=True, seed=1, rank=rank, world=2)
        s.set_epoch(0, start=128)
        assert list(s) == shards[rank][128:] and len(s) == 540 - 128


@pytest.mark.parametrize(("size", "world"), [(359, 2), (10, 3), (2, 4), (0, 2)])
def test_shard_sampler_covers_every_index_once(size: int, world: int) -> None:
    shards = [list(ShardSampler(size, rank, world)) for rank in range(world)]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(size))
    assert sum(len(ShardSampler(size, r, world)) for r in range(world)) == size


# ---------------------------------------------------------------- checkpoint files


class _Evil:
    """Unpickling this would create a file: a loader that runs code would show it."""

    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_atomic_save_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.pt"
    ckpt.atomic_save({"format": ckpt.FORMAT, "x": torch.arange(3)}, path)
    ckpt.atomic_save({"format": ckpt.FORMAT, "x": torch.arange(4)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(4))
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.pt"]


def test_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.pt"
    ckpt.atomic_save({"format": ckpt.FORMAT, "x": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017  (whatever pickle raises for a lambda)
        ckpt.atomic_save({"format": ckpt.FORMAT, "x": lambda: 0}, path)
    assert path.read_bytes() == before

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save({"format": ckpt.FORMAT, "x": torch.zeros(2)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))


def test_load_rejects_foreign_and_garbage_files(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(PadkdError, match="is not a padkd checkpoint"):
        ckpt.load(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all" * 10)
    with pytest.raises(PadkdError) as info:
        ckpt.load(garbage)
    assert "not a readable padkd checkpoint" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(PadkdError, match="not found"):
        ckpt.load(tmp_path / "missing.pt")


def test_load_never_runs_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "payload": evil}, path)
    with pytest.raises(PadkdError, match="not a readable padkd checkpoint"):
        ckpt.load(path)
    assert not marker.exists()


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # a cached gaussian is part of numpy's state

    def draw() -> tuple[Any, ...]:
        return random.random(), np.random.rand(3).tolist(), np.random.normal(), torch.rand(3).tolist()

    state = ckpt.rng_state()
    expected = draw()
    ckpt.atomic_save({"format": ckpt.FORMAT, "rng": state}, tmp_path / "rng.pt")
    draw()
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])  # as checkpoints are loaded
    assert draw() == expected
    ckpt.set_rng_state(state)
    assert draw() == expected


def test_resolve_and_strict_loading(tmp_path: Path) -> None:
    with pytest.raises(PadkdError, match="holds no checkpoints"):
        ckpt.resolve(tmp_path)
    module = torch.nn.Linear(3, 2)
    with pytest.raises(PadkdError) as info:
        ckpt.load_state_strict(module, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, "x.pt")
    assert "shape of weight" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(PadkdError, match="missing"):
        ckpt.load_state_strict(module, {"weight": torch.zeros(2, 3)}, "x.pt")


# ---------------------------------------------------------------- a two-stage run's outputs


def test_run_writes_checkpoints_with_full_training_state(run_a: tuple[Path, dict[str, Any]]) -> None:
    run_dir, final = run_a
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    raw = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    last = last_checkpoint(run_dir)
    assert set(raw) == set(last)
    assert {"student", "terms", "optimizer", "scaler", "meters", "progress", "rng", "model"} <= set(last)
    assert last["format"] == ckpt.FORMAT and last["kind"] == "run"
    assert last["model"] == {"name": "cnn", "widths": [4, 8]}
    assert last["progress"] == {"stage": 1, "epoch": 1, "batch": 0, "global_step": 3 * STEPS_PER_EPOCH,
                                "best_metric": final["best_val"], "best_at": final["best_stage_epoch"]}
    assert any("weighting.head" in key for key in last["terms"]), list(last["terms"])
    assert any("method.connector" in key for key in last["terms"])  # student 8 -> teacher 16 features
    assert not any(key.startswith("teacher") for key in last["student"])
    assert {"state", "param_groups"} <= set(last["optimizer"])
    assert {"python", "numpy", "torch"} <= set(last["rng"])
    assert (run_dir / "config.yaml").read_text() == dump_config(parse_config(yaml_load(run_dir / "config.yaml")))


def test_run_writes_metrics_events(run_a: tuple[Path, dict[str, Any]]) -> None:
    run_dir, final = run_a
    events = read_metrics(run_dir)
    assert [e["event"] for e in events] == ["teacher", "epoch", "epoch", "epoch", "final"]
    teacher = events[0]
    assert set(teacher) == {"event", "val", "test"}
    assert set(teacher["val"]) == {"top1", "top5", "loss"}
    epochs = events[1:4]
    assert [(e["stage"], e["stage_name"], e["epoch"], e["global_step"]) for e in epochs] == [
        (0, "l2", 1, 16), (0, "l2", 2, 32), (1, "pad", 1, 48)]
    for e in epochs:
        assert set(e) == {"event", "stage", "stage_name", "epoch", "global_step", "lr", "train", "val",
                          "time_s", "samples_per_s"}
        assert set(e["train"]) == {"task", "hint", "total"}
        assert e["train"]["total"] == pytest.approx(e["train"]["task"] + e["train"]["hint"], rel=1e-5)
        assert set(e["val"]) == {"top1", "top5", "loss"}
        assert 0 <= e["val"]["top1"] <= e["val"]["top5"] <= 100
    assert epochs[2]["lr"] == pytest.approx(0.005)  # constant schedule in stage 2
    assert epochs[1]["lr"] < 0.001  # cosine near its end
    assert events[-1] == {"event": "final", **final}
    assert json.loads((run_dir / "final.json").read_text()) == final
    assert final["split"] == "test" and set(final["last"]) == {"top1", "top5", "loss"}
    assert set(final) == {"primary_metric", "best_stage_epoch", "best_val", "split", "last", "best", "engine"}
    assert final["primary_metric"] == "top1"
    best_epoch = next(e for e in epochs if [e["stage"], e["epoch"]] == final["best_stage_epoch"])
    assert best_epoch["val"]["top1"] == final["best_val"] == max(e["val"]["top1"] for e in epochs)


def test_run_writes_per_sample_records(run_a: tuple[Path, dict[str, Any]]) -> None:
    run_dir, _ = run_a
    assert sorted(p.name for p in (run_dir / "records").iterdir()) == [
        "0-l2-test.csv", "0-l2-test.hint.elements.csv", "1-pad-test.csv", "1-pad-test.hint.elements.csv"]
    with open(run_dir / "records" / "1-pad-test.hint.elements.csv", newline="") as f:
        elements = list(csv.reader(f))
    assert elements[0] == ["element", "discrepancy", "log_var", "inv_var"] and len(elements) == 1 + 16  # teacher's 16-d
    with open(run_dir / "records" / "1-pad-test.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", "target", "student_pred", "student_correct", "student_confidence", "teacher_pred",
                       "teacher_correct", "teacher_confidence", "teacher_true_prob", "hint.discrepancy", "hint.weight",
                       "hint.log_var", "hint.inv_var"]
    body = rows[1:]
    assert len(body) == TEST_SIZE
    assert [int(r[0]) for r in body] == list(range(TEST_SIZE))
    for r in body:
        discrepancy, weight, log_var, inv_var = float(r[9]), float(r[10]), float(r[11]), float(r[12])
        assert discrepancy >= 0 and weight > 0 and math.isfinite(log_var)
        assert inv_var >= math.exp(-log_var) * (1 - 1e-3)  # mean of exp(-s) >= exp(-mean s)
        assert 0 <= int(r[1]) < 10
        assert int(r[3]) == int(r[2] == r[1]) and int(r[6]) == int(r[5] == r[1])  # correctness columns
    with open(run_dir / "records" / "0-l2-test.csv", newline="") as f:
        header = next(csv.reader(f))
    assert "hint.log_var" not in header and header[-2:] == ["hint.discrepancy", "hint.weight"]


def test_tensorboard_scalars_are_written(tmp_path: Path, plain_config) -> None:
    raw = plain_config(tmp_path / "run")
    raw["log"] = {"tensorboard": True, "progress": "none", "interval": 4}
    run(raw)
    files = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"step/total", "step/lr", "val/top1", "train/task"} <= tags
    assert [e.step for e in acc.Scalars("step/total")] == [4, 8, 12, 16]


# ---------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def run_b(tmp_path_factory: pytest.TempPathFactory, distill_config) -> tuple[Path, dict, dict]:
    """The reference run interrupted mid-epoch (stage 0, epoch 2, after 4 of 16 steps), then resumed."""
    run_dir = tmp_path_factory.mktemp("run_b") / "run"
    interrupted, final = interrupt_then_resume(distill_config(run_dir), STEPS_PER_EPOCH + 4)
    return run_dir, interrupted, final


def test_interrupt_saves_a_mid_epoch_checkpoint(run_b: tuple[Path, dict, dict]) -> None:
    _, interrupted, _ = run_b
    progress = interrupted["progress"]
    assert (progress["stage"], progress["epoch"], progress["batch"], progress["global_step"]) == (0, 1, 4, 20)
    assert set(interrupted["meters"]) == {"task", "hint", "total", "steps"}
    assert float(interrupted["meters"]["steps"]) == 4


def test_resume_mid_epoch_replays_the_interrupted_stage_exactly(run_a, run_b) -> None:
    (a_dir, _), (b_dir, _, _) = run_a, run_b
    a_events, b_events = epoch_events(a_dir), epoch_events(b_dir)
    assert [e for e in b_events if e["stage"] == 0] == [e for e in a_events if e["stage"] == 0]
    kinds = [e["event"] for e in read_metrics(b_dir)]
    assert kinds == ["teacher", "epoch", "resume", "epoch", "epoch", "final"]  # no duplicate or stale events
    resumed = next(e for e in read_metrics(b_dir) if e["event"] == "resume")
    assert resumed == {"event": "resume", "stage": 0, "epoch": 1, "batch": 4, "global_step": 20,
                       "checkpoint": "last.pt", "changes": {}}


def test_resume_mid_epoch_matches_the_uninterrupted_run(run_a, run_b) -> None:
    (a_dir, a_final), (b_dir, _, b_final) = run_a, run_b
    assert b_final == a_final
    assert_same_tensors(last_checkpoint(a_dir)["student"], last_checkpoint(b_dir)["student"])
    assert_same_tensors(last_checkpoint(a_dir)["terms"], last_checkpoint(b_dir)["terms"])
    assert epoch_events(b_dir) == epoch_events(a_dir)


def test_resume_across_the_stage_boundary_matches(tmp_path: Path, run_a, distill_config) -> None:
    a_dir, a_final = run_a
    run_dir = tmp_path / "run"
    interrupted, final = interrupt_then_resume(distill_config(run_dir), 2 * STEPS_PER_EPOCH + 1)
    assert {k: interrupted["progress"][k] for k in ("stage", "epoch", "batch")} == {"stage": 1, "epoch": 0, "batch": 1}
    assert final == a_final
    assert_same_tensors(last_checkpoint(a_dir)["student"], last_checkpoint(run_dir)["student"])
    assert_same_tensors(last_checkpoint(a_dir)["terms"], last_checkpoint(run_dir)["terms"])
    assert epoch_events(run_dir) == epoch_events(a_dir)
    assert (run_dir / "records" / "1-pad-test.csv").read_text() == (a_dir / "records" / "1-pad-test.csv").read_text()


def test_resume_mid_epoch_of_a_plain_run_matches(tmp_path: Path, plain_config) -> None:
    reference = run(plain_config(tmp_path / "a", epochs=2))
    raw = plain_config(tmp_path / "b", epochs=2)
    interrupted, final = interrupt_then_resume(raw, STEPS_PER_EPOCH + 3)
    assert interrupted["progress"]["batch"] == 3 and interrupted["terms"] == {}
    assert final == reference
    assert_same_tensors(last_checkpoint(tmp_path / "a")["student"], last_checkpoint(tmp_path / "b")["student"])
    assert epoch_events(tmp_path / "b") == epoch_events(tmp_path / "a")


def test_resume_of_a_start_killed_before_its_first_checkpoint_starts_it_over(tmp_path: Path, plain_config) -> None:
    reference = run(plain_config(tmp_path / "a"))
    killed = tmp_path / "b"
    killed.mkdir()  # what a kill -9 between config.yaml and the first checkpoint leaves
    (killed / "config.yaml").write_bytes((tmp_path / "a" / "config.yaml").read_bytes())
    assert Trainer(parse_config(plain_config(killed)), resume=True, quiet=True).run().final == reference


def test_resume_without_checkpoint_is_refused_and_writes_nothing(tmp_path: Path, plain_config) -> None:
    with pytest.raises(PadkdError, match="holds no run to resume"):  # never a fresh run in the wrong place
        Trainer(parse_config(plain_config(tmp_path / "b")), resume=True, quiet=True).run()
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------- guards


def test_teacher_checkpoint_of_another_architecture(tmp_path: Path, distill_config, teacher_dir: Path) -> None:
    raw = distill_config(tmp_path / "run")
    raw["teacher"]["model"]["widths"] = [8, 32]
    with pytest.raises(PadkdError) as info:
        run(raw)
    message = str(info.value)
    assert "teacher.checkpoint" in message and "'widths': [8, 16]" in message and "'widths': [8, 32]" in message
    assert "\n" not in message


def test_a_run_that_failed_at_setup_does_not_block_its_output_dir(tmp_path: Path, distill_config) -> None:
    raw = distill_config(tmp_path / "run", stage1_epochs=1)
    bad = copy.deepcopy(raw)
    bad["teacher"]["model"]["widths"] = [8, 32]
    with pytest.raises(PadkdError, match="teacher.checkpoint"):
        run(bad)
    run(raw)


def test_output_dir_holding_a_run_needs_resume(run_a, distill_config) -> None:
    run_dir, _ = run_a
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(PadkdError, match=r"already holds a run; pass --resume"):
        run(distill_config(run_dir))
    changed = distill_config(run_dir)
    changed["seed"] = 1
    with pytest.raises(PadkdError, match="holds a run whose 'seed' was 0, not 1"):
        Trainer(parse_config(changed), resume=True, quiet=True).run()
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_non_empty_directory_without_a_run(tmp_path: Path, plain_config) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(PadkdError, match="is not empty and holds no padkd run"):
        run(plain_config(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]


def test_batch_larger_than_the_training_split(tmp_path: Path, plain_config) -> None:
    raw = plain_config(tmp_path / "run")
    raw["data"]["batch_size"] = 5000
    with pytest.raises(PadkdError, match="lower data.batch_size"):
        run(raw)


# ---------------------------------------------------------------- non-finite losses


def test_exploding_learning_rate_stops_with_a_named_error(tmp_path: Path, plain_config) -> None:
    raw = plain_config(tmp_path / "run")
    raw["stages"][0]["optimizer"]["lr"] = 1.0e6
    with pytest.raises(NonFiniteLossError) as info:
        run(raw)
    message = str(info.value)
    assert "loss 'task'" in message and "stage 'train'" in message and "global step" in message
    assert "lower the learning rate" in message and "\n" not in message
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "run" / "final.json").exists()


def test_non_finite_term_keeps_the_last_good_checkpoint(tmp_path: Path, distill_config) -> None:
    raw = distill_config(tmp_path / "run", stage1_epochs=1, stage2_epochs=1)
    raw["stages"][1]["terms"][0]["weight"] = 1.0e39  # overflows float32: the hint loss is inf at once
    with pytest.raises(NonFiniteLossError) as info:
        run(raw)
    assert "loss 'hint'" in str(info.value) and "stage 'pad'" in str(info.value)
    last = last_checkpoint(tmp_path / "run")
    assert {k: last["progress"][k] for k in ("stage", "epoch", "batch", "global_step")} == {
        "stage": 0, "epoch": 1, "batch": 0, "global_step": STEPS_PER_EPOCH}
    assert all(torch.isfinite(v).all() for v in last["student"].values() if v.is_floating_point())


def test_interrupt_after_a_non_finite_loss_does_not_save_nan_weights(tmp_path: Path, plain_config) -> None:
    raw = plain_config(tmp_path / "run")
    raw["stages"][0]["optimizer"]["lr"] = 1.0e6
    with pytest.raises(PadkdError):
        run(raw, callbacks=[stop_at(3)])
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    if path.exists():
        student = ckpt.load(path)["student"]
        assert all(torch.isfinite(v).all() for v in student.values() if v.is_floating_point())


# ---------------------------------------------------------------- plain training


def test_plain_training_without_teacher(tmp_path: Path, plain_config) -> None:
    run_dir = tmp_path / "run"
    final = run(plain_config(run_dir, epochs=2))
    assert final["best"]["top1"] > 20  # well above chance (10%) after two epochs
    assert not (run_dir / "records").exists()
    assert [e["event"] for e in read_metrics(run_dir)] == ["epoch", "epoch", "final"]
    assert set(epoch_events(run_dir)[0]["train"]) == {"task", "total"}
    last = last_checkpoint(run_dir)
    assert last["terms"] == {} and last["progress"]["global_step"] == 2 * STEPS_PER_EPOCH
    assert run(plain_config(tmp_path / "again", epochs=2)) == final  # seeded: the same numbers


# ---------------------------------------------------------------- DDP


def _torchrun() -> str:
    path = Path(sys.executable).parent / "torchrun"
    if not path.exists():
        pytest.skip("torchrun is not installed next to the interpreter")
    return str(path)


_LATE_RANK = textwrap.dedent("""
    import os, sys, time
    from padkd.engine.trainer import Trainer
    prepare = Trainer._resume_state
    def late(self):
        if self.rank == int(os.environ["LATE_RANK"]):
            time.sleep(1.5)
        return prepare(self)
    Trainer._resume_state = late
    from padkd.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _launch_cli(args: list[str], cwd: Path, late_rank: int) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc_per_node 2` of `padkd.cli.main(args)`, one rank reaching the
    run-directory check 1.5 s after the other.

    Rank 0 alone checks the run directory and tells the others (test_ddp_fresh_output_dir_race): with
    either rank late, the run must go through.
    """
    script = cwd / "late_rank.py"
    script.write_text(_LATE_RANK)
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1", "LATE_RANK": str(late_rank)}
    return subprocess.run([_torchrun(), "--standalone", "--nproc_per_node", "2", str(script), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, distill_config, write_yaml) -> tuple[Path, Any]:
    """`padkd train` under torchrun with 2 CPU ranks (gloo) on digits: one PAD-L2 stage of one epoch."""
    base = tmp_path_factory.mktemp("ddp")
    raw = distill_config(base / "run")
    raw["stages"] = raw["stages"][1:]
    raw["stages"][0]["epochs"] = 1
    config = write_yaml(base / "ddp.yaml", raw)
    proc = _launch_cli(["train", str(config), "--quiet"], cwd=base, late_rank=0)
    return base / "run", proc


@pytest.mark.slow
def test_ddp_training_with_torchrun(ddp_run) -> None:
    run_dir, proc = ddp_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    final = json.loads((run_dir / "final.json").read_text())
    assert [e["event"] for e in read_metrics(run_dir)] == ["teacher", "epoch", "final"]
    epoch = read_metrics(run_dir)[1]
    assert epoch["global_step"] == 8  # 1079 samples over 2 ranks: 540 per rank, 8 batches of 64
    assert read_metrics(run_dir)[0]["test"]["top1"] > 0
    printed = proc.stdout[proc.stdout.index("{"):]
    assert json.loads(printed[: printed.index("\n}") + 2])["last"] == final["last"]
    assert (run_dir / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_ddp_records_hold_every_sample(ddp_run) -> None:
    run_dir, proc = ddp_run
    assert proc.returncode == 0
    with open(run_dir / "records" / "0-pad-test.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert sorted(int(r[0]) for r in rows) == list(range(TEST_SIZE))


@pytest.mark.slow
def test_ddp_final_metrics_are_those_of_the_saved_student(ddp_run) -> None:
    run_dir, proc = ddp_run
    assert proc.returncode == 0
    final = json.loads((run_dir / "final.json").read_text())
    assert final["best_stage_epoch"] == [0, 1]  # one epoch: best.pt and last.pt hold the same weights
    assert final["last"] == final["best"]


@pytest.mark.slow
def test_ddp_fresh_output_dir_race(tmp_path: Path, plain_config, write_yaml) -> None:
    config = write_yaml(tmp_path / "plain.yaml", plain_config(tmp_path / "run"))
    proc = _launch_cli(["train", str(config), "--quiet"], cwd=tmp_path, late_rank=1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "final.json").is_file()


@pytest.mark.parametrize("carry", [True, False])
def test_stage2_starts_from_the_stage1_connector_unless_carry_is_off(tmp_path: Path, distill_config,
                                                                     carry: bool) -> None:
    """The reference recipe renews only the PAD head: the hint's connector carries over to stage 2."""
    from padkd.engine.records import read_csv

    raw = distill_config(tmp_path / "run", stage1_epochs=2, stage2_epochs=1)
    raw["stages"][1]["optimizer"]["lr"] = 1e-12  # stage 2 leaves the modules where it found them
    raw["stages"][1]["terms"][0]["carry"] = carry
    Trainer(parse_config(raw), quiet=True).run()
    stage1 = read_csv(tmp_path / "run" / "records" / "0-l2-test.csv")["hint.discrepancy"]
    stage2 = read_csv(tmp_path / "run" / "records" / "1-pad-test.csv")["hint.discrepancy"]
    # BN statistics still move in stage 2, so compare scales: a fresh random connector is far off.
    ratio = sum(stage2) / sum(stage1)
    print(f"carry={carry}: mean stage-2 / stage-1 discrepancy = {ratio:.3f}")
    assert (0.7 < ratio < 1.3) is carry


def test_term_lr_scale_gives_the_term_its_own_parameter_group(tmp_path: Path, distill_config) -> None:
    from padkd.assemble import make_data, make_distiller, make_model, make_task
    from padkd.engine.stage import StageRun

    raw = distill_config(tmp_path / "run")
    raw["stages"][1]["terms"][0]["lr_scale"] = 10.0
    cfg = parse_config(raw)
    data, task = make_data(cfg), make_task(cfg.task)
    student, teacher = make_model(cfg.student, data, task, "student"), make_model(cfg.teacher, data, task, "teacher")
    stage = cfg.stages[1]
    distiller = make_distiller(cfg, stage, student, teacher, task, "stages[1]")
    distiller.prepare(task.collate([data.train[i] for i in range(8)]), data.info())
    optimizer = StageRun(stage, distiller, cfg.engine, torch.device("cpu"), world=1).optimizer
    # the student, then the term's method (its connector) and its weighting (PAD's head), each at 10x
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([stage.optimizer.lr, 10 * stage.optimizer.lr, 10 * stage.optimizer.lr])
    term_params = {id(p) for p in distiller.terms.parameters()}
    assert {id(p) for g in optimizer.param_groups[1:] for p in g["params"]} == term_params
    assert not term_params & {id(p) for p in optimizer.param_groups[0]["params"]}


# ---------------------------------------------------------------- the training step (StageRun)


def _stage_run(accumulate: int = 1, clip: float | None = None, precision: str = "fp32",
               momentum: float = 0.0) -> tuple[Any, Any]:
    from padkd.config import EngineConfig, StageConfig
    from padkd.distiller import Distiller
    from padkd.engine.stage import StageRun
    from padkd.models import MODELS
    from padkd.tasks import Classification

    torch.manual_seed(0)
    student = MODELS.create("mlp", {"hidden": [16]}, in_channels=1, num_classes=10)
    stage = StageConfig.model_validate({"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": momentum,
                                                                   "weight_decay": 0.0}})
    engine = EngineConfig(accumulate=accumulate, clip_grad_norm=clip, precision=precision)
    run = StageRun(stage, Distiller(student, task=Classification()), engine, torch.device("cpu"), world=1)
    run.distiller.train()
    return run, student


def _digits_batch(n: int = 64) -> Any:
    from padkd.batch import Batch

    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n))


def test_gradient_accumulation_equals_the_large_batch_step() -> None:
    batch = _digits_batch()
    whole, student_a = _stage_run()
    whole.step(batch)
    halves, student_b = _stage_run(accumulate=2)
    first, second = (batch.replace(inputs=batch.inputs[s], targets=batch.targets[s], index=batch.index[s])
                     for s in (slice(0, 32), slice(32, 64)))
    halves.step(first)
    assert halves.pending == 1 and all(p.grad is not None for p in student_b.parameters())
    halves.step(second)
    assert halves.pending == 0
    for (name, a), b in zip(student_a.state_dict().items(), student_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_term_ramps_count_optimizer_steps_under_accumulation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            distill_config) -> None:
    """With accumulate: 2 a PAD term's 5-step warm-up ends after 5 optimizer steps (10 micro-batches); the
    stage's step count is saved in last.pt, so a resumed run's clock continues where it stopped."""
    from padkd.distiller import Distiller

    seen: list[tuple[int, int | None]] = []
    forward = Distiller.forward

    def spy(self: Distiller, batch: Any, step: int | None = None, split: str = "train") -> Any:
        if self.training and self.terms:
            seen.append((self._ramps["hint"], step))
        return forward(self, batch, step, split)

    monkeypatch.setattr(Distiller, "forward", spy)
    raw = distill_config(tmp_path / "run", stage1_epochs=1, stage2_epochs=1)
    raw["engine"] = {"accumulate": 2}
    raw["stages"][1]["terms"][0]["weighting"]["warmup_steps"] = 5
    run(raw)
    assert [ramp for ramp, _ in seen] == [0] * STEPS_PER_EPOCH + [5] * STEPS_PER_EPOCH  # L2 stage: no ramp
    stage2 = [step for _, step in seen[STEPS_PER_EPOCH:]]
    assert stage2 == [k // 2 for k in range(STEPS_PER_EPOCH)]  # two micro-batches share each optimizer step
    assert last_checkpoint(tmp_path / "run")["stage_steps"] == STEPS_PER_EPOCH // 2


def test_flush_steps_on_a_partial_group_at_its_mean_gradient() -> None:
    batch = _digits_batch(32)
    full, student_a = _stage_run()
    full.step(batch)
    partial, student_b = _stage_run(accumulate=4)
    partial.step(batch)
    assert partial.flush() and not partial.flush()
    for a, b in zip(student_a.parameters(), student_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_bounds_the_update() -> None:
    batch = _digits_batch()
    run, student = _stage_run(clip=1e-3)
    before = torch.cat([p.detach().flatten().clone() for p in student.parameters()])
    run.step(batch)
    after = torch.cat([p.detach().flatten() for p in student.parameters()])
    assert (after - before).norm().item() == pytest.approx(0.1 * 1e-3, rel=1e-3)  # lr × clip (plain SGD)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_step_keeps_fp32_weights_and_losses(precision: str) -> None:
    run, student = _stage_run(precision=precision)
    losses = run.step(_digits_batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert run.scaler.is_enabled() == (precision == "fp16")
    assert ("scale" in run.state_dict()["scaler"]) == (precision == "fp16")


def test_resume_with_accumulation_fp16_and_clipping_matches(tmp_path: Path, plain_config) -> None:
    def config(out: Path) -> dict[str, Any]:
        raw = plain_config(out, epochs=2)
        raw["data"]["batch_size"] = 32
        raw["engine"] = {"accumulate": 2, "precision": "fp16", "clip_grad_norm": 5.0}
        return raw

    reference = run(config(tmp_path / "a"))
    interrupted, final = interrupt_then_resume(config(tmp_path / "b"), 20)
    assert interrupted["progress"]["batch"] == 6 and "scale" in interrupted["scaler"]  # 33 - 2·16 micro-batches
    assert final == reference
    assert_same_tensors(last_checkpoint(tmp_path / "a")["student"], last_checkpoint(tmp_path / "b")["student"])
    events = epoch_events(tmp_path / "a")
    assert [e["global_step"] for e in events] == [17, 34]  # 16 full groups + 1 flushed partial per epoch


@pytest.mark.slow
def test_compile_traces_a_bounded_number_of_graphs_and_keeps_state_dict_keys(tmp_path: Path,
                                                                             distill_config) -> None:
    import torch._dynamo.utils as dynamo_utils

    raw = distill_config(tmp_path / "run", stage1_epochs=2, stage2_epochs=1)
    raw["engine"] = {"compile": True, "compile_backend": "aot_eager"}
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    graphs: dict[int, int] = {}

    def count(trainer: Trainer, step: int) -> None:
        graphs[step] = dynamo_utils.counters["stats"]["unique_graphs"]

    run(raw, callbacks=[count])
    steps = sorted(graphs)
    assert len(steps) == 3 * STEPS_PER_EPOCH
    # Graphs appear in the first epoch (train, and evaluation at its end); the second adds none, and the
    # second stage (new terms, the same run-long taps) adds a bounded few.
    assert graphs[2 * STEPS_PER_EPOCH] == graphs[STEPS_PER_EPOCH + 1] <= 8
    assert graphs[steps[-1]] <= graphs[2 * STEPS_PER_EPOCH] + 4
    table = (tmp_path / "run/records/1-pad-test.csv").read_text().splitlines()
    assert len(table) == TEST_SIZE + 1 and "hint.log_var" in table[0]  # stage 2 read its taps under compile
    keys = set(last_checkpoint(tmp_path / "run")["student"])
    assert keys == set(torch.load(tmp_path / "run/checkpoints/best.pt", weights_only=True)["student"])
    assert not any("_orig_mod" in k for k in keys)


def test_a_bf16_teacher_trains_a_student_and_is_recorded_in_the_config(tmp_path: Path, distill_config) -> None:
    raw = distill_config(tmp_path / "run", stage1_epochs=1, stage2_epochs=0)
    raw["stages"] = raw["stages"][:1]
    raw["teacher"] = {**raw["teacher"], "precision": "bf16", "device": "cpu"}
    final = run(raw)
    assert math.isfinite(final["last"]["top1"])
    assert "precision: bf16" in (tmp_path / "run" / "config.yaml").read_text()
