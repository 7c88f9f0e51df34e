"""Shared fixtures: a tiny trained teacher run, config builders and a YAML writer.

Everything runs on CPU on scikit-learn's digits (no download) with tiny CNNs, so the whole
engine/CLI/data/config suite stays well under a minute and a half on two cores.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

TEACHER_MODEL = {"name": "cnn", "widths": [8, 16]}
STUDENT_MODEL = {"name": "cnn", "widths": [4, 8]}
QUIET_LOG = {"tensorboard": False, "progress": "none"}
HINT_TERM = {"name": "hint", "method": {"name": "hint"}, "student": "fc:in", "teacher": "fc:in"}


def _plain_config(output_dir: Path | str, *, epochs: int = 1, model: dict[str, Any] | None = None,
                  seed: int = 0) -> dict[str, Any]:
    return {
        "name": "plain",
        "output_dir": str(output_dir),
        "seed": seed,
        "device": "cpu",
        "data": {"name": "digits", "batch_size": 64},
        "student": {"model": copy.deepcopy(model or STUDENT_MODEL)},
        "stages": [{"name": "train", "epochs": epochs, "optimizer": {"name": "sgd", "lr": 0.05}}],
        "log": dict(QUIET_LOG),
    }


def _distill_config(output_dir: Path | str, teacher_dir: Path | str, *, stage1_epochs: int = 2,
                    stage2_epochs: int = 1, seed: int = 0) -> dict[str, Any]:
    """The two-stage recipe of the README: uniform L2 hint, then PAD-L2 with a fresh head."""
    return {
        **_plain_config(output_dir, seed=seed),
        "name": "t",
        "teacher": {"model": copy.deepcopy(TEACHER_MODEL), "checkpoint": str(teacher_dir)},
        "records": {"splits": ["test"]},
        "stages": [
            {"name": "l2", "epochs": stage1_epochs, "optimizer": {"name": "sgd", "lr": 0.05},
             "terms": [copy.deepcopy(HINT_TERM)]},
            {"name": "pad", "epochs": stage2_epochs, "optimizer": {"name": "sgd", "lr": 0.005},
             "scheduler": {"name": "constant"},
             "terms": [{**copy.deepcopy(HINT_TERM), "weighting": {"name": "pad"}}]},
        ],
    }


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding a tiny trained teacher (cnn [8, 16], 2 epochs on digits)."""
    from padkd.config import parse_config
    from padkd.engine.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    cfg = parse_config({**_plain_config(run_dir, epochs=2, model=TEACHER_MODEL), "name": "teacher"})
    Trainer(cfg, quiet=True).run()
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    return run_dir


@pytest.fixture(scope="session")
def plain_config() -> Callable[..., dict[str, Any]]:
    """`plain_config(output_dir, epochs=1, model=None, seed=0)`: a raw config without a teacher."""
    return _plain_config


@pytest.fixture(scope="session")
def distill_config(teacher_dir: Path) -> Callable[..., dict[str, Any]]:
    """`distill_config(output_dir, stage1_epochs=2, stage2_epochs=1)`: the L2 → PAD-L2 recipe."""

    def make(output_dir: Path | str, **kwargs: Any) -> dict[str, Any]:
        return _distill_config(output_dir, teacher_dir, **kwargs)

    return make


@pytest.fixture(scope="session")
def write_yaml() -> Callable[[Path, dict[str, Any]], Path]:
    """`write_yaml(path, raw)`: dump a config dict to a YAML file and return its path."""

    def write(path: Path, raw: dict[str, Any]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def one_line_error() -> Callable[..., str]:
    """`one_line_error(argv, capsys, *fragments)`: `padkd ARGV` exits 2 with one `padkd: error:` line (no
    traceback) holding every fragment; returns that line."""
    from padkd.cli import main

    def check(argv: list[str], capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and err.startswith("padkd: error: ") and "Traceback" not in err, err
        for fragment in fragments:
            assert fragment in err, err
        return err

    return check
