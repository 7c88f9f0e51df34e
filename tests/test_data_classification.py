"""Classification data at full scale: CIFAR-10/100 python pickles, ImageNet-style folders, and the
batched device transforms. Every reader is fed tiny files written here in the real on-disk format."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from padkd.batch import Batch, stack_collate
from padkd.data import DATASETS, DataSplits
from padkd.data.augment import ImageBatchTransform, random_crop_flip
from padkd.errors import PadkdError

# The constants the readers must normalise with (CRD's code for CIFAR-100; the training-set
# statistics for CIFAR-10; torchvision's for ImageNet), written out independently of the code.
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# ---------------------------------------------------------------- the CIFAR python-pickle format


def py2_string(raw: bytes) -> bytes:
    """A Python 2 `str` as cPickle writes it: SHORT_BINSTRING (U) or BINSTRING (T)."""
    if len(raw) < 256:
        return b"U" + bytes([len(raw)]) + raw
    return b"T" + struct.pack("<I", len(raw)) + raw


def py2_int(n: int) -> bytes:
    """BININT1 (K), BININT2 (M) or BININT (J)."""
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    return b"J" + struct.pack("<i", n)


def py2_uint8_array(a: np.ndarray) -> bytes:
    """A 2-d uint8 numpy array as Python 2 numpy pickled it (protocol 2): `_reconstruct(ndarray, (0,),
    'b')` then `__setstate__((1, shape, dtype('u1'), False, raw bytes as str))`."""
    dtype = (b"cnumpy\ndtype\n" + py2_string(b"u1") + py2_int(0) + py2_int(1) + b"\x87R"
             + b"(" + py2_int(3) + py2_string(b"|") + b"NNN" + py2_int(-1) + py2_int(-1) + py2_int(0) + b"tb")
    shape = py2_int(a.shape[0]) + py2_int(a.shape[1]) + b"\x86"
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + py2_int(0) + b"\x85" + py2_string(b"b")
            + b"\x87R(" + py2_int(1) + shape + dtype + b"\x89" + py2_string(np.ascontiguousarray(a).tobytes())
            + b"tb")


def py2_batch_pickle(data: np.ndarray, label_key: str, labels: list[int]) -> bytes:
    """A CIFAR batch file byte for byte as the authors' Python 2 cPickle (protocol 2) wrote it: a dict
    of str keys: 'batch_label', label_key (a list of ints), 'data' (uint8 [n, 3072]), 'filenames'."""
    items = py2_string(b"batch_label") + py2_string(b"training batch 1 of 1")
    items += py2_string(label_key.encode()) + b"](" + b"".join(py2_int(y) for y in labels) + b"e"
    items += py2_string(b"data") + py2_uint8_array(data)
    items += py2_string(b"filenames") + b"](" + b"".join(py2_string(f"img_{k}.png".encode())
                                                         for k in range(len(labels))) + b"e"
    return b"\x80\x02}(" + items + b"u."


def tagged_images(n: int, start: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 rows of 3072 (CHW) with random content in 1..255 whose first two values encode the global
    image number `start + k`, so every item can be traced back to its row in the files."""
    rows = rng.integers(1, 256, size=(n, 3072), dtype=np.uint8)
    ids = np.arange(start, start + n)
    rows[:, 0], rows[:, 1] = ids % 250 + 1, ids // 250 + 1
    return rows


def image_id(x: torch.Tensor) -> int:
    return (int(x[0, 0, 0]) - 1) + 250 * (int(x[0, 0, 1]) - 1)


