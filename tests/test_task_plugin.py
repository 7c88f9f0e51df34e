"""A second task, written here as a plugin, goes through the whole CLI without the engine knowing it.

The plugin registers a regression task (predict the ink fraction of a digits image; evaluator MSE/MAE,
lower is better; its own record columns) and its data set. A teacher and a PAD-distilled student are
trained, the student interrupted and resumed, evaluated and exported, all through `padkd`.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
import torch

from padkd import checkpoint as ckpt
from padkd import plugins
from padkd.cli import main
from padkd.engine.records import read_csv
from padkd.engine.trainer import Trainer

PLUGIN = '''
import torch
from torch.nn import functional as F

from padkd.data import DATASETS, DataSplits, TensorData
from padkd.distributed import all_reduce_sum
from padkd.tasks import TASKS, Evaluator, Task


@DATASETS.register("digits_ink")
def digits_ink():
    """scikit-learn digits with a regression target: each image's mean (normalised) intensity."""
    base = DATASETS.create("digits", {}, "data")

    def ink(split):
        return TensorData(split.images, split.images.mean(dim=(1, 2, 3)))

    return DataSplits(train=ink(base.train), val=ink(base.val), test=ink(base.test), in_channels=1)


class ErrorSums(Evaluator):
    def __init__(self):
        self.sums = {"se": torch.zeros(()), "ae": torch.zeros(()), "n": torch.zeros(())}

    def update(self, output, batch):
        err = output.squeeze(1).float() - batch.targets
        add = {"se": err.pow(2).sum(), "ae": err.abs().sum(), "n": torch.tensor(float(len(err)))}
        self.sums = {k: self.sums[k] + add[k].cpu() for k in self.sums}

    def compute(self):
        s = all_reduce_sum(self.sums)
        n = max(float(s["n"]), 1.0)
        return {"mse": float(s["se"]) / n, "mae": float(s["ae"]) / n}


