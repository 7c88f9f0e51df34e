"""A run directory nobody can turn against its owner (issue 18): planted symlinks are refused, rewrites
are atomic, every file read back is capped and fails in one line, resume keeps honest records and never
restarts a run that has trained. Each test failed before its fix."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import padkd
from padkd import checkpoint as ckpt
from padkd.cli import main
from padkd.config import parse_config
from padkd.engine import rundir
from padkd.engine.logging import MetricsLog, read_metrics
from padkd.engine.trainer import Interrupted, Trainer
from padkd.errors import PadkdError

STEPS_PER_EPOCH = 16  # 1079 digits training images, batch 64


def train(raw: dict[str, Any], resume: bool = False, **kwargs: Any) -> dict[str, Any]:
    return Trainer(parse_config(copy.deepcopy(raw)), resume=resume, quiet=True, **kwargs).run().final


def stop_after(step: int) -> Any:
    def callback(trainer: Trainer, global_step: int) -> None:
        if global_step == step:
            trainer.request_stop()

    return callback


def copy_run(source: Path, target: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of a run directory as if it had been trained at `target` (its config.yaml says so)."""
    shutil.copytree(source, target, symlinks=True)
    config = target / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    saved["output_dir"] = str(target)
    config.write_text(yaml.safe_dump(saved, sort_keys=False))
    return {**copy.deepcopy(raw), "output_dir": str(target)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, plain_config) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """A finished plain run of 2 epochs: (directory, raw config, final)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    raw = plain_config(out, epochs=2)
    return out, raw, train(raw)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory, plain_config) -> tuple[Path, dict[str, Any]]:
    """A plain run of 2 epochs stopped after step 5 of epoch 2: (directory, raw config)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    raw = plain_config(out, epochs=2)
    with pytest.raises(Interrupted):
        train(raw, callbacks=[stop_after(STEPS_PER_EPOCH + 5)])
    return out, raw


# ---------------------------------------------------------------- 1. planted symlinks


@pytest.mark.parametrize("name", [".padkd.lock", "config.yaml", "metrics.jsonl", "checkpoints", "tensorboard"])
def test_a_fresh_start_never_writes_through_a_planted_symlink(name: str, tmp_path: Path, plain_config,
                                                              finished) -> None:
    victim = tmp_path / "victim"
    if name in ("checkpoints", "tensorboard"):  # a folder of someone else's run
        shutil.copytree(finished[0] / "checkpoints", victim)
    else:
        victim.write_text("precious\n")
    before = {p.name: p.read_bytes() for p in victim.iterdir()} if victim.is_dir() else victim.read_bytes()
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(victim)
    raw = plain_config(out)
    raw["log"]["tensorboard"] = name == "tensorboard"
    with pytest.raises(PadkdError, match=f"'{name}' is a symbolic link"):
        train(raw)
    after = {p.name: p.read_bytes() for p in victim.iterdir()} if victim.is_dir() else victim.read_bytes()
    assert after == before
    assert sorted(p.name for p in out.iterdir()) == [name]  # refused before anything was written


@pytest.mark.parametrize("name", ["final.json", "metrics.jsonl", "records", "checkpoints/best.pt"])
def test_resume_never_writes_through_a_planted_symlink(name: str, tmp_path: Path, interrupted) -> None:
    raw = copy_run(interrupted[0], tmp_path / "run", interrupted[1])
    victim = tmp_path / "victim"
    if name == "records":
        victim.mkdir()
    else:
        victim.write_text("precious\n")
    planted = tmp_path / "run" / name
    if planted.exists():
        planted.unlink()
    planted.symlink_to(victim)
    with pytest.raises(PadkdError, match="is a symbolic link"):
        train(raw, resume=True)
    assert (list(victim.iterdir()) == []) if victim.is_dir() else victim.read_text() == "precious\n"