def write_cifar(root: Path, name: str, n_train: int, n_test: int, style: str = "py2",
                seed: int = 0) -> dict[str, np.ndarray]:
    """Write the real layout of `cifar10` (5 train batches + test_batch) or `cifar100` (train, test)
    under `root`; `style`: 'py2' (bytes as the authors' files), 'py3' (pickle.dump protocol 2, str
    keys) or 'bytes' (Python 3 pickle with bytes keys). Returns all train/test rows and labels."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder, files, key = (("cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)], "labels")
                          if name == "cifar10" else ("cifar-100-python", ["train"], "fine_labels"))
    out = root / folder
    out.mkdir(parents=True, exist_ok=True)
    train_x = tagged_images(n_train, 0, rng)
    train_y = rng.integers(0, classes, size=n_train)
    test_x = tagged_images(n_test, n_train, rng)
    test_y = rng.integers(0, classes, size=n_test)
    chunks = np.array_split(np.arange(n_train), len(files))
    parts = [(f, train_x[c], train_y[c]) for f, c in zip(files, chunks, strict=True)]
    parts.append(("test_batch" if name == "cifar10" else "test", test_x, test_y))
    for filename, x, y in parts:
        labels = [int(v) for v in y]
        if style == "py2":
            blob = py2_batch_pickle(x, key, labels)
        else:
            entry = {"batch_label": "batch", key: labels, "data": x, "filenames": [f"{k}.png" for k in labels]}
            if style == "bytes":
                entry = {k.encode(): v for k, v in entry.items()}
            blob = pickle.dumps(entry, protocol=2)
        (out / filename).write_bytes(blob)
    meta = {"label_names" if name == "cifar10" else "fine_label_names": [f"c{k}" for k in range(classes)]}
    (out / ("batches.meta" if name == "cifar10" else "meta")).write_bytes(pickle.dumps(meta, protocol=2))
    return {"train_x": train_x.reshape(-1, 3, 32, 32), "train_y": train_y, "test_x": test_x.reshape(-1, 3, 32, 32),
            "test_y": test_y}


def check_cifar(data: DataSplits, arrays: dict[str, np.ndarray], val_size: int, classes: int) -> None:
    n_train, n_test = len(arrays["train_y"]), len(arrays["test_y"])
    assert len(data.train) == n_train - val_size and len(data.test) == n_test
    assert (len(data.val) if data.val is not None else 0) == val_size
    assert data.num_classes == classes and data.in_channels == 3
    seen = []
    for split in [data.train] + ([data.val] if data.val is not None else []):
        ids = []
        for i in range(len(split)):
            x, y, index = split[i]
            assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y.dtype == torch.long and index == i
            k = image_id(x)
            assert np.array_equal(x.numpy(), arrays["train_x"][k]) and int(y) == arrays["train_y"][k]
            ids.append(k)
        assert ids == sorted(ids)  # each split keeps the files' order
        seen += ids
    assert sorted(seen) == list(range(n_train))  # train and val partition the training files
    for k in range(n_test):
        x, y, _ = data.test[k]
        assert image_id(x) == n_train + k and np.array_equal(x.numpy(), arrays["test_x"][k])
        assert int(y) == arrays["test_y"][k]
    assert torch.equal(data.train_targets, torch.stack([data.train[i][1] for i in range(len(data.train))]))


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("c100")
    return root, write_cifar(root, "cifar100", 300, 40)


def test_cifar100_reads_the_authors_python2_pickles(cifar100_root) -> None:
    root, arrays = cifar100_root
    data = DATASETS.create("cifar100", {"root": str(root), "val_size": 50}, "data")
    check_cifar(data, arrays, 50, 100)
    assert data.normalization == (CIFAR100_MEAN, CIFAR100_STD)


@pytest.mark.parametrize("style", ["py3", "bytes"])
def test_cifar10_reads_five_training_batches_in_order(tmp_path: Path, style: str) -> None:
    arrays = write_cifar(tmp_path, "cifar10", 103, 17, style=style)
    data = DATASETS.create("cifar10", {"root": str(tmp_path), "val_size": 13}, "data")
    check_cifar(data, arrays, 13, 10)
    assert data.normalization == (CIFAR10_MEAN, CIFAR10_STD)
    everything = DATASETS.create("cifar10", {"root": str(tmp_path), "val_size": 0}, "data")
    assert [image_id(everything.train[i][0]) for i in range(103)] == list(range(103))  # batch 1, 2, ..., 5


def test_cifar_val_size_zero_split_seed_and_train_subset(cifar100_root) -> None:
    root, arrays = cifar100_root
    none = DATASETS.create("cifar100", {"root": str(root), "val_size": 0}, "data")
    assert none.val is None and len(none.train) == 300
    check_cifar(none, arrays, 0, 100)
    with pytest.raises(ValueError, match="no 'val' split"):
        none.split("val")
    a = DATASETS.create("cifar100", {"root": str(root), "val_size": 50}, "data")
    again = DATASETS.create("cifar100", {"root": str(root), "val_size": 50, "split_seed": 0}, "data")
    b = DATASETS.create("cifar100", {"root": str(root), "val_size": 50, "split_seed": 1}, "data")
    assert torch.equal(a.val.images, again.val.images) and not torch.equal(a.val.images, b.val.images)
    small = DATASETS.create("cifar100", {"root": str(root), "val_size": 50, "train_subset": 20}, "data")
    assert len(small.train) == 20 and torch.equal(small.val.images, a.val.images)
    assert len(small.train_targets) == 20
    train_ids = {image_id(x) for x in a.train.images}
    assert {image_id(x) for x in small.train.images} <= train_ids
    assert max(image_id(x) for x in small.train.images) > 20  # a random subset, not the first rows
    for options, message in (({"val_size": 300}, r"val_size must be in 0\.\.299"),
                             ({"train_subset": 0}, r"train_subset must be in 1\.\.250"),
                             ({"crop_padding": -1}, "crop_padding must be >= 0"),
                             ({"std": [0.2, 0.0, 0.2]}, "std must be positive")):
        with pytest.raises(PadkdError, match=rf"^data: {message}"):
            DATASETS.create("cifar100", {"root": str(root), "val_size": 50, **options}, "data")


def test_cifar_eval_split_of_train_and_records_use_the_eval_transform(cifar100_root) -> None:
    root, _ = cifar100_root
    data = DATASETS.create("cifar100", {"root": str(root), "val_size": 50}, "data")
    # The items are the raw uint8 images for both uses; the loader picks the device transform.
    assert data.split("train") is data.train and data.split("train", augment=True) is data.train
    assert data.eval_train is None
    assert set(data.device_transforms) == {"train", "eval"}
    eval_tf = data.device_transforms["eval"]
    assert (eval_tf.padding, eval_tf.flip) == (0, False)
    train_tf = data.device_transforms["train"]
    assert (train_tf.padding, train_tf.flip) == (4, True)
    plain = DATASETS.create("cifar100", {"root": str(root), "val_size": 50, "augment": False}, "data")
    assert (plain.device_transforms["train"].padding, plain.device_transforms["train"].flip) == (0, False)


# ---------------------------------------------------------------- device transforms


def cifar_batch(data: DataSplits, n: int) -> Batch:
    return stack_collate([data.train[i] for i in range(n)])


def test_eval_transform_is_deterministic_and_normalises_per_channel(cifar100_root) -> None:
    root, _ = cifar100_root
    for name, mean, std in (("cifar100", CIFAR100_MEAN, CIFAR100_STD),):
        data = DATASETS.create(name, {"root": str(root), "val_size": 0}, "data")
        batch = cifar_batch(data, 16)
        out = data.device_transforms["eval"](batch)
        assert out.inputs.dtype == torch.float32 and out.inputs.shape == (16, 3, 32, 32)
        assert torch.equal(out.targets, batch.targets) and torch.equal(out.index, batch.index)
        x = batch.inputs.double() / 255.0
        for c in range(3):
            expected = (x[:, c] - mean[c]) / std[c]
            assert torch.allclose(out.inputs[:, c].double(), expected, atol=1e-5)
        torch.manual_seed(1)
        assert torch.equal(data.device_transforms["eval"](batch).inputs, out.inputs)


def test_cifar10_eval_constants(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10", 20, 5, style="py3")
    data = DATASETS.create("cifar10", {"root": str(tmp_path), "val_size": 0}, "data")
    white = Batch(torch.full((1, 3, 32, 32), 255, dtype=torch.uint8), torch.zeros(1, dtype=torch.long),
                  torch.zeros(1, dtype=torch.long))
    out = data.device_transforms["eval"](white).inputs
    for c in range(3):
        assert torch.allclose(out[0, c], torch.full((32, 32), (1 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]), atol=1e-5)


def test_flip_only_reproduces_a_hand_computed_flip(cifar100_root) -> None:
    root, _ = cifar100_root
    data = DATASETS.create("cifar100", {"root": str(root), "val_size": 0, "crop_padding": 0}, "data")
    batch = cifar_batch(data, 64)
    torch.manual_seed(0)
    out = data.device_transforms["train"](batch).inputs
    expected = ((batch.inputs.double() / 255.0 - torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1).double())
                / torch.tensor(CIFAR100_STD).view(1, 3, 1, 1).double())
    mirrored = torch.from_numpy(np.ascontiguousarray(expected.numpy()[:, :, :, ::-1]))
    same = (out.double() - expected).abs().flatten(1).amax(1) < 1e-5
    flipped = (out.double() - mirrored).abs().flatten(1).amax(1) < 1e-5
    assert (same ^ flipped).all()  # every image is either itself or its mirror image, exactly
    assert 10 < int(flipped.sum()) < 54  # about half flipped (binomial(64, 1/2): 6 sd margin)


def find_crop(out: np.ndarray, image: np.ndarray, pad: int) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) whose crop of the zero-padded `image` equals `out` (computed by hand)."""
    c, h, w = image.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=image.dtype)
    padded[:, pad:pad + h, pad:pad + w] = image
    crops = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))  # [C, 2p+1, 2p+1, H, W]
    found = []
    for flipped, candidate in ((False, crops), (True, crops[..., ::-1])):
        match = (candidate == out[:, None, None]).all(axis=(0, 3, 4))  # [2p+1, 2p+1]
        found += [(int(dy) - pad, int(dx) - pad, flipped) for dy, dx in zip(*np.nonzero(match), strict=True)]
    return found


