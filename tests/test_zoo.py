"""The CIFAR zoo of the CRD benchmark, its named taps, torchvision/timm weights from local files, and
`padkd import-teacher` on the checkpoint layouts of RepDistiller, mdistiller and torchdistill."""

from __future__ import annotations

import argparse
import fractions
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from padkd import checkpoint as ckpt
from padkd.cli import main
from padkd.config import Component
from padkd.errors import PadkdError
from padkd.models import MODELS
from padkd.models.cifar import ZOO
from padkd.models.convert import import_teacher, read_state_dict
from padkd.taps import Taps

# Parameter counts at 100 classes of the reference definitions (RepDistiller b84f547 `models/`, whose
# architectures mdistiller's `models/cifar/` repeats): `sum(p.numel() for p in model_dict[k](num_classes=100)
# .parameters())`, and `mobilenetv2_T_w(6, 1.0, 100)` for the full-width MobileNetV2.
PARAMS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "resnet50": 23_705_252,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "mobilenetv2": 2_353_060, "mobilenetv2_half": 812_836, "shufflenetv1": 949_258, "shufflenetv2": 1_355_528,
}
SLOW = {"resnet50", "vgg19"}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Batch-2 forwards gain nothing from more threads, and idle OpenMP threads spin on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def zoo_model(name: str, num_classes: int = 100) -> nn.Module:
    return MODELS.create(name, {}, "model", in_channels=3, num_classes=num_classes)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- architectures


def test_zoo_is_every_pinned_model() -> None:
    assert sorted(ZOO) == sorted(PARAMS)
    assert set(ZOO) <= set(MODELS.names())
    assert all(MODELS.describe(name) for name in ZOO)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count_matches_the_reference(name: str) -> None:
    assert n_params(zoo_model(name)) == PARAMS[name]


def cifar_resnet_params(depth: int, widths: tuple[int, int, int, int], classes: int) -> int:
    """He et al.'s CIFAR ResNet counted layer by layer: 3x3 convs without bias, BN (2 per channel), a
    1x1-conv+BN projection where the width or resolution changes, and the linear classifier."""
    n = (depth - 2) // 6
    total = 3 * widths[0] * 9 + 2 * widths[0]
    previous = widths[0]
    for stage, width in enumerate(widths[1:]):
        for b in range(n):
            c_in = previous if b == 0 else width
            total += c_in * width * 9 + width * width * 9 + 4 * width
            if b == 0 and (stage > 0 or c_in != width):
                total += c_in * width + 2 * width
        previous = width
    return total + widths[3] * classes + classes


@pytest.mark.parametrize("name,depth,widths", [
    ("resnet20", 20, (16, 16, 32, 64)), ("resnet56", 56, (16, 16, 32, 64)), ("resnet110", 110, (16, 16, 32, 64)),
    ("resnet8x4", 8, (32, 64, 128, 256)), ("resnet32x4", 32, (32, 64, 128, 256)),
])
def test_resnet_counts_follow_the_layer_formula(name: str, depth: int, widths: tuple[int, int, int, int]) -> None:
    for classes in (10, 100):
        assert n_params(zoo_model(name, classes)) == cifar_resnet_params(depth, widths, classes)


def test_the_issues_rounded_counts() -> None:
    assert round(PARAMS["resnet20"] / 1e6, 2) == 0.28 and round(PARAMS["resnet56"] / 1e6, 2) == 0.86
    assert round(PARAMS["resnet8x4"] / 1e6, 2) == 1.23 and round(PARAMS["resnet32x4"] / 1e6, 2) == 7.43
    assert round(PARAMS["wrn_40_2"] / 1e6, 2) == 2.26


