"""CIFAR-100 and ImageNet recipes: the CRD protocol in every shipped recipe, config patches by index, the
LR scaling rule, and tiny end-to-end runs of zoo pairs through the CLI (fp32, bf16 + channels_last,
torch.compile) and under torchrun (2 gloo processes equal 1 process at the same global batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from padkd import checkpoint as ckpt
from padkd.cli import main
from padkd.config import Config, EngineConfig, StageConfig, load_config, merge, read_raw
from padkd.distiller import Distiller
from padkd.engine.logging import read_metrics
from padkd.engine.stage import StageRun
from padkd.errors import PadkdError
from padkd.models import MODELS
from padkd.tasks import Classification
from padkd.weightings import WEIGHTINGS

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "src" / "padkd" / "recipes" / "cifar100"

# The pairs of the CRD paper's Table 1 (same family) and Table 2 (different families), as in the
# RepDistiller README; the CRD tables' "MobileNetV2" is the zoo's mobilenetv2_half.
SAME_FAMILY = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
               ("resnet110", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")]
CROSS_FAMILY = [("vgg13", "mobilenetv2_half"), ("resnet50", "mobilenetv2_half"), ("resnet50", "vgg8"),
                ("resnet32x4", "shufflenetv1"), ("resnet32x4", "shufflenetv2"), ("wrn_40_2", "shufflenetv1")]
METHODS = {"student", "kd", "l2", "pad_l2", "l2_control", "pad_l2_single", "pad_kd", "crd", "pad_crd", "fitnet",
           "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "nst", "dkd", "dist", "kd_ls", "dkd_ls", "mlkd",
           "mlkd_ls", "ctkd", "ctkd_ls", "reviewkd", "ofd", "dist_plus",
           "kd_entropy", "dkd_entropy", "kd_wsld"}  # + fsp for Table 1's pairs
#: Recipes that weight cross-entropy by 0.1 (KD's CRD setting, and the authors' of LS, MLKD, CTKD and EA-KD).
LOW_CE = {"kd", "pad_kd", "kd_ls", "mlkd", "mlkd_ls", "ctkd", "ctkd_ls", "kd_entropy"}
#: The per-sample weightings since PAD (issue 19): recipe -> (method, weighting, the weighting's options).
WEIGHTED = {"kd_entropy": ("kd", "entropy", {"temperature": 3.0, "entropy_bound": 100.0}),
            "dkd_entropy": ("dkd", "entropy", {"temperature": 3.0, "entropy_bound": 100.0}),
            "kd_wsld": ("kd", "wsld", {})}
LOW_LR_STUDENTS = {"mobilenetv2_half", "shufflenetv1", "shufflenetv2"}


# ---------------------------------------------------------------- config patches and the LR scaling rule


def test_a_mapping_with_integer_keys_patches_list_items(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # bases are found from the current directory
    base = {"stages": [{"name": "a", "epochs": 3, "optimizer": {"lr": 0.1, "momentum": 0.9}}, {"name": "b"}]}
    patched = merge(base, {"stages": {0: {"optimizer": {"lr": 0.01}}}})
    assert patched["stages"] == [{"name": "a", "epochs": 3, "optimizer": {"lr": 0.01, "momentum": 0.9}}, {"name": "b"}]
    assert base["stages"][0]["optimizer"]["lr"] == 0.1  # the base is not modified
    assert merge(base, {"stages": [{"name": "c"}]})["stages"] == [{"name": "c"}]  # a list still replaces
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "bad.yaml").write_text("extends: base.yaml\nstages: {2: {epochs: 1}}\n")
    with pytest.raises(PadkdError) as err:
        read_raw(tmp_path / "bad.yaml")
    assert str(err.value) == (f"{tmp_path / 'bad.yaml'}: stages: patch index 2 is not an item of the base's list "
                              "of 2; use 0..1, or give the whole list")


@pytest.mark.parametrize(("lr_per", "batch_size", "accumulate", "expected"), [
    (None, 32, 2, 0.1),             # no rule: the LR as written, whatever the batch
    (256, 32, 1, 0.1 * 32 / 256),   # 32 images per optimizer step
    (256, 32, 2, 0.1 * 64 / 256),   # accumulating 2 micro-batches makes the step's batch 64
    (64, 64, 1, 0.1),               # the batch the LR was written for
])
def test_lr_per_scales_the_lr_by_the_global_batch(lr_per: int | None, batch_size: int, accumulate: int,
                                                  expected: float) -> None:
    """The rule within one process; the world size's factor is checked under torchrun below."""
    stage = StageConfig.model_validate({"epochs": 10, "optimizer": {"lr": 0.1, "lr_per": lr_per},
                                        "scheduler": {"name": "multistep", "milestones": [5]}})
    student = MODELS.create("mlp", {}, "m", in_channels=1, num_classes=3)
    run = StageRun(stage, Distiller(student, task=Classification()), EngineConfig(accumulate=accumulate),
                   torch.device("cpu"), world=1, batch_size=batch_size)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert run.set_lr(6.0) == pytest.approx(expected * 0.1)  # the schedule multiplies the scaled LR
    if lr_per is not None:
        with pytest.raises(ValueError, match="global batch"):
            StageRun(stage, Distiller(student, task=Classification()), EngineConfig(), torch.device("cpu"), world=1)