def test_crop_keeps_the_size_and_shifts_by_at_most_the_padding() -> None:
    g = torch.Generator().manual_seed(3)
    images = torch.randint(1, 256, (600, 3, 10, 12), dtype=torch.uint8, generator=g)
    torch.manual_seed(0)
    out = random_crop_flip(images, padding=4, flip=True)
    assert out.shape == images.shape and out.dtype == torch.uint8
    shifts = []
    for k in range(len(images)):
        found = find_crop(out[k].numpy(), images[k].numpy(), 4)
        assert len(found) == 1, found  # exactly one crop of the padded image, shifted by at most 4 px
        shifts.append(found[0])
    dy = np.array([s[0] for s in shifts])
    dx = np.array([s[1] for s in shifts])
    flips = np.array([s[2] for s in shifts])
    # Offsets uniform on -4..4 per axis (each value has probability 1/9: 66.7 of 600, sd 7.7).
    for values in (dy, dx):
        counts = np.bincount(values + 4, minlength=9)
        assert counts.min() > 35 and counts.max() < 100, counts
    assert 240 < flips.sum() < 360
    assert abs(np.corrcoef(dy, dx)[0, 1]) < 0.15  # drawn independently per axis


def test_train_transform_is_random_and_follows_the_torch_seed(cifar100_root) -> None:
    root, _ = cifar100_root
    data = DATASETS.create("cifar100", {"root": str(root), "val_size": 0}, "data")
    batch = cifar_batch(data, 32)
    transform = data.device_transforms["train"]
    torch.manual_seed(0)
    a = transform(batch).inputs
    torch.manual_seed(0)
    same = transform(batch).inputs
    torch.manual_seed(1)
    other = transform(batch).inputs
    assert torch.equal(a, same) and not torch.equal(a, other)
    assert a.dtype == torch.float32 and a.shape == (32, 3, 32, 32)
    # The padding is black before normalisation: a shifted image shows the normalised zero.
    zero = torch.tensor([-m / s for m, s in zip(CIFAR100_MEAN, CIFAR100_STD, strict=True)])
    is_pad = torch.isclose(a, zero.view(1, 3, 1, 1), atol=1e-5).all(1)  # [B, H, W]
    assert is_pad.any()
    assert not is_pad[:, 4:28, 4:28].any()  # the centre always comes from the image (content is 1..255)


