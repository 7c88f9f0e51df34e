"""`padkd study`: where PAD helps or hurts on the real data we have, and why (issue 10).

Every comparison pits a PAD arm against its epoch-matched control — the same stage 1, and the same
stage 2 with the base loss continued — paired by seed: a seed fixes the student's initialisation and
the data order, and the arms of one seed share their stage-1 run bit for bit (stage 2 is trained from
a copy of the stage-1 run's end-of-stage checkpoint, which resuming makes equal to an uninterrupted
two-stage run). Each factor is varied alone around one base setting in which the L2 hint itself
helps: scikit-learn digits, teacher `cnn [32, 64, 128]`, student `cnn [4, 32]`, hint on the pooled
embeddings at weight 30, 30 epochs (SGD 0.05, cosine) then 15 (SGD 0.005, constant).

Runs go to `OUT/runs/<config hash>/s<seed>` (a rerun reuses finished runs, so an interrupted study
continues), tables and figures to `OUT/study.md` and `OUT/figures/`, every number to
`OUT/results.json`, and `padkd report`'s reports of selected comparisons to `OUT/reports/`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from padkd.errors import PadkdError
from padkd.study.analyse import fmt, read_final, write_analysis
from padkd.study.factors import build_plan
from padkd.study.plan import MODES, Mode, Plan, describe, digits_teacher, mnist_teacher
from padkd.study.run import run_plan


def run_study(out: Path, mode: str = "quick", data_root: str | None = None, jobs: int = 2, seeds: int | None = None,
              only: list[str] | None = None, quiet: bool = False, train: bool = True,
              minutes: float | None = None) -> dict[str, Any]:
    """Plan, train (reusing finished runs) and analyse the study; returns the results written to results.json.
    `train=False` analyses the runs finished so far (comparisons then have fewer pairs, or none); `minutes`
    stops starting runs after that long and analyses what finished."""
    if mode not in MODES:
        raise PadkdError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    chosen = MODES[mode]
    if seeds is not None:
        if seeds < 2:
            raise PadkdError(f"--seeds must be at least 2 (a paired interval needs two pairs), got {seeds}")
        chosen = Mode(**{**chosen.__dict__, "seeds": seeds, "headline_seeds": max(seeds, 2),
                         "method_seeds": seeds, "stall_seeds": seeds if chosen.stall_seeds else 0,
                         "ceiling_seeds": seeds})
    if jobs < 1:
        raise PadkdError(f"--jobs must be at least 1, got {jobs}")
    if minutes is not None and not minutes > 0:
        raise PadkdError(f"--minutes must be a positive number of minutes, got {minutes}")
    if data_root is not None and not (Path(data_root) / "MNIST" / "raw").is_dir() and not Path(data_root).is_dir():
        raise PadkdError(f"--data-root '{data_root}' is not a directory; give the folder that holds MNIST/raw")

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    out = Path(out)
    root = out / "runs"
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    plan, factors = build_plan(chosen, data_root, only)
    if mode == "full" and data_root is None:
        say("[study] no --data-root: the MNIST parts (data-size subsets, the probe's stall) are skipped")
    failed = run_plan(plan, root, jobs, say, None if minutes is None else 60 * minutes) if train else {}
    seconds = time.perf_counter() - start
    command = f"padkd study --mode {mode}" + (f" --data-root {data_root}" if data_root else "") + \
        (f" --seeds {seeds}" if seeds else "") + (f" --only {' '.join(only)}" if only else "") + \
        ("" if train else " --no-train")
    teachers = {"digits": digits_teacher(Plan(), chosen),
                "mnist": mnist_teacher(Plan(), data_root) if data_root else None}
    finished = sum((root / k / "final.json").is_file() for k in plan.specs)
    trained = f"this invocation trained for {seconds:.0f} s with {jobs} job(s)" if train else "analysis only"
    header = [f"- Command: `{command}` ({finished} of {len(plan.specs)} runs finished; {trained})",
              *describe(chosen, fmt(read_final(root, teachers["digits"])),
                        fmt(read_final(root, teachers["mnist"])) if teachers["mnist"] else None)]
    results = write_analysis(root, out, factors, failed, header, command, teachers)
    say(f"[study] {out / 'study.md'} ({time.perf_counter() - start:.0f}s)")
    return results