@TASKS.register("ink_regression")
class InkRegression(Task):
    """Regress the ink fraction; MAE selects the best checkpoint (lower is better)."""

    primary_metric = "mae"
    higher_is_better = False
    model_fields = frozenset({"in_channels", "num_classes"})

    def model_kwargs(self, data):
        return {"in_channels": data.in_channels, "num_classes": 1}

    def loss(self, output, batch):
        return F.mse_loss(output.squeeze(1).float(), batch.targets)

    def evaluator(self):
        return ErrorSums()

    def record_columns(self, student, teacher, batch):
        row = {"target": batch.targets, "prediction": student.squeeze(1),
               "abs_error": (student.squeeze(1) - batch.targets).abs()}
        if teacher is not None:
            row["teacher_prediction"] = teacher.squeeze(1)
        return row
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ink_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ink_plugin", raising=False)
    ep = EntryPoint(name="ink", value="ink_plugin", group=plugins.GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [ep] if group == plugins.GROUP else [])
    yield
    from padkd.data import DATASETS
    from padkd.tasks import TASKS

    DATASETS._entries.pop("digits_ink", None)
    TASKS._entries.pop("ink_regression", None)


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def config(path: Path, run_dir: Path, teacher: Path | None = None) -> Path:
    raw: dict[str, Any] = {
        "name": "ink", "output_dir": str(run_dir), "device": "cpu", "seed": 3,
        "task": {"name": "ink_regression"}, "data": {"name": "digits_ink", "batch_size": 64},
        "student": {"model": {"name": "cnn", "widths": [4, 8]}},
        "log": {"tensorboard": False, "progress": "none", "interval": 4},
        "stages": [{"name": "main", "epochs": 2, "optimizer": {"name": "adamw", "lr": 0.01}}],
    }
    if teacher is not None:
        raw["teacher"] = {"model": {"name": "cnn", "widths": [8, 16]}, "checkpoint": str(teacher)}
        raw["records"] = {"splits": ["test"]}
        raw["stages"][0]["terms"] = [{"name": "hint", "method": {"name": "hint"}, "weighting": {"name": "pad"},
                                      "student": "fc:in", "teacher": "fc:in"}]
    else:
        raw["student"] = {"model": {"name": "cnn", "widths": [8, 16]}}
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def stop_after(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next Trainer stop after `step` optimizer steps, as Ctrl-C would."""
    original = Trainer.__init__

    def init(self: Trainer, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.callbacks.append(lambda trainer, global_step: trainer.request_stop() if global_step == step else None)

    monkeypatch.setattr(Trainer, "__init__", init)


@pytest.mark.slow
def test_a_plugin_task_trains_resumes_evaluates_and_exports_through_the_cli(
        plugin: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["list", "tasks"], capsys)
    assert code == 0 and "ink_regression" in out and "classification" in out
    with contextlib.redirect_stdout(io.StringIO()):
        teacher_code = main(["train", str(config(tmp_path / "t.yaml", tmp_path / "teacher")), "--quiet"])
    assert teacher_code == 0
    capsys.readouterr()

    # The uninterrupted reference, then the same run interrupted mid-epoch and resumed.
    code, out, err = cli(["train", str(config(tmp_path / "a.yaml", tmp_path / "a", tmp_path / "teacher")),
                          "--quiet"], capsys)
    assert code == 0, err
    reference = json.loads(out)
    assert reference["primary_metric"] == "mae" and set(reference["last"]) == {"mse", "mae"}
    assert reference["best"]["mae"] <= reference["last"]["mae"] + 1e-12
    b_cfg = config(tmp_path / "b.yaml", tmp_path / "b", tmp_path / "teacher")
    with monkeypatch.context() as patch:
        stop_after(21, patch)
        code, _, err = cli(["train", str(b_cfg), "--quiet"], capsys)
    assert code == 130 and "--resume" in err
    code, out, err = cli(["train", str(b_cfg), "--resume", "--quiet"], capsys)
    assert code == 0, err
    resumed = json.loads(out)
    assert {k: v for k, v in resumed.items() if k != "run_dir"} == {k: v for k, v in reference.items()
                                                                    if k != "run_dir"}
    a_last, b_last = ckpt.load(tmp_path / "a/checkpoints/last.pt"), ckpt.load(tmp_path / "b/checkpoints/last.pt")
    assert all(torch.equal(a_last["student"][k], b_last["student"][k]) for k in a_last["student"])

    # The best checkpoint is the one with the lowest validation MAE.
    epochs = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    val_mae = {(e["stage"], e["epoch"]): e["val"]["mae"] for e in epochs if e["event"] == "epoch"}
    assert min(val_mae.values()) == reference["best_val"]
    assert list(min(val_mae, key=val_mae.get)) == reference["best_stage_epoch"]

    table = read_csv(tmp_path / "a" / "records" / "0-main-test.csv")
    assert {"target", "prediction", "abs_error", "teacher_prediction", "hint.weight", "hint.log_var"} <= set(table)
    assert len(table["index"]) == 359

    code, out, err = cli(["eval", str(tmp_path / "a"), "--split", "test"], capsys)
    assert code == 0, err
    evaluated = json.loads(out)
    assert evaluated["mae"] == pytest.approx(reference["best"]["mae"], rel=1e-6)
    code, out, err = cli(["export", str(tmp_path / "a"), "-o", str(tmp_path / "student.pt")], capsys)
    assert code == 0, err
    exported = ckpt.load(tmp_path / "student.pt")
    assert exported["kind"] == "export" and set(exported["student"]) == set(a_last["student"])


def test_the_engine_names_no_task_metric_or_method() -> None:
    import padkd.engine as engine

    for path in Path(engine.__file__).parent.glob("*.py"):
        text = path.read_text().lower()
        for word in ("classification", "top1", "top-1", "cross_entropy", "hint", "fitnet", "pad_l2"):
            assert word not in text, f"{path.name} names '{word}'"
