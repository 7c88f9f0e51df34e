"""`padkd` console script: train, eval, export, import-teacher, cache-teacher, list, recipes, demo, report,
study.

User errors (PadkdError) and file-system errors print one line `padkd: error: ...` and exit with status
2, no traceback. Anything unexpected prints one line saying where its full traceback was written (the
run directory when there is one) and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from padkd import __version__
from padkd.errors import PadkdError

#: padkd.engine.cpu.ENV (not imported here: that module imports torch).
THREADS_ENV = "PADKD_THREADS"
#: Subcommands whose `key=value` overrides may stand anywhere among the options.
_WITH_OVERRIDES = ("train", "eval")


def _cmd_train(args: argparse.Namespace) -> int:
    from padkd.config import load_config
    from padkd.engine.logging import finite_json
    from padkd.engine.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    args.run_dir = Path(cfg.output_dir)  # where a crash report goes
    trainer = Trainer(cfg, resume=args.resume, quiet=args.quiet)
    result = trainer.run()
    if trainer.main:
        print(json.dumps(finite_json({"run_dir": str(result.run_dir), **result.final}), indent=2))
    return 0


def _run_config_for(path: Path) -> Path:
    """The config.yaml of the run a checkpoint (or run directory) belongs to."""
    if not path.exists():
        raise PadkdError(f"no such run directory or checkpoint '{path}' ({path.absolute()}); pass the output_dir "
                         "of a padkd train run or a .pt file")
    run_dir = path if path.is_dir() else path.parent.parent
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise PadkdError(f"no config.yaml found for '{path}' (looked in {run_dir}); pass --config")
    return config


def _cmd_eval(args: argparse.Namespace) -> int:
    from padkd import checkpoint as ckpt
    from padkd.assemble import make_data, make_model, make_task, resolve_device
    from padkd.config import ModelRef
    from padkd.engine.cpu import set_threads
    from padkd.engine.evaluate import evaluate
    from padkd.engine.loaders import make_loader
    from padkd.engine.logging import finite_json
    from padkd.validate import load_checked

    path = Path(args.checkpoint)
    cfg = load_checked(args.config or _run_config_for(path), args.overrides)
    set_threads(cfg.engine.threads)
    ref = ModelRef(model=cfg.student.model, checkpoint=str(path))
    data = make_data(cfg)
    task = make_task(cfg.task)
    device = resolve_device(cfg.device)
    model = make_model(ref, data, task, "student").to(device)
    try:
        loader = make_loader(cfg, data, args.split, train=False, collate=task.collate, device=device)
    except ValueError as err:
        raise PadkdError(f"--split {args.split}: {err}") from None
    result = evaluate(task, model, loader)
    print(json.dumps(finite_json({"checkpoint": str(ckpt.resolve(path)), "split": args.split, **result}), indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from padkd import checkpoint as ckpt

    source = ckpt.resolve(Path(args.checkpoint))
    state = ckpt.load(source)
    output = Path(args.output)
    if output.is_dir():
        raise PadkdError(f"-o '{output}' is a directory; name the file to write, e.g. {output / 'student.pt'}")
    if output.exists() and (output.resolve() == source.resolve() or _is_run_checkpoint(output)):
        raise PadkdError(f"-o '{output}' is a run's training checkpoint; exporting over it would destroy the run's "
                         "state: write the export elsewhere")
    extra = {"model_kwargs": state["model_kwargs"]} if "model_kwargs" in state else {}
    ckpt.save(output, "export", model=state["model"], student=state["student"], **extra)
    dropped = len(state.get("terms", {}))
    print(f"exported the student of {source} to {args.output} ({len(state['student'])} tensors; "
          f"{dropped} distillation-only tensors such as PAD heads left out)")
    return 0


def _is_run_checkpoint(path: Path) -> bool:
    from padkd import checkpoint as ckpt

    try:
        return ckpt.load(path).get("kind") == "run"
    except PadkdError:
        return False


def _cmd_cache_teacher(args: argparse.Namespace) -> int:
    from padkd.assemble import make_data, make_model, make_task, resolve_device
    from padkd.engine.cpu import set_threads
    from padkd.engine.loaders import make_loader
    from padkd.lmcache import TeacherCacheWriter
    from padkd.tasks.language import LanguageModeling, write_teacher_cache
    from padkd.validate import load_checked

    cfg = load_checked(args.config, args.overrides)
    set_threads(cfg.engine.threads)  # the policy every run follows (padkd.engine.cpu)
    task = make_task(cfg.task)
    if not isinstance(task, LanguageModeling) or task.teacher_cache is None or cfg.teacher is None:
        raise PadkdError("cache-teacher: the config needs task language_modeling with task.teacher_cache (the folder "
                         "to write) and a teacher (teacher.model, teacher.checkpoint)")
    data = make_data(cfg)
    device = resolve_device(cfg.device)
    teacher = make_model(cfg.teacher, data, task, "teacher").to(device)
    loader = make_loader(cfg, data, "train", train=False, collate=task.collate, device=device)
    if args.k is not None and args.k < 1:
        raise PadkdError(f"--k {args.k}: keep at least one logit per token (e.g. --k 32)")
    k = min(args.k or task.cache_k, data.num_classes or 1)
    first = next(iter(loader))
    with TeacherCacheWriter(task.teacher_cache, n_items=len(data.split("train")), seq_len=first.targets.shape[1],
                            k=k, identity=task.cache_identity(teacher, data)) as writer:
        count = write_teacher_cache(teacher, loader, writer, k, task.cache_temperature)
    print(f"cached the teacher's top-{k} logits of {count} training sequences in {task.teacher_cache}")
    return 0


def _cmd_import_teacher(args: argparse.Namespace) -> int:
    from padkd.config import parse_value
    from padkd.models.convert import import_teacher

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PadkdError(f"--option '{item}': write KEY=VALUE, e.g. --option width_mult=0.5")
        options[key] = parse_value(value, f"--option '{item}'")
    print(import_teacher(Path(args.source), Path(args.output), args.model, options, args.num_classes,
                         part=args.part))
    return 0


#: `padkd list` kinds → (module, registry name); imported only when the catalogue must be built.
_REGISTRIES = {"methods": ("padkd.methods", "METHODS"), "weightings": ("padkd.weightings", "WEIGHTINGS"),
               "models": ("padkd.models", "MODELS"), "datasets": ("padkd.data", "DATASETS"),
               "tasks": ("padkd.tasks", "TASKS"), "samplers": ("padkd.data.samplers", "SAMPLERS")}


def _defaults(factory: object) -> str:
    """`key=default` of a factory's options, for `padkd list`."""
    import inspect

    params = inspect.signature(factory).parameters.values()  # type: ignore[arg-type]
    return ", ".join(f"{p.name}={p.default!r}" for p in params if p.default is not inspect.Parameter.empty)


