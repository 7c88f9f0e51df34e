"""Per-sample records: for every sample of a split, each term's discrepancy, relative weight and the
weighting's own columns (PAD: learned log σ² and 1/σ²), beside the task's own columns (e.g.
the teacher's and the student's predictions). Written as CSV.

Per-element records: for terms whose elements are fixed feature dimensions, the mean over the split's
samples of each element's discrepancy and of the weighting's per-element columns (PAD: log σ² and 1/σ²,
what per-element PAD learns per dimension), one row per element. The columns are whatever the method
and weighting return: this module names neither."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import torch

from padkd import files
from padkd.batch import Batch
from padkd.distiller import Distiller
from padkd.errors import PadkdError
from padkd.tasks.base import Task

Table = dict[str, torch.Tensor]
#: The largest records CSV a report reads (a train split of ImageNet with a few terms is ~300 MB).
MAX_RECORDS_BYTES = 1 << 30
#: The key (and file-name part) of the task's own per-element table (`Task.element_rows`) among the tables
#: `collect` returns by term (name no term of a config should take).
ELEMENT_ROWS = "task-rows"


@torch.no_grad()
def collect(distiller: Distiller, task: Task, loader: Iterable[Batch], split: str = "train"
            ) -> tuple[Table, dict[str, Table]]:
    """Run the distiller in eval mode over `loader` (of `split`). Returns the per-sample table (one column per quantity,
    rows sorted by index) and, per term with per-element records, a table with one row per element:
    `element`, then each quantity averaged over the split's samples (`discrepancy`, then the weighting's
    element columns, e.g. PAD's `log_var` and `inv_var`); and, under `ELEMENT_ROWS`, the task's own
    per-element rows when it makes any (the language task's per-token table)."""
    was_training = distiller.training
    distiller.eval()
    columns: dict[str, list[torch.Tensor]] = {}
    sums: dict[str, Table] = {}
    extra: dict[str, list[torch.Tensor]] = {}
    count = 0
    try:
        for batch in loader:
            out = distiller(batch, split=split)
            row = {"index": batch.index} | task.record_columns(out.student, out.teacher, batch)
            for term, rec in out.records.items():
                row |= {f"{term}.{key}": value for key, value in rec.items()}
            for key, value in row.items():
                columns.setdefault(key, []).append(value.detach().cpu())
            for key, value in task.element_rows(out.student, out.teacher, batch, out.masked_elements).items():
                extra.setdefault(key, []).append(value.detach().cpu())
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
    if extra:
        elements[ELEMENT_ROWS] = {key: torch.cat(values) for key, values in extra.items()}
    return task.finish_records({key: value[order] for key, value in table.items()}), elements


def write_csv(table: dict[str, torch.Tensor], path: Path) -> None:
    """Write a records table as CSV, whole (`padkd.files.atomic_write`: never a torn file, never through a link)."""
    keys = list(table)

    def write(binary: IO[bytes]) -> None:
        text = io.TextIOWrapper(binary, encoding="utf-8", newline="")
        writer = csv.writer(text)
        writer.writerow(keys)
        for row in zip(*(table[k].tolist() for k in keys), strict=True):
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
        text.flush()
        text.detach()  # the caller fsyncs and closes the file

    files.atomic_write(path, write)


def read_header(path: Path) -> list[str]:
    """The column names of a records CSV (its first line, at most 1 MiB read)."""
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    rows = _rows(files.decode(first, path, "records table"), path)
    return rows[0][1] if rows else []


def read_csv(path: Path) -> dict[str, list[float]]:
    """Columns of a records CSV as lists of numbers, within MAX_RECORDS_BYTES; a file that is not such a
    table (not UTF-8, a ragged row, a value that is no number) is one line naming the place."""
    rows = _rows(files.read_text(path, MAX_RECORDS_BYTES, "records table"), path)
    if not rows:
        raise PadkdError(f"'{path}' holds no header line; it is not a records table: restore it or train again")
    header = rows[0][1]
    if len(set(header)) != len(header):
        raise PadkdError(f"'{path}' names a column twice in its header; restore it or train again")
    columns: dict[str, list[float]] = {key: [] for key in header}
    for number, row in rows[1:]:
        if len(row) != len(header):
            raise PadkdError(f"'{path}' line {number} has {len(row)} fields, the header {len(header)}; the file is "
                             "torn or edited: restore it or train again")
        for key, value in zip(header, row, strict=True):
            try:
                columns[key].append(float(value))
            except ValueError:
                raise PadkdError(f"'{path}' line {number}: column '{key[:60]}' holds {value[:20]!r}, not a number; "
                                 "restore the file or train again") from None
    return columns


def _rows(text: str, path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank row of CSV text."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return [(reader.line_num, row) for row in reader if row]
    except csv.Error as err:
        raise PadkdError(f"'{path}' is not a readable CSV table ({err}); restore it or train again") from None