# Keys and shapes of the reference modules (RepDistiller's names), and keys it does not have.
REFERENCE_KEYS: dict[str, dict[str, tuple[int, ...] | None]] = {
    "resnet56": {"layer1.8.conv2.weight": (16, 16, 3, 3), "layer2.0.downsample.0.weight": (32, 16, 1, 1),
                 "layer3.0.downsample.1.running_var": (64,), "fc.weight": (100, 64),
                 "layer1.0.downsample.0.weight": None},
    "resnet8x4": {"conv1.weight": (32, 3, 3, 3), "layer1.0.downsample.0.weight": (64, 32, 1, 1),
                  "layer3.0.conv2.weight": (256, 256, 3, 3), "fc.bias": (100,)},
    "resnet50": {"layer1.0.shortcut.0.weight": (256, 64, 1, 1), "layer4.2.conv3.weight": (2048, 512, 1, 1),
                 "layer3.5.bn3.num_batches_tracked": (), "linear.weight": (100, 2048),
                 "layer1.1.shortcut.0.weight": None},
    "wrn_40_2": {"block1.layer.0.convShortcut.weight": (32, 16, 1, 1), "block3.layer.5.conv2.weight": (128, 128, 3, 3),
                 "block2.layer.0.bn1.weight": (32,), "bn1.running_mean": (128,), "fc.weight": (100, 128)},
    "wrn_16_1": {"block1.layer.0.convShortcut.weight": None, "block2.layer.0.convShortcut.weight": (32, 16, 1, 1)},
    "vgg13": {"block0.3.weight": (64, 64, 3, 3), "block0.3.bias": (64,), "block0.4.running_mean": (64,),
              "block4.4.weight": (512,), "block4.5.weight": None, "classifier.weight": (100, 512)},
    "mobilenetv2_half": {"conv1.0.weight": (16, 3, 3, 3), "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
                         "blocks.6.0.conv.6.weight": (160, 480, 1, 1), "conv2.0.weight": (1280, 160, 1, 1),
                         "classifier.0.weight": (100, 1280)},
    "shufflenetv1": {"layer1.0.conv1.weight": (54, 24, 1, 1), "layer1.0.conv3.weight": (216, 18, 1, 1),
                     "layer2.0.conv1.weight": (60, 80, 1, 1), "layer3.3.bn3.weight": (960,),
                     "linear.weight": (100, 960)},
    "shufflenetv2": {"layer1.0.conv1.weight": (24, 1, 3, 3), "layer1.0.conv2.weight": (58, 24, 1, 1),
                     "layer1.1.conv1.weight": (58, 58, 1, 1), "layer2.7.bn3.weight": (116,),
                     "conv2.weight": (1024, 464, 1, 1), "linear.weight": (100, 1024)},
}


@pytest.mark.parametrize("name", sorted(REFERENCE_KEYS))
def test_module_names_follow_the_reference(name: str) -> None:
    state = zoo_model(name).state_dict()
    for key, shape in REFERENCE_KEYS[name].items():
        if shape is None:
            assert key not in state
        else:
            assert tuple(state[key].shape) == shape, key


# ---------------------------------------------------------------- taps, forward and backward


def expected_taps(name: str) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes at every alias on a 32x32 input, from each architecture's description."""
    if name.startswith("resnet") and name != "resnet50":
        w = (32, 64, 128, 256) if name.endswith("x4") else (16, 16, 32, 64)
        stages = [(w[1], 32, 32), (w[2], 16, 16), (w[3], 8, 8)]
        stem, pooled = (w[0], 32, 32), w[3]
    elif name == "resnet50":
        stages = [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)]
        stem, pooled = (64, 32, 32), 2048
    elif name.startswith("wrn"):
        k = int(name.rsplit("_", 1)[1])
        stages = [(16 * k, 32, 32), (32 * k, 16, 16), (64 * k, 8, 8)]
        stem, pooled = (16, 32, 32), 64 * k
    elif name.startswith("vgg"):
        stages = [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]
        stem, pooled = (64, 32, 32), 512
    elif name.startswith("mobilenetv2"):
        w = 0.5 if name.endswith("half") else 1.0
        stages = [(int(24 * w), 16, 16), (int(32 * w), 8, 8), (int(96 * w), 4, 4), (int(320 * w), 2, 2)]
        stem, pooled = (int(32 * w), 16, 16), 1280
    elif name == "shufflenetv1":
        stages = [(240, 16, 16), (480, 8, 8), (960, 4, 4)]
        stem, pooled = (24, 32, 32), 960
    else:
        stages = [(116, 16, 16), (232, 8, 8), (464, 4, 4)]
        stem, pooled = (24, 32, 32), 1024
    taps = {"stem": stem, "pooled": (pooled,), "logits": (100,)}
    for k, shape in enumerate(stages, start=1):
        taps |= {f"stage{k}": shape, f"preact{k}": shape}
    return taps