def test_batch_transform_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="3 channels but std has 1"):
        ImageBatchTransform((0.5, 0.5, 0.5), (0.5,))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        ImageBatchTransform((0.5,), (0.5,), padding=-1)
    with pytest.raises(ValueError, match="std must be positive"):
        ImageBatchTransform((0.5,), (0.0,))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_transforms_run_on_the_gpu(cifar100_root) -> None:
    root, _ = cifar100_root
    data = DATASETS.create("cifar100", {"root": str(root), "val_size": 0}, "data")
    batch = cifar_batch(data, 64)
    gpu = batch.to("cuda")
    for split in ("train", "eval"):
        out = data.device_transforms[split](gpu).inputs
        assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == (64, 3, 32, 32)
    assert torch.allclose(data.device_transforms["eval"](gpu).inputs.cpu(),
                          data.device_transforms["eval"](batch).inputs, atol=1e-5)
    torch.cuda.manual_seed(0)
    crops = random_crop_flip(gpu.inputs, 4, True).cpu()
    for k in range(8):
        assert len(find_crop(crops[k].numpy(), batch.inputs[k].numpy(), 4)) == 1


# ---------------------------------------------------------------- CIFAR errors


def test_cifar_missing_root_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(PadkdError) as info:
        DATASETS.create("cifar100", {"root": str(tmp_path / "nowhere")}, "data")
    message = str(info.value)
    assert message.startswith("data.root: ") and "nowhere" in message and "cifar-100-python" in message
    with pytest.raises(PadkdError) as info:
        DATASETS.create("cifar100", {"root": str(tmp_path)}, "data")
    message = str(info.value)
    assert message == (f"data.root: '{tmp_path}' holds no cifar-100-python/train; download CIFAR-100 (python "
                       "version) from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it there")
    write_cifar(tmp_path, "cifar10", 50, 10, style="py3")
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(PadkdError) as info:
        DATASETS.create("cifar10", {"root": str(tmp_path)}, "data")
    message = str(info.value)
    assert "cifar-10-batches-py/data_batch_4" in message and "cifar-10-python.tar.gz" in message
    assert "\n" not in message


