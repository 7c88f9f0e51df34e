"""Any set of run directories → the report's results (the schema of the demo's results.json).

Runs are grouped into *settings*: runs whose resolved configs (config.yaml, the config a run started
with) agree on everything but `seed`, `name`, `output_dir`, logging and what a resume may change without
changing what is trained (data loading, device, compilation, threads) are seeds of one setting, so a
resumed run stays with its seeds; its resume events are listed in the report. The config keys that
differ between settings name them ("weighting.name=pad"), and settings are compared with a baseline paired
by seed. When exactly one key differs, it is the report's *factor* and the effect of each setting is drawn
against its value.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from padkd import files
from padkd.config import MAX_CONFIG_BYTES, read_yaml
from padkd.engine.logging import read_metrics
from padkd.errors import PadkdError
from padkd.tasks import TASKS

#: Config keys that name files or folders: shown relative to the report (a report holds no absolute path).
PATH_KEY = re.compile(r"(^|\.)(checkpoint|root|\w+_path|\w+_dir)$")
#: Config keys that do not make two runs different settings.
IGNORED = re.compile(r"^(seed|name|output_dir|log(\..*)?|device|data\.(num_workers|pin_memory|persistent_workers|"
                     r"prefetch_factor|root)|engine\.(compile|compile_backend|threads))$")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of nested mappings and lists of mappings (`stages.1.terms.0.weighting.name`); a list of
    plain values (`widths: [4, 32]`) stays one value."""
    items: list[tuple[str, Any]] = []
    if isinstance(tree, dict):
        items = [(str(k), v) for k, v in tree.items()]
    elif isinstance(tree, list) and any(isinstance(v, dict | list) for v in tree):
        items = [(str(i), v) for i, v in enumerate(tree)]
    else:
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out |= flatten(value, f"{prefix}{key}.")
    return out or {prefix.rstrip("."): tree}


def _load(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's resolved config and final metrics; PadkdError when the directory is not a finished run."""
    config, final = run_dir / "config.yaml", run_dir / "final.json"
    if not config.is_file():
        raise PadkdError(f"'{run_dir}' holds no config.yaml: point `padkd report` at run directories "
                         "(each `output_dir` of `padkd train`)")
    if not final.is_file():
        raise PadkdError(f"'{run_dir}' holds no final.json: the run has not finished (finish it with --resume)")
    return _plain(read_yaml(config, "run config") or {}, config), read_final(final)


def _plain(config: Any, path: Path) -> dict[str, Any]:
    """A run's config as JSON-plain data (string keys; YAML dates and the like as text), or one line."""
    if not isinstance(config, dict):
        raise PadkdError(f"'{path}' is not a padkd config (not a mapping); restore it")
    try:
        return json.loads(json.dumps(config, default=str))
    except (TypeError, ValueError):
        raise PadkdError(f"'{path}' holds keys that are not plain names; restore it") from None


def read_final(path: Path) -> dict[str, Any]:
    """A run's final.json within the size limit, checked to hold what the report reads."""
    final = files.read_json(path, MAX_CONFIG_BYTES, "run result")
    metric = final.get("primary_metric", "top1") if isinstance(final, dict) else None
    if not isinstance(metric, str) or not all(
            isinstance(final.get(k), dict | None) and isinstance((final.get(k) or {}).get(metric), int | float | None)
            for k in ("last", "best")):
        raise PadkdError(f"'{path}' is not a padkd run result (its 'last' and 'best' map the primary metric to a "
                         "number); restore it, or finish the run again with --resume")
    return final


def _short(key: str, keys: list[str]) -> str:
    """The last two parts of a dotted key when they name it unambiguously among `keys`."""
    tail = ".".join(key.split(".")[-2:])
    clash = [k for k in keys if k != key and ".".join(k.split(".")[-2:]) == tail]
    return key if clash else tail


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _metric(final: dict[str, Any], which: str) -> float | None:
    metric = final.get("primary_metric", "top1")
    value = (final.get(which) or {}).get(metric)
    return None if value is None else float(value)


def _numbers(metrics: Any) -> dict[str, float]:
    """The numeric entries of a final.json's `last` (NaN stored as null left out)."""
    return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}


def task_meta(config: dict[str, Any], final: dict[str, Any], where: Path) -> dict[str, Any]:
    """The run's task, its primary metric (from final.json) and whether higher is better (the task's own
    metadata), so a report ranks runs of any registered task the way the trainer picked their best epoch."""
    task = config.get("task")
    name = task.get("name", "classification") if isinstance(task, dict) else "classification"
    if name not in TASKS:
        raise PadkdError(f"'{where}' was trained with task '{name}', which is not registered in this install; "
                         "install the plugin that provides it, then report again")
    return {"task": name, "metric": final.get("primary_metric", "top1"),
            "higher_is_better": bool(getattr(TASKS.get(name), "higher_is_better", True))}


def relative(path: Path, out_dir: Path) -> str:
    """`path` relative to the report's folder (with `..` where needed): a report holds no absolute path."""
    return Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()


def _resumes(run_dir: Path) -> list[dict[str, Any]]:
    """A run's resume events: where it resumed and the config keys it changed (was → now)."""
    return [{"stage": e.get("stage", 0), "epoch": e.get("epoch", 0), "batch": e.get("batch", 0),
             "changes": e.get("changes", {})} for e in read_metrics(run_dir) if e["event"] == "resume"]