def shuffle_in_two(x: torch.Tensor) -> torch.Tensor:
    """Channel order [a0, b0, a1, b1, ...] from halves a and b (ShuffleNetV2's shuffle, groups 2)."""
    a, b = x.chunk(2, dim=1)
    return torch.stack([a, b], dim=2).flatten(1, 2)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(PARAMS)])
def test_taps_shapes_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS.create(name, {}, "model", in_channels=3, num_classes=100)
    assert type(model.padkd_taps) is dict and set(model.padkd_taps) == set(expected_taps(name))
    taps = Taps(model, set(model.padkd_taps), "student")
    with taps.capture():
        out = model(torch.randn(2, 3, 32, 32))
    values = taps.values(out)
    taps.close()
    for alias, shape in expected_taps(name).items():
        assert tuple(values[alias].shape) == (2, *shape), alias
    assert torch.equal(values["logits"], out)
    for k in range(1, 5 if "stage4" in values else 4):
        stage, preact = values[f"stage{k}"], values[f"preact{k}"]
        if name.startswith("mobilenetv2"):  # linear bottlenecks: no ReLU after a stage
            assert preact is stage
        elif name == "shufflenetv2":
            assert torch.equal(shuffle_in_two(F.relu(preact)), stage)
        elif not name.startswith("wrn"):  # the stage output is the ReLU of its pre-activation
            assert torch.equal(F.relu(preact), stage) and (preact < 0).any()
    if name.startswith("wrn"):  # the BN that follows a pre-activation stage
        assert all((values[f"preact{k}"] < 0).any() for k in (1, 2, 3))
    (out.square().mean() + values["pooled"].mean()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_wrn_preact_is_the_next_bn_of_the_stage_output() -> None:
    torch.manual_seed(0)
    model = MODELS.create("wrn_16_1", {}, "model", in_channels=3, num_classes=10).eval()
    with torch.no_grad():  # BN statistics that are not (0, 1), so the check is not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    taps = Taps(model, {"stage1", "stage3", "preact1", "preact3"}, "student")
    with taps.capture(), torch.no_grad():
        values = taps.values(model(torch.randn(2, 3, 32, 32)))
    bn = model.block2.layer[0].bn1
    expect = (values["stage1"] - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    expect = expect * bn.weight[:, None, None] + bn.bias[:, None, None]
    assert torch.allclose(values["preact1"], expect, atol=1e-5)
    last = model.bn1
    expect3 = (values["stage3"] - last.running_mean[:, None, None]) / torch.sqrt(last.running_var[:, None, None]
                                                                              + last.eps)
    assert torch.allclose(values["preact3"], expect3, atol=1e-5)


def test_zoo_options_and_other_sizes() -> None:
    model = MODELS.create("shufflenetv2", {"net_size": 0.5}, "model", in_channels=3, num_classes=10)
    assert model.linear.in_features == 1024 and model.layer1[0].bn2.num_features == 24
    with pytest.raises(PadkdError, match=r"^student\.model: net_size must be one of"):
        MODELS.create("shufflenetv2", {"net_size": 0.7}, "student.model", in_channels=3, num_classes=10)
    with pytest.raises(PadkdError, match=r"^student\.model\.drop_rate: unknown option"):
        MODELS.create("resnet20", {"drop_rate": 0.1}, "student.model", in_channels=3, num_classes=10)
    wide = MODELS.create("wrn_16_2", {"drop_rate": 0.3}, "model", in_channels=1, num_classes=10)
    assert wide(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert n_params(MODELS.create("mobilenetv2", {"width_mult": 0.5}, "model", in_channels=3, num_classes=100)) \
        == PARAMS["mobilenetv2_half"]
    # global average pooling: other input sizes work (the references' fixed 8x8 pools are the same at 32x32)
    small = MODELS.create("resnet8", {}, "model", in_channels=3, num_classes=10)
    assert small(torch.randn(2, 3, 16, 16)).shape == (2, 10)


# ---------------------------------------------------------------- teacher import


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    """A resnet8 for 10 classes with non-trivial BN statistics, as a trained teacher would have."""
    torch.manual_seed(1)
    model = MODELS.create("resnet8", {}, "model", in_channels=3, num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(1234)
    return model.eval()


def optimizer_state(model: nn.Module) -> dict[str, Any]:
    """What SGD with momentum's state_dict() holds after some steps (written out: building an optimizer
    costs seconds of imports)."""
    params = list(model.parameters())
    return {"state": {i: {"momentum_buffer": torch.zeros_like(p)} for i, p in enumerate(params)},
            "param_groups": [{"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 5e-4, "nesterov": False,
                              "maximize": False, "foreach": None, "differentiable": False, "fused": None,
                              "params": list(range(len(params)))}]}


def layouts(teacher: nn.Module) -> dict[str, Any]:
    """What each code base writes for a trained CIFAR model (see the module docstring of padkd.models.convert)."""
    sd = teacher.state_dict()
    other = MODELS.create("resnet20", {}, "model", in_channels=3, num_classes=10).state_dict()
    return {
        # torchdistill's published weights (torch.hub state dicts)
        "torchdistill_weights": sd,
        # torchdistill's save_ckpt: model, optimizer, best value, LR scheduler and the parsed args
        "torchdistill_ckpt": {"model": sd, "optimizer": optimizer_state(teacher), "best_value": 71.5,
                              "lr_scheduler": None, "args": argparse.Namespace(config="cifar.yaml", seed=None,
                                                                               world_size=1)},
        # RepDistiller's train_teacher.py: {'epoch', 'model', 'accuracy', 'optimizer'}
        "repdistiller": {"epoch": 240, "model": sd, "accuracy": torch.tensor(72.34),
                         "optimizer": optimizer_state(teacher)},
        # mdistiller's student_best, or a teacher trained under DataParallel
        "mdistiller_dataparallel": {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 240},
        # mdistiller's best/latest: the DataParallel-wrapped distiller (student, teacher, method modules)
        "mdistiller_distiller": {"model": {**{f"module.student.{k}": v for k, v in sd.items()},
                                           **{f"module.teacher.{k}": v for k, v in other.items()},
                                           "module.conv_reg.weight": torch.zeros(4, 4, 1, 1)},
                                 "optimizer": optimizer_state(teacher), "epoch": 3, "best_acc": 55.0},
        # a torch.compile'd model's state dict
        "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()},
        # PyTorch < 0.4.1 wrote no BN counters
        "old_pytorch": {"model": {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}},
    }


@pytest.mark.parametrize("layout", ["torchdistill_weights", "torchdistill_ckpt", "repdistiller",
                                    "mdistiller_dataparallel", "mdistiller_distiller", "compiled", "old_pytorch"])
def test_import_teacher_reads_every_layout(layout: str, teacher: nn.Module, tmp_path: Path) -> None:
    source = tmp_path / "ckpt_epoch_240.pth"
    torch.save(layouts(teacher)[layout], source)
    out = tmp_path / "teacher.pt"
    line = import_teacher(source, out, "resnet8")
    assert "with 10 classes" in line and str(out) in line and "\n" not in line
    exported = ckpt.load(out)
    assert exported["kind"] == "export" and exported["model"] == {"name": "resnet8"}
    fresh = MODELS.create("resnet8", {}, "teacher.model", in_channels=3, num_classes=10)
    ckpt.load_model_weights(fresh, out, Component(name="resnet8"), "teacher")  # how `teacher:` loads it
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), teacher(x))
    expected_counter = 0 if layout == "old_pytorch" else 1234
    assert int(fresh.layer1[0].bn1.num_batches_tracked) == expected_counter


def test_import_the_teacher_part_of_a_distiller_checkpoint(teacher: nn.Module, tmp_path: Path) -> None:
    source = tmp_path / "best"
    torch.save(layouts(teacher)["mdistiller_distiller"], source)
    line = import_teacher(source, tmp_path / "t.pt", "resnet20", part="teacher")
    assert "'teacher' part of a distiller checkpoint" in line and "prefixes module. stripped" in line
    with pytest.raises(PadkdError, match="holds one model, not a distiller checkpoint"):
        torch.save(teacher.state_dict(), tmp_path / "plain.pt")
        read_state_dict(tmp_path / "plain.pt", part="teacher")


def test_torchdistill_cifar_resnet_loads_into_the_zoo(tmp_path: Path) -> None:
    """torchdistill's own ResNet-20 for CIFAR (torchvision's block naming) has the zoo's keys and function."""
    resnet = pytest.importorskip("torchdistill.models.classification.resnet")
    torch.manual_seed(2)
    theirs = resnet.resnet20(num_classes=100).eval()
    torch.save(theirs.state_dict(), tmp_path / "cifar100-resnet20.pt")
    import_teacher(tmp_path / "cifar100-resnet20.pt", tmp_path / "t.pt", "resnet20")
    ours = MODELS.create("resnet20", {}, "teacher.model", in_channels=3, num_classes=100)
    ckpt.load_model_weights(ours, tmp_path / "t.pt", Component(name="resnet20"), "teacher")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), theirs(x), atol=1e-5)


