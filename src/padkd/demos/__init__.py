"""The embedded demos of `padkd demo`, one module per task (classification, retrieval, detection): they train
small runs end to end, on digits or on data they generate (detection: shapes in the COCO format), and write
results.json and report.md through `padkd.report.write_report`.

Every demo is resumable: with `resume`, a run that finished with the same config is reused, an interrupted
one continues from its checkpoint, and the rest are trained; an interrupted demo names the command that
continues it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from padkd.errors import PadkdError


def fresh_output(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse a demo folder that already holds files unless `overwrite` (then empty it) or `resume` (then
    keep it: its finished runs are reused): nothing is lost by accident."""
    if overwrite and resume:
        raise PadkdError("--resume continues the demo in its folder and --overwrite empties it first: pass one")
    if resume:
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PadkdError(f"'{out}' already holds files; pass --resume to continue the demo in it, --overwrite "
                             "to replace it, or --out another folder")
        shutil.rmtree(out)


def progress(quiet: bool) -> Callable[[str], None]:
    """A demo's progress printer: lines to stderr, or nothing when `quiet`."""
    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)
    return say


def command(task: str, out: Path | str, seeds: int | None, quick: bool, *extra: str) -> str:
    """The `padkd demo` command line of these options (`--out` given as `out`)."""
    parts = ["padkd", "demo", *(["--task", task] if task != "classification" else []), "--out", str(out)]
    parts += [*(["--seeds", str(seeds)] if seeds is not None else []), *(["--quick"] if quick else []), *extra]
    return shlex.join(parts)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Train the demo's runs on one CPU thread unless `--threads` or OMP_NUM_THREADS says otherwise: the demos'
    tiny steps run fastest on one thread of a shared machine (docs/speed.md), and a fixed count keeps their
    numbers bitwise the same per seed, which the idle-core default would not (it follows the machine's load)."""
    from padkd.engine.cpu import ENV

    chosen = os.environ.get(ENV) or os.environ.get("OMP_NUM_THREADS")
    if not chosen:
        os.environ[ENV] = "1"  # read by every run's Trainer (padkd.engine.cpu.set_threads)
    try:
        yield
    finally:
        if not chosen:
            os.environ.pop(ENV, None)


class Session(NamedTuple):
    """A demo's run state: its progress printer, its runs, the `--seeds` its commands show (None: the default)
    and when it started."""

    say: Callable[[str], None]
    runs: Runs
    shown_seeds: int | None
    start: float


def begin(task: str, out: Path, seeds: int, default_seeds: int, quick: bool, quiet: bool, overwrite: bool,
          resume: bool, *extra: str) -> Session:
    """Check `seeds`, prepare `out` (fresh_output) and start a demo's session; `extra`: options its resume
    command repeats (`--data-root DIR`)."""
    if seeds < 1:
        raise PadkdError(f"--seeds must be at least 1, got {seeds}")
    fresh_output(out, overwrite, resume)
    shown = seeds if seeds != default_seeds else None
    return Session(progress(quiet), Runs(resume, command(task, out, shown, quick, *extra, "--resume")), shown,
                   time.perf_counter())


class Runs:
    """Trains a demo's runs quietly. With `resume`, a run that finished with this config is read back, one
    with a checkpoint continues from it; an interruption names `resume_command`."""

    def __init__(self, resume: bool, resume_command: str) -> None:
        self.resume = resume
        self.resume_command = resume_command
        #: How many finished runs were read back instead of trained.
        self.reused = 0

    def train(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The run's final metrics (final.json), training what is not finished yet."""
        from padkd.config import parse_config
        from padkd.engine import rundir
        from padkd.engine.trainer import Interrupted, Trainer
        from padkd.report.runs import read_final

        cfg = parse_config(raw)
        run_dir = Path(cfg.output_dir)
        finished = (run_dir / "final.json").is_file()
        if self.resume and finished:
            stages = len(cfg.stages)
            try:
                rundir.resume_changes(run_dir, cfg.model_dump(mode="json"), (stages, 0, 0), stages)
            except PadkdError as err:
                raise PadkdError(f"{err} (the demo's options differ from those this folder was trained with: "
                                 "resume with the same --seeds and --quick, or pass --overwrite)") from None
            self.reused += 1
            return read_final(run_dir / "final.json")
        holds_checkpoint = any((run_dir / "checkpoints" / n).is_file() for n in ("last.pt", "best.pt"))
        try:
            return Trainer(cfg, resume=self.resume and holds_checkpoint, quiet=True).run().final
        except Interrupted:
            saved = run_dir / "checkpoints" / "last.pt"
            raise Interrupted(f"interrupted in run {run_dir}; checkpoint saved to {saved}; continue the demo with: "
                              f"{self.resume_command}") from None