def _build_catalogue() -> dict[str, dict[str, dict[str, str]]]:
    """Every registered component (plugins included): kind → name → its docstring and, for methods, the
    default weight, options and reference. Imports every registry (torch): seconds."""
    import importlib
    import inspect

    from padkd.plugins import load_plugins

    load_plugins()
    catalogue: dict[str, dict[str, dict[str, str]]] = {}
    for kind, (module, attr) in _REGISTRIES.items():
        registry = getattr(importlib.import_module(module), attr)
        entries = catalogue[kind] = {}
        for name in registry.names():
            factory = registry.get(name)
            extra = ""
            if kind == "methods":
                options = _defaults(factory)
                extra = f"[weight {factory.default_weight:g}{'; ' + options if options else ''}]"
                extra += f" ({factory.reference})" if factory.reference else ""
            entries[name] = {"doc": inspect.getdoc(factory) or "", "extra": extra}
    return catalogue


def _catalogue() -> dict[str, dict[str, dict[str, str]]]:
    """The catalogue `padkd list` prints, cached per source: keyed by the hash of padkd's own source files
    and the installed plugins, so `padkd list` answers without importing torch once it has run once. A process
    that has loaded the registries already lists them live and writes no cache."""
    import hashlib
    import importlib.util

    from padkd import files, plugins

    if any(module in sys.modules for module, _ in _REGISTRIES.values()):
        # Registries already loaded here (the Python API, tests) may hold components registered in this
        # process only: list them live, and keep them out of the cache every later `padkd list` reads.
        return _build_catalogue()
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(str(path.relative_to(Path(__file__).parent)).encode() + path.read_bytes())
    for ep in sorted(plugins.entry_points(group=plugins.GROUP), key=lambda e: e.name):
        digest.update(f"{ep.name}={ep.value}@{ep.dist.version if ep.dist is not None else ''}".encode())
        try:  # the plugin module's own file: an edited plugin is listed afresh without importing it
            spec = importlib.util.find_spec(ep.module)
        except Exception:  # noqa: BLE001  (a broken plugin is named when the catalogue is built)
            spec = None
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            digest.update(Path(spec.origin).read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "padkd"
    path = cache / f"catalogue-{digest.hexdigest()[:20]}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    catalogue = _build_catalogue()
    try:
        files.atomic_write_text(path, json.dumps(catalogue))
    except OSError:  # a read-only home: list without the cache
        pass
    return catalogue


def first_sentence(text: str) -> str:
    """The first sentence of a docstring's first paragraph, whole (its lines joined)."""
    import re

    paragraph = " ".join((text.strip().split("\n\n") or [""])[0].split())
    return re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph, maxsplit=1)[0]


