"""YAML → typed run configuration: the pure schema (types, defaults, ranges), `extends` and overrides.

Configs are read with `yaml.safe_load` (no tags, no imports) and name registered components only.
Every error names the key path and the fix: `stages[0].optimizer.lrr: unknown key; did you mean 'lr'?`.
This module imports no registry: whether the names and options exist is checked where objects are made
(`padkd.validate.check_components`, run by the Trainer and the CLI), so parsing a YAML file loads no models.
"""

from __future__ import annotations

import copy
import json
import os
import re
import reprlib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from padkd import files
from padkd.errors import PadkdError, did_you_mean

#: Limits on what is parsed, so a hostile or careless file fails fast with one line: its size, how deep
#: it nests, and how many nodes it expands to once aliases are followed (a "billion laughs" bomb).
MAX_CONFIG_BYTES = 1 << 20
MAX_OVERRIDE_CHARS = 10_000
MAX_DEPTH = 40
MAX_NODES = 100_000
#: `extends` chains at most this many files deep, and one config reads at most MAX_CONFIG_FILES files.
MAX_EXTENDS_DEPTH = 16
MAX_CONFIG_FILES = 64


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Component(BaseModel):
    """A registered name plus its options: `{name: pad, mode: per_sample}`. Options are checked
    against the registered factory's signature when the config is validated."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(Component):
    """Dataset (a registered name and its options) and how it is loaded. `batch_size` is per process."""

    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    num_workers: int = Field(0, ge=0)
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = Field(2, ge=1)
    #: The training sampler (a registered name and options): `random`, or e.g. a class-balanced one.
    sampler: Component = Field(default_factory=lambda: Component(name="random"))


class ModelRef(Strict):
    """A network: its architecture and, optionally, weights to start from (a padkd checkpoint or export)."""

    model: Component
    checkpoint: str | None = None


class TeacherRef(ModelRef):
    """The teacher; `device` (e.g. `cuda:1`; default: the run's device) and `precision` (`bf16` halves its
    memory) place it apart from the student, so a large teacher and a small student share a node."""

    device: str | None = None
    precision: Literal["fp32", "bf16"] = "fp32"


class TermConfig(Strict):
    """One distillation term; `student`/`teacher` are tap paths (`output`, `layer3`, `fc:in`) or the
    models' tap aliases (`stage3`, `pooled`)."""

    name: str | None = None
    method: Component
    weighting: Component = Field(default_factory=lambda: Component(name="uniform"))
    student: str | list[str] = "output"
    teacher: str | list[str] = "output"
    #: The term's weight β; null: the method's default (its CRD-benchmark value, `padkd list methods`).
    weight: float | None = None
    embedding: str | None = None
    #: Start the method's modules (connector, regressor, paraphraser) from the previous stage's term of
    #: the same name, method and taps; the weighting (e.g. a PAD head) is always new.
    carry: bool = True
    #: Learning-rate multiplier for this term's trainable modules (connector, PAD head): a PAD head
    #: trained at a small stage-2 LR for few steps barely leaves its initialisation (docs/pad.md).
    #: 0 freezes them for the stage (a paraphraser trained in an init stage).
    lr_scale: float = Field(1.0, ge=0)
    #: Optimizer steps over which the term ramps in linearly (the one ramp every term uses); null: from
    #: `warmup_epochs`, else the longer of the method's default (DKD: 20 epochs) and the weighting's (PAD: 100).
    warmup_steps: int | None = Field(None, ge=0)
    #: The same ramp given in epochs of the stage (converted to optimizer steps); give one of the two.
    warmup_epochs: float | None = Field(None, ge=0)

    @pydantic.model_validator(mode="after")
    def _one_warmup(self) -> TermConfig:
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ValueError("give warmup_steps or warmup_epochs, not both")
        return self

    def signature(self) -> str:
        """What must match for `carry`: the method's name and both taps (options may differ between
        stages, e.g. FT's paraphraser-training stage and its transfer stage)."""
        return json.dumps([self.method.name, self.student, self.teacher])