def test_the_lock_and_the_log_open_no_link_even_past_the_checks(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / rundir.LOCK_NAME).symlink_to(victim)
    with pytest.raises(PadkdError, match="symbolic link"):
        rundir.RunLock(tmp_path / "run").acquire()
    (tmp_path / "run" / rundir.LOCK_NAME).unlink()
    os.link(victim, tmp_path / "run" / rundir.LOCK_NAME)  # a hard link: truncating it would destroy the victim
    with pytest.raises(PadkdError, match="not padkd's lock file"):
        rundir.RunLock(tmp_path / "run").acquire()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(PadkdError, match="symbolic link"):
        MetricsLog(tmp_path / "run", tensorboard=False).event({"event": "teacher"})
    assert victim.read_text() == "precious\n"


# ---------------------------------------------------------------- 2. resume never restarts a run that trained


def test_resume_without_last_pt_continues_from_best_pt(tmp_path: Path, plain_config, finished,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    raw = plain_config(out, epochs=2)
    with pytest.raises(Interrupted):
        train(raw, callbacks=[stop_after(STEPS_PER_EPOCH + 3)])
    (out / "checkpoints" / "last.pt").unlink()
    best = ckpt.load(out / "checkpoints" / "best.pt")
    steps: list[int] = []
    with caplog.at_level(logging.WARNING):
        final = train(raw, resume=True, callbacks=[lambda trainer, step: steps.append(step)])
    assert "resuming from checkpoints/best.pt" in caplog.text
    assert steps[0] == best["progress"]["global_step"] + 1 and len(steps) == (2 - best["progress"]["epoch"]) * 16
    assert final == finished[2]  # the replay from best.pt is the same run


def test_a_run_whose_checkpoints_are_gone_is_refused_not_restarted(tmp_path: Path, finished,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    raw = copy_run(finished[0], tmp_path / "run", finished[1])
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    kept = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    for resume in (True, False):
        with pytest.raises(PadkdError, match="no checkpoint") as err:
            train(raw, resume=resume)
        assert "start over in another output_dir" in str(err.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == kept


# ---------------------------------------------------------------- 3. atomic rewrites


@pytest.mark.slow  # subprocesses
def test_rewrites_at_start_keep_the_old_file_when_a_write_fails(tmp_path: Path, interrupted, finished,
                                                                write_yaml) -> None:
    """A write that fails midway (here: over RLIMIT_FSIZE, as a full disk or a kill would) must leave
    metrics.jsonl and config.yaml as they were."""
    raw = copy_run(interrupted[0], tmp_path / "run", interrupted[1])
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"event": "epoch", "sta')  # a torn last line: the resume must rewrite the file
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("metrics.jsonl", "config.yaml")}
    config = write_yaml(tmp_path / "c.yaml", raw)
    script = ("import resource, signal, sys; from padkd.cli import main; import padkd.engine.trainer; "
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (40, -1)); "
              f"sys.exit(main(['train', {str(config)!r}, '--resume', '--quiet']))")
    env = {**os.environ, "PYTHONPATH": str(Path(padkd.__file__).parents[1]), "CI": "true"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before
    assert train(raw, resume=True) == finished[2]


# ---------------------------------------------------------------- 4. and 7. caps and one line on what is read back


BOMB = "bomb0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"bomb{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 5))


@pytest.mark.parametrize(("tail", "fragment"), [
    (BOMB.encode(), "expands to more than"),
    (("deep: " + "[" * 5000 + "]" * 5000 + "\n").encode(), "nested more than"),
    ("note: café\n".encode("latin-1"), "not UTF-8"),
])
def test_a_runs_config_yaml_is_read_within_the_limits(tail: bytes, fragment: str, tmp_path: Path, finished,
                                                      write_yaml, capsys, one_line_error) -> None:
    raw = copy_run(finished[0], tmp_path / "run", finished[1])
    with open(tmp_path / "run" / "config.yaml", "ab") as f:
        f.write(tail)
    config = write_yaml(tmp_path / "c.yaml", raw)
    one_line_error(["train", str(config), "--resume", "--quiet"], capsys, fragment, "config.yaml")
    one_line_error(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")], capsys, fragment)


# ---------------------------------------------------------------- 5. extends


def test_extends_takes_relative_yaml_paths_and_caps_what_it_reads(tmp_path: Path, plain_config, write_yaml,
                                                                  capsys, one_line_error, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # bases are found from the current directory
    secret = tmp_path / "accounts"
    secret.write_text("root: x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "recipes").mkdir()
    for base in (str(secret), "../accounts", str(tmp_path / "recipes" / "base.yaml")):
        write_yaml(tmp_path / "recipes" / "c.yaml", {"extends": base})
        err = one_line_error(["train", str(tmp_path / "recipes" / "c.yaml")], capsys, "relative path to a .yaml")
        assert "/bin/bash" not in err and "x:0:0" not in err
    write_yaml(tmp_path / "shared" / "base.yaml", plain_config(tmp_path / "run"))
    write_yaml(tmp_path / "recipes" / "c.yaml", {"extends": "shared/base.yaml", "seed": 3})
    from padkd.config import load_config

    assert load_config(tmp_path / "recipes" / "c.yaml").seed == 3  # a base in another folder


def test_a_config_is_capped_by_the_bytes_read_not_the_size_reported(capsys, one_line_error) -> None:
    path = Path("/proc/kallsyms")  # reports size 0, holds megabytes
    if not path.is_file() or len(path.read_bytes()) <= 1 << 20:
        pytest.skip("no procfs file larger than the config limit here")
    one_line_error(["train", str(path)], capsys, "too large")


# ---------------------------------------------------------------- 6. the C locale


def _c_locale(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIOENCODING"))}
    env |= {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "CI": "true",
            "PYTHONPATH": str(Path(padkd.__file__).parents[1])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.slow  # subprocesses
def test_the_c_locale_gets_one_line_and_the_right_hint(tmp_path: Path, plain_config, write_yaml) -> None:
    config = write_yaml(tmp_path / "c.yaml", plain_config(tmp_path / "runs" / "café"))
    proc = _c_locale(["-m", "padkd.cli", "train", str(config)], tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "UTF-8 locale" in proc.stderr and "Traceback" not in proc.stderr
    config = write_yaml(tmp_path / "d.yaml", plain_config(tmp_path / "runs" / "plain"))
    proc = _c_locale(["-m", "padkd.cli", "train", str(config), "name=café"], tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "UTF-8 locale" in proc.stderr and "quote it" not in proc.stderr
    crash = ("import argparse; from padkd import cli\n"
             "try:\n    raise ZeroDivisionError('a bug')\n"
             "except ZeroDivisionError:\n    print(cli._crash_report(argparse.Namespace(run_dir='runs/caf\\u00e9')))\n")
    proc = _c_locale(["-c", crash], tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "ZeroDivisionError" in Path(proc.stdout.strip()).read_text()


def test_the_crash_report_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from padkd import cli

    def broken(self: Path, *args: Any, **kwargs: Any) -> None:
        raise UnicodeEncodeError("ascii", "é", 0, 1, "ordinal not in range(128)")

    monkeypatch.setattr(Path, "mkdir", broken)
    try:
        raise ZeroDivisionError("a bug")
    except ZeroDivisionError:
        report = cli._crash_report(argparse.Namespace(run_dir=str(tmp_path / "run")))
    assert "nowhere" in str(report) or "ZeroDivisionError" in report.read_text()


# ---------------------------------------------------------------- 7. bad inputs that were internal errors


def _last(out: Path, edit: Any) -> None:
    path = out / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    ckpt.atomic_save(state, path)


def _shapes(state: dict[str, Any]) -> None:
    first = next(iter(state["optimizer"]["state"]))
    state["optimizer"]["state"][first]["momentum_buffer"] = torch.zeros(3)


RESUME_CASES = {
    "list metrics line": (lambda out: _append(out / "metrics.jsonl", "[1, 2, 3]\n"), "metrics.jsonl"),
    "epoch event without fields": (lambda out: _append(out / "metrics.jsonl", '{"event": "epoch"}\n'),
                                   "metrics.jsonl"),
    "extra progress key": (lambda out: _last(out, lambda s: s["progress"].update(extra=1)), "progress"),
    "wrong-shaped optimizer state": (lambda out: _last(out, _shapes), "optimizer"),
    "bad rng state": (lambda out: _last(out, lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8))),
                      "rng"),
    "non-UTF-8 config.yaml": (lambda out: _append(out / "config.yaml", "# \xe9\n", "latin-1"), "not UTF-8"),
    "deep config.yaml": (lambda out: _append(out / "config.yaml", "x: " + "[" * 3000 + "]" * 3000 + "\n"),
                         "nested more than"),
}


def _append(path: Path, text: str, encoding: str = "utf-8") -> None:
    with open(path, "a", encoding=encoding) as f:
        f.write(text)


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_bad_run_files_on_resume_get_one_line(case: str, tmp_path: Path, interrupted, write_yaml,
                                              capsys, one_line_error) -> None:
    raw = copy_run(interrupted[0], tmp_path / "run", interrupted[1])
    edit, fragment = RESUME_CASES[case]
    edit(tmp_path / "run")
    one_line_error(["train", str(write_yaml(tmp_path / "c.yaml", raw)), "--resume", "--quiet"], capsys, fragment)


def _records(out: Path, text: bytes) -> None:
    (out / "records").mkdir(exist_ok=True)
    (out / "records" / "0-train-test.csv").write_bytes(text)


RECORDS = (b"index,target,teacher_pred,teacher_confidence,pad.discrepancy,pad.log_var\n"
           b"0,1,1,0.9,0.5,-1\n1,2,2,0.8,0.4,-2\n")
REPORT_CASES = {
    "non-UTF-8 records": (lambda out: _records(out, RECORDS + "2,3,3,0.7,0.3,\xe9\n".encode("latin-1")), "not UTF-8"),
    "ragged records": (lambda out: _records(out, RECORDS + b"2,3\n"), "line 4"),
    "torn final.json": (lambda out: (out / "final.json").write_text('{"primary_metric": "top1", "la'),
                        "final.json"),
    "garbage metrics line": (lambda out: _append(out / "metrics.jsonl", '{"event": "epoch", "stage": "x"}\n'),
                             "metrics.jsonl"),
    "non-UTF-8 config.yaml": (lambda out: _append(out / "config.yaml", "# \xe9\n", "latin-1"), "not UTF-8"),
}


@pytest.mark.parametrize("case", list(REPORT_CASES))
def test_bad_run_files_in_a_report_get_one_line(case: str, tmp_path: Path, finished,
                                                capsys, one_line_error) -> None:
    copy_run(finished[0], tmp_path / "run", finished[1])
    edit, fragment = REPORT_CASES[case]
    edit(tmp_path / "run")
    one_line_error(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")], capsys, fragment)


def test_bad_overrides_extends_chains_and_import_options_get_one_line(tmp_path: Path, plain_config, write_yaml,
                                                                      capsys, one_line_error, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_yaml(tmp_path / "c.yaml", plain_config(tmp_path / "run"))
    one_line_error(["train", str(config), "stages.\u00b2.epochs=1"], capsys, "not an index")
    for i in range(1500):
        (tmp_path / f"chain{i}.yaml").write_text(f"extends: chain{i + 1}.yaml\n")
    (tmp_path / "chain1500.yaml").write_text(config.read_text())
    one_line_error(["train", str(tmp_path / "chain0.yaml")], capsys, "extends", "deep")
    from padkd.models import MODELS

    source = tmp_path / "teacher.pth"
    torch.save(MODELS.create("cnn", {"widths": [4, 8]}, "m", in_channels=1, num_classes=10).state_dict(), source)
    out = str(tmp_path / "t.pt")
    one_line_error(["import-teacher", str(source), "--model", "cnn", "--option", "widths=[1", "-o", out], capsys,
              "--option", "not valid YAML")
    one_line_error(["import-teacher", str(source), "--model", "cnn", "--num-classes", "-3", "-o", out], capsys,
              "--num-classes -3")
    assert not Path(out).exists()


def test_raw_pickles_get_padkds_line_and_its_warning_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          write_yaml, plain_config, one_line_error) -> None:
    import pickle
    import warnings

    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"a": 1}, protocol=4))  # torch warns about the protocol, then refuses it
    cfg = plain_config(tmp_path / "run")
    cfg["teacher"] = {"model": {"name": "cnn", "widths": [4, 8]}, "checkpoint": str(raw)}
    cfg["stages"][0]["terms"] = [{"method": {"name": "kd"}}]
    for argv in (["export", str(raw), "-o", str(tmp_path / "x.pt")],
                 ["import-teacher", str(raw), "--model", "cnn", "-o", str(tmp_path / "x.pt")],
                 ["train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--quiet"]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            one_line_error(argv, capsys, "not a readable", "weights_only=False could run arbitrary code")
        assert [str(w.message) for w in caught] == []


# ---------------------------------------------------------------- 8. honest records of a resume


def test_config_yaml_says_what_trained_and_resume_events_say_what_changed(tmp_path: Path, interrupted,
                                                                          finished) -> None:
    raw = copy_run(interrupted[0], tmp_path / "run", interrupted[1])
    written = (tmp_path / "run" / "config.yaml").read_text()
    raised = copy.deepcopy(raw)
    raised["stages"][0]["optimizer"]["lr"] = 0.9
    with pytest.raises(PadkdError, match=r"may only be lowered at resume"):
        train(raised, resume=True)
    lowered = copy.deepcopy(raw)
    lowered["stages"][0]["optimizer"]["lr"] = 0.01
    with pytest.raises(Interrupted):
        train(lowered, resume=True, callbacks=[stop_after(STEPS_PER_EPOCH + 9)])
    assert (tmp_path / "run" / "config.yaml").read_text() == written
    events = [e for e in read_metrics(tmp_path / "run") if e["event"] == "resume"]
    assert events[0]["changes"] == {"stages.0.optimizer.lr": {"was": 0.05, "now": 0.01}}
    assert (events[0]["stage"], events[0]["epoch"], events[0]["batch"], events[0]["global_step"]) == (0, 1, 5, 21)
    with pytest.raises(PadkdError, match="may only be lowered at resume"):  # 0.01 trained since: 0.05 is a raise
        train(raw, resume=True)
    train(lowered, resume=True)  # the same command again continues
    assert (tmp_path / "run" / "config.yaml").read_text() == written
    done = copy.deepcopy(lowered)
    done["stages"][0]["optimizer"]["lr"] = 0.001
    with pytest.raises(PadkdError, match="has finished training"):  # a change that trains nothing is refused
        train(done, resume=True)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "a lower `stages.N.optimizer.lr` for a stage that has not finished" in readme  # what the code does


# ---------------------------------------------------------------- 9. the same directory, however it is named


def test_resume_by_a_relative_path_a_symlink_or_after_a_move(tmp_path: Path, finished,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out, raw, final = finished
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)  # its config.yaml still names the old place
    (tmp_path / "link").symlink_to(moved)
    monkeypatch.chdir(tmp_path)
    logged = {**raw["log"], "interval": 7}  # a resumable change, recorded beside the move
    for name in ("moved", str(tmp_path / "link"), str(moved)):
        assert train({**raw, "output_dir": name, "log": logged}, resume=True) == final
    changes = [e["changes"] for e in read_metrics(moved) if e["event"] == "resume"]
    assert changes == [{"output_dir": {"was": str(out), "now": "moved"}, "log.interval": {"was": 20, "now": 7}},
                       {}, {}]


# ---------------------------------------------------------------- 10. non-finite or impossible state


def test_import_teacher_refuses_nan_weights(tmp_path: Path, capsys, one_line_error) -> None:
    from padkd.models import MODELS

    state = MODELS.create("cnn", {"widths": [4, 8]}, "m", in_channels=3, num_classes=10).state_dict()
    state["fc.weight"][0, 0] = float("nan")  # fits the model import-teacher builds (3 input channels)
    torch.save(state, tmp_path / "nan.pth")
    one_line_error(["import-teacher", str(tmp_path / "nan.pth"), "--model", "cnn", "--option", "widths=[4, 8]",
               "-o", str(tmp_path / "t.pt")], capsys, "NaN/inf", "fc.weight")
    assert not (tmp_path / "t.pt").exists()


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda s: s["student"].__setitem__("fc.weight", s["student"]["fc.weight"] * float("nan")), "NaN/inf"),
    (lambda s: s["progress"].update(stage=99), "stage 99"),
    (lambda s: s["progress"].update(epoch=7), "epoch 7"),
    (lambda s: s["progress"].update(batch=10_000), "batch 10000"),
])
def test_resume_refuses_non_finite_or_impossible_state(edit: Any, fragment: str, tmp_path: Path,
                                                       interrupted) -> None:
    raw = copy_run(interrupted[0], tmp_path / "run", interrupted[1])
    _last(tmp_path / "run", edit)
    with pytest.raises(PadkdError, match=fragment) as err:
        train(raw, resume=True)
    assert "last good checkpoint" not in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "final.json").exists()


# ---------------------------------------------------------------- 11. guarantees no test watched


def test_no_epoch_with_a_non_finite_validation_metric_becomes_the_best(tmp_path: Path, plain_config,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Epoch 1: NaN top-1; epoch 2: finite; epoch 3: a higher top-1 beside an infinite loss. Only epoch 2 is
    the best, in best.pt and in final.json."""
    from padkd.engine import trainer as trainer_module

    real = trainer_module.evaluate
    calls: list[int] = []

    def evaluate(task: Any, model: Any, loader: Any) -> dict[str, float]:
        result = real(task, model, loader)
        calls.append(1)  # a run without a teacher evaluates val once per epoch, then the test split
        return {1: {**result, "top1": float("nan")}, 2: {**result, "top1": 50.0},
                3: {**result, "top1": 90.0, "loss": float("inf")}}.get(len(calls), result)

    monkeypatch.setattr(trainer_module, "evaluate", evaluate)
    final = train(plain_config(tmp_path / "run", epochs=3))
    assert final["best_stage_epoch"] == [0, 2] and final["best_val"] == 50.0
    assert ckpt.load(tmp_path / "run" / "checkpoints" / "best.pt")["progress"]["best_at"] == [0, 2]
    saved = json.loads((tmp_path / "run" / "final.json").read_text())
    assert saved["best_stage_epoch"] == [0, 2] and saved["best_val"] == 50.0


def test_the_lock_is_held_for_the_whole_run_and_the_whole_resume(tmp_path: Path, plain_config) -> None:
    out = tmp_path / "run"
    raw = plain_config(out, epochs=1)
    seen: list[str] = []

    def probe(trainer: Trainer, step: int) -> None:
        if step in (3, STEPS_PER_EPOCH - 1):
            try:
                rundir.RunLock(out).acquire()
            except PadkdError as err:
                seen.append(str(err))
            if step == 3:
                trainer.request_stop()

    with pytest.raises(Interrupted):
        train(raw, callbacks=[probe])
    train(raw, resume=True, callbacks=[probe])
    assert len(seen) == 2 and all("in use by another padkd process" in s for s in seen)


def test_temporaries_of_killed_writers_are_removed_when_a_run_starts(tmp_path: Path, interrupted) -> None:
    raw = copy_run(interrupted[0], tmp_path / "run", interrupted[1])
    stale = [tmp_path / "run" / "checkpoints" / ".last.pt.tmp-999999999-abcd",
             tmp_path / "run" / ".metrics.jsonl.tmp-999999999-efgh"]
    for path in stale:
        path.write_bytes(b"half a file")
    train(raw, resume=True)
    assert not any(path.exists() for path in stale)


def test_every_atomic_write_fsyncs_the_file_and_its_folder(tmp_path: Path, plain_config,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import stat

    synced: list[tuple[str, bool]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), stat.S_ISDIR(mode)))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    train(plain_config(tmp_path / "run"))
    folders = {Path(p).name for p, is_dir in synced if is_dir}
    written = {Path(p).name.split(".tmp-")[0] for p, is_dir in synced if not is_dir}
    assert {"run", "checkpoints"} <= folders
    assert {".config.yaml", ".final.json", ".last.pt", ".best.pt", "metrics.jsonl"} <= written


def test_a_start_that_crashed_leaves_its_directory_reusable(tmp_path: Path, plain_config, write_yaml,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from padkd.engine import trainer as trainer_module

    real = trainer_module.make_data

    def broken(cfg: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(trainer_module, "make_data", broken)
    config = write_yaml(tmp_path / "c.yaml", plain_config(tmp_path / "run"))
    assert main(["train", str(config), "--quiet"]) == 1
    assert len(list((tmp_path / "run").glob("padkd-crash-*.log"))) == 1
    monkeypatch.setattr(trainer_module, "make_data", real)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet"]) == 0, capsys.readouterr().err
