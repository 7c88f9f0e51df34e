"""Fuzzing the config loader, the CLI's overrides and the files a resume or a report reads back from a run
directory: whatever the YAML document, `key=value` string, metrics line, checkpoint entry, records table or
final.json, padkd either accepts it or stops with one PadkdError line, never a traceback, in bounded time."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from padkd.cli import main
from padkd.config import set_override
from padkd.errors import PadkdError
from padkd.validate import load_checked, parse_checked

VALID: dict[str, Any] = {
    "output_dir": "runs/x", "data": {"name": "digits", "batch_size": 64},
    "student": {"model": {"name": "cnn", "widths": [4, 8]}},
    "teacher": {"model": {"name": "cnn", "widths": [8, 16]}},
    "stages": [{"epochs": 1, "terms": [{"method": {"name": "hint"}, "weighting": {"name": "pad"},
                                        "student": "fc:in", "teacher": "fc:in"}]}],
}
KEYS = ["output_dir", "seed", "data", "data.name", "data.batch_size", "student.model.name", "student.model.widths",
        "teacher.model", "stages.0.epochs", "stages.0.optimizer.lr", "stages.0.optimizer.name",
        "stages.0.terms.0.method.name", "stages.0.terms.0.weighting.mode", "stages.0.terms.0.weight",
        "stages.0.scheduler.milestones", "task.name", "engine.precision", "log.interval", "x.y", "stages.9", ""]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20))
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                         max_leaves=20)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _accepted_or_one_line(call: Any) -> None:
    start = time.perf_counter()
    try:
        call()
    except PadkdError as err:
        assert str(err) and "\n" not in str(err) and len(str(err)) < 2000
    assert time.perf_counter() - start < 5


@FUZZ
@given(doc=documents)
def test_any_document_is_accepted_or_refused_in_one_line(doc: Any) -> None:
    _accepted_or_one_line(lambda: parse_checked(doc))


@FUZZ
@given(key=st.sampled_from(KEYS) | st.text(max_size=30), value=st.text(max_size=40))
def test_any_override_is_accepted_or_refused_in_one_line(key: str, value: str) -> None:
    raw = yaml.safe_load(yaml.safe_dump(VALID))

    def apply() -> None:
        set_override(raw, f"{key}={value}")
        parse_checked(raw)

    _accepted_or_one_line(apply)


@FUZZ
@given(text=st.text(max_size=300))
def test_any_file_text_is_accepted_or_refused_in_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _accepted_or_one_line(lambda: load_checked(path))


@pytest.mark.parametrize("argv", [["train", "missing.yaml"], ["train", "fuzz.yaml", "seed"], ["eval", "nowhere"],
                                  ["export", "nowhere", "-o", "x.pt"], ["import-teacher", "nowhere", "--model",
                                                                        "resnet8", "-o", "x.pt"]])
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path: Path, argv: list[str], monkeypatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fuzz.yaml").write_text(yaml.safe_dump(VALID))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("padkd: error: ")


# ---------------------------------------------------------------- files read back from a run directory

RUN_FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(),
                                     st.text(max_size=10)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.sampled_from(
                                                       ["event", "stage", "epoch", "batch", "val", "train", "top1",
                                                        "changes", "now", "was", "last", "best", "x"]), inner,
                                                       max_size=4)), max_leaves=12)
lines = st.one_of(json_values.map(lambda v: json.dumps(v)), st.text(max_size=40))
tensors = st.builds(lambda shape, fill: torch.full(shape, fill), st.lists(st.integers(0, 3), max_size=3),
                    st.floats(allow_nan=True, allow_infinity=True, width=32))
#: Where a checkpoint may be damaged: a key path into last.pt (a missing key is added).
STATE_PATHS = [("progress", "stage"), ("progress", "epoch"), ("progress", "batch"), ("progress", "best_at"),
               ("progress", "best_metric"), ("progress", "extra"), ("optimizer", "state"),
               ("optimizer", "param_groups"), ("rng", "python"), ("rng", "numpy"), ("rng", "torch"),
               ("stage_steps",), ("meters",), ("scaler",), ("terms",), ("model",), ("student", "fc.weight")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, plain_config) -> tuple[Path, dict[str, Any]]:
    """A finished plain run of 1 epoch, with a records table a report reads as PAD's."""
    from padkd.engine.trainer import Trainer

    out = tmp_path_factory.mktemp("fuzz") / "run"
    raw = plain_config(out)
    Trainer(parse_checked(raw), quiet=True).run()
    (out / "records").mkdir()
    (out / "records" / "0-train-test.csv").write_text(
        "index,target,teacher_pred,teacher_confidence,pad.discrepancy,pad.log_var\n0,0,0,0.9,0.5,-1\n1,1,1,0.8,0.4,-2\n")
    return out, raw


def _copy(finished_run: tuple[Path, dict[str, Any]], target: Path) -> dict[str, Any]:
    source, raw = finished_run
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    config = yaml.safe_load((target / "config.yaml").read_text())
    (target / "config.yaml").write_text(yaml.safe_dump({**config, "output_dir": str(target)}, sort_keys=False))
    return {**raw, "output_dir": str(target)}


def _one_line_or_accepted(call: Any, seconds: float = 60) -> None:
    start = time.perf_counter()
    try:
        call()
    except PadkdError as err:
        assert str(err) and "\n" not in str(err) and len(str(err)) < 2000
    assert time.perf_counter() - start < seconds


def _damage(path: Path, keys: tuple[str, ...], value: Any) -> None:
    state = torch.load(path, weights_only=True)
    node = state
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    torch.save(state, path)


@RUN_FUZZ
@given(which=st.sampled_from(["metrics.jsonl", "config.yaml", "last.pt"]), text=st.lists(lines, max_size=5),
       keys=st.sampled_from(STATE_PATHS), value=st.one_of(json_values, tensors))
def test_any_run_file_on_resume_is_accepted_or_refused_in_one_line(tmp_path: Path, finished_run, which: str,
                                                                   text: list[str], keys: tuple[str, ...],
                                                                   value: Any) -> None:
    from padkd.engine.trainer import Trainer

    raw = _copy(finished_run, tmp_path / "run")
    path = tmp_path / "run" / ("checkpoints/last.pt" if which == "last.pt" else which)
    if which == "last.pt":
        _damage(path, keys, value)
    elif which == "metrics.jsonl":
        with open(path, "a", encoding="utf-8", errors="surrogatepass") as f:
            f.write("\n".join(text))
    else:
        path.write_text("\n".join(text), encoding="utf-8", errors="surrogatepass")
    _one_line_or_accepted(lambda: Trainer(parse_checked(raw), resume=True, quiet=True).run())


@RUN_FUZZ
@given(which=st.sampled_from(["metrics.jsonl", "config.yaml", "final.json", "records/0-train-test.csv"]),
       text=st.lists(lines | st.lists(st.one_of(st.floats(), st.text(max_size=6)), max_size=7).map(
           lambda row: ",".join(map(str, row))), max_size=6), append=st.booleans())
def test_any_run_file_in_a_report_is_accepted_or_refused_in_one_line(tmp_path: Path, finished_run, which: str,
                                                                     text: list[str], append: bool) -> None:
    from padkd.report import report_runs

    _copy(finished_run, tmp_path / "run")
    with open(tmp_path / "run" / which, "a" if append else "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write("\n".join(text))
    _one_line_or_accepted(lambda: report_runs([tmp_path / "run"], tmp_path / "report"))