# ---------------------------------------------------------------- the shipped recipes


@pytest.fixture(scope="module")
def recipes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Config]:
    out = tmp_path_factory.mktemp("recipes")
    return {(p.parent.name, p.stem): load_config(p, [f"output_dir={out}"])
            for p in sorted(CIFAR.glob("*-*/*.yaml"))}


def _optimizer(stage: StageConfig) -> tuple[float, int | None, float, float]:
    o = stage.optimizer
    return o.lr, o.lr_per, o.momentum, o.weight_decay


def test_every_crd_pair_has_every_recipe(recipes: dict[tuple[str, str], Config]) -> None:
    found: dict[str, set[str]] = {}
    for pair, method in recipes:
        found.setdefault(pair, set()).add(method)
    expected = {f"{t}-{s}": METHODS | {"fsp"} for t, s in SAME_FAMILY} | {f"{t}-{s}": METHODS for t, s in CROSS_FAMILY}
    assert found == expected


def test_recipes_follow_the_crd_protocol(recipes: dict[tuple[str, str], Config]) -> None:
    for (pair, method), cfg in recipes.items():
        teacher, student = pair.split("-")
        where = f"{pair}/{method}"
        assert cfg.student.model.name == student, where
        assert (cfg.teacher is None) == (method == "student"), where
        if cfg.teacher is not None:
            assert cfg.teacher.model.name == teacher and cfg.teacher.checkpoint == f"runs/cifar100/teachers/{teacher}"
        assert cfg.data.name == "cifar100" and cfg.data.batch_size == 64 and cfg.data.options["val_size"] == 0, where
        main_lr = 0.01 if student in LOW_LR_STUDENTS else 0.05
        main = [s for s in cfg.stages if s.epochs == 240]
        assert len(main) == 1, where
        assert _optimizer(main[0]) == (main_lr, 64, 0.9, 5e-4), where
        assert main[0].scheduler.name == "multistep" and main[0].scheduler.milestones == [150, 180, 210], where
        assert main[0].scheduler.gamma == 0.1, where
        assert main[0].task_weight == (0.1 if method in LOW_CE else 1.0), where
        if method in ("ab", "fsp", "ft"):  # RepDistiller's 30-epoch init stage, no cross-entropy, constant LR
            init = cfg.stages[0]
            init_lr = 0.01 if method == "ft" and student.startswith(("resnet", "wrn")) else main_lr
            assert (init.epochs, init.task_weight, init.scheduler.name) == (30, 0.0, "constant"), where
            assert _optimizer(init) == (init_lr, 64, 0.9, 5e-4), where


def test_entropy_and_wsld_recipes_load_with_their_weighting(recipes: dict[tuple[str, str], Config]) -> None:
    """EA-KD, EA-DKD and WSLD: every pair's recipe loads, and its one term is the method under its weighting
    with the authors' settings (DKD's beta stays the pair's, as in its dkd.yaml)."""
    for teacher, student in SAME_FAMILY + CROSS_FAMILY:
        pair = f"{teacher}-{student}"
        for recipe, (method, weighting, options) in WEIGHTED.items():
            where = f"{pair}/{recipe}"
            (main_stage,) = recipes[(pair, recipe)].stages
            (term,) = main_stage.terms
            assert term.method.name == method, where
            assert term.weighting.name == weighting and term.weighting.options == options, where
            WEIGHTINGS.create(weighting, term.weighting.options, where)  # the options are the factory's
            if recipe == "dkd_entropy":
                assert term.method.options == recipes[(pair, "dkd")].stages[0].terms[0].method.options, where
            else:
                temperature, weight = (4.0, 0.9) if weighting == "entropy" else (2.0, 2.5)
                assert (term.method.options["temperature"], term.weight) == (temperature, weight), where


