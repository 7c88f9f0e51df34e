"""The embedded demos of `padkd demo`, one module per task (classification, retrieval, detection): they train
small runs end to end, on digits or on data they generate (detection: shapes in the COCO format)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from padkd.errors import PadkdError


def fresh_output(out: Path, overwrite: bool) -> None:
    """Refuse a demo folder that already holds files unless `overwrite` (then empty it): nothing is lost by
    accident."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PadkdError(f"'{out}' already holds files; pass --overwrite to replace it or --out another folder")
        shutil.rmtree(out)


def progress(quiet: bool) -> Callable[[str], None]:
    """A demo's progress printer: lines to stderr, or nothing when `quiet`."""
    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)
    return say
