"""The `padkd` console script: list, train, eval, export, demo; user errors exit 2 with one line."""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from padkd import checkpoint as ckpt
from padkd.assemble import make_data, make_model, make_task
from padkd.cli import main
from padkd.config import Component, ModelRef, parse_config


def call(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("padkd: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, distill_config, write_yaml) -> dict[str, Any]:
    """`padkd train CONFIG --quiet` of the L2 → PAD-L2 recipe (1 + 1 epochs), run in-process."""
    base = tmp_path_factory.mktemp("cli")
    raw = distill_config(base / "run", stage1_epochs=1, stage2_epochs=1)
    config = write_yaml(base / "distill.yaml", raw)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", str(config), "--quiet"])
    return {"code": code, "stdout": out.getvalue(), "config": config, "raw": raw, "run_dir": base / "run"}


# ---------------------------------------------------------------- list


@pytest.mark.parametrize(
    ("what", "names"),
    [
        ("methods", {"kd", "hint", "fitnet"}),
        ("weightings", {"uniform", "pad", "ohem", "focal", "softmax_hard", "softmax_easy", "polynomial",
                        "discard_hardest"}),
        ("models", {"cnn", "mlp", "torchvision"}),
        ("datasets", {"digits", "mnist"}),
    ],
)
def test_list_prints_registered_names(what: str, names: set[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = call(["list", what], capsys)
    assert code == 0 and err == ""
    listed = {line.split()[0] for line in out.splitlines()}
    assert names <= listed
    assert all(len(line.split(maxsplit=1)) == 2 for line in out.splitlines())  # name + description


def test_bad_command_line_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["list", "methodz"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])


# ---------------------------------------------------------------- train


def test_train_prints_the_result_as_json(trained: dict[str, Any]) -> None:
    assert trained["code"] == 0
    result = json.loads(trained["stdout"])
    run_dir = trained["run_dir"]
    assert result["run_dir"] == str(run_dir)
    assert result["split"] == "test" and set(result["last"]) == {"top1", "top5", "loss"}
    assert {k: v for k, v in result.items() if k != "run_dir"} == json.loads((run_dir / "final.json").read_text())
    assert (run_dir / "records" / "1-pad-test.csv").is_file()


def test_train_not_quiet_prints_epoch_lines(tmp_path: Path, plain_config, write_yaml,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = write_yaml(tmp_path / "c.yaml", plain_config(tmp_path / "run"))
    code, out, _ = call(["train", str(config), "seed=1", "name=cli"], capsys)
    assert code == 0
    assert out.splitlines()[0].startswith("[train] epoch 1/1 task=")
    assert json.loads(out[out.index("{"):])["run_dir"] == str(tmp_path / "run")
    assert "seed: 1" in (tmp_path / "run" / "config.yaml").read_text()


def test_train_bad_key_is_one_line_exit_2(tmp_path: Path, plain_config, write_yaml,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    raw = plain_config(tmp_path / "run")
    raw["stages"][0]["optimizer"]["lrr"] = 0.1
    config = write_yaml(tmp_path / "bad.yaml", raw)
    code, out, err = call(["train", str(config)], capsys)
    assert_user_error(code, err, "stages[0].optimizer.lrr: unknown key; did you mean 'lr'?")
    assert out == ""
    assert not (tmp_path / "run").exists()


def test_train_bad_override_and_missing_file(tmp_path: Path, plain_config, write_yaml,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    config = write_yaml(tmp_path / "c.yaml", plain_config(tmp_path / "run"))
    assert_user_error(*call(["train", str(config), "stages.3.epochs=2"], capsys)[::2], "not an index")
    assert_user_error(*call(["train", str(tmp_path / "nope.yaml")], capsys)[::2], "nope.yaml", "not found")


def test_train_override_with_invalid_yaml_is_a_user_error(tmp_path: Path, plain_config, write_yaml,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = write_yaml(tmp_path / "c.yaml", plain_config(tmp_path / "run"))
    assert_user_error(*call(["train", str(config), "name=[oops"], capsys)[::2], "name")


def test_train_again_needs_resume(trained: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = call(["train", str(trained["config"]), "--quiet"], capsys)
    assert_user_error(code, err, "already holds a run", "--resume")


def test_console_script_reports_user_errors_without_traceback(tmp_path: Path, plain_config, write_yaml) -> None:
    script = Path(sys.executable).parent / "padkd"
    if not script.exists():
        pytest.skip("the padkd console script is not installed in this environment")
    raw = plain_config(tmp_path / "run")
    raw["stages"][0]["terms"] = [{"method": {"name": "fitnett"}}]
    raw["teacher"] = {"model": {"name": "cnn", "widths": [8, 16]}}
    config = write_yaml(tmp_path / "bad.yaml", raw)
    proc = subprocess.run([str(script), "train", str(config)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CI": "true"})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == ("padkd: error: stages[0].terms[0].method.name: unknown method 'fitnett'; "
                                   "did you mean 'fitnet'?")


# ---------------------------------------------------------------- eval


def test_eval_run_dir_prints_top1(trained: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = trained["run_dir"]
    code, out, err = call(["eval", str(run_dir)], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["checkpoint"] == str(run_dir / "checkpoints" / "best.pt")
    assert result["split"] == "test" and 0 <= result["top1"] <= 100
    final = json.loads((run_dir / "final.json").read_text())
    assert {k: result[k] for k in ("top1", "top5", "loss")} == final["best"]
    code, out, _ = call(["eval", str(run_dir / "checkpoints" / "last.pt"), "--split", "val"], capsys)
    assert code == 0 and json.loads(out)["split"] == "val"


def test_eval_checkpoint_of_another_architecture(trained: dict[str, Any], tmp_path: Path, write_yaml,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    raw = copy.deepcopy(trained["raw"])
    raw["student"]["model"]["widths"] = [8, 16]
    other = write_yaml(tmp_path / "other.yaml", raw)
    code, _, err = call(["eval", str(trained["run_dir"]), "--config", str(other)], capsys)
    assert_user_error(code, err, "student.checkpoint", "'widths': [4, 8]", "'widths': [8, 16]")


def test_eval_without_a_run_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "loose.pt"
    ckpt.atomic_save({"format": ckpt.FORMAT, "model": {"name": "cnn"}, "student": {}}, path)
    assert_user_error(*call(["eval", str(path)], capsys)[::2], "no config.yaml found", "--config")


# ---------------------------------------------------------------- export


def test_export_writes_the_student_alone(trained: dict[str, Any], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, out_file = trained["run_dir"], tmp_path / "student.pt"
    code, out, err = call(["export", str(run_dir), "-o", str(out_file)], capsys)
    assert code == 0, err
    assert "distillation-only tensors such as PAD heads left out" in out
    exported = torch.load(out_file, map_location="cpu", weights_only=True)
    assert "terms" not in exported and "optimizer" not in exported and exported["kind"] == "export"
    assert exported["model"] == {"name": "cnn", "widths": [4, 8]}
    best = ckpt.load(run_dir / "checkpoints" / "best.pt")
    cfg = parse_config(trained["raw"])
    task = make_task(cfg.task)
    model = make_model(cfg.student, make_data(cfg), task, "student")
    assert list(exported["student"]) == list(model.state_dict())
    for key, value in exported["student"].items():
        assert torch.equal(value, best["student"][key])
    fresh = make_model(ModelRef(model=Component(name="cnn", widths=[4, 8])), make_data(cfg), task, "student")
    ckpt.load_model_weights(fresh, out_file, Component(name="cnn", widths=[4, 8]), "student")
    assert all(torch.equal(v, best["student"][k]) for k, v in fresh.state_dict().items())
    with pytest.raises(Exception, match="holds model"):
        ckpt.load_model_weights(fresh, out_file, Component(name="cnn", widths=[4, 16]), "teacher")


def test_export_serves_as_the_teacher_of_another_run(trained: dict[str, Any], tmp_path: Path, write_yaml,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    exported = tmp_path / "teacher.pt"
    assert call(["export", str(trained["run_dir"]), "-o", str(exported)], capsys)[0] == 0
    raw = copy.deepcopy(trained["raw"])
    raw["output_dir"] = str(tmp_path / "second")
    raw["teacher"] = {"model": {"name": "cnn", "widths": [4, 8]}, "checkpoint": str(exported)}
    raw["stages"] = [{"name": "kd", "epochs": 1, "terms": [{"method": {"name": "kd"}}]}]
    config = write_yaml(tmp_path / "second.yaml", raw)
    code, out, err = call(["train", str(config), "--quiet"], capsys)
    assert code == 0, err
    teacher_event = json.loads((tmp_path / "second" / "metrics.jsonl").read_text().splitlines()[0])
    assert teacher_event["event"] == "teacher"
    first_run = json.loads((trained["run_dir"] / "final.json").read_text())
    assert teacher_event["test"] == first_run["best"]  # the exported best student, evaluated as teacher
    code, out, err = call(["eval", str(exported), "--config", str(trained["config"])], capsys)
    assert code == 0, err
    assert {k: json.loads(out)[k] for k in ("top1", "top5", "loss")} == first_run["best"]


def test_export_of_a_foreign_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    code, _, err = call(["export", str(path), "-o", str(tmp_path / "x.pt")], capsys)
    assert_user_error(code, err, "is not a padkd checkpoint")
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------- demo


def test_demo_refuses_a_non_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = call(["demo", "--quick", "--seeds", "1", "--out", str(tmp_path), "--quiet"], capsys)
    assert_user_error(code, err, "--overwrite")
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_demo_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("padkd.report")
    import padkd.demos.classification as demo

    # The demo's teacher (cnn 32-64-128) alone takes ~10 s on two cores; a small one keeps the test quick
    # while running the same code path (teacher, five students, results.json, report).
    monkeypatch.setattr(demo, "TEACHER", {"name": "cnn", "widths": [8, 16]})
    out = tmp_path / "demo"
    code, stdout, err = call(["demo", "--quick", "--seeds", "1", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["none", "kd", "l2", "pad_l2", "ohem_l2"]
    assert set(results["last"]) == set(results["methods"]) and results["metric"] == "top1"
    assert all(set(v) == {"0"} for v in results["last"].values())
    assert results["epochs"] == {"stage1": 2, "stage2": 1, "total": 3}
    assert (out / "report.md").is_file() and (out / "report.md").read_text().strip()
    assert (out / "seed0" / "pad_l2" / "records" / "1-stage2-test.csv").is_file()
    assert "report:" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_to_resume_from(tmp_path: Path, plain_config, write_yaml, sig: str) -> None:
    """Ctrl-C (or a SIGTERM from a scheduler) stops after the current step with a checkpoint to resume."""
    import signal
    import time

    raw = plain_config(tmp_path / "run", epochs=400)
    config = write_yaml(tmp_path / "c.yaml", raw)
    padkd = str(Path(sys.executable).parent / "padkd")
    proc = subprocess.Popen([padkd, "train", str(config), "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "CI": "true"})
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert last.exists(), proc.communicate()
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "--resume" in err and "Traceback" not in err
    progress = ckpt.load(last)["progress"]
    assert 0 < progress["global_step"] < 400 * 16
    # The checkpoint belongs to this config: resuming with a changed one is refused.
    code = subprocess.run([padkd, "train", str(config), "stages.0.epochs=3", "--resume", "--quiet"],
                          capture_output=True, text=True).returncode
    assert code == 2


# ---------------------------------------------------------------- the command line's order, pipes and speed


def test_options_and_overrides_in_any_order(tmp_path: Path, plain_config, write_yaml,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = write_yaml(tmp_path / "c.yaml", plain_config(tmp_path / "unused"))
    from padkd.cli import parse_args

    for argv in (["train", str(config), "--resume", f"output_dir={tmp_path / 'run'}", "seed=2", "--quiet"],
                 ["train", str(config), f"output_dir={tmp_path / 'run'}", "--quiet", "seed=2", "--resume"],
                 ["train", "--quiet", str(config), f"output_dir={tmp_path / 'run'}", "seed=2", "--resume"]):
        args = parse_args(argv)
        assert args.resume and args.quiet and args.overrides == [f"output_dir={tmp_path / 'run'}", "seed=2"]
    with pytest.raises(SystemExit) as done:
        parse_args(["train", str(config), "--resume", "--bogus"])
    assert done.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["export", "run", "-o", "x.pt", "seed=1"])  # export takes no overrides


def test_resume_with_nothing_to_resume_says_so_and_writes_nothing(tmp_path: Path, plain_config, write_yaml,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = write_yaml(tmp_path / "c.yaml", plain_config(tmp_path / "unused"))
    code, out, err = call(["train", str(config), "--resume", f"output_dir={tmp_path / 'runs' / 'new'}"], capsys)
    assert_user_error(code, err, "--resume", "holds no run to resume", "drop --resume")
    assert out == "" and not (tmp_path / "runs").exists()


def test_a_failed_start_leaves_nothing_in_output_dir(tmp_path: Path, plain_config, write_yaml,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    raw = plain_config(tmp_path / "runs" / "run")
    raw["student"]["checkpoint"] = "no/such/teacher.pt"
    config = write_yaml(tmp_path / "c.yaml", raw)
    code, _, err = call(["train", str(config)], capsys)
    assert_user_error(code, err, "student.checkpoint 'no/such/teacher.pt' not found",
                      str(Path.cwd() / "no" / "such" / "teacher.pt"), "relative to the current directory")
    assert not (tmp_path / "runs").exists()  # no .padkd.lock, no empty folders
    (tmp_path / "mine").mkdir()  # an output_dir that existed before the start is kept, and stays empty
    code, _, err = call(["train", str(config), f"output_dir={tmp_path / 'mine'}"], capsys)
    assert code == 2 and list((tmp_path / "mine").iterdir()) == []


def test_a_tap_error_names_its_stage_and_term(tmp_path: Path, distill_config, write_yaml,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    raw = distill_config(tmp_path / "run")
    raw["stages"][1]["terms"][0]["teacher"] = "fc2:in"
    config = write_yaml(tmp_path / "c.yaml", raw)
    code, _, err = call(["train", str(config)], capsys)
    assert_user_error(code, err, "stages[1].terms[0]: teacher tap 'fc2:in': no module 'fc2'")
    assert not (tmp_path / "run").exists()


def test_eval_of_a_missing_run_says_no_such_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = call(["eval", str(tmp_path / "runs" / "nonexistent")], capsys)
    assert_user_error(code, err, "no such run directory", str(tmp_path / "runs" / "nonexistent"))


def test_list_shows_whole_first_sentences_and_one_components_full_text(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from padkd.cli import first_sentence
    from padkd.methods import METHODS

    assert first_sentence("A `pool_size` k\nwindow. Then more.\n\nOther.") == "A `pool_size` k window."
    assert first_sentence("Use e.g. a hint. Next") == "Use e.g. a hint."
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["list", "methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name in METHODS.names():
        assert first_sentence(inspect.getdoc(METHODS.get(name)) or "") in lines[name]
    # this process has loaded the registries (and may have registered test-only parts): listed live, not cached
    assert not list(tmp_path.glob("padkd/catalogue-*.json"))
    assert _padkd(["list", "methods"], cwd=tmp_path, env={"XDG_CACHE_HOME": str(tmp_path)}).returncode == 0
    assert len(list((tmp_path / "padkd").glob("catalogue-*.json"))) == 1  # the cache the next `padkd list` reads
    assert main(["list", "methods", "kd"]) == 0
    out = capsys.readouterr().out
    assert (inspect.getdoc(METHODS.get("kd")) or "") in out and "[weight" in out
    code, _, err = call(["list", "methods", "kdd"], capsys)
    assert_user_error(code, err, "unknown method 'kdd'", "did you mean 'kd'")


def _padkd(args: list[str], cwd: Path, env: dict[str, str] | None = None,
           python: bool = False) -> subprocess.CompletedProcess[str]:
    """`padkd ARGS` (`python ARGS` with `python`) in a subprocess running this checkout's code."""
    environ = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), **(env or {})}
    command = [sys.executable, *args] if python else [sys.executable, "-m", "padkd.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=environ, timeout=300)


def test_version_imports_no_torch(tmp_path: Path) -> None:
    code = "import sys\nfrom padkd.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n" \
           "print('torch' in sys.modules)"
    done = _padkd(["-c", code], tmp_path, python=True)
    assert done.stdout.split() == ["padkd", "0.1.0", "False"], done.stdout + done.stderr


def test_a_closed_pipe_exits_0_silently(tmp_path: Path) -> None:
    """`padkd list methods | head -1`, and a reader that closes the pipe before padkd writes (`| true`)."""
    script = (f"{sys.executable} -m padkd.cli list methods | head -1; echo rc=${{PIPESTATUS[0]}}; "
              f"{sys.executable} -m padkd.cli list methods | true; echo rc=${{PIPESTATUS[0]}}")
    done = _padkd(["-c", f"import subprocess; subprocess.run(['bash', '-c', {script!r}])"], tmp_path,
                  {"XDG_CACHE_HOME": str(tmp_path)}, python=True)
    assert done.stderr == "" and done.stdout.splitlines()[1:] == ["rc=0", "rc=0"], done.stdout + done.stderr


@pytest.mark.slow
def test_the_readmes_training_commands_run_in_order_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The first block of "Training from a config", line by line in a fresh directory; each recipe's stages
    are cut to one epoch (the same overrides on every line, so --resume continues the same run)."""
    import re
    import shlex

    from padkd.config import load_config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Training from a config"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    commands = [shlex.split(line.split("  #")[0]) for line in block.group(1).strip().splitlines()]
    assert [c[:2] for c in commands][:4] == [["padkd", "recipes"], ["padkd", "train"], ["padkd", "train"],
                                             ["padkd", "train"]]
    for command in commands:
        argv = command[1:]
        if argv[0] == "train":
            stages = len(load_config(argv[1], [a for a in argv[2:] if "=" in a]).stages)
            argv += [f"stages.{i}.epochs=1" for i in range(stages)] + ["--quiet"]
        assert main(argv) == 0, (command, capsys.readouterr().err)
    assert (tmp_path / "runs" / "digits" / "pad_l2-s1" / "final.json").is_file()
    import padkd

    assert isinstance(padkd.load_student(tmp_path / "student.pt"), torch.nn.Module)
    assert (tmp_path / "my_pad_l2.yaml").is_file() and (tmp_path / "runs" / "report" / "report.md").is_file()



def test_a_missing_data_root_shows_the_resolved_path(tmp_path: Path, plain_config, write_yaml,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    raw = plain_config(tmp_path / "run")
    raw["data"] = {"name": "mnist", "root": "data/nowhere"}
    config = write_yaml(tmp_path / "c.yaml", raw)
    code, _, err = call(["train", str(config)], capsys)
    assert_user_error(code, err, "data.root", f"data.root 'data/nowhere' is {tmp_path / 'data' / 'nowhere'}",
                      "relative to the current directory")
    assert not (tmp_path / "run").exists()
