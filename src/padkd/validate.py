"""Registry checks of a parsed config: every name and option of every stage, resolved before training.

`config` is the pure schema and imports no registry; this module checks a parsed Config against the
registries and is run where objects are made (the Trainer, `padkd eval`), before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from padkd.assemble import make_task
from padkd.config import Component, Config, load_config, parse_config
from padkd.data import DATASETS
from padkd.data.samplers import SAMPLERS
from padkd.errors import PadkdError
from padkd.methods import METHODS
from padkd.models import MODELS
from padkd.registry import Registry, check_options, validate_options
from padkd.weightings import WEIGHTINGS

#: Keyword arguments the engine passes to every sampler factory.
SAMPLER_FIXED = frozenset({"size", "seed", "rank", "world", "batch_size", "targets"})


def check_component(registry: Registry[Any], comp: Component, where: str,
                    fixed: frozenset[str] = frozenset()) -> None:
    """The name is registered and the options fit the factory's signature and types."""
    factory = registry.get(comp.name, f"{where}.name")
    also = frozenset(type(comp).model_fields) - {"name"}
    check_options(factory, comp.options, where, set(fixed), also)
    validate_options(factory, comp.options, where)


def check_components(cfg: Config) -> None:
    """Resolve every registered name and option of every stage now, not when stage 2 starts: methods and
    weightings are built once (cheap, no shapes yet) and each weighting checks that it can weight its method."""
    check_component(DATASETS, cfg.data, "data")
    check_component(SAMPLERS, cfg.data.sampler, "data.sampler", SAMPLER_FIXED)
    task = make_task(cfg.task)
    check_component(MODELS, cfg.student.model, "student.model", task.model_fields)
    if cfg.teacher is not None:
        check_component(MODELS, cfg.teacher.model, "teacher.model", task.model_fields)
    for i, stage in enumerate(cfg.stages):
        if stage.terms and cfg.teacher is None:
            raise PadkdError(f"stages[{i}].terms: distillation terms need a teacher; add a 'teacher:' section")
        for j, term in enumerate(stage.terms):
            where = f"stages[{i}].terms[{j}]"
            check_component(METHODS, term.method, f"{where}.method")
            check_component(WEIGHTINGS, term.weighting, f"{where}.weighting")
            method = METHODS.create(term.method.name, term.method.options, f"{where}.method")
            weighting = WEIGHTINGS.create(term.weighting.name, term.weighting.options, f"{where}.weighting")
            try:
                weighting.check(method)
                weighting.check_inputs(task.weighting_inputs, cfg.task.name)
            except ValueError as err:
                raise PadkdError(f"{where}.weighting: {err}") from None
    for split in cfg.records.splits:
        if split == "test" and not cfg.eval_test:
            raise PadkdError("records.splits: 'test' needs eval_test: true")


def load_checked(path: str | Path, overrides: list[str] | None = None) -> Config:
    """`load_config` plus every registry check: the config a command can build a run from."""
    cfg = load_config(path, overrides)
    check_components(cfg)
    return cfg


def parse_checked(raw: dict[str, Any]) -> Config:
    """`parse_config` plus every registry check (a dict built in code, e.g. by a demo or a test)."""
    cfg = parse_config(raw)
    check_components(cfg)
    return cfg
