"""Training the plan: each run in a process of its own pool (dependencies first), stage 2 forked from its
stage-1 run, failures recorded and the rest going on, and a time budget after which no run starts."""

from __future__ import annotations

import copy
import multiprocessing
import shutil
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from padkd.errors import PadkdError
from padkd.study.plan import Plan


def _worker_init() -> None:
    """One CPU thread per worker (the pool runs several runs at once): the thread policy's --threads 1."""
    import os

    from padkd.engine.cpu import ENV

    os.environ[ENV] = "1"


def execute(run_dir: str, raw: dict[str, Any], fork_dir: str | None) -> dict[str, Any]:
    """Train one run (stage 2 from `fork_dir`'s end-of-stage-1 checkpoint when given); its final metrics."""
    from padkd.config import dump_config, parse_config
    from padkd.engine.trainer import Trainer
    from padkd.files import atomic_write_text

    out = Path(run_dir)
    raw = {**raw, "output_dir": str(out)}
    cfg = parse_config(raw)
    shutil.rmtree(out, ignore_errors=True)
    if fork_dir is None:
        return Trainer(cfg, quiet=True).run().final
    shutil.copytree(fork_dir, out, ignore=shutil.ignore_patterns(".padkd.lock", "final.json"))
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    return Trainer(cfg, resume=True, quiet=True).run().final


def run_plan(plan: Plan, root: Path, jobs: int, say: Callable[[str], None], budget_s: float | None = None
             ) -> dict[str, str]:
    """Train every run of the plan not finished yet, `jobs` at a time (dependencies first). Returns the
    runs that failed, with the reason. `budget_s`: start no run after that many seconds (the running ones
    finish); a later invocation continues where this one stopped."""
    done = {k for k in plan.specs if (root / k / "final.json").is_file()}
    failed: dict[str, str] = {}
    todo = [k for k in plan.specs if k not in done]
    total, completed, start = len(todo), 0, time.perf_counter()
    say(f"[study] {len(done)} runs already finished, {total} to train with {jobs} job(s)")
    running: dict[Future[dict[str, Any]], str] = {}
    executor = None if jobs <= 1 else ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                          initializer=_worker_init)

    def launch(key: str) -> None:
        spec = plan.specs[key]
        raw = copy.deepcopy(spec.resolve(root, spec.raw) if spec.resolve else spec.raw)
        teacher = raw.get("teacher")
        if teacher and teacher.get("checkpoint") in plan.specs:  # a run of the plan: its directory
            teacher["checkpoint"] = str((root / teacher["checkpoint"]).resolve())
        fork = str(root / spec.fork) if spec.fork else None
        if executor is None:
            future: Future[dict[str, Any]] = Future()
            try:
                future.set_result(execute(str(root / key), raw, fork))
            except Exception as err:  # noqa: BLE001  (recorded and reported; the study goes on)
                future.set_exception(err)
        else:
            future = executor.submit(execute, str(root / key), raw, fork)
        running[future] = key

    try:
        while todo or running:
            for key in list(todo):
                if budget_s is not None and time.perf_counter() - start >= budget_s:
                    say(f"[study] time budget of {budget_s / 60:g} min reached: {len(todo)} runs not started; "
                        "rerun the same command to continue (finished runs are reused)")
                    todo.clear()
                    break
                deps = plan.specs[key].deps
                if any(d in failed for d in deps):
                    failed[key] = f"depends on a failed run ({next(d for d in deps if d in failed)})"
                    todo.remove(key)
                elif all(d in done for d in deps) and (executor is None or len(running) < 2 * jobs):
                    todo.remove(key)
                    launch(key)
            if not running:
                if todo:
                    raise PadkdError(f"study plan: runs wait for runs that are not in the plan: {todo[:3]}")
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                key = running.pop(future)
                err = future.exception()
                if err is None:
                    done.add(key)
                else:
                    failed[key] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    (root / key).mkdir(parents=True, exist_ok=True)
                    (root / key / "study-error.txt").write_text(
                        "".join(traceback.format_exception(type(err), err, err.__traceback__)))
                completed += 1
                failure = f" FAILED {key}" if err else ""
                say(f"[study] {completed}/{total} runs ({time.perf_counter() - start:.0f}s){failure}")
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    return failed


