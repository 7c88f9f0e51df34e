"""Regression test: PAD with its default settings is safe from step one.

A tiny student (2/4-channel CNN) trained with CE + a per-element PAD-weighted L2 hint from the first
step, with a freshly initialised head (single stage, no L2 warm-up stage), must learn: its
cross-entropy falls and its accuracy is far above chance.
"""

from __future__ import annotations

import copy
from pathlib import Path

from conftest import HINT_TERM, TEACHER_MODEL

from padkd.config import parse_config
from padkd.engine.logging import read_metrics
from padkd.engine.trainer import Trainer


def test_tiny_student_learns_under_single_stage_pad(tmp_path: Path, teacher_dir: Path) -> None:
    raw = {
        "name": "pad-single-stage",
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "device": "cpu",
        "data": {"name": "digits", "batch_size": 64},
        "teacher": {"model": copy.deepcopy(TEACHER_MODEL), "checkpoint": str(teacher_dir)},
        "student": {"model": {"name": "cnn", "widths": [2, 4]}},
        "records": {"splits": ["val"]},
        "log": {"tensorboard": False, "progress": "none"},
        "stages": [{
            "name": "pad", "epochs": 6, "optimizer": {"name": "adamw", "lr": 0.02, "weight_decay": 0.0},
            "scheduler": {"name": "constant"},
            "terms": [{**copy.deepcopy(HINT_TERM), "weighting": {"name": "pad", "mode": "per_element"}}],
        }],
    }
    final = Trainer(parse_config(raw), quiet=True).run().final
    epochs = [e for e in read_metrics(tmp_path / "run") if e["event"] == "epoch"]
    ce = [e["train"]["task"] for e in epochs]
    assert ce[-1] < 0.8 * ce[0], ce  # cross-entropy falls: not stuck at ln 10 = 2.30
    assert final["last"]["top1"] > 30.0, final  # chance is 10 %
    assert all(e["train"]["hint"] == e["train"]["hint"] for e in epochs)  # finite PAD term
