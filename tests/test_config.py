"""Config loading: every mistake is one line naming the key path and the fix; overrides; dumps."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from padkd.config import Config, dump_config, load_config, parse_config, set_override
from padkd.errors import PadkdError
from padkd.validate import parse_checked


@pytest.fixture
def raw(tmp_path: Path) -> dict[str, Any]:
    """A valid distillation config (the teacher checkpoint is never opened by parse_config)."""
    return {
        "name": "t",
        "output_dir": str(tmp_path / "run"),
        "data": {"name": "digits", "batch_size": 64},
        "teacher": {"model": {"name": "cnn", "widths": [8, 16]}, "checkpoint": str(tmp_path / "teacher")},
        "student": {"model": {"name": "cnn", "widths": [4, 8]}},
        "records": {"splits": ["test"]},
        "log": {"tensorboard": False, "progress": "none"},
        "stages": [
            {"name": "l2", "epochs": 2, "optimizer": {"name": "sgd", "lr": 0.05},
             "terms": [{"name": "hint", "method": {"name": "hint"}, "student": "fc:in", "teacher": "fc:in"}]},
            {"name": "pad", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.005},
             "scheduler": {"name": "constant"},
             "terms": [{"name": "hint", "method": {"name": "hint"}, "weighting": {"name": "pad"},
                        "student": "fc:in", "teacher": "fc:in"}]},
        ],
    }


def error_of(raw: dict[str, Any]) -> str:
    with pytest.raises(PadkdError) as info:
        parse_checked(raw)
    message = str(info.value)
    assert "\n" not in message, f"config errors must be one line: {message!r}"
    assert "Traceback" not in message
    return message


def edited(raw: dict[str, Any], edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    edit(out)
    return out


# ---------------------------------------------------------------- valid configs


def test_valid_config_parses_with_defaults(raw: dict[str, Any]) -> None:
    cfg = parse_config(raw)
    assert isinstance(cfg, Config)
    assert cfg.data.name == "digits" and cfg.data.batch_size == 64 and cfg.data.options == {}
    assert cfg.student.model.options == {"widths": [4, 8]}
    assert [s.epochs for s in cfg.stages] == [2, 1]
    assert cfg.stages[0].scheduler.name == "cosine"
    assert cfg.stages[0].terms[0].weighting.name == "uniform"
    assert cfg.stages[1].terms[0].weighting.name == "pad"
    assert cfg.term_names(cfg.stages[1]) == ["hint"]


def test_term_names_default_to_method_and_are_made_unique(raw: dict[str, Any]) -> None:
    raw["stages"][0]["terms"] = [{"method": {"name": "kd"}}, {"method": {"name": "kd", "temperature": 2.0}}]
    cfg = parse_config(raw)
    assert cfg.term_names(cfg.stages[0]) == ["kd", "kd2"]


# ---------------------------------------------------------------- error messages


def test_unknown_top_level_key_suggests_the_closest(raw: dict[str, Any]) -> None:
    raw["lgo"] = {"interval": 5}
    assert error_of(raw) == "lgo: unknown key; did you mean 'log'?"


def test_misspelt_required_top_level_key_suggests_the_right_one(raw: dict[str, Any]) -> None:
    raw["dta"] = raw.pop("data")
    message = error_of(raw)
    assert "dta" in message and "did you mean 'data'" in message


def test_nested_unknown_key_names_the_path_and_the_closest_key(raw: dict[str, Any]) -> None:
    raw["stages"][0]["optimizer"]["lrr"] = 0.1
    assert error_of(raw) == "stages[0].optimizer.lrr: unknown key; did you mean 'lr'?"


def test_unknown_key_in_a_term(raw: dict[str, Any]) -> None:
    raw["stages"][1]["terms"][0]["wieght"] = 2.0
    assert error_of(raw) == "stages[1].terms[0].wieght: unknown key; did you mean 'weight'?"


def test_unknown_method_name_suggests_the_closest(raw: dict[str, Any]) -> None:
    raw["stages"][0]["terms"][0]["method"]["name"] = "fitnett"
    assert error_of(raw) == "stages[0].terms[0].method.name: unknown method 'fitnett'; did you mean 'fitnet'?"


def test_unknown_weighting_name(raw: dict[str, Any]) -> None:
    raw["stages"][1]["terms"][0]["weighting"]["name"] = "padd"
    assert error_of(raw) == "stages[1].terms[0].weighting.name: unknown weighting 'padd'; did you mean 'pad'?"


def test_unknown_weighting_option_suggests_the_closest(raw: dict[str, Any]) -> None:
    raw["stages"][1]["terms"][0]["weighting"]["modee"] = "per_sample"
    assert error_of(raw) == "stages[1].terms[0].weighting.modee: unknown option; did you mean 'mode'?"


def test_unknown_method_option(raw: dict[str, Any]) -> None:
    raw["stages"][0]["terms"][0]["method"] = {"name": "kd", "temprature": 2.0}
    assert error_of(raw) == "stages[0].terms[0].method.temprature: unknown option; did you mean 'temperature'?"


def test_bad_weighting_option_value_names_the_allowed_values(raw: dict[str, Any]) -> None:
    raw["stages"][1]["terms"][0]["weighting"]["mode"] = "per_pixel"
    message = error_of(raw)
    assert message.startswith("stages[1].terms[0].weighting.mode: ")
    assert "'per_element'" in message and "'per_sample'" in message and "per_pixel" in message


def test_unknown_model_and_model_option(raw: dict[str, Any]) -> None:
    bad = edited(raw, lambda r: r["student"]["model"].__setitem__("name", "cnnn"))
    assert error_of(bad) == "student.model.name: unknown model 'cnnn'; did you mean 'cnn'?"
    bad = edited(raw, lambda r: r["teacher"]["model"].__setitem__("widht", [8]))
    assert error_of(bad) == "teacher.model.widht: unknown option; did you mean 'widths'?"


def test_model_options_fixed_by_the_data_are_rejected(raw: dict[str, Any]) -> None:
    raw["student"]["model"]["num_classes"] = 5
    assert error_of(raw).startswith("student.model.num_classes: unknown option")


def test_unknown_dataset_name(raw: dict[str, Any]) -> None:
    raw["data"]["name"] = "digit"
    assert error_of(raw) == "data.name: unknown dataset 'digit'; did you mean 'digits'?"


def test_misspelt_loader_key_suggests_batch_size(raw: dict[str, Any]) -> None:
    raw["data"]["batch_sise"] = 32
    assert error_of(raw) == "data.batch_sise: unknown option; did you mean 'batch_size'?"


def test_wrong_type_names_the_path_and_the_value(raw: dict[str, Any]) -> None:
    raw["stages"][0]["epochs"] = "abc"
    message = error_of(raw)
    assert message.startswith("stages[0].epochs: ")
    assert "integer" in message and "'abc'" in message


def test_out_of_range_value(raw: dict[str, Any]) -> None:
    raw["stages"][1]["optimizer"]["lr"] = -1
    message = error_of(raw)
    assert message.startswith("stages[1].optimizer.lr: ") and "greater than 0" in message


def test_bad_literal_lists_the_allowed_values(raw: dict[str, Any]) -> None:
    raw["stages"][0]["scheduler"] = {"name": "cosin"}
    message = error_of(raw)
    assert message.startswith("stages[0].scheduler.name: ")
    for allowed in ("'constant'", "'multistep'", "'cosine'"):
        assert allowed in message
    assert "'cosin'" in message


def test_bad_records_split(raw: dict[str, Any]) -> None:
    raw["records"]["splits"] = ["tst"]
    message = error_of(raw)
    assert message.startswith("records.splits[0]: ") and "'test'" in message


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda r: r.pop("stages"), "stages: required key is missing"),
        (lambda r: r.pop("output_dir"), "output_dir: required key is missing"),
        (lambda r: r["stages"][1].pop("epochs"), "stages[1].epochs: required key is missing"),
        (lambda r: r["stages"][0]["terms"][0].pop("method"), "stages[0].terms[0].method: required key is missing"),
        (lambda r: r.__setitem__("data", {"name": "mnist"}), "data.root: required option is missing"),
    ],
    ids=["stages", "output_dir", "epochs", "method", "mnist-root"],
)
def test_missing_required_key(raw: dict[str, Any], edit: Callable[[dict[str, Any]], Any], expected: str) -> None:
    assert error_of(edited(raw, edit)) == expected


def test_empty_stage_list_is_rejected(raw: dict[str, Any]) -> None:
    raw["stages"] = []
    assert error_of(raw).startswith("stages: ")


def test_terms_without_teacher(raw: dict[str, Any]) -> None:
    del raw["teacher"]
    assert error_of(raw) == "stages[0].terms: distillation terms need a teacher; add a 'teacher:' section"


def test_test_records_need_eval_test(raw: dict[str, Any]) -> None:
    raw["eval_test"] = False
    assert error_of(raw) == "records.splits: 'test' needs eval_test: true"


def test_non_mapping_config(raw: dict[str, Any]) -> None:
    with pytest.raises(PadkdError, match="YAML mapping"):
        parse_config(["not", "a", "mapping"])  # type: ignore[arg-type]


# ---------------------------------------------------------------- files


def test_load_config_reads_yaml_and_applies_overrides(raw: dict[str, Any], tmp_path: Path, write_yaml) -> None:
    path = write_yaml(tmp_path / "cfg.yaml", raw)
    cfg = load_config(path, ["stages.0.epochs=5", "seed=3", "log.interval=7"])
    assert cfg.stages[0].epochs == 5 and cfg.seed == 3 and cfg.log.interval == 7
    assert load_config(path).stages[0].epochs == 2  # the file itself is unchanged
    with pytest.raises(PadkdError, match=r"^stages\[0\]\.epochs: "):
        load_config(path, ["stages.0.epochs=abc"])


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PadkdError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "not found" in message and "\n" not in message


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: t\ndata: {name: digits\nstages: []\n")
    with pytest.raises(PadkdError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML at line ") and "\n" not in message


def test_empty_yaml_file_reports_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(PadkdError, match="required key is missing"):
        load_config(path)


def test_yaml_python_tags_are_rejected_and_never_run(tmp_path: Path, raw: dict[str, Any]) -> None:
    marker = tmp_path / "pwned"
    text = yaml.safe_dump(raw, sort_keys=False)
    text = text.replace("name: t\n", f"name: !!python/object/apply:os.system ['touch {marker}']\n", 1)
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    with pytest.raises(PadkdError) as info:
        load_config(path)
    assert "not valid YAML" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("assignment", ["name=[oops", "name=!!python/object/apply:os.system ['true']"])
def test_override_with_invalid_yaml_value_is_a_padkd_error(raw: dict[str, Any], assignment: str) -> None:
    with pytest.raises(PadkdError, match="name"):
        set_override(raw, assignment)


# ---------------------------------------------------------------- overrides


def test_override_nested_keys_and_yaml_types(raw: dict[str, Any]) -> None:
    set_override(raw, "data.batch_size=32")
    set_override(raw, "log.tensorboard=true")
    set_override(raw, "student.model.widths=[2, 4]")
    set_override(raw, "stages.1.optimizer.lr=0.001")
    set_override(raw, "stages.0.terms.0.weight=0.5")
    set_override(raw, "task.label_smoothing=0.1")  # a section absent from the file is created
    set_override(raw, "name=run 7")
    assert raw["data"]["batch_size"] == 32
    assert raw["log"]["tensorboard"] is True
    assert raw["student"]["model"]["widths"] == [2, 4]
    assert raw["stages"][1]["optimizer"]["lr"] == pytest.approx(1e-3)
    assert raw["stages"][0]["terms"][0]["weight"] == 0.5
    assert raw["task"] == {"label_smoothing": 0.1}
    assert raw["name"] == "run 7"
    cfg = parse_config(raw)
    assert cfg.student.model.options["widths"] == [2, 4] and cfg.task.label_smoothing == 0.1
    # YAML 1.1 reads '1e-3' as a string; the config still coerces it to the float field.
    set_override(raw, "stages.1.optimizer.lr=1e-3")
    assert parse_config(raw).stages[1].optimizer.lr == pytest.approx(1e-3)


def test_override_list_index(raw: dict[str, Any]) -> None:
    set_override(raw, "stages.0.epochs=5")
    assert raw["stages"][0]["epochs"] == 5 and isinstance(raw["stages"][0]["epochs"], int)
    set_override(raw, "records.splits.0=val")
    assert raw["records"]["splits"] == ["val"]
    set_override(raw, "stages.1={name: s, epochs: 3}")
    assert raw["stages"][1] == {"name": "s", "epochs": 3}


@pytest.mark.parametrize("assignment", ["stages.2.epochs=5", "stages.x.epochs=5", "stages.-1.epochs=1"])
def test_override_bad_index(raw: dict[str, Any], assignment: str) -> None:
    with pytest.raises(PadkdError, match=r"is not an index of a list of 2"):
        set_override(raw, assignment)


def test_override_through_a_scalar_and_without_equals(raw: dict[str, Any]) -> None:
    with pytest.raises(PadkdError, match="'name' is not a mapping or list"):
        set_override(raw, "name.first=1")
    with pytest.raises(PadkdError, match="expected key=value"):
        set_override(raw, "seed")


def test_override_with_empty_value_sets_none(raw: dict[str, Any]) -> None:
    set_override(raw, "teacher.checkpoint=")
    assert raw["teacher"]["checkpoint"] is None
    assert parse_config(raw).teacher.checkpoint is None


# ---------------------------------------------------------------- dump


def test_dump_config_round_trips(raw: dict[str, Any]) -> None:
    raw["stages"][0]["optimizer"] = {"name": "adamw", "lr": 1e-3, "betas": [0.8, 0.9]}
    raw["stages"][0]["scheduler"] = {"name": "multistep", "milestones": [1], "gamma": 0.5, "warmup_epochs": 0.5}
    cfg = parse_config(raw)
    text = dump_config(cfg)
    again = parse_config(yaml.safe_load(text))
    assert again == cfg
    assert dump_config(again) == text
    assert again.stages[0].optimizer.betas == (0.8, 0.9)
    assert again.stages[1].terms[0].weighting.name == "pad"


def test_dump_config_is_plain_yaml(raw: dict[str, Any]) -> None:
    text = dump_config(parse_config(raw))
    assert "!!" not in text  # no python tags: safe_load can read it back
    assert yaml.safe_load(text)["stages"][0]["terms"][0]["method"] == {"name": "hint"}


def test_engine_threads_and_precision_auto(raw: dict[str, Any]) -> None:
    cfg = parse_config({**raw, "engine": {"threads": 2, "precision": "auto"}})
    assert cfg.engine.threads == 2 and cfg.engine.precision == "auto"
    assert parse_config(raw).engine.threads is None and parse_config(raw).engine.precision == "fp32"
    with pytest.raises(PadkdError, match=r"engine.threads: Input should be greater than or equal to 1"):
        parse_config({**raw, "engine": {"threads": 0}})
    with pytest.raises(PadkdError, match=r"engine.precision: .*'auto'"):
        parse_config({**raw, "engine": {"precision": "bf32"}})
