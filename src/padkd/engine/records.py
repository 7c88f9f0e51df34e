"""Per-sample records: for every sample of a split, each term's discrepancy, effective weight and
learned log σ² (PAD), beside the teacher's and the student's prediction. Written as CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from padkd.distiller import Distiller
from padkd.methods.base import Batch


@torch.no_grad()
def collect(distiller: Distiller, loader: DataLoader, device: torch.device) -> dict[str, torch.Tensor]:
    """Run the distiller in eval mode over `loader`; one column per quantity, rows sorted by index."""
    was_training = distiller.training
    distiller.eval()
    columns: dict[str, list[torch.Tensor]] = {}
    try:
        for x, y, idx in loader:
            batch = Batch(x.to(device), y.to(device), idx.to(device))
            out = distiller(batch)
            s_prob = out.student.float().softmax(1)
            row = {"index": idx, "target": y, "student_pred": s_prob.argmax(1),
                   "student_correct": (s_prob.argmax(1) == batch.targets).int(),
                   "student_confidence": s_prob.max(1).values}
            if out.teacher is not None:
                t_prob = out.teacher.float().softmax(1)
                row |= {"teacher_pred": t_prob.argmax(1), "teacher_correct": (t_prob.argmax(1) == batch.targets).int(),
                        "teacher_confidence": t_prob.max(1).values,
                        "teacher_true_prob": t_prob.gather(1, batch.targets[:, None]).squeeze(1)}
            for term, rec in out.records.items():
                row |= {f"{term}.{key}": value for key, value in rec.items()}
            for key, value in row.items():
                columns.setdefault(key, []).append(value.detach().cpu())
    finally:
        distiller.train(was_training)
    table = {key: torch.cat(values) for key, values in columns.items()}
    order = table["index"].argsort()
    return {key: value[order] for key, value in table.items()}


def write_csv(table: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(table)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for row in zip(*(table[k].tolist() for k in keys), strict=True):
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])


def read_csv(path: Path) -> dict[str, list[float]]:
    """Columns of a records CSV as lists of numbers."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    return {key: [float(r[i]) for r in body] for i, key in enumerate(header)}
