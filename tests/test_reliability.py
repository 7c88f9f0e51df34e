"""Reliability at the edges: a kill at any write, non-finite weights, one run per directory, failed
starts, planted symlinks, self-destructive exports, hostile config files, malformed checkpoints and data.
Each test failed before its fix."""

from __future__ import annotations

import copy
import gzip
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from padkd import checkpoint as ckpt
from padkd import files
from padkd.assemble import make_data, make_model, make_task
from padkd.cli import main
from padkd.config import load_config, parse_config
from padkd.engine import rundir
from padkd.engine.logging import MetricsLog, read_metrics
from padkd.engine.trainer import Trainer
from padkd.errors import NonFiniteLossError, PadkdError
from padkd.validate import parse_checked


class SimulatedKill(BaseException):
    """Stands for SIGKILL at one write: nothing after it runs (it is no Exception, so nothing catches it)."""


def run(raw: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return Trainer(parse_config(copy.deepcopy(raw)), quiet=True, **kwargs).run().final


def write_yaml(path: Path, raw: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------- 1. a kill at every write


def _writes(monkeypatch: pytest.MonkeyPatch, kill_at: int | None) -> list[str]:
    """Count the run's writes (whole files: config.yaml, checkpoints, final.json; and metrics events); raise
    SimulatedKill before write `kill_at`."""
    seen: list[str] = []
    save, event = files.atomic_write, MetricsLog.event

    def guard(what: str) -> None:
        if kill_at is not None and len(seen) == kill_at:
            raise SimulatedKill(what)
        seen.append(what)

    def atomic_write(path: Path, write: Any) -> None:
        guard(path.name)
        save(path, write)

    def logged(self: MetricsLog, record: dict[str, Any], step: int | None = None) -> None:
        guard(record["event"])
        event(self, record, step)

    monkeypatch.setattr(files, "atomic_write", atomic_write)
    monkeypatch.setattr(MetricsLog, "event", logged)
    return seen


@pytest.mark.slow
def test_a_kill_at_any_write_resumes_to_the_same_run_and_the_same_best(tmp_path: Path, plain_config,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    raw = plain_config(tmp_path / "reference", epochs=3)
    with monkeypatch.context() as patch:
        writes = _writes(patch, None)
        reference = run(raw)
    assert writes.count("last.pt") == 3 and writes[0] == "config.yaml" and writes[-2:] == ["final", "final.json"]
    best_ref = ckpt.load(tmp_path / "reference/checkpoints/best.pt")
    events_ref = [e for e in read_metrics(tmp_path / "reference") if e["event"] == "epoch"]
    for k in range(len(writes)):
        out = tmp_path / f"kill{k}"
        with monkeypatch.context() as patch:
            _writes(patch, k)
            with pytest.raises(SimulatedKill):
                run({**raw, "output_dir": str(out)})
        again = parse_config({**raw, "output_dir": str(out)})
        if not out.exists():  # killed before its first write: the start left nothing, so nothing resumes
            with pytest.raises(PadkdError, match="holds no run to resume"):
                Trainer(again, resume=True, quiet=True).run()
            resumed = Trainer(again, quiet=True).run().final
        else:
            resumed = Trainer(again, resume=True, quiet=True).run().final
        assert resumed == reference, f"kill before write {k} ({writes[k]})"
        best = ckpt.load(out / "checkpoints/best.pt")
        assert best["progress"]["best_at"] == best_ref["progress"]["best_at"]
        assert all(torch.equal(best["student"][n], t) for n, t in best_ref["student"].items()), writes[k]
        events = [e for e in read_metrics(out) if e["event"] == "epoch"]
        assert [(e["stage"], e["epoch"], e["val"]) for e in events] == [(e["stage"], e["epoch"], e["val"])
                                                                     for e in events_ref]


def test_resume_repairs_a_best_checkpoint_older_than_the_best_epoch(tmp_path: Path, plain_config) -> None:
    out = tmp_path / "run"
    run(plain_config(out, epochs=1))
    last = ckpt.load(out / "checkpoints/last.pt")
    stale = copy.deepcopy(last)
    stale["progress"]["best_at"] = [0, 0]
    stale["student"] = {k: torch.zeros_like(v) for k, v in stale["student"].items()}
    ckpt.atomic_save(stale, out / "checkpoints/best.pt")
    assert rundir.repair_best(out, last)
    repaired = ckpt.load(out / "checkpoints/best.pt")
    assert all(torch.equal(repaired["student"][k], v) for k, v in last["student"].items())
    assert not rundir.repair_best(out, last)  # consistent now


# ---------------------------------------------------------------- 2. no non-finite checkpoint, strict JSON


def test_weights_that_become_infinite_are_never_saved_and_the_log_stays_strict_json(tmp_path: Path,
                                                                                     plain_config) -> None:
    raw = plain_config(tmp_path / "run", epochs=3, model={"name": "cnn", "widths": [32, 64, 128]})
    raw["data"]["batch_size"] = 1079
    raw["stages"][0]["optimizer"]["lr"] = 1000
    raw["stages"][0]["task_weight"] = 1e37
    with pytest.raises(NonFiniteLossError, match="NaN/inf") as err:
        run(raw)
    assert "no checkpoint was written yet" in str(err.value)
    assert not (tmp_path / "run/checkpoints/last.pt").exists()
    for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_a_non_finite_teacher_is_refused(tmp_path: Path, teacher_dir: Path, distill_config) -> None:
    state = ckpt.load(teacher_dir / "checkpoints/best.pt")
    state["student"] = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v
                        for k, v in state["student"].items()}
    bad = tmp_path / "nan-teacher.pt"
    ckpt.atomic_save({**state, "kind": "export"}, bad)
    raw = distill_config(tmp_path / "run")
    raw["teacher"]["checkpoint"] = str(bad)
    with pytest.raises(PadkdError, match=r"teacher.checkpoint .* holds NaN/inf weights"):
        run(raw)


def test_the_nan_message_names_the_first_bad_step_and_resume_may_lower_the_lr(tmp_path: Path, plain_config,
                                                                              monkeypatch) -> None:
    raw = plain_config(tmp_path / "run", epochs=2)
    raw["log"]["interval"] = 5
    from padkd.tasks.classification import Classification

    loss = Classification.loss

    def poisoned(self: Classification, output: torch.Tensor, batch: Any) -> torch.Tensor:
        value = loss(self, output, batch)
        return value * float("nan") if self.calls == 19 else value

    monkeypatch.setattr(Classification, "calls", 0, raising=False)
    original = Classification.loss

    def counting(self: Classification, output: torch.Tensor, batch: Any) -> torch.Tensor:
        Classification.calls += 1
        return poisoned(self, output, batch)

    monkeypatch.setattr(Classification, "loss", counting)
    with pytest.raises(NonFiniteLossError) as err:
        run(raw)
    assert "at global step 19;" in str(err.value)  # checked at step 20, named where it happened
    assert "--resume stages.0.optimizer.lr=<lower>" in str(err.value)
    monkeypatch.setattr(Classification, "loss", original)
    lowered = {**raw, "stages": [{**raw["stages"][0], "optimizer": {"name": "sgd", "lr": 0.01}}]}
    Trainer(parse_config(lowered), resume=True, quiet=True).run()
    resume_events = [e for e in read_metrics(tmp_path / "run") if e["event"] == "resume"]
    assert resume_events[0]["changes"] == {"stages.0.optimizer.lr": {"was": 0.05, "now": 0.01}}


# ---------------------------------------------------------------- 3. one run per directory


def test_a_second_run_in_a_locked_directory_is_refused_with_the_holders_pid(tmp_path: Path, plain_config) -> None:
    lock = rundir.RunLock(tmp_path / "run")
    lock.acquire()
    try:
        with pytest.raises(PadkdError, match=rf"in use by another padkd process \(pid {os.getpid()}\)"):
            run(plain_config(tmp_path / "run"))
        with pytest.raises(PadkdError, match="in use"):
            Trainer(parse_config(plain_config(tmp_path / "run")), resume=True, quiet=True).run()
    finally:
        lock.release()
    run(plain_config(tmp_path / "run"))  # released: the directory is usable (the lock file is no clutter)


# ---------------------------------------------------------------- 4. failed starts leave the directory usable


def test_every_stage_is_checked_before_training_and_a_failed_start_is_reusable(tmp_path: Path,
                                                                                distill_config) -> None:
    raw = distill_config(tmp_path / "run")
    raw["stages"][1]["trainable"] = ["featurs"]
    with pytest.raises(PadkdError, match=r"stages\[1\]\.trainable: no student module 'featurs'; did you mean"):
        run(raw)
    assert not (tmp_path / "run/config.yaml").exists() and not (tmp_path / "run/checkpoints").exists()
    raw["stages"][1]["terms"][0]["student"] = "fc1:in"
    raw["stages"][1]["trainable"] = None
    with pytest.raises(PadkdError, match="student tap 'fc1:in'"):
        run(raw)
    bad_pad = copy.deepcopy(raw)
    bad_pad["stages"][1]["terms"][0]["weighting"]["eps"] = 0
    with pytest.raises(PadkdError, match=r"stages\[1\]\.terms\[0\]\.weighting: PAD eps must be > 0"):
        parse_checked(bad_pad)
    # A start that died after writing its config but before any checkpoint: the directory is reused.
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run/config.yaml").write_text("name: old\n")
    (tmp_path / "run/metrics.jsonl").write_text('{"event": "teacher"}\n')
    raw["stages"][1]["terms"][0]["student"] = "fc:in"
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0]["epochs"] = 1
    run(raw)
    assert [e["event"] for e in read_metrics(tmp_path / "run")] == ["teacher", "epoch", "final"]


# ---------------------------------------------------------------- 5. atomic, exclusive writes


def test_checkpoint_writes_never_follow_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / f".last.pt.tmp-{os.getpid()}").symlink_to(victim)  # the old, predictable temporary name
    ckpt.atomic_save({"x": torch.ones(2)}, folder / "last.pt")
    assert victim.read_text() == "precious"
    assert torch.equal(torch.load(folder / "last.pt", weights_only=True)["x"], torch.ones(2))