def test_pad_l2_and_its_epoch_matched_control_differ_only_in_the_stage_2_weighting(
        recipes: dict[tuple[str, str], Config]) -> None:
    for (pair, method), pad in recipes.items():
        if method != "pad_l2":
            continue
        control = recipes[(pair, "l2_control")]
        l2 = recipes[(pair, "l2")]
        assert pad.stages[0] == control.stages[0] == l2.stages[0]
        final_lr = pad.stages[0].optimizer.lr * 0.1 ** 3
        for cfg in (pad, control):
            stage2 = cfg.stages[1]
            assert stage2.epochs == 80 and stage2.scheduler.name == "constant"
            assert stage2.optimizer.lr == pytest.approx(2 * final_lr)  # twice stage 1's final LR
        assert pad.stages[1].terms[0].weighting.name == "pad" and pad.stages[1].terms[0].weight == 1.0
        assert control.stages[1].terms[0] == pad.stages[0].terms[0]  # plain L2, as in stage 1
        assert pad.stages[1].terms[0].method == pad.stages[0].terms[0].method
        assert pad.stages[1].terms[0].name == pad.stages[0].terms[0].name  # so the connector is carried


def test_imagenet_recipes() -> None:
    cfgs = {p.stem: load_config(p) for p in sorted((ROOT / "src" / "padkd" / "recipes" / "imagenet").glob("*.yaml"))}
    assert set(cfgs) == {"base", "l2", "pad_l2", "l2_control", "kd"}
    l2, pad, control, kd = cfgs["l2"], cfgs["pad_l2"], cfgs["l2_control"], cfgs["kd"]
    assert [(s.epochs, s.optimizer.lr, s.optimizer.lr_per, s.scheduler.milestones) for s in l2.stages] == [
        (90, 0.1, 256, [30, 60])]
    assert l2.stages[0].terms[0].weight == 15.0 and l2.stages[0].optimizer.weight_decay == 1e-4
    for cfg in (pad, control):  # stage 2 of the reference: 30 epochs from the L2 run's student
        assert cfg.student.checkpoint == l2.output_dir and len(cfg.stages) == 1
        assert (cfg.stages[0].epochs, cfg.stages[0].optimizer.lr, cfg.stages[0].optimizer.lr_per) == (30, 0.001, 256)
        assert cfg.stages[0].scheduler.name == "constant"
    assert pad.stages[0].terms[0].weighting.name == "pad" and control.stages[0].terms[0] == l2.stages[0].terms[0]
    assert kd.stages[0].task_weight == 0.5 and kd.stages[0].terms[0].weight == 0.5
    assert kd.stages[0].terms[0].method.options == {"temperature": 1.0}
    assert {c.teacher.model.options["weights_path"] for c in (l2, pad, control, kd) if c.teacher} == {
        "weights/resnet34-b627a593.pth"}


# ---------------------------------------------------------------- tiny end-to-end runs


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-100 folder in the authors' Python 2 pickle format: 128 training and 32 test images."""
    from test_data_classification import write_cifar

    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, "cifar100", n_train=128, n_test=32)
    return root


def _common(root: Path, out: Path) -> list[str]:
    return [f"output_dir={out}", f"data.root={root}", "data.batch_size=32", "data.eval_batch_size=32", "device=cpu",
            "log.tensorboard=false", "log.progress=none"]


def _train(config: Path, overrides: list[str]) -> None:
    assert main(["train", str(config), *overrides, "--quiet"]) == 0


@pytest.fixture(scope="module")
def teacher_run(cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped teacher recipe with a resnet8, one epoch of the tiny set."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    _train(CIFAR / "teachers" / "resnet56.yaml",
           [*_common(cifar_root, out), "student.model.name=resnet8", "stages.0.epochs=1"])
    return out


def _epochs(run: Path) -> list[dict[str, Any]]:
    return [e for e in read_metrics(run) if e["event"] == "epoch"]


@pytest.mark.slow
def test_zoo_pair_trains_kd_and_two_stage_pad_l2_through_the_cli(cifar_root: Path, teacher_run: Path,
                                                                  tmp_path: Path) -> None:
    pair = ["teacher.model.name=resnet8", f"teacher.checkpoint={teacher_run}", "student.model.name=wrn_16_1"]
    _train(CIFAR / "resnet56-resnet20" / "kd.yaml", [*_common(cifar_root, tmp_path / "kd"), *pair, "stages.0.epochs=1"])
    _train(CIFAR / "resnet56-resnet20" / "pad_l2.yaml",
           [*_common(cifar_root, tmp_path / "pad"), *pair, "stages.0.epochs=1", "stages.1.epochs=1"])
    kd, pad = _epochs(tmp_path / "kd"), _epochs(tmp_path / "pad")
    # 128 images in batches of 32: 4 steps an epoch; lr_per 64 scales the recipes' LRs by 32 / 64.
    assert [(e["stage_name"], e["global_step"]) for e in kd] == [("main", 4)]
    assert [(e["stage_name"], e["global_step"]) for e in pad] == [("l2", 4), ("pad", 8)]
    assert kd[0]["lr"] == pytest.approx(0.05 * 32 / 64) and pad[1]["lr"] == pytest.approx(1e-4 * 32 / 64)
    assert set(kd[0]["train"]) == {"task", "kd", "total"} and set(pad[1]["train"]) == {"task", "l2", "total"}
    for run in ("kd", "pad"):
        final = json.loads((tmp_path / run / "final.json").read_text())
        assert final["split"] == "test" and 0 <= final["last"]["top1"] <= 100
    records = (tmp_path / "pad" / "records" / "1-pad-test.csv").read_text().splitlines()
    assert len(records) == 1 + 32 and "log_var" in records[0]  # PAD's σ² per test image