def one_line_error(fn: Any, *fragments: str) -> str:
    with pytest.raises(PadkdError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_import_errors_are_one_line(teacher: nn.Module, tmp_path: Path) -> None:
    source = tmp_path / "t.pth"
    torch.save({"model": teacher.state_dict()}, source)
    out = tmp_path / "o.pt"
    one_line_error(lambda: import_teacher(source, out, "resnet14"), "missing", "layer1.1.bn1.bias", "check --model")
    one_line_error(lambda: import_teacher(source, out, "resnet8", num_classes=100),
                   "2 shape mismatches: fc.weight (10, 64) in the file vs (100, 64)", "pass --num-classes 10")
    one_line_error(lambda: import_teacher(source, out, "wrn_16_1"), "missing", "unexpected", "block1.layer.0.bn1.bias")
    bigger = tmp_path / "r14.pth"
    torch.save(MODELS.create("resnet14", {}, "m", in_channels=3, num_classes=10).state_dict(), bigger)
    # resnet14 has a second block in each of the 3 stages: 2 convs and 2 BNs (5 entries each) = 12 keys a block
    one_line_error(lambda: import_teacher(bigger, out, "resnet8"), "unexpected 36 keys [layer1.1.bn1.bias")
    one_line_error(lambda: import_teacher(source, out, "resnet9"), "unknown model 'resnet9'; did you mean")
    assert not out.exists()


def test_unreadable_files_are_one_line_errors(teacher: nn.Module, tmp_path: Path) -> None:
    one_line_error(lambda: read_state_dict(tmp_path / "nowhere.pth"), "not found")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    one_line_error(lambda: read_state_dict(tmp_path / "junk.pth"), "not a readable PyTorch checkpoint")
    torch.save({"epoch": 3, "acc": 1.0}, tmp_path / "no_state.pth")
    one_line_error(lambda: read_state_dict(tmp_path / "no_state.pth"), "holds no state dict", "'acc', 'epoch'")
    torch.save({"model": teacher.state_dict(), "note": fractions.Fraction(1, 3)}, tmp_path / "pickled.pth")
    one_line_error(lambda: read_state_dict(tmp_path / "pickled.pth"), "holds a fractions.Fraction object",
                   "weights_only")
    padkd_file = tmp_path / "export.pt"
    ckpt.atomic_save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "kind": "export", "model": {"name": "resnet8"},
                      "student": teacher.state_dict()}, padkd_file)
    one_line_error(lambda: read_state_dict(padkd_file), "already a padkd checkpoint")
    torch.save({"student.a": torch.zeros(1), "conv.b": torch.zeros(1)}, tmp_path / "d.pth")
    one_line_error(lambda: read_state_dict(tmp_path / "d.pth", part="teacher"), "parts ['student']")