class OptimizerConfig(Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, le=1e6)
    #: The LR is given per this many images of the global batch (batch_size × processes × accumulate):
    #: the engine uses lr × global batch / lr_per (the linear scaling rule). null: lr as given.
    lr_per: int | None = Field(None, ge=1)
    momentum: float = Field(0.9, ge=0, le=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0, le=1)
    betas: tuple[float, float] = (0.9, 0.999)

    @pydantic.field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError("Adam betas must each be in [0, 1)")
        return value


class SchedulerConfig(Strict):
    name: Literal["constant", "multistep", "cosine"] = "cosine"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)
    warmup_epochs: float = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)


class StageConfig(Strict):
    """A training stage. Each stage builds fresh terms (new PAD heads, connectors) and a fresh
    optimizer; the student carries over from the previous stage.

    Init stages (AB, FT, FSP, FitNet's hint stage) train only some modules: `trainable` lists the
    student's module paths that train (null: all; []: none), `student_mode: eval` runs the student in
    eval mode, and a term's `lr_scale: 0` freezes its modules."""

    name: str = "main"
    epochs: int = Field(ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    terms: list[TermConfig] = Field(default_factory=list)
    task_weight: float = 1.0
    trainable: list[str] | None = None
    student_mode: Literal["train", "eval"] = "train"


class EngineConfig(Strict):
    """How each training step runs: precision, gradient accumulation and clipping, compile, layout."""

    #: bf16 or fp16 autocast (fp16 with a gradient scaler, saved in checkpoints); losses and PAD in fp32.
    #: `auto`: bf16 where the device has bf16 units (AMX/AVX512-BF16 CPUs, bf16 GPUs), else fp32; the
    #: precision used is recorded in final.json (`engine.precision`).
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    #: Micro-batches per optimizer step (the effective batch is accumulate × batch_size × processes).
    accumulate: int = Field(1, ge=1)
    #: Clip the global gradient norm of each optimizer step to this value (null: no clipping).
    clip_grad_norm: float | None = Field(None, gt=0)
    #: torch.compile the student and teacher in place (state_dict keys unchanged).
    compile: bool = False
    #: The torch.compile backend (`aot_eager` or `eager` to debug compilation without code generation).
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    #: NHWC memory layout for models and 4-d inputs (faster convolutions on recent GPUs).
    channels_last: bool = False
    #: CPU threads of torch's operators; null: the policy of padkd.engine.cpu (`--threads N` wins, else
    #: OMP_NUM_THREADS, else the cores idle at start). The count used is recorded in final.json.
    threads: int | None = Field(None, ge=1, le=1024)


class DistillConfig(Strict):
    embedding: str = "auto"
    teacher_train_bn: bool = False


class LogConfig(Strict):
    interval: int = Field(20, ge=1)
    tensorboard: bool = True
    progress: Literal["auto", "bar", "none"] = "auto"


class RecordsConfig(Strict):
    """Per-sample records written at the end of each stage (for PAD: learned σ² per sample)."""

    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["val"])