@pytest.mark.slow
def test_bf16_channels_last_and_compile_train_like_fp32(cifar_root: Path, teacher_run: Path, tmp_path: Path) -> None:
    base = ["teacher.model.name=resnet8", f"teacher.checkpoint={teacher_run}", "student.model.name=resnet8",
            "stages.0.epochs=1", "data.augment=false"]
    variants = {"fp32": [], "bf16": ["engine.precision=bf16", "engine.channels_last=true"],
                "compiled": ["engine.compile=true", "engine.compile_backend=aot_eager"]}
    losses = {}
    for name, extra in variants.items():
        _train(CIFAR / "resnet56-resnet20" / "pad_kd.yaml", [*_common(cifar_root, tmp_path / name), *base, *extra])
        losses[name] = _epochs(tmp_path / name)[0]["train"]
    # The same seed and data: aot_eager runs the same kernels (rounding only); bf16 autocast keeps the KD and
    # PAD reductions in fp32, so its epoch means stay within bf16's precision of the fp32 ones.
    for key in ("task", "kd"):
        assert losses["compiled"][key] == pytest.approx(losses["fp32"][key], rel=1e-4)
        assert losses["bf16"][key] == pytest.approx(losses["fp32"][key], rel=5e-2)
    state = ckpt.load(tmp_path / "bf16" / "checkpoints" / "last.pt")
    assert state["student"]["conv1.weight"].dtype == torch.float32  # autocast: the weights stay fp32


_LAUNCH = textwrap.dedent("""
    import sys
    from padkd.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_at_the_same_global_batch(cifar_root: Path, tmp_path: Path) -> None:
    """2 × 32 under torchrun against 1 × 64: the same samples per step (the sampler deals the epoch's permutation
    to ranks in turn), gradients averaged by DDP, and an MLP pair without BatchNorm (batch statistics of 32
    would differ from those of 64), terms KD + L2 and no augmentation (each rank draws its own crops)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to the interpreter")
    mlp = {"name": "mlp", "input_size": 32, "hidden": [64, 32]}
    raw = {"name": "ddp", "output_dir": "x", "seed": 3, "device": "cpu",
           "data": {"name": "cifar100", "root": str(cifar_root), "val_size": 0, "augment": False, "batch_size": 64},
           "teacher": {"model": {**mlp, "hidden": [128]}}, "student": {"model": mlp},
           "stages": [{"epochs": 2, "optimizer": {"lr": 0.05, "lr_per": 64}, "scheduler": {"name": "constant"},
                       "terms": [{"name": "kd", "method": {"name": "kd"}, "student": "fc", "teacher": "fc"},
                                 {"name": "l2", "method": {"name": "hint"}, "student": "fc:in", "teacher": "fc:in"}]}],
           "records": {"splits": []}, "log": {"tensorboard": False, "progress": "none"}}
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(raw))
    _train(config, [f"output_dir={tmp_path / 'one'}"])
    script = tmp_path / "launch.py"
    script.write_text(_LAUNCH)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), "train", str(config),
                           f"output_dir={tmp_path / 'two'}", "data.batch_size=32", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (ckpt.load(tmp_path / run / "checkpoints" / "last.pt") for run in ("one", "two"))
    assert one["progress"]["global_step"] == two["progress"]["global_step"] == 4  # 128 / 64 per epoch, 2 epochs
    assert _epochs(tmp_path / "two")[0]["lr"] == pytest.approx(0.05)  # lr_per 64 at a global batch of 64
    # Only the order of floating-point sums differs (a mean of 64 vs the average of two means of 32).
    for key, value in one["student"].items():
        torch.testing.assert_close(two["student"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    finals = [json.loads((tmp_path / run / "final.json").read_text())["last"] for run in ("one", "two")]
    assert finals[0]["top1"] == pytest.approx(finals[1]["top1"], abs=100 / 32)  # at most one test image apart
