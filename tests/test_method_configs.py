"""Every example config under src/padkd/recipes/methods and recipes/examples trains on digits (shortened) and its
distillation loss falls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from padkd.config import parse_config, read_raw
from padkd.engine.logging import read_metrics
from padkd.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "src" / "padkd" / "recipes"
CONFIGS = sorted([*(RECIPES / "methods").glob("*.yaml"), *(RECIPES / "examples").glob("*.yaml")])
TEACHER = {"name": "cnn", "widths": [8, 16, 32]}
EPOCHS = 3
#: Methods with a memory of the training set: in their first epoch the memory still holds its random
#: initialisation, so their loss is compared from the second epoch on, over one more epoch.
MEMORY = {"crd"}


@pytest.fixture(scope="module")
def teacher3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-block teacher (the example configs tap up to its third block), 2 epochs on digits."""
    out = tmp_path_factory.mktemp("teacher3") / "run"
    Trainer(parse_config({"output_dir": str(out), "device": "cpu", "data": {"name": "digits"},
                          "student": {"model": TEACHER}, "log": {"tensorboard": False, "progress": "none"},
                          "stages": [{"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.05}}]}), quiet=True).run()
    return out


def shortened(path: Path, out: Path, teacher: Path) -> dict[str, Any]:
    raw = read_raw(path)
    raw.update(output_dir=str(out), device="cpu", log={"tensorboard": False, "progress": "none"},
               records={"splits": []})
    raw["teacher"] = {"model": TEACHER, "checkpoint": str(teacher)}
    for stage in raw["stages"]:
        terms = stage.get("terms", [])
        stage["epochs"] = EPOCHS + any(t["method"]["name"] in MEMORY for t in terms)
        for term in terms:
            term["warmup_epochs"] = 0  # DKD's 20-epoch ramp would hide the fall in a short run
            if term.get("weighting", {}).get("name") == "pad":
                term["weighting"]["warmup_steps"] = 0  # so is PAD's 100-step ramp
    return raw


def test_every_method_has_an_example_config() -> None:
    from padkd.methods import METHODS

    named = {term["method"]["name"] for path in (ROOT / "src" / "padkd" / "recipes").rglob("*.yaml")
             for stage in read_raw(path).get("stages", []) for term in stage.get("terms", [])}
    # similarity, a retrieval term, is exercised by the retrieval demo's recipes
    assert set(METHODS.names()) - {"similarity"} <= named


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_trains_and_its_distillation_loss_falls(path: Path, teacher3: Path, tmp_path: Path) -> None:
    raw = shortened(path, tmp_path / "run", teacher3)
    Trainer(parse_config(raw), quiet=True).run()
    epochs = [e for e in read_metrics(tmp_path / "run") if e["event"] == "epoch"]
    for index, stage in enumerate(raw["stages"]):
        losses = [e["train"] for e in epochs if e["stage"] == index]
        for term in stage.get("terms", []):
            name, first = term.get("name") or term["method"]["name"], int(term["method"]["name"] in MEMORY)
            assert losses[-1][name] < losses[first][name], f"{path.stem} stage {index} {name}: {losses}"


def test_every_method_is_in_the_methods_table() -> None:
    from padkd.methods import METHODS

    table = (ROOT / "docs" / "methods.md").read_text()
    assert all(f"| `{name}` |" in table for name in METHODS.names())
