"""Built-in recipes: named from any directory, listed, copied out, and reachable by `extends:`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from padkd.cli import main
from padkd.config import RECIPES, find_config, load_config, read_raw, recipe_names
from padkd.errors import PadkdError


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current directory outside the repository, holding nothing."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_recipe_is_named_from_anywhere_with_or_without_its_suffix(elsewhere: Path) -> None:
    expected = RECIPES / "digits" / "teacher.yaml"
    assert find_config("digits/teacher") == expected
    assert find_config("digits/teacher.yaml") == expected
    cfg = load_config("digits/teacher", ["output_dir=runs/t", "stages.0.epochs=1"])
    assert cfg.name == "digits-teacher" and cfg.stages[0].epochs == 1 and cfg.output_dir == "runs/t"
    assert {"digits/teacher", "digits/kd", "cifar100/resnet32x4-resnet8x4/kd", "cifar100/base"} <= set(recipe_names())


def test_a_real_path_wins_over_a_recipe_of_the_same_name(elsewhere: Path) -> None:
    own = elsewhere / "digits" / "teacher.yaml"
    own.parent.mkdir()
    own.write_text(yaml.safe_dump({**read_raw(RECIPES / "digits" / "teacher.yaml"), "seed": 41}))
    assert find_config("digits/teacher.yaml") == Path("digits/teacher.yaml")
    assert load_config("digits/teacher.yaml").seed == 41
    assert load_config("digits/teacher").seed == 0  # no file of that exact path: the built-in recipe


@pytest.mark.parametrize("name", ["../../pyproject.toml", "../cli", "/no/such/digits/kd.yaml", ""])
def test_a_recipe_name_never_reaches_outside_the_recipes(elsewhere: Path, name: str) -> None:
    with pytest.raises(PadkdError, match="not found"):
        find_config(name)


def test_not_found_names_the_resolved_path_and_the_closest_recipe(elsewhere: Path) -> None:
    with pytest.raises(PadkdError) as err:
        find_config("digits/teachr")
    message = str(err.value)
    assert str(elsewhere / "digits" / "teachr") in message and "did you mean 'digits/teacher'?" in message
    assert "padkd recipes" in message


def test_extends_reaches_built_in_bases_and_paths_from_the_current_directory(elsewhere: Path) -> None:
    (elsewhere / "mine").mkdir()
    (elsewhere / "mine" / "kd.yaml").write_text("extends: digits/kd.yaml\nseed: 5\n")
    cfg = load_config("mine/kd.yaml")
    assert cfg.seed == 5 and cfg.stages[0].terms[0].method.name == "kd"
    (elsewhere / "mine" / "more.yaml").write_text("extends: mine/kd.yaml\nseed: 6\n")  # from the current directory
    assert load_config("mine/more.yaml").seed == 6
    (elsewhere / "mine" / "wrong.yaml").write_text("extends: kd.yaml\n")  # written relative to its own folder
    with pytest.raises(PadkdError, match="bases are found from the current directory: write extends: mine/kd.yaml"):
        load_config("mine/wrong.yaml")


def test_every_recipe_extends_only_built_in_recipe_names() -> None:
    for path in RECIPES.rglob("*.yaml"):
        bases = yaml.safe_load(path.read_text()).get("extends") or []
        for base in [bases] if isinstance(bases, str) else bases:
            assert (RECIPES / base).is_file() and ".." not in base, (path, base)


def test_recipes_lists_names_with_their_first_sentence(elsewhere: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes", "digits"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["digits/fitnet_pad", "digits/kd", "digits/pad_l2", "digits/teacher"]
    assert lines[-1].split(None, 1)[1] == "Teacher for the digits recipes: a 3-block CNN, plain cross-entropy."
    assert main(["recipes", "cifar100/*/kd"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "cifar100/resnet32x4-resnet8x4/kd" in names and all(n.endswith("/kd") for n in names)


def test_recipes_of_no_match_is_one_line(capsys: pytest.CaptureFixture[str], one_line_error) -> None:
    one_line_error(["recipes", "no-such-recipe"], capsys, "no built-in recipe matches 'no-such-recipe'")


def test_copy_writes_the_recipe_and_never_overwrites(elsewhere: Path, capsys: pytest.CaptureFixture[str],
                                                      one_line_error) -> None:
    assert main(["recipes", "--copy", "cifar100/resnet32x4-resnet8x4/kd", "kd.yaml"]) == 0
    capsys.readouterr()
    source = RECIPES / "cifar100" / "resnet32x4-resnet8x4" / "kd.yaml"
    assert (elsewhere / "kd.yaml").read_text() == source.read_text()
    # the copy's bases are built-in recipes: it loads as the original does
    assert load_config("kd.yaml").model_dump() == load_config(source).model_dump()
    (elsewhere / "kd.yaml").write_text("mine\n")
    one_line_error(["recipes", "--copy", "digits/kd", "kd.yaml"], capsys, "exists", "never overwrites")
    assert (elsewhere / "kd.yaml").read_text() == "mine\n"
    (elsewhere / "out").mkdir()
    assert main(["recipes", "--copy", "digits/kd", "out"]) == 0
    assert (elsewhere / "out" / "kd.yaml").read_text() == (RECIPES / "digits" / "kd.yaml").read_text()
    one_line_error(["recipes", "--copy", "digits/kk", "x.yaml"], capsys, "did you mean 'digits/kd'")


@pytest.mark.slow
def test_the_wheel_trains_a_named_recipe_outside_the_repository(tmp_path: Path) -> None:
    """Build the wheel, install it alone into a folder that shadows any other padkd, and from a directory
    outside the repository train a built-in recipe by name for one epoch and report it."""
    import os
    import shutil
    import subprocess
    import sys
    import zipfile

    root, tree = Path(__file__).resolve().parents[1], tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):  # a copy: the build writes build/ and *.egg-info beside them
        shutil.copy2(root / name, tree / name)
    shutil.copytree(root / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(tree)], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("padkd-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("padkd/recipes/")}
    assert {f"padkd/recipes/{p.relative_to(RECIPES).as_posix()}" for p in RECIPES.rglob("*.yaml")} <= shipped
    site, work = tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(site), "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def padkd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "padkd.cli", *args], capture_output=True, text=True,
                              timeout=300, cwd=work, env=env)

    where = subprocess.run([sys.executable, "-c", "import padkd; print(padkd.__file__)"], capture_output=True,
                           text=True, cwd=work, env=env)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr  # not this checkout
    trained = padkd("train", "digits/teacher", "stages.0.epochs=1", "output_dir=runs/teacher", "--quiet")
    assert trained.returncode == 0, trained.stderr[-2000:]
    final = json.loads((work / "runs" / "teacher" / "final.json").read_text())
    assert final["best"]["top1"] > 20.0  # one epoch of the teacher on digits: well above chance (10%)
    reported = padkd("report", "runs/teacher", "--out", "runs/report")
    assert reported.returncode == 0, reported.stderr[-2000:]
    assert (work / "runs" / "report" / "report.md").is_file()