def test_temporaries_of_dead_writers_are_removed_on_start(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    dead = folder / ".last.pt.tmp-999999999-abcd"
    mine = folder / f".best.pt.tmp-{os.getpid()}-efgh"
    dead.write_bytes(b"half a checkpoint")
    mine.write_bytes(b"being written")
    assert files.remove_stale_temporaries(folder) == [dead]
    assert not dead.exists() and mine.exists()


# ---------------------------------------------------------------- 6. and 10. exports and file-system errors


def test_export_refuses_to_overwrite_a_run_checkpoint_or_a_directory(tmp_path: Path, plain_config,
                                                                     capsys, one_line_error) -> None:
    out = tmp_path / "run"
    run(plain_config(out))
    last = out / "checkpoints/last.pt"
    before = last.read_bytes()
    one_line_error(["export", str(last), "-o", str(last)], capsys, "destroy the run's state")
    one_line_error(["export", str(out), "-o", str(last)], capsys, "destroy")
    assert last.read_bytes() == before
    one_line_error(["export", str(out), "-o", str(tmp_path)], capsys, "is a directory")


def test_output_dir_that_is_a_file_or_below_a_file(tmp_path: Path, plain_config, write_yaml,
                                                   capsys, one_line_error) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target in (blocker, blocker / "run"):
        cfg = write_yaml(tmp_path / "c.yaml", plain_config(target))
        one_line_error(["train", str(cfg), "--quiet"], capsys, str(blocker))


# ---------------------------------------------------------------- 7. hostile config files


@pytest.mark.parametrize(("content", "fragment"), [
    ("name: café\n".encode("latin-1"), "not UTF-8 text"),
    ("name: x\n".encode("utf-16"), "not UTF-8 text"),
    (("a: " + "[" * 3000 + "]" * 3000 + "\n").encode(), "nested more than"),
    (b"a: &a [x,x,x,x,x,x,x,x,x,x]\n" + b"".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n".encode() for p, c in zip("abcdefgh", "bcdefghi", strict=True)),
     "expands to more than"),
    (b"a: &a [1, *a]\n", "recursive"),
    (b"#" * (2 << 20), "too large for a config"),
])
def test_hostile_config_files_fail_fast_with_one_line(tmp_path: Path, content: bytes, fragment: str,
                                                      capsys, one_line_error) -> None:
    import time

    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    start = time.perf_counter()
    one_line_error(["train", str(path)], capsys, fragment)
    assert time.perf_counter() - start < 5


def test_error_messages_never_echo_a_huge_value(plain_config) -> None:
    raw = plain_config("unused")
    raw["seed"] = ["x" * 10_000] * 100
    with pytest.raises(PadkdError) as err:
        parse_config(raw)
    assert len(str(err.value)) < 300


# ---------------------------------------------------------------- 8. values that used to crash later


@pytest.mark.parametrize(("override", "fragment"), [
    ("seed=-1", "seed"), ("seed=4294967296", "seed"), ("stages.0.optimizer.momentum=-0.5", "momentum"),
    ("stages.0.optimizer.lr=1e300", "lr"), ("stages.0.optimizer.lr=.inf", "lr"),
    ("data.val_fraction=0.9", "val_fraction"), ("data.test_fraction=-0.1", "test_fraction"),
    ("stages.0.terms.0.weight=.nan", "weight"), ("stages.0.terms.0.weighting.warmup_steps=-1", "warmup_steps"),
])
def test_values_that_pass_types_but_make_no_sense(override: str, fragment: str, tmp_path: Path, plain_config,
                                                 write_yaml, capsys, one_line_error) -> None:
    raw = plain_config(tmp_path / "run")
    raw["teacher"] = {"model": {"name": "cnn", "widths": [4]}}
    raw["stages"][0]["terms"] = [{"method": {"name": "hint"}, "weighting": {"name": "pad"},
                                  "student": "fc:in", "teacher": "fc:in"}]
    cfg = write_yaml(tmp_path / "c.yaml", raw)
    one_line_error(["train", str(cfg), override], capsys, fragment)
    assert not (tmp_path / "run/config.yaml").exists()


@pytest.mark.parametrize(("model", "fragment"), [
    ({"name": "cnn", "widths": [2, 2, 2, 2, 2]}, "student.model 'cnn' cannot take this data's inputs ([64, 1, 8, 8])"),
    ({"name": "mlp", "input_size": 28}, "student.model 'mlp' cannot take this data's inputs"),
])
def test_a_model_that_cannot_take_the_data_is_named_before_training(model: dict[str, Any], fragment: str,
                                                                    tmp_path: Path, plain_config) -> None:
    with pytest.raises(PadkdError) as err:
        run(plain_config(tmp_path / "run", model=model))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run/config.yaml").exists()


# ---------------------------------------------------------------- 9. malformed checkpoints


def test_malformed_checkpoints_get_one_line(tmp_path: Path, plain_config, capsys) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(PadkdError, match="is empty"):
        ckpt.load(empty)
    for name, obj, fragment in [
        ("nostudent.pt", {"format": ckpt.FORMAT, "kind": "export", "model": {"name": "cnn"}}, "'student' is missing"),
        ("types.pt", {"format": ckpt.FORMAT, "kind": "export", "model": {}, "student": {"w": "text"}}, "non-tensor"),
        ("kind.pt", {"format": ckpt.FORMAT, "kind": "mystery"}, "unknown kind"),
    ]:
        torch.save(obj, tmp_path / name)
        with pytest.raises(PadkdError, match=fragment):
            ckpt.load(tmp_path / name)
    out = tmp_path / "run"
    run(plain_config(out))
    exported = tmp_path / "student.pt"
    assert main(["export", str(out), "-o", str(exported)]) == 0
    os.replace(exported, out / "checkpoints/last.pt")
    with pytest.raises(PadkdError, match="--resume needs checkpoints/last.pt of a run"):
        Trainer(parse_config(plain_config(out)), resume=True, quiet=True).run()


def test_a_run_of_the_previous_checkpoint_format_serves_its_weights_but_is_not_resumed(tmp_path: Path,
                                                                                     plain_config, capsys) -> None:
    """Format 1 (the foundation's trainer) stored `aux` instead of `terms` and no write-order fields: its
    student is read as a teacher, evaluated and exported; resuming from it is refused in one line."""
    out = tmp_path / "run"
    run(plain_config(out))
    current = ckpt.load(out / "checkpoints" / "last.pt")
    old = {"format": ckpt.FORMAT, "version": 1, "kind": "run", "model": current["model"],
           "student": current["student"], "aux": {}, "optimizer": current["optimizer"],
           "progress": {"stage": 0, "epoch": 1}, "meters": {}, "rng": current["rng"]}
    teacher = tmp_path / "old" / "checkpoints" / "best.pt"
    teacher.parent.mkdir(parents=True)
    torch.save(old, teacher)
    cfg = parse_config(plain_config(tmp_path / "x"))
    model = make_model(cfg.student, make_data(cfg), make_task(cfg.task), "student")
    ckpt.load_model_weights(model, teacher.parents[1], cfg.student.model, "teacher")
    assert all(torch.equal(v, current["student"][k]) for k, v in model.state_dict().items())
    exported = tmp_path / "student.pt"
    assert main(["export", str(teacher.parents[1]), "-o", str(exported)]) == 0
    assert ckpt.load(exported)["kind"] == "export"
    capsys.readouterr()
    with pytest.raises(PadkdError, match=r"written by another padkd version \(format 1, this is 3\)"):
        ckpt.load(teacher, kind="run")


# ---------------------------------------------------------------- 11. a torn metrics line


def test_a_torn_last_metrics_line_is_repaired_on_resume(tmp_path: Path, plain_config) -> None:
    out = tmp_path / "run"
    reference = run(plain_config(tmp_path / "ref", epochs=2))
    raw = plain_config(out, epochs=2)

    def stop(trainer: Trainer, step: int) -> None:
        if step == 20:
            trainer.request_stop()

    with pytest.raises(PadkdError, match="--resume"):
        run(raw, callbacks=[stop])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"event": "epoch", "stage": 0, "ep')  # the crash came mid-append
    assert Trainer(parse_config(raw), resume=True, quiet=True).run().final == reference
    assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


# ---------------------------------------------------------------- 12. MNIST files with wrong contents


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _mnist(root: Path, train_images: np.ndarray, train_labels: np.ndarray, gz: bool = False) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    files = {"train-images-idx3-ubyte": train_images, "train-labels-idx1-ubyte": train_labels,
             "t10k-images-idx3-ubyte": np.zeros((4, 28, 28)), "t10k-labels-idx1-ubyte": np.arange(4)}
    for name, array in files.items():
        data = _idx(array)
        (raw / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize(("images", "labels", "fragment"), [
    (np.zeros((8, 28, 28)), np.array([0, 1, 2, 3, 4, 5, 6, 10]), "labels must be 0..9"),
    (np.zeros((8, 28, 28)), np.arange(7), "has 8 images but labels of shape (7,)"),
    (np.zeros((8, 784)), np.arange(8), "rank-3 IDX array"),
    (np.zeros((0, 28, 28)), np.zeros(0), "hold no image"),
])
def test_mnist_with_wrong_contents(tmp_path: Path, images: np.ndarray, labels: np.ndarray, fragment: str) -> None:
    from padkd.data import DATASETS

    _mnist(tmp_path, images, labels)
    with pytest.raises(PadkdError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        DATASETS.create("mnist", {"root": str(tmp_path), "val_size": 2}, "data")


def test_mnist_truncated_or_fake_gzip(tmp_path: Path) -> None:
    from padkd.data import DATASETS

    _mnist(tmp_path, np.zeros((8, 28, 28)), np.arange(8) % 10, gz=True)
    path = tmp_path / "MNIST/raw/train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(PadkdError, match="cannot be read"):
        DATASETS.create("mnist", {"root": str(tmp_path), "val_size": 2}, "data")
    path.write_bytes(b"not gzip at all")
    with pytest.raises(PadkdError, match="cannot be read"):
        DATASETS.create("mnist", {"root": str(tmp_path), "val_size": 2}, "data")


# ---------------------------------------------------------------- beyond the list


def test_an_unexpected_exception_ends_with_one_line_and_a_crash_report(tmp_path: Path, plain_config, write_yaml,
                                                                       monkeypatch, capsys) -> None:
    from padkd.engine import trainer as trainer_module

    def broken(self: Trainer) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(trainer_module.Trainer, "run", broken)
    cfg = write_yaml(tmp_path / "c.yaml", plain_config(tmp_path / "run"))
    code = main(["train", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "internal error: ZeroDivisionError: a bug" in err
    reports = list((tmp_path / "run").glob("padkd-crash-*.log"))
    assert len(reports) == 1 and str(reports[0]) in err and "ZeroDivisionError" in reports[0].read_text()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from padkd import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"padkd {__version__}"


def test_extends_merges_bases_from_the_current_directory_and_refuses_cycles(tmp_path: Path, plain_config, write_yaml,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the one path rule: relative to the current directory
    base = plain_config(tmp_path / "run")
    (tmp_path / "bases").mkdir()
    write_yaml(tmp_path / "bases/base.yaml", base)
    write_yaml(tmp_path / "recipe.yaml", {"extends": "bases/base.yaml", "seed": 7,
                                          "data": {"batch_size": 32}})
    cfg = load_config(tmp_path / "recipe.yaml", ["stages.0.epochs=2"])
    assert cfg.seed == 7 and cfg.data.batch_size == 32 and cfg.data.name == "digits" and cfg.stages[0].epochs == 2
    write_yaml(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write_yaml(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(PadkdError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    write_yaml(tmp_path / "c.yaml", {"extends": "missing.yaml"})
    with pytest.raises(PadkdError, match=r"missing.yaml' \(extended by"):
        load_config(tmp_path / "c.yaml")
