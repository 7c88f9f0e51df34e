"""Data sets (digits, MNIST IDX files) and the model registry."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from padkd.data import DATASETS, DataSplits, TensorData, stratified_split
from padkd.data.mnist import FILES, MEAN, STD, read_idx
from padkd.errors import PadkdError
from padkd.models import MODELS
from padkd.models.cifar import ZOO

# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return DATASETS.create("digits", {}, "data")


@pytest.fixture(scope="module")
def digit_labels() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().target, dtype=torch.long)


def test_digits_split_sizes(digits: DataSplits) -> None:
    sizes = [len(digits.train), len(digits.val), len(digits.test)]
    assert sizes == [1079, 359, 359]
    assert sum(sizes) == 1797
    assert digits.num_classes == 10 and digits.in_channels == 1
    assert digits.split("val") is digits.val


def test_digits_items(digits: DataSplits) -> None:
    for split in (digits.train, digits.val, digits.test):
        x, y, i = split[5]
        assert isinstance(x, torch.Tensor) and x.shape == (1, 8, 8) and x.dtype == torch.float32
        assert int(y) in range(10) and i == 5
    x, y, idx = next(iter(torch.utils.data.DataLoader(digits.train, batch_size=4)))
    assert x.shape == (4, 1, 8, 8) and y.dtype == torch.long and idx.tolist() == [0, 1, 2, 3]


def test_digits_every_class_in_every_split(digits: DataSplits) -> None:
    for split in (digits.train, digits.val, digits.test):
        counts = torch.bincount(split.labels, minlength=10)
        assert (counts > 0).all()
    val_share = torch.bincount(digits.val.labels, minlength=10).float() / torch.bincount(
        torch.cat([digits.train.labels, digits.val.labels, digits.test.labels]), minlength=10).float()
    assert torch.allclose(val_share, torch.full((10,), 0.2), atol=0.01)  # stratified


def test_digits_normalised_with_train_statistics(digits: DataSplits) -> None:
    assert float(digits.train.images.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(digits.train.images.std()) == pytest.approx(1.0, abs=1e-4)
    (mean,), (std,) = digits.normalization
    assert 0 < mean < 1 and 0 < std < 1
    assert torch.equal(digits.train_targets, digits.train.labels)


def test_digits_split_fixed_by_split_seed(digits: DataSplits) -> None:
    same = DATASETS.create("digits", {"split_seed": 0}, "data")
    assert torch.equal(same.train.images, digits.train.images) and torch.equal(same.test.labels, digits.test.labels)
    other = DATASETS.create("digits", {"split_seed": 1}, "data")
    assert len(other.train) == len(digits.train)
    assert not torch.equal(other.test.images, digits.test.images)


def test_stratified_split_is_disjoint_covering_and_seeded(digit_labels: torch.Tensor) -> None:
    parts = stratified_split(digit_labels, (0.6, 0.2, 0.2), seed=0)
    sets = [set(p.tolist()) for p in parts]
    assert [len(p) for p in parts] == [len(s) for s in sets] == [1079, 359, 359]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sets[0] | sets[1] | sets[2] == set(range(1797))
    for p in parts:
        assert p.tolist() == sorted(p.tolist())
        assert set(digit_labels[p].tolist()) == set(range(10))
    again = stratified_split(digit_labels, (0.6, 0.2, 0.2), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    other = stratified_split(digit_labels, (0.6, 0.2, 0.2), seed=1)
    assert not torch.equal(parts[2], other[2])


def test_digits_fractions_and_bad_options() -> None:
    data = DATASETS.create("digits", {"val_fraction": 0.1, "test_fraction": 0.3}, "data")
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert abs(len(data.val) - 180) <= 5 and abs(len(data.test) - 539) <= 5
    with pytest.raises(PadkdError, match=r"^data\.val_fraction: "):
        DATASETS.create("digits", {"val_fraction": "lots"}, "data")


def test_tensor_data_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        TensorData(torch.zeros(3, 1, 2, 2), torch.zeros(2))


# ---------------------------------------------------------------- MNIST IDX files

N_TRAIN, N_TEST = 20, 8


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: 0x00 0x00, dtype code 0x08 (uint8), rank, big-endian dims, then the data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def mnist_arrays() -> dict[str, np.ndarray]:
    """Image k of a split is filled with the value 10·k + (1 for test) so items can be traced back."""

    def images(n: int, offset: int) -> np.ndarray:
        out = np.zeros((n, 28, 28), dtype=np.uint8)
        for k in range(n):
            out[k] = 10 * k + offset
            out[k, 0, 0] = 255  # one saturated pixel per image
        return out

    return {
        "train_images": images(N_TRAIN, 0),
        "train_labels": (np.arange(N_TRAIN) % 10).astype(np.uint8),
        "test_images": images(N_TEST, 1),
        "test_labels": ((np.arange(N_TEST) * 3) % 10).astype(np.uint8),
    }


def write_mnist(root: Path, gz: bool = False, folder: str = "MNIST/raw") -> dict[str, np.ndarray]:
    arrays = mnist_arrays()
    raw = root / folder if folder else root
    raw.mkdir(parents=True, exist_ok=True)
    for key, name in FILES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (raw / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (raw / name).write_bytes(data)
    return arrays


def check_mnist(data: DataSplits, arrays: dict[str, np.ndarray], val_size: int) -> None:
    assert (len(data.train), len(data.val), len(data.test)) == (N_TRAIN - val_size, val_size, N_TEST)
    assert data.num_classes == 10 and data.in_channels == 1 and data.normalization == ((MEAN,), (STD,))
    seen = []
    for split in (data.train, data.val):
        for i in range(len(split)):
            x, y, index = split[i]
            assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and index == i
            k = round(float(x[0, 5, 5]) * STD * 255 + MEAN * 255) // 10  # undo the normalisation
            seen.append(k)
            expected = (torch.from_numpy(arrays["train_images"][k]).float() / 255.0 - MEAN) / STD
            assert torch.allclose(x[0], expected, atol=1e-6)
            assert int(y) == arrays["train_labels"][k]
    assert sorted(seen) == list(range(N_TRAIN))  # train and val partition the training file
    for k in range(N_TEST):  # the test file keeps its order
        x, y, _ = data.test[k]
        assert float(x[0, 0, 0]) == pytest.approx((1.0 - MEAN) / STD)
        assert float(x[0, 3, 3]) == pytest.approx(((10 * k + 1) / 255.0 - MEAN) / STD)
        assert int(y) == arrays["test_labels"][k]


def test_mnist_reads_idx_files(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path)
    data = DATASETS.create("mnist", {"root": str(tmp_path), "val_size": 5}, "data")
    check_mnist(data, arrays, 5)
    assert read_idx(tmp_path / "MNIST" / "raw" / FILES["train_labels"]).tolist() == arrays["train_labels"].tolist()


def test_mnist_reads_gzipped_files_and_files_in_root(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path / "gz", gz=True)
    check_mnist(DATASETS.create("mnist", {"root": str(tmp_path / "gz"), "val_size": 5}, "data"), arrays, 5)
    arrays = write_mnist(tmp_path / "flat", folder="")
    check_mnist(DATASETS.create("mnist", {"root": str(tmp_path / "flat"), "val_size": 3}, "data"), arrays, 3)


def test_mnist_split_seed_and_train_subset(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    a = DATASETS.create("mnist", {"root": str(tmp_path), "val_size": 5}, "data")
    b = DATASETS.create("mnist", {"root": str(tmp_path), "val_size": 5, "split_seed": 1}, "data")
    assert not torch.equal(a.val.images, b.val.images)
    small = DATASETS.create("mnist", {"root": str(tmp_path), "val_size": 5, "train_subset": 4}, "data")
    assert len(small.train) == 4 and torch.equal(small.val.images, a.val.images)


def test_mnist_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(PadkdError) as info:
        DATASETS.create("mnist", {"root": str(root)}, "data")
    message = str(info.value)
    assert message.startswith("data.root: ") and str(root) in message and "set data.root" in message


def test_mnist_missing_file_names_it_and_the_layout(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / FILES["test_labels"]).unlink()
    with pytest.raises(PadkdError) as info:
        DATASETS.create("mnist", {"root": str(tmp_path), "val_size": 5}, "data")
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte" in message and str(tmp_path) in message and "MNIST/raw" in message
    assert "\n" not in message


def test_mnist_truncated_file(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / FILES["train_images"]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(PadkdError) as info:
        DATASETS.create("mnist", {"root": str(tmp_path), "val_size": 5}, "data")
    assert str(path) in str(info.value) and "truncated" in str(info.value)


def test_mnist_file_truncated_inside_its_header(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / FILES["train_images"]
    path.write_bytes(path.read_bytes()[:9])  # magic + 1 of the 3 dims, and a byte
    with pytest.raises(PadkdError) as info:
        DATASETS.create("mnist", {"root": str(tmp_path), "val_size": 5}, "data")
    assert str(path) in str(info.value)
    with pytest.raises(PadkdError):
        read_idx(path)


def test_mnist_bad_magic_and_mismatched_counts(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / FILES["test_images"]
    path.write_bytes(b"\x01\x02" + path.read_bytes()[2:])
    with pytest.raises(PadkdError, match="not an IDX file"):
        DATASETS.create("mnist", {"root": str(tmp_path), "val_size": 5}, "data")
    write_mnist(tmp_path)
    labels = tmp_path / "MNIST" / "raw" / FILES["test_labels"]
    labels.write_bytes(idx_bytes(np.zeros(N_TEST - 1, dtype=np.uint8)))
    with pytest.raises(PadkdError, match=r"MNIST test has 8 images but labels of shape \(7,\)"):
        DATASETS.create("mnist", {"root": str(tmp_path), "val_size": 5}, "data")


# ---------------------------------------------------------------- models

MODEL_CASES = {
    "cnn": ({"widths": [4, 8]}, 1, 8),
    "mlp": ({"hidden": [16, 8]}, 1, 8),
    "lenet": ({"channels": [2, 4], "hidden": 16, "input_size": 8}, 1, 8),
    "torchvision": ({"arch": "resnet18"}, 3, 32),
    "timm": ({"arch": "test_resnet"}, 3, 32),
}


#: Models tested in their task's own file: the retrieval embedding networks (tests/test_retrieval.py) and the
#: causal LMs (tests/test_language.py).
ELSEWHERE = {"cnn_embedding", "torchvision_embedding", "gpt2", "llama", "hf_causal_lm"}


def test_every_registered_model_is_covered() -> None:
    # the CIFAR zoo (ZOO) is covered model by model in test_zoo.py, which pins ZOO's names; the detectors
    # in test_detection.py
    assert set(MODELS.names()) == set(MODEL_CASES) | set(ZOO) | ELSEWHERE | {"fasterrcnn", "retinanet"}


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_registered_models_build_and_forward(name: str) -> None:
    if name == "timm":
        pytest.importorskip("timm")  # an optional extra (`pip install 'padkd[timm]'`)
    options, channels, size = MODEL_CASES[name]
    torch.manual_seed(0)
    model = MODELS.create(name, options, "student.model", in_channels=channels, num_classes=10)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert MODELS.describe(name)


def test_cnn_on_mnist_sized_input_and_its_embedding() -> None:
    model = MODELS.create("cnn", {"widths": [4, 8, 16]}, "m", in_channels=1, num_classes=10)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert model.fc.in_features == 16


def test_torchvision_resnet18_ten_classes_without_download() -> None:
    model = MODELS.create("torchvision", {"arch": "resnet18"}, "teacher.model", in_channels=3, num_classes=10)
    assert model.fc.out_features == 10
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_torchvision_needs_three_channels() -> None:
    with pytest.raises(PadkdError) as info:
        MODELS.create("torchvision", {"arch": "resnet18"}, "student.model", in_channels=1, num_classes=10)
    assert "3-channel" in str(info.value) and "resnet18" in str(info.value)


def test_torchvision_unknown_arch_suggests_the_closest() -> None:
    with pytest.raises(PadkdError) as info:
        MODELS.create("torchvision", {"arch": "resnet19"}, "student.model", in_channels=3, num_classes=10)
    assert "unknown torchvision model 'resnet19'; did you mean 'resnet18'?" in str(info.value)


def test_bad_model_options() -> None:
    with pytest.raises(PadkdError, match="widths must be a non-empty list of positive ints"):
        MODELS.create("cnn", {"widths": [4, 0]}, "student.model", in_channels=1, num_classes=10)
    with pytest.raises(PadkdError, match=r"^student\.model\.widths: "):
        MODELS.create("cnn", {"widths": "wide"}, "student.model", in_channels=1, num_classes=10)
    with pytest.raises(PadkdError, match=r"^student\.model\.arch: required option is missing"):
        MODELS.create("torchvision", {}, "student.model", in_channels=3, num_classes=10)
    with pytest.raises(PadkdError, match="unknown model 'resnet'"):
        MODELS.create("resnet", {}, "student.model", in_channels=3, num_classes=10)


def test_cnn_pool_size_flattens_a_k_by_k_map() -> None:
    model = MODELS.create("cnn", {"widths": [2, 4], "pool_size": 7}, in_channels=1, num_classes=10)
    assert model.fc.in_features == 4 * 7 * 7
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(PadkdError, match="pool_size"):
        MODELS.create("cnn", {"pool_size": 0}, in_channels=1, num_classes=10)
