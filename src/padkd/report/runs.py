"""Any set of run directories → the report's results (the schema of the demo's results.json).

Runs are grouped into *settings*: runs whose resolved configs agree on everything but `seed`, `name`,
`output_dir` and logging are seeds of one setting. The config keys that differ between settings name
them ("weighting.name=pad"), and settings are compared with a baseline paired by seed. When exactly one
key differs, it is the report's *factor* and the effect of each setting is drawn against its value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from padkd import files
from padkd.config import MAX_CONFIG_BYTES, read_yaml
from padkd.errors import PadkdError

#: Config keys that do not make two runs different settings.
IGNORED = re.compile(r"^(seed|name|output_dir|log(\..*)?)$")


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


def results_from_runs(run_dirs: list[Path], labels: dict[str, str] | None = None,
                      baseline: str | None = None, command: str = "padkd report") -> dict[str, Any]:
    """Group finished runs into settings and return the report's results dict.

    `labels` maps a setting's generated name (`key=value, ...`) to a label shown instead; `baseline`
    names the setting (generated name or label) others are compared with (default: the first one)."""
    if not run_dirs:
        raise PadkdError("padkd report: give at least one run directory")
    loaded = []
    for run_dir in run_dirs:
        config, final = _load(run_dir)
        flat = {k: v for k, v in flatten(config).items() if not IGNORED.match(k)}
        loaded.append((run_dir.resolve(), config, final, flat))
    keys = sorted({k for *_, flat in loaded for k in flat})
    varying = [k for k in keys if len({json.dumps(flat.get(k), sort_keys=True) for *_, flat in loaded}) > 1]
    settings: dict[str, dict[str, Any]] = {}
    for run_dir, config, final, flat in loaded:
        name = ", ".join(f"{_short(k, varying)}={_show(flat.get(k))}" for k in varying) or "all runs"
        entry = settings.setdefault(name, {"values": {k: flat.get(k) for k in varying}, "runs": {}, "last": {},
                                           "best": {}})
        seed = str(config.get("seed", 0))
        if seed in entry["runs"]:
            raise PadkdError(f"padkd report: '{run_dir}' and '{entry['runs'][seed]}' are the same setting and seed "
                             f"({seed}); give each run once")
        entry["runs"][seed] = str(run_dir)
        entry["last"][seed] = _metric(final, "last")
        entry["best"][seed] = _metric(final, "best")
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
    teacher_top1 = None
    if teacher is not None and (teacher / "final.json").is_file():
        teacher_top1 = _metric(read_final(teacher / "final.json"), "last")
    results: dict[str, Any] = {
        "dataset": json.loads(datasets.pop()) if len(datasets) == 1 else "several data sets",
        "methods": list(settings), "labels": labels, "baseline": baseline or next(iter(settings)),
        "seeds": seeds, "runs": {n: e["runs"] for n, e in settings.items()},
        "test_top1": {n: e["last"] for n, e in settings.items()},
        "best_test_top1": {n: e["best"] for n, e in settings.items()},
        "teacher_run": str(teacher) if teacher is not None else None, "teacher_test_top1": teacher_top1,
        "epochs": _epochs(first.get("stages")),
        "command": command, "varying": varying,
    }
    if len(varying) == 1:
        results["factor"] = {"key": varying[0], "values": {n: e["values"][varying[0]] for n, e in settings.items()}}
    return results
