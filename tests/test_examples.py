"""The README's examples run as documented and do what they claim."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_own_loop_example_trains_a_student_with_pad(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(ROOT / "examples" / "own_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    match = re.search(r"student test accuracy ([\d.]+)%, median σ² ([\d.]+)", out)
    assert match, out
    assert float(match.group(1)) > 80.0  # chance is 10%
    assert float(match.group(2)) > 0.0


def test_readme_shows_the_example_and_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    example = (ROOT / "examples" / "own_loop.py").read_text()
    # The README's API snippet is the example's distillation loop, verbatim.
    snippet = re.search(r"```python\n(.*?)```", readme, re.S)
    assert snippet, "README has no python block"
    for line in snippet.group(1).strip().splitlines():
        assert line in example, f"README line not in examples/own_loop.py: {line!r}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^make test\b.*$", readme, re.M)
    assert command and command.group(0).split("#")[0].strip() in ci


def test_every_shipped_config_validates(tmp_path: Path) -> None:
    from padkd.config import load_config

    configs = sorted((ROOT / "src" / "padkd" / "recipes").rglob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(path, [f"output_dir={tmp_path / path.stem}"])
        assert cfg.stages