def _cmd_list(args: argparse.Namespace) -> int:
    from padkd.errors import did_you_mean

    entries = _catalogue()[args.what]
    if args.name is not None:
        if args.name not in entries:
            raise PadkdError(f"unknown {args.what[:-1]} '{args.name}'{did_you_mean(args.name, entries)}")
        entry = entries[args.name]
        print("\n".join(filter(None, [args.name, entry["extra"], "", entry["doc"]])))
        return 0
    for name, entry in entries.items():
        print(" ".join(filter(None, [f"{name:18s}", first_sentence(entry["doc"]), entry["extra"]])))
    return 0


def _recipe_summary(path: Path) -> str:
    """A recipe's first sentence: its leading comment block, up to the first command line (`#   padkd ...`)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#") or line.startswith("#  "):
            break
        lines.append(line.lstrip("#").strip())
    return first_sentence(" ".join(lines))


def _cmd_recipes(args: argparse.Namespace) -> int:
    import fnmatch

    from padkd.config import recipe_names, recipe_path

    if args.copy is not None:
        return _copy_recipe(*args.copy)
    pattern = args.pattern or "*"
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    names = [n for n in recipe_names() if fnmatch.fnmatchcase(n, glob)]
    if not names:
        raise PadkdError(f"no built-in recipe matches '{pattern}'; `padkd recipes` lists them all")
    width = max(len(n) for n in names)
    for name in names:
        path = recipe_path(name)
        assert path is not None
        print(f"{name:{width}s}  {_recipe_summary(path)}".rstrip())
    return 0


def _copy_recipe(name: str, dest: str) -> int:
    """Write built-in recipe `name` to `dest` (a file, or a folder to put NAME.yaml in), never over a file."""
    from padkd.config import recipe_path

    source = recipe_path(name)
    if source is None:
        from padkd.config import find_config

        find_config(name)  # the one-line "not found" with the closest recipe
        raise PadkdError(f"'{name}' is a file, not a built-in recipe; copy it with cp")
    target = Path(dest)
    if target.is_dir():
        target = target / source.name
    try:
        with target.open("x", encoding="utf-8") as f:
            f.write(source.read_text(encoding="utf-8"))
    except FileExistsError:
        raise PadkdError(f"'{target}' exists; padkd never overwrites it: remove it or choose another DEST") from None
    print(f"copied recipe {name} to {target}; its `extends:` bases are built-in recipes (or files of that path "
          f"in the current directory); train it with: padkd train {target}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out or ("runs/demo" if args.task == "classification" else f"runs/demo-{args.task}"))
    options = {"quick": args.quick, "quiet": args.quiet, "overwrite": args.overwrite, "resume": args.resume}
    if args.seeds is not None:
        options["seeds"] = args.seeds
    if args.task == "retrieval":
        from padkd.demos.retrieval import run_retrieval_demo

        run_retrieval_demo(out, data_root=args.data_root, **options)
        return 0
    if args.data_root is not None:
        raise PadkdError("--data-root applies to --task retrieval (its MNIST protocol)")
    if args.task == "language":
        from padkd.demos.language import run_language_demo

        run_language_demo(out, **options)
        return 0
    if args.task == "detection":
        from padkd.demos.detection import run_detection_demo

        run_detection_demo(out, **options)
        return 0
    from padkd.demos.classification import run_demo

    run_demo(out, **options)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import shlex

    from padkd.report import report_runs
    from padkd.report.runs import relative

    runs, out = [Path(r) for r in args.runs], Path(args.out)
    # The command as run from the report's folder: the report holds no path of this machine.
    command = shlex.join(["padkd", "report", *(relative(r, out) for r in runs), "--out", "."]
                         + (["--baseline", args.baseline] if args.baseline else []))
    report = report_runs(runs, out, baseline=args.baseline, command=command)
    print(f"report: {report}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from padkd.study import run_study

    run_study(Path(args.out), mode=args.mode, data_root=args.data_root, jobs=args.jobs, seeds=args.seeds,
              only=args.only, quiet=args.quiet, train=not args.no_train, minutes=args.minutes)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="padkd", description="Prime-Aware Adaptive Distillation toolkit")
    parser.add_argument("--version", action="version", version=f"padkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=int, metavar="N", help="CPU threads of torch's operators (wins over "
                         "engine.threads; default: the cores idle at start, see docs/speed.md)")

    p = sub.add_parser("train", help="train from a YAML config", parents=[threads])
    p.add_argument("config", help="a YAML config file, or a built-in recipe's name (`padkd recipes`), e.g. "
                   "digits/teacher")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.0.epochs=5 seed=1 (anywhere "
                   "among the options)")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from checkpoints/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint's student", parents=[threads])
    p.add_argument("checkpoint", help="a .pt file or a run directory (its best checkpoint)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run's config (e.g. data.root=...)")
    p.add_argument("--config", help="config to take data and model from (default: the run's config.yaml)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="write the student alone (no PAD heads, connectors or optimizer)")
    p.add_argument("checkpoint", help="a .pt file or a run directory (its best checkpoint)")
    p.add_argument("-o", "--output", required=True, help="where to write the exported student")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import-teacher", help="convert a RepDistiller/mdistiller/torchdistill checkpoint into a "
                       "padkd export of a zoo model, checked key by key")
    p.add_argument("source", help="the foreign checkpoint: a state dict, bare or under 'model'/'state_dict'")
    p.add_argument("--model", required=True, help="registered model it holds, e.g. resnet56 (padkd list models)")
    p.add_argument("--num-classes", type=int, help="classes it was trained for (default: read from its classifier)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a model option, repeatable (e.g. --option net_size=0.5)")
    p.add_argument("--part", choices=["student", "teacher"],
                   help="which model of a distiller checkpoint (mdistiller's latest/best; default student)")
    p.add_argument("-o", "--output", required=True, help="where to write the padkd export")
    p.set_defaults(func=_cmd_import_teacher)

    p = sub.add_parser("cache-teacher", help="run a language run's teacher once over the training split and store "
                       "its top-k logits in task.teacher_cache (offline KD)", parents=[threads])
    p.add_argument("config", help="the distillation config (task language_modeling with teacher_cache)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    p.add_argument("--k", type=int, help="logits kept per token (default task.cache_k; at most the vocabulary)")
    p.set_defaults(func=_cmd_cache_teacher)

    p = sub.add_parser("list", help="list registered components")
    p.add_argument("what", choices=list(_REGISTRIES))
    p.add_argument("name", nargs="?", help="one component: its full description")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("recipes", help="list the built-in recipes (train one by name: padkd train digits/teacher)")
    p.add_argument("pattern", nargs="?", help="a part of the name, or a glob (e.g. 'cifar100/*/kd')")
    p.add_argument("--copy", nargs=2, metavar=("NAME", "DEST"), help="write recipe NAME to the file or folder "
                   "DEST to edit it (never overwrites)")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("demo", help="the embedded default: teacher + students on scikit-learn digits, report",
                       parents=[threads])
    p.add_argument("--task", choices=["classification", "retrieval", "detection", "language"],
                   default="classification",
                   help="classification (5 students, default), retrieval (train on digits 0-4, retrieve 5-9), "
                        "detection (synthetic shapes in the COCO format) or language (GPT students on Python's "
                        "own documentation)")
    p.add_argument("--out", help="output directory (default runs/demo, runs/demo-TASK for the other tasks)")
    p.add_argument("--seeds", type=int, help="paired seeds per student (default 8 for classification, 5 for "
                                              "retrieval, 1 for detection, 2 for language)")
    p.add_argument("--data-root", help="retrieval: run the protocol on the MNIST files under this folder")
    p.add_argument("--quick", action="store_true", help="a few epochs only: a smoke test whose report judges nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out: finished runs "
                   "are reused, the interrupted one resumes from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("report", help="report on finished runs: curves, σ² diagnostics, paired comparisons")
    p.add_argument("runs", nargs="+", help="run directories (output_dir of padkd train); runs that differ only by "
                   "seed are one setting, compared with the baseline paired by seed")
    p.add_argument("--out", default="runs/report", help="where report.md and its plots go (default runs/report)")
    p.add_argument("--baseline", help="the setting others are compared with (default: that of the first run)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("study", help="the evidence study: where PAD helps or hurts on digits and MNIST, and why",
                       parents=[threads])
    p.add_argument("--mode", choices=["quick", "full"], default="quick",
                   help="quick: digits only, few seeds (minutes); full: every factor (over 90 min on 2 cores; "
                   "see --minutes)")
    p.add_argument("--out", default="runs/study", help="output directory; a rerun reuses its finished runs")
    p.add_argument("--data-root", default=None, help="folder holding MNIST/raw (the MNIST parts are skipped "
                   "without it)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained in parallel, one thread each (default 2)")
    p.add_argument("--seeds", type=int, default=None, help="paired seeds per comparison (default: the mode's)")
    p.add_argument("--only", nargs="+", default=None, help="run only these factors (see docs/evidence.md)")
    p.add_argument("--no-train", action="store_true", help="only analyse the runs finished so far")
    p.add_argument("--minutes", type=float, default=None, help="start no run after this many minutes, then analyse "
                   "what finished; the same command later continues")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_study)
    return parser


def _crash_report(args: argparse.Namespace) -> Path:
    """Write the current exception's traceback to the run directory (else a temporary file); its path.
    Never raises: a folder that cannot be made or named (a full disk, the C locale) means the next one."""
    import tempfile
    import time
    import traceback

    from padkd import files

    text = f"padkd {__version__}, {' '.join(sys.argv)}\n\n{traceback.format_exc()}"
    data = text.encode("utf-8", "backslashreplace")  # argv may hold undecodable bytes
    folder = getattr(args, "run_dir", None)
    for target in ([folder] if folder is not None else []) + [tempfile.gettempdir()]:
        try:
            Path(target).mkdir(parents=True, exist_ok=True)
            return files.create_exclusive(Path(target), f"padkd-crash-{time.strftime('%Y%m%d-%H%M%S')}-", ".log",
                                          data)
        except Exception:  # noqa: BLE001, S112  (the crash path must not crash; try the next folder)
            continue
    return Path("(nowhere: no writable folder)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `train` and `eval` taking their key=value overrides anywhere among the
    options (`padkd train CFG --resume seed=1` as well as `padkd train CFG seed=1 --resume`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in _WITH_OVERRIDES and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: a reader that closed the pipe (`padkd list | head -1`) wants no more, and
    the interpreter's final flush must not fail either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    previous = os.environ.get(THREADS_ENV)
    try:
        return _main(args)
    finally:  # a call of main() in a process that goes on (a test, a notebook) leaves its environment as it was
        if previous is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = previous


def _main(args: argparse.Namespace) -> int:
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            print(f"padkd: error: --threads {args.threads}: give at least 1", file=sys.stderr)
            return 2
        os.environ[THREADS_ENV] = str(args.threads)  # read by every run this command starts (engine/cpu.py)
    try:
        if args.command != "list":  # list loads plugins only to build its catalogue
            from padkd.plugins import load_plugins

            load_plugins()
        code: int = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except PadkdError as err:
        from padkd.engine.trainer import Interrupted

        print(f"padkd: error: {err}", file=sys.stderr)
        return 130 if isinstance(err, Interrupted) else 2
    except OSError as err:  # the file system said no: a read-only folder, a full disk, a path below a file
        where = f"'{err.filename}': " if err.filename else ""
        print(f"padkd: error: {where}{err.strerror or err}; check the path, its permissions and free space",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("padkd: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (one line, and the full story on disk for a bug report)
        if isinstance(err, UnicodeEncodeError) and sys.getfilesystemencoding().lower() not in ("utf-8", "utf8"):
            print(f"padkd: error: {str(err)[:200]}: this system's encoding is {sys.getfilesystemencoding()} (the C "
                  "locale?); run padkd in a UTF-8 locale (e.g. LANG=C.UTF-8, or PYTHONUTF8=1)", file=sys.stderr)
            return 2  # text or a name the locale cannot encode: the user's setting, not a bug
        report = _crash_report(args)
        print(f"padkd: internal error: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}; the full "
              f"traceback is in {report}; please report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