def malformed_cases(path: Path) -> list[tuple[bytes, str]]:
    good = path.read_bytes()
    data = np.zeros((4, 3072), dtype=np.uint8)
    return [
        (good[: len(good) // 2], "not a readable CIFAR-100 python batch"),  # truncated download
        (b"<html>404 Not Found</html>", "not a readable CIFAR-100 python batch"),
        (pickle.dumps([1, 2, 3], protocol=2), "holds a list, not the dict of a CIFAR-100 batch"),
        (pickle.dumps({"data": data, "labels": [0] * 4}, protocol=2), "no 'fine_labels' entry"),
        (pickle.dumps({"data": np.zeros((4, 1024), dtype=np.uint8), "fine_labels": [0] * 4}, protocol=2),
         r"'data' must be uint8 rows of 3072 values \(3x32x32, CHW\), got uint8 \(4, 1024\)"),
        (pickle.dumps({"data": data.astype(np.float32), "fine_labels": [0] * 4}, protocol=2),
         r"'data' must be uint8 rows of 3072 values"),
        (pickle.dumps({"data": data, "fine_labels": [0] * 3}, protocol=2), "4 images but 3 labels"),
        (pickle.dumps({"data": data, "fine_labels": [0, 1, 2, 100]}, protocol=2), r"labels outside 0\.\.99"),
        (pickle.dumps({"data": data, "fine_labels": ["a"] * 4}, protocol=2), "is not a list of integer labels"),
    ]


def test_cifar_malformed_files_get_one_line_naming_the_file(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar100", 20, 4)
    path = tmp_path / "cifar-100-python" / "train"
    for blob, expected in malformed_cases(path):
        path.write_bytes(blob)
        with pytest.raises(PadkdError, match=expected) as info:
            DATASETS.create("cifar100", {"root": str(tmp_path), "val_size": 0}, "data")
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "\n" not in message


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.target,))


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar100", 20, 4)
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-100-python" / "test"
    path.write_bytes(pickle.dumps({"data": _Exploit(marker), "fine_labels": [0]}, protocol=2))
    with pytest.raises(PadkdError, match="refusing to load global"):
        DATASETS.create("cifar100", {"root": str(tmp_path), "val_size": 0}, "data")
    assert not marker.exists()


# ---------------------------------------------------------------- ImageNet-style folders

CLASSES = ("n01440764", "n01443537", "n02102040")


def write_folder(root: Path, per_class: int = 4, val_classes: tuple[str, ...] = CLASSES) -> dict[str, int]:
    """ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/* of small images: solid colour (class k, image j)
    → RGB (40k+10, 10j+5, 200) as PNG (exact) and a few noisy JPEGs and a greyscale JPEG."""
    rng = np.random.default_rng(0)
    colours = {}
    for split, classes in (("train", CLASSES), ("val", val_classes)):
        for k, wnid in enumerate(CLASSES):
            if wnid not in classes:
                continue
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            n = per_class if split == "train" else 2
            for j in range(n):
                colour = (40 * k + 10, 10 * j + 5 + (100 if split == "val" else 0), 200)
                image = np.empty((20, 30, 3), dtype=np.uint8)
                image[:] = colour
                name = f"{wnid}_{j}.png"
                Image.fromarray(image).save(folder / name)
                colours[f"{split}/{wnid}/{name}"] = colour
            noisy = rng.integers(0, 256, size=(24 + k, 36, 3), dtype=np.uint8)
            Image.fromarray(noisy).save(folder / f"{wnid}_noisy.JPEG", quality=90)
            Image.fromarray(noisy[:, :, 0]).save(folder / f"{wnid}_grey.JPEG")  # mode L, loaded as RGB
    return colours


FOLDER = {"image_size": 16, "resize_size": 20}


def test_folder_reads_train_and_val_with_the_train_class_indices(tmp_path: Path) -> None:
    write_folder(tmp_path, val_classes=(CLASSES[0], CLASSES[2]))  # val lacks the middle class
    data = DATASETS.create("imagenet", {"root": str(tmp_path), **FOLDER}, "data")
    assert data.num_classes == 3 and data.in_channels == 3 and data.val is None
    assert len(data.train) == 3 * 6 and len(data.test) == 2 * 4
    assert data.normalization == (IMAGENET_MEAN, IMAGENET_STD)
    assert data.train_targets.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    test_labels = sorted({int(data.test[i][1]) for i in range(len(data.test))})
    assert test_labels == [0, 2]  # val's class folders map to train's indices by name
    for split in (data.train, data.test, data.eval_train):
        for i in range(len(split)):
            x, y, index = split[i]
            assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and index == i
            assert Path(split.samples[i][0]).parent.name == CLASSES[y]


def test_folder_eval_transform_resizes_and_centre_crops(tmp_path: Path) -> None:
    colours = write_folder(tmp_path)
    data = DATASETS.create("imagenet", {"root": str(tmp_path), **FOLDER}, "data")
    checked = 0
    for i, (path, _) in enumerate(data.test.samples):
        key = "/".join(Path(path).parts[-3:])
        x = data.test[i][0]
        assert torch.equal(x, data.test[i][0])  # deterministic
        if key in colours:  # a solid colour stays that colour
            assert (x == torch.tensor(colours[key], dtype=torch.uint8).view(3, 1, 1)).all()
            checked += 1
        elif key.endswith("_noisy.JPEG") and CLASSES[0] in key:  # 24x36: the shorter side is 20 after resize
            checked += 1
    assert checked == 7
    # resize_size equal to the shorter side: the eval transform is a pure centre crop, rows 2..17, cols 7..22.
    exact = DATASETS.create("imagenet", {"root": str(tmp_path), "image_size": 16, "resize_size": 20}, "data")
    wide = np.asarray(Image.open(tmp_path / "train" / CLASSES[1] / f"{CLASSES[1]}_0.png"))
    wide = wide.copy()
    wide[:, :, 2] = np.arange(30)[None, :] * 8
    wide[:, :, 1] = np.arange(20)[:, None] * 12
    Image.fromarray(wide).save(tmp_path / "train" / CLASSES[1] / f"{CLASSES[1]}_0.png")
    i = [Path(p).name for p, _ in exact.eval_train.samples].index(f"{CLASSES[1]}_0.png")
    got = exact.eval_train[i][0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, wide[2:18, 7:23])


def test_folder_train_transform_is_random_crop_and_flip(tmp_path: Path) -> None:
    colours = write_folder(tmp_path)
    data = DATASETS.create("imagenet", {"root": str(tmp_path), **FOLDER}, "data")
    names = [Path(p).name for p, _ in data.train.samples]
    noisy = names.index(f"{CLASSES[0]}_noisy.JPEG")
    torch.manual_seed(0)
    a = data.train[noisy][0]
    torch.manual_seed(0)
    same = data.train[noisy][0]
    torch.manual_seed(1)
    other = data.train[noisy][0]
    assert torch.equal(a, same) and not torch.equal(a, other) and a.shape == (3, 16, 16)
    solid = names.index(f"{CLASSES[2]}_1.png")
    colour = colours[f"train/{CLASSES[2]}/{CLASSES[2]}_1.png"]
    assert (data.train[solid][0] == torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)).all()
    plain = DATASETS.create("imagenet", {"root": str(tmp_path), **FOLDER, "augment": False}, "data")
    assert torch.equal(plain.train[noisy][0], plain.eval_train[noisy][0])