def describe(config: dict[str, Any]) -> str:
    """A setting's name when no config key tells runs apart: the last stage's terms (method and weighting)."""
    stages = config.get("stages")
    last = stages[-1] if isinstance(stages, list) and stages and isinstance(stages[-1], dict) else {}
    terms = [t for t in last.get("terms") or [] if isinstance(t, dict)]
    if not terms:
        return "task loss only"
    names = []
    for term in terms:
        method = term.get("method", {}).get("name") if isinstance(term.get("method"), dict) else None
        weighting = term.get("weighting", {}).get("name") if isinstance(term.get("weighting"), dict) else None
        names.append(f"{method or term.get('name', 'term')}" + (f" ({weighting})" if weighting else ""))
    return " + ".join(names)


def _teacher_run(config: dict[str, Any]) -> Path | None:
    """The run directory of the teacher's checkpoint, when it is a padkd run (it has metrics.jsonl)."""
    teacher = config.get("teacher")
    checkpoint = teacher.get("checkpoint") if isinstance(teacher, dict) else None
    if not isinstance(checkpoint, str) or not checkpoint:
        return None
    path = Path(checkpoint)
    for candidate in (path, path.parent.parent):
        if (candidate / "metrics.jsonl").is_file():
            return candidate.resolve()
    return None


def _epochs(stages: Any) -> dict[str, Any]:
    """Epochs per stage name, as the config lists them."""
    if not isinstance(stages, list):
        return {}
    return {str(s.get("name", f"stage{i}")): s.get("epochs") for i, s in enumerate(stages) if isinstance(s, dict)}


def results_from_runs(run_dirs: list[Path], out_dir: Path, labels: dict[str, str] | None = None,
                      baseline: str | None = None, command: str = "padkd report") -> dict[str, Any]:
    """Group finished runs into settings and return the report's results dict, its paths relative to `out_dir`.

    `labels` maps a setting's generated name (`key=value, ...`) to a label shown instead; `baseline`
    names the setting (generated name or label) others are compared with (default: the first one). The
    runs must share a task and primary metric; the task's `higher_is_better` says which way is better."""
    if not run_dirs:
        raise PadkdError("padkd report: give at least one run directory")
    loaded = []
    for run_dir in run_dirs:
        config, final = _load(run_dir)
        flat = {k: relative(Path(v), out_dir) if PATH_KEY.search(k) and isinstance(v, str) and v else v
                for k, v in flatten(config).items() if not IGNORED.match(k)}
        loaded.append((run_dir.resolve(), config, final, flat))
    metas = [task_meta(config, final, run_dir) for run_dir, config, final, _ in loaded]
    kinds = sorted({f"{m['task']} ({m['metric']})" for m in metas})
    if len(kinds) > 1:
        raise PadkdError(f"padkd report: the runs are of different tasks or primary metrics ({', '.join(kinds)}); "
                         "report each task's runs apart")
    keys = sorted({k for *_, flat in loaded for k in flat})
    varying = [k for k in keys if len({json.dumps(flat.get(k), sort_keys=True) for *_, flat in loaded}) > 1]
    settings: dict[str, dict[str, Any]] = {}
    for run_dir, config, final, flat in loaded:
        name = ", ".join(f"{_short(k, varying)}={_show(flat.get(k))}" for k in varying) or describe(config)
        entry = settings.setdefault(name, {"values": {k: flat.get(k) for k in varying}, "runs": {}, "last": {},
                                           "best": {}, "metrics": {}, "resumed": {}})
        seed = str(config.get("seed", 0))
        if seed in entry["runs"]:
            raise PadkdError(f"padkd report: '{run_dir}' and '{out_dir / entry['runs'][seed]}' are the same setting "
                             f"and seed ({seed}); give each run once")
        entry["runs"][seed] = relative(run_dir, out_dir)
        entry["last"][seed] = _metric(final, "last")
        entry["best"][seed] = _metric(final, "best")
        entry["metrics"][seed] = _numbers(final.get("last"))
        if resumes := _resumes(run_dir):
            entry["resumed"][seed] = resumes
    labels = {name: (labels or {}).get(name, name) for name in settings}
    if baseline is not None:
        found = [n for n in settings if baseline in (n, labels[n])]
        if not found:
            raise PadkdError(f"padkd report: --baseline '{baseline}' names no setting; the settings are: "
                             + "; ".join(labels.values()))
        baseline = found[0]
    seeds = sorted({s for e in settings.values() for s in e["runs"]}, key=lambda s: (len(s), s))
    first = loaded[0][1]
    datasets = {json.dumps(c["data"].get("name") if isinstance(c.get("data"), dict) else None)
                for _, c, _, _ in loaded}
    teacher = _teacher_run(first)
    teacher_metrics = None
    if teacher is not None and (teacher / "final.json").is_file():
        teacher_metrics = _numbers(read_final(teacher / "final.json").get("last"))
    results: dict[str, Any] = {
        "dataset": json.loads(datasets.pop()) if len(datasets) == 1 else "several data sets", **metas[0],
        "methods": list(settings), "labels": labels, "baseline": baseline or next(iter(settings)),
        "seeds": seeds, "runs": {n: e["runs"] for n, e in settings.items()},
        "last": {n: e["last"] for n, e in settings.items()}, "best": {n: e["best"] for n, e in settings.items()},
        "metrics": {n: e["metrics"] for n, e in settings.items()},
        "resumed": {n: e["resumed"] for n, e in settings.items() if e["resumed"]},
        "teacher_run": relative(teacher, out_dir) if teacher is not None else None,
        "teacher_metrics": teacher_metrics, "epochs": _epochs(first.get("stages")),
        "command": command, "varying": varying,
    }
    if len(varying) == 1:
        results["factor"] = {"key": varying[0], "values": {n: e["values"][varying[0]] for n, e in settings.items()}}
    return results
