"""Library use: `padkd.load_student` rebuilds an exported student; `DistillOutput.total` is the loss to step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import padkd
from padkd import checkpoint as ckpt
from padkd.cli import main
from padkd.data.digits import digits
from padkd.distiller import DistillOutput
from padkd.errors import PadkdError
from padkd.models import MODELS


def _inputs() -> torch.Tensor:
    return torch.stack([digits().test[i][0] for i in range(16)])


def test_load_student_rebuilds_the_model_of_a_run_and_of_its_export(teacher_dir: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    best = ckpt.load(teacher_dir / "checkpoints" / "best.pt")
    assert best["model_kwargs"] == {"in_channels": 1, "num_classes": 10}
    reference = MODELS.create("cnn", {"widths": [8, 16]}, "model", in_channels=1, num_classes=10)
    reference.load_state_dict(best["student"])
    reference.eval()
    assert main(["export", str(teacher_dir), "-o", str(tmp_path / "student.pt")]) == 0
    capsys.readouterr()
    for source in (teacher_dir, tmp_path / "student.pt"):
        model = padkd.load_student(source)
        assert isinstance(model, nn.Module) and not model.training
        with torch.no_grad():
            assert torch.equal(model(_inputs()), reference(_inputs()))


def test_an_export_without_data_fields_names_the_fix(teacher_dir: Path, tmp_path: Path) -> None:
    state = ckpt.load(teacher_dir / "checkpoints" / "best.pt")
    ckpt.save(tmp_path / "old.pt", "export", model=state["model"], student=state["student"])  # as before
    with pytest.raises(PadkdError, match=r"num_classes, in_channels.*load_student\(path, num_classes=N"):
        padkd.load_student(tmp_path / "old.pt")
    model = padkd.load_student(tmp_path / "old.pt", num_classes=10, in_channels=1)
    assert model.state_dict().keys() == state["student"].keys()


def test_distill_output_total_is_the_sum_of_its_losses() -> None:
    out = DistillOutput(student=None, teacher=None,
                        losses={"task": torch.tensor(1.25), "hint": torch.tensor(0.5, dtype=torch.bfloat16)})
    assert out.total.dtype == torch.float32 and out.total.item() == 1.75