def test_folder_device_transform_normalises_with_imagenet_constants(tmp_path: Path) -> None:
    write_folder(tmp_path)
    data = DATASETS.create("imagenet", {"root": str(tmp_path), **FOLDER}, "data")
    batch = stack_collate([data.test[i] for i in range(4)])
    for split in ("train", "eval"):
        out = data.device_transforms[split](batch).inputs
        for c in range(3):
            expected = (batch.inputs[:, c].double() / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
            assert torch.allclose(out[:, c].double(), expected, atol=1e-5)


def test_folder_val_size_and_train_subset(tmp_path: Path) -> None:
    write_folder(tmp_path)
    data = DATASETS.create("imagenet", {"root": str(tmp_path), **FOLDER, "val_size": 5}, "data")
    assert len(data.val) == 5 and len(data.train) == 13 and len(data.train_targets) == 13
    held_out = {p for p, _ in data.val.samples}
    assert not held_out & {p for p, _ in data.train.samples}
    assert data.val[0][0].shape == (3, 16, 16)
    other = DATASETS.create("imagenet", {"root": str(tmp_path), **FOLDER, "val_size": 5, "split_seed": 1}, "data")
    assert {p for p, _ in other.val.samples} != held_out
    small = DATASETS.create("imagenet", {"root": str(tmp_path), **FOLDER, "train_subset": 6}, "data")
    assert len(small.train) == 6 and len(small.eval_train) == 6
    assert len(set(small.train_targets.tolist())) > 1  # a random subset, not the first class folder
    with pytest.raises(PadkdError, match=r"^data: train_subset must be in 1\.\.18"):
        DATASETS.create("imagenet", {"root": str(tmp_path), **FOLDER, "train_subset": 19}, "data")
    with pytest.raises(PadkdError, match=r"^data: resize_size \(8\) must be at least image_size \(16\)"):
        DATASETS.create("imagenet", {"root": str(tmp_path), "image_size": 16, "resize_size": 8}, "data")
    default = DATASETS.create("imagenet", {"root": str(tmp_path), "image_size": 56}, "data")
    assert default.test[0][0].shape == (3, 56, 56)  # resized to 64 (56 / 0.875), centre-cropped


def test_folder_errors_name_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(PadkdError) as info:
        DATASETS.create("imagenet", {"root": str(tmp_path)}, "data")
    message = str(info.value)
    assert message.startswith(f"data.root: '{tmp_path}' holds no train/ folder; expected ROOT/train/<class>/")
    assert "image-net.org" in message and "\n" not in message
    write_folder(tmp_path)
    flat = tmp_path / "val"
    for folder in list(flat.iterdir()):
        for image in folder.iterdir():
            image.rename(flat / image.name)
        folder.rmdir()
    with pytest.raises(PadkdError) as info:
        DATASETS.create("imagenet", {"root": str(tmp_path)}, "data")
    message = str(info.value)
    assert f"'{flat}' holds no class folders" in message and "val/<wnid>/" in message and "\n" not in message
    (flat / "n99999999").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(flat / "n99999999" / "x.png")
    with pytest.raises(PadkdError, match=r"class folders that train/ lacks: \['n99999999'\]"):
        DATASETS.create("imagenet", {"root": str(tmp_path)}, "data")
    (flat / "n99999999" / "x.png").unlink()
    (flat / "n99999999").rmdir()
    for image in flat.iterdir():
        image.unlink()
    (flat / CLASSES[0]).mkdir()
    with pytest.raises(PadkdError, match="holds no images in its class folders"):
        DATASETS.create("imagenet", {"root": str(tmp_path)}, "data")
    empty = tmp_path / "train" / "n00000000"
    empty.mkdir()
    with pytest.raises(PadkdError) as info:
        DATASETS.create("imagenet", {"root": str(tmp_path)}, "data")
    assert "n00000000" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- registry coverage and end to end


def test_every_registered_dataset_is_covered() -> None:
    """Each data set has reader tests here, in test_data.py or in its task's file (retrieval, detection); a
    new one must add its own."""
    retrieval = {"cub200", "cars196", "sop", "digits_retrieval", "mnist_retrieval"}  # tests/test_retrieval.py
    detection = {"coco", "voc"}  # tests/test_detection.py
    text = {"text", "python_stdlib"}  # tests/test_data_text.py
    # data sets the tests themselves register (tests/language_data.py) are not padkd's
    shipped = {n for n in DATASETS.names() if DATASETS.get(n).__module__.startswith("padkd.")}
    assert shipped == ({"digits", "mnist", "cifar10", "cifar100", "imagenet"} | retrieval | detection
                                     | text)


def cifar_config(data_root: Path, run_dir: Path, **data: object) -> dict[str, object]:
    return {
        "name": "cifar", "output_dir": str(run_dir), "device": "cpu",
        "data": {"name": "cifar10", "root": str(data_root), "val_size": 64, "batch_size": 32, **data},
        "student": {"model": {"name": "cnn", "widths": [4, 8]}},
        "stages": [{"name": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.05}}],
        "log": {"tensorboard": False, "progress": "none"},
    }


