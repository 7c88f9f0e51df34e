"""Fuzzing the config loader and the CLI's overrides: whatever the YAML document or `key=value` string,
padkd either accepts it or stops with one PadkdError line, never a traceback, in bounded time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
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
