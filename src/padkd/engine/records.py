"""Per-sample records: for every sample of a split, each term's discrepancy, relative weight and the
weighting's own columns (PAD: learned log σ² and 1/σ²), beside the task's own columns (e.g.
the teacher's and the student's predictions). Written as CSV."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import torch

from padkd.batch import Batch
from padkd.distiller import Distiller
from padkd.tasks.base import Task


@torch.no_grad()
def collect(distiller: Distiller, task: Task, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
    """Run the distiller in eval mode over `loader`; one column per quantity, rows sorted by index."""
    was_training = distiller.training
    distiller.eval()
    columns: dict[str, list[torch.Tensor]] = {}
    try:
        for batch in loader:
            out = distiller(batch)
            row = {"index": batch.index} | task.record_columns(out.student, out.teacher, batch)
            for term, rec in out.records.items():
                row |= {f"{term}.{key}": value for key, value in rec.items()}
            for key, value in row.items():
                columns.setdefault(key, []).append(value.detach().cpu())
    finally:
        distiller.train(was_training)
    table = {key: torch.cat(values) for key, values in columns.items()}
    order = table["index"].argsort()
    return task.finish_records({key: value[order] for key, value in table.items()})


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