def test_engine_loaders_apply_the_device_transforms(tmp_path: Path) -> None:
    from padkd.assemble import make_data
    from padkd.config import parse_config
    from padkd.engine.loaders import make_loader

    write_cifar(tmp_path, "cifar10", 100, 20, style="py3")
    cfg = parse_config(cifar_config(tmp_path, tmp_path / "run", val_size=20, batch_size=16))
    data = make_data(cfg)
    torch.manual_seed(0)
    train = make_loader(cfg, data, "train", train=True, collate=stack_collate, device=torch.device("cpu"))
    batches = list(train)
    assert len(batches) == 80 // 16
    evaluation = make_loader(cfg, data, "train", train=False, collate=stack_collate, device=torch.device("cpu"))
    eval_batches = list(evaluation)  # records of the train split: no augmentation
    assert sum(len(b) for b in eval_batches) == 80
    for batch in eval_batches:
        raw = torch.stack([data.train[int(i)][0] for i in batch.index])
        assert torch.equal(batch.inputs, data.device_transforms["eval"].images(raw))
    augmented = 0
    for batch in batches:
        assert batch.inputs.dtype == torch.float32 and batch.inputs.shape == (16, 3, 32, 32)
        raw = torch.stack([data.train[int(i)][0] for i in batch.index])
        augmented += int((batch.inputs != data.device_transforms["eval"].images(raw)).flatten(1).any(1).sum())
    assert augmented > 60  # crops and flips change almost every image (the identity has probability 1/162)