def test_import_teacher_command(teacher: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": {f"module.{k}": v for k, v in teacher.state_dict().items()}}, source)
    out = tmp_path / "resnet8_teacher.pt"
    assert main(["import-teacher", str(source), "--model", "resnet8", "-o", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"imported {source} (a state dict under 'model', prefixes module. stripped)")
    assert "checkpoint: " + str(out) in printed and ckpt.load(out)["imported_from"] == str(source)
    assert main(["import-teacher", str(source), "--model", "resnet8", "--num-classes", "100", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("padkd: error: ") and "--num-classes 10" in err
    assert main(["import-teacher", str(source), "--model", "resnet8", "--option", "width", "-o", str(out)]) == 2
    assert "write KEY=VALUE" in capsys.readouterr().err


def test_import_teacher_with_model_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = MODELS.create("shufflenetv2", {"net_size": 0.5}, "m", in_channels=3, num_classes=10)
    torch.save({"model": model.state_dict()}, tmp_path / "s.pth")
    out = tmp_path / "s.pt"
    assert main(["import-teacher", str(tmp_path / "s.pth"), "--model", "shufflenetv2", "--option", "net_size=0.5",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    assert ckpt.load(out)["model"] == {"name": "shufflenetv2", "net_size": 0.5}
    again = MODELS.create("shufflenetv2", {"net_size": 0.5}, "teacher.model", in_channels=3, num_classes=10)
    ckpt.load_model_weights(again, out, Component(name="shufflenetv2", net_size=0.5), "teacher")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))


# ---------------------------------------------------------------- torchvision and timm weights from files


def test_torchvision_weights_path(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = MODELS.create("torchvision", {"arch": "resnet18"}, "m", in_channels=3, num_classes=10)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    loaded = MODELS.create("torchvision", {"arch": "resnet18", "weights_path": str(tmp_path / "r18.pth")},
                          "teacher.model", in_channels=3, num_classes=10)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values(),
                                                 strict=True))
    one_line_error(lambda: MODELS.create("torchvision", {"arch": "resnet18", "weights_path": str(tmp_path / "r18.pth")},
                                        "teacher.model", in_channels=3, num_classes=100),
                   "weights_path of torchvision resnet18", "fc.weight (10, 512) in the file vs (100, 512)")
    one_line_error(lambda: MODELS.create("torchvision", {"arch": "resnet18", "weights": "IMAGENET1K_V1",
                                                        "weights_path": "x.pth"}, "m", in_channels=3, num_classes=10),
                   "not both")


def test_timm_by_name_with_weights_path(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    torch.manual_seed(4)
    model = MODELS.create("timm", {"arch": "test_resnet"}, "student.model", in_channels=1, num_classes=7)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, tmp_path / "t.pth.tar")
    loaded = MODELS.create("timm", {"arch": "test_resnet", "weights_path": str(tmp_path / "t.pth.tar")},
                          "student.model", in_channels=1, num_classes=7)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
    one_line_error(lambda: MODELS.create("timm", {"arch": "resnet1800"}, "m", in_channels=3, num_classes=7),
                   "unknown timm model 'resnet1800'; did you mean")


def test_timm_missing_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    one_line_error(lambda: MODELS.create("timm", {"arch": "resnet18"}, "m", in_channels=3, num_classes=7),
                   "timm is not installed", "pip install timm")