class Config(Strict):
    """A whole run: data, teacher, student, task, stages, logging."""

    name: str = "run"
    output_dir: str
    seed: int = Field(0, ge=0, lt=2**32)
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig
    teacher: TeacherRef | None = None
    student: ModelRef
    #: The task (a registered name and options); options given without a name apply to classification.
    task: Component = Field(default_factory=lambda: Component(name="classification"))
    distill: DistillConfig = Field(default_factory=DistillConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    stages: list[StageConfig] = Field(min_length=1)
    log: LogConfig = Field(default_factory=LogConfig)
    records: RecordsConfig = Field(default_factory=RecordsConfig)
    eval_test: bool = True

    @pydantic.field_validator("task", mode="before")
    @classmethod
    def _default_task_name(cls, value: Any) -> Any:
        return {"name": "classification", **value} if isinstance(value, dict) and "name" not in value else value

    def term_names(self, stage: StageConfig) -> list[str]:
        """Term names, defaulting to the method's name (suffixed when a method repeats)."""
        names: list[str] = []
        for term in stage.terms:
            base = term.name or term.method.name
            name, k = base, 2
            while name in names:
                name, k = f"{base}{k}", k + 1
            names.append(name)
        return names


# ---------------------------------------------------------------- loading and errors


def _loc(parts: tuple[Any, ...]) -> str:
    """`stages[0].optimizer.lr`; each key cut to 60 characters (a key may be anything a file holds)."""
    out = ""
    for p in parts:
        name = str(p) if len(str(p)) <= 60 else str(p)[:57] + "..."
        out += f"[{p}]" if isinstance(p, int) else (f".{name}" if out else name)
    return out


def _model_at(cls: type[BaseModel], parts: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class found by following `parts` (field names and list indices) from `cls`."""
    current: Any = cls
    for p in parts:
        if isinstance(p, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or p not in current.model_fields:
            return None
        current = _unwrap(current.model_fields[p].annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """`list[X]`, `X | None` → X (the first BaseModel found)."""
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return annotation


def _format_error(err: pydantic.ValidationError) -> str:
    errors = err.errors()
    # A misspelt key shows up twice (unknown + missing); the unknown one can say "did you mean".
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(p for p in first["loc"] if not isinstance(p, str) or not p.startswith("function-"))
    where = _loc(loc) or "config"
    if first["type"] == "extra_forbidden":
        parent = _model_at(Config, loc[:-1])
        allowed = list(parent.model_fields) if parent else []
        return f"{where}: unknown key{did_you_mean(str(loc[-1]), allowed)}"
    if first["type"] == "missing":
        return f"{where}: required key is missing"
    return f"{where}: {first['msg']} (got {short_repr(first.get('input'))})"


def short_repr(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters: error messages never echo a whole (expanded) document."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 2, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_config(raw: dict[str, Any]) -> Config:
    """Validate a plain dict (from YAML plus overrides) against the schema."""
    if not isinstance(raw, dict):
        raise PadkdError("config: the file must hold a YAML mapping of keys to values")
    try:
        cfg = Config.model_validate(raw)
    except pydantic.ValidationError as err:
        raise PadkdError(_format_error(err)) from None
    return cfg


def check_decoded(text: str, where: str) -> None:
    """Refuse command-line text holding bytes the locale could not decode (Python keeps them as lone
    surrogates), naming the fix: a UTF-8 locale."""
    if re.search("[\udc80-\udcff]", text):
        raise PadkdError(f"{where}: holds bytes that are not text in this system's encoding "
                         f"({sys.getfilesystemencoding()}, the C locale?); run padkd in a UTF-8 locale "
                         "(e.g. LANG=C.UTF-8, or PYTHONUTF8=1)")


def parse_value(text: str, where: str) -> Any:
    """A command-line value parsed as YAML (`[4, 8]`, `0.1`, `null`) within the limits, or one line."""
    check_decoded(text, where)
    try:
        return safe_yaml(text, where)
    except yaml.YAMLError as err:
        raise PadkdError(f"{where}: the value is not valid YAML ({_yaml_problem(err)}); quote it, e.g. "
                         "\"name='[x'\"") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What the YAML parser found, without the snippet of the text it would quote."""
    return str(getattr(err, "problem", None) or getattr(err, "reason", None) or type(err).__name__)


def set_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.0.c=value` (value parsed as YAML) to the raw config dict."""
    if "=" not in assignment:
        raise PadkdError(f"override {short_repr(assignment)}: expected key=value, e.g. stages.0.epochs=5")
    key, _, text = assignment.partition("=")
    if len(assignment) > MAX_OVERRIDE_CHARS:
        raise PadkdError(f"override '{assignment[:40]}...': longer than {MAX_OVERRIDE_CHARS} characters; put it in "
                         "the config file")
    check_decoded(assignment, f"override {short_repr(assignment)}")
    value = parse_value(text, f"override {short_repr(assignment)}") if text else None
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not re.fullmatch("[0-9]+", part) or int(part) >= len(node):
                raise PadkdError(f"override '{key}': '{part}' is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise PadkdError(f"override '{key}': '{'.'.join(parts[:i])}' is not a mapping or list")


class _LimitedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses documents nested deeper than MAX_DEPTH while composing them."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise _TooLarge(f"nested more than {MAX_DEPTH} levels deep (line {mark.line + 1})")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _TooLarge(Exception):
    """A document over the limits; the message says which."""


def _expanded_size(node: yaml.Node, memo: dict[int, int], path: set[int]) -> int:
    """Nodes of the document once every alias is expanded (memoised: linear in the unique nodes)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in path:
        raise _TooLarge("an alias refers to a node that contains it (a recursive structure)")
    path.add(key)
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo, path) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo, path) + _expanded_size(v, memo, path) for k, v in node.value)
    else:
        size = 1
    path.discard(key)
    if size > MAX_NODES:
        raise _TooLarge(f"expands to more than {MAX_NODES} values once its aliases are followed")
    memo[key] = size
    return size


def safe_yaml(text: str, where: str) -> Any:
    """Parse YAML with safe_load's rules (no tags, no code) within the depth and expansion limits."""
    loader = _LimitedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    except _TooLarge as err:
        raise PadkdError(f"{where}: refused: {err}") from None
    finally:
        loader.dispose()


#: Parsed config texts (text → value): a base that many recipes extend is parsed once per process.
_PARSED: dict[str, Any] = {}


def _parse_file_text(text: str, where: str) -> Any:
    """`safe_yaml` of a config file's text, memoised by the text (a deep copy each time)."""
    if text not in _PARSED:
        if len(_PARSED) >= 1024:
            _PARSED.clear()
        _PARSED[text] = safe_yaml(text, where)
    return copy.deepcopy(_PARSED[text])


def read_yaml(path: Path, what: str = "config") -> Any:
    """A YAML file (a config, a run's config.yaml) within every limit: the bytes actually read, UTF-8, depth
    and alias expansion. Errors name the file and the line, never its text."""
    text = files.read_text(path, MAX_CONFIG_BYTES, what)
    try:
        return _parse_file_text(text, str(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise PadkdError(f"{path}: not valid YAML{at} ({_yaml_problem(err)})") from None


def merge(base: Any, delta: Any, where: str = "") -> Any:
    """`delta` over `base`: mappings merge key by key (recursively), a mapping with integer keys over a list
    patches the list's items by index (`stages: {1: {epochs: 80}}`), anything else is replaced."""
    if isinstance(base, dict) and isinstance(delta, dict):
        out = dict(base)
        for key, value in delta.items():
            out[key] = merge(base[key], value, f"{where}.{key}" if where else str(key)) if key in base else value
        return out
    if isinstance(base, list) and isinstance(delta, dict) and delta and all(type(k) is int for k in delta):
        items = list(base)
        for index, value in delta.items():
            if not 0 <= index < len(items):
                raise PadkdError(f"{where}: patch index {index} is not an item of the base's list of {len(items)}; "
                                 f"use 0..{len(items) - 1}, or give the whole list")
            items[index] = merge(items[index], value, f"{where}[{index}]")
        return items
    return delta


#: The built-in recipes, shipped in the package: `padkd train digits/teacher` finds RECIPES/digits/teacher.yaml.
RECIPES = Path(__file__).resolve().parent / "recipes"
SUFFIXES = (".yaml", ".yml")


def recipe_names() -> list[str]:
    """Every built-in recipe's name: its path under RECIPES without the suffix (`digits/teacher`)."""
    return sorted(p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.rglob("*")
                  if p.suffix in SUFFIXES and p.is_file())


def recipe_path(name: str) -> Path | None:
    """The built-in recipe `name` (`digits/teacher`, `.yaml` optional), or None; never a file outside RECIPES."""
    if not name or Path(name).is_absolute():
        return None
    for candidate in ([RECIPES / name] if Path(name).suffix in SUFFIXES else []) + [RECIPES / f"{name}{s}"
                                                                                     for s in SUFFIXES]:
        if candidate.is_file() and candidate.resolve().is_relative_to(RECIPES):
            return candidate
    return None


def find_config(name: str | Path, extended_by: Path | None = None) -> Path:
    """The config file a name means, by the one path rule: a path relative to the current directory (or
    absolute) when that file exists, else a built-in recipe of that name. One line when neither exists,
    naming the resolved path and the closest recipe."""
    path = Path(name)
    if path.is_file():
        return path
    recipe = recipe_path(str(name))
    if recipe is not None:
        return recipe
    by = f" (extended by {extended_by})" if extended_by is not None else ""
    hint = ""
    if extended_by is not None and (extended_by.parent / path).is_file():
        hint = (f"; it exists beside {extended_by.name}, but bases are found from the current directory: write "
                f"extends: {Path(os.path.relpath(extended_by.parent / path)).as_posix()}, or run padkd from "
                f"{extended_by.parent}")
    stem = str(name).removesuffix(path.suffix) if path.suffix in SUFFIXES else str(name)
    raise PadkdError(f"config file '{name}'{by} not found (no file {path.absolute()}, no built-in recipe "
                     f"'{stem}'){hint or did_you_mean(stem, recipe_names(), list_all=False)}; list recipes with "
                     "`padkd recipes`")


def read_raw(path: str | Path) -> dict[str, Any]:
    """A config file (a path or a recipe name, see `find_config`) as a plain dict, with its `extends:` bases
    merged under it (one or a list, later ones winning). A base is a relative .yaml/.yml path found by the
    same rule as the file itself (from the current directory, else a built-in recipe: `cifar100/base.yaml`);
    chains are at most MAX_EXTENDS_DEPTH deep and MAX_CONFIG_FILES files in all. Bases are data like the
    file itself: nothing is imported."""
    return _read_tree(find_config(path), (), [MAX_CONFIG_FILES])


def _read_tree(path: Path, chain: tuple[Path, ...], budget: list[int]) -> dict[str, Any]:
    """`read_raw` of one file of an `extends` tree: `chain` the files extending it, `budget` the files left."""
    if path.resolve() in chain:
        raise PadkdError(f"{path}: 'extends' forms a cycle ({' -> '.join(str(p) for p in (*chain, path.resolve()))})")
    if len(chain) >= MAX_EXTENDS_DEPTH or budget[0] <= 0:
        raise PadkdError(f"{chain[0]}: refused: 'extends' reaches more than "
                         f"{MAX_EXTENDS_DEPTH if len(chain) >= MAX_EXTENDS_DEPTH else MAX_CONFIG_FILES} files "
                         f"{'deep' if len(chain) >= MAX_EXTENDS_DEPTH else 'in all'} (at {path})")
    budget[0] -= 1
    raw = read_yaml(path)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise PadkdError(f"{path}: the file must hold a YAML mapping of keys to values")
    bases = raw.pop("extends", None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise PadkdError(f"{path}: extends must be a relative path or a list of them, got {short_repr(bases)}")
    for base in bases:
        if Path(base).is_absolute() or Path(base).suffix not in SUFFIXES:
            raise PadkdError(f"{path}: extends {short_repr(base)}: a base must be a relative path to a .yaml or "
                             ".yml file, from the current directory, or a built-in recipe (e.g. extends: "
                             "cifar100/base.yaml)")
    layers = [_read_tree(find_config(base, path), (*chain, path.resolve()), budget) for base in bases] + [raw]
    merged: dict[str, Any] = {}
    try:
        for layer in layers:
            merged = merge(merged, layer)
    except PadkdError as err:
        raise PadkdError(f"{path}: {err}") from None
    return merged


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (and the files it extends), apply `key=value` overrides and validate the result
    against the schema (not the registries: see `padkd.validate.load_checked`)."""
    raw = read_raw(path)
    for assignment in overrides or []:
        set_override(raw, assignment)
    return parse_config(raw)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written to every run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