def test_tiny_cifar_trains_end_to_end(tmp_path: Path) -> None:
    from padkd.config import parse_config
    from padkd.engine.trainer import Trainer

    write_cifar(tmp_path / "data", "cifar10", 320, 64, style="py3")
    final = Trainer(parse_config(cifar_config(tmp_path / "data", tmp_path / "run")), quiet=True).run().final
    assert final["split"] == "test" and final["best_val"] is not None
    for key in ("last", "best"):
        assert 0 <= final[key]["top1"] <= 100 and np.isfinite(final[key]["loss"])
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


@pytest.mark.slow
def test_resumed_cifar_run_draws_the_same_augmentation(tmp_path: Path) -> None:
    """The crops and flips come from the device's torch generator, which checkpoints save: a run
    interrupted mid-epoch and resumed ends with exactly the weights of an uninterrupted run."""
    from padkd import checkpoint as ckpt
    from padkd.config import parse_config
    from padkd.engine.trainer import Interrupted, Trainer

    write_cifar(tmp_path / "data", "cifar10", 320, 32, style="py3")

    def config(run: str) -> dict[str, object]:
        raw = cifar_config(tmp_path / "data", tmp_path / run)
        raw["stages"][0]["epochs"] = 2  # type: ignore[index]
        return raw

    whole = Trainer(parse_config(config("whole")), quiet=True).run().final

    def stop(trainer: Trainer, step: int) -> None:
        if step == 11:  # epoch 2, batch 3 of 8
            trainer.request_stop()

    with pytest.raises(Interrupted):
        Trainer(parse_config(config("parts")), quiet=True, callbacks=[stop]).run()
    resumed = Trainer(parse_config(config("parts")), resume=True, quiet=True).run().final
    assert resumed["last"] == whole["last"]
    a = ckpt.load(tmp_path / "whole" / "checkpoints" / "last.pt")["student"]
    b = ckpt.load(tmp_path / "parts" / "checkpoints" / "last.pt")["student"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
