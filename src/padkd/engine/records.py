"""Per-sample records: for every sample of a split, each term's discrepancy, relative weight and the
weighting's own columns (PAD: learned log σ² and 1/σ²), beside the task's own columns (e.g.
the teacher's and the student's predictions). Written as CSV.

Per-element records: for terms whose elements are fixed feature dimensions, the mean over the split's
samples of each element's discrepancy and of the weighting's per-element columns (PAD: log σ² and 1/σ²,
what per-element PAD learns per dimension), one row per element. The columns are whatever the method
and weighting return: this module names neither."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import torch

from padkd.batch import Batch
from padkd.distiller import Distiller
from padkd.tasks.base import Task

Table = dict[str, torch.Tensor]


@torch.no_grad()
def collect(distiller: Distiller, task: Task, loader: Iterable[Batch]) -> tuple[Table, dict[str, Table]]:
    """Run the distiller in eval mode over `loader`. Returns the per-sample table (one column per quantity,
    rows sorted by index) and, per term with per-element records, a table with one row per element:
    `element`, then each quantity averaged over the split's samples (`discrepancy`, then the weighting's
    element columns, e.g. PAD's `log_var` and `inv_var`)."""
    was_training = distiller.training
    distiller.eval()
    columns: dict[str, list[torch.Tensor]] = {}
    sums: dict[str, Table] = {}
    count = 0
    try:
        for batch in loader:
            out = distiller(batch)
            row = {"index": batch.index} | task.record_columns(out.student, out.teacher, batch)
            for term, rec in out.records.items():
                row |= {f"{term}.{key}": value for key, value in rec.items()}
            for key, value in row.items():
                columns.setdefault(key, []).append(value.detach().cpu())
            for term, rec in out.element_records.items():
                into = sums.setdefault(term, {})
                for key, value in rec.items():
                    total = value.detach().double().sum(0).cpu()
                    into[key] = into[key] + total if key in into else total
            count += len(batch)
    finally:
        distiller.train(was_training)
    table = {key: torch.cat(values) for key, values in columns.items()}
    order = table["index"].argsort()
    elements = {term: {"element": torch.arange(len(next(iter(by_key.values()))))}
                | {key: (value / max(count, 1)).float() for key, value in by_key.items()}
                for term, by_key in sums.items()}
    return task.finish_records({key: value[order] for key, value in table.items()}), elements


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
