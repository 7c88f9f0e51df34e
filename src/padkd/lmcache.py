"""The offline teacher cache: each token's top-k teacher logits, run once, read instead of the teacher.

A cache folder holds three memory-mapped arrays over the `n_items` items of a data split, each `seq_len`
tokens long: `values.f16` (the top-k logits, fp16 `[n, T, k]`), `indices.i32` (their vocabulary ids, int32
`[n, T, k]`) and `logsumexp.f32` (fp32 `[n, T]`, over the whole vocabulary), then `metadata.json`: shapes,
the sha256 of every file and the identity (teacher, tokenizer, data, k, seq_len) it was made for. The
metadata is written last and atomically, so an unfinished cache is never readable; opening it checks the
identity, the sizes and the checksums and refuses any difference with one line (docs/language-cache.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from padkd import files
from padkd.batch import tree_leaves
from padkd.errors import PadkdError

FORMAT = "padkd-teacher-cache-1"
METADATA = "metadata.json"
#: The arrays of a cache: file name, dtype and whether it has the trailing k axis.
ARRAYS = {"values": ("values.f16", np.float16, True), "indices": ("indices.i32", np.int32, True),
          "logsumexp": ("logsumexp.f32", np.float32, False)}
#: Identity keys the cache fills in itself from its shape.
SHAPE_KEYS = ("n_items", "seq_len", "k")
_CHUNK = 1 << 24
_META_LIMIT = 1 << 20
_FIX = "run `padkd cache-teacher CONFIG` again for this run, or point at the cache made for it"


def topk_entries(logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """What the cache stores for teacher `logits [..., V]`: the top-k of `logits / temperature` rounded to fp16,
    their ids (int32), and the fp32 logsumexp over the whole vocabulary of the same fp16-rounded values, so the
    top-k probabilities and the remaining mass sum to exactly one (at temperature 1, bitwise the teacher's
    logits for a bf16/fp16 teacher). Record a temperature other than 1 as the identity key `temperature`."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    rounded = (logits.detach().float() / temperature).to(torch.float16)
    values, indices = rounded.topk(k, dim=-1)
    return values, indices.to(torch.int32), torch.logsumexp(rounded.float(), dim=-1)


def cached_log_probs(values: Tensor, logsumexp: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's log-probabilities of the cached top-k tokens `[..., k]` and the log of the remaining
    mass `log(1 - Σ top-k probs)` `[...]` (-inf when the top k hold it all), both fp32."""
    log_probs = values.float() - logsumexp.float().unsqueeze(-1)
    top = torch.logsumexp(log_probs.double(), dim=-1).clamp(max=0.0)
    return log_probs, torch.log(-torch.expm1(top)).float()


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, _CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _shape(name: str, n_items: int, seq_len: int, k: int) -> tuple[int, ...]:
    return (n_items, seq_len, k) if ARRAYS[name][2] else (n_items, seq_len)


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise PadkdError(f"teacher cache: '{path}' is a symbolic link; padkd never reads or writes a cache through "
                         "a link: remove the link or use the folder itself")


class TeacherCacheWriter:
    """Writes a cache folder: `write` batches of items by index, then `finish`. The arrays go to exclusively
    created temporary files (never through a link) renamed into place by `finish`, which writes the
    metadata last; an old cache in the folder is made unreadable (its metadata removed) before any write."""

    def __init__(self, directory: str | Path, *, n_items: int, seq_len: int, k: int, identity: dict[str, str]) -> None:
        if min(n_items, seq_len, k) < 1:
            raise ValueError(f"n_items, seq_len and k must be positive, got {n_items}, {seq_len}, {k}")
        self.directory = Path(directory)
        self.shape = {"n_items": n_items, "seq_len": seq_len, "k": k}
        clash = {key for key in SHAPE_KEYS if key in identity and str(identity[key]) != str(self.shape[key])}
        if clash:
            raise ValueError(f"identity {sorted(clash)} contradicts the cache's shape {self.shape}")
        self.identity = {**{key: str(value) for key, value in identity.items()},
                         **{key: str(value) for key, value in self.shape.items()}}
        _temperature(self.identity)
        _refuse_link(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        _refuse_link(self.directory / METADATA)
        (self.directory / METADATA).unlink(missing_ok=True)
        self._files: dict[str, tuple[Path, IO[bytes], np.memmap]] = {}
        try:
            for name, (filename, dtype, _) in ARRAYS.items():
                shape = _shape(name, n_items, seq_len, k)
                fd, tmp = tempfile.mkstemp(prefix=f".{filename}.tmp-{os.getpid()}-", dir=self.directory)
                os.ftruncate(fd, int(np.prod(shape)) * np.dtype(dtype).itemsize)
                handle = os.fdopen(fd, "r+b")
                self._files[name] = (Path(tmp), handle, np.memmap(handle, dtype=dtype, mode="r+", shape=shape))
        except BaseException:
            self.abort()
            raise
        self._written = np.zeros(n_items, dtype=bool)

    def write(self, index: Tensor, values: Tensor, indices: Tensor, logsumexp: Tensor) -> None:
        """Store items `index [B]`: `values [B, T, k]` fp16, `indices [B, T, k]` integer, `logsumexp [B, T]` fp32."""
        n, t, k = self.shape["n_items"], self.shape["seq_len"], self.shape["k"]
        b = len(index)
        if index.dim() != 1 or values.shape != (b, t, k) or indices.shape != (b, t, k) or logsumexp.shape != (b, t):
            raise ValueError(f"expected index [B], values and indices [B, {t}, {k}], logsumexp [B, {t}]; got "
                             f"{tuple(index.shape)}, {tuple(values.shape)}, {tuple(indices.shape)}, "
                             f"{tuple(logsumexp.shape)}")
        if values.dtype != torch.float16 or logsumexp.dtype != torch.float32 or indices.is_floating_point():
            raise ValueError(f"values must be float16, logsumexp float32 and indices integer; got {values.dtype}, "
                             f"{logsumexp.dtype}, {indices.dtype} (padkd.lmcache.topk_entries makes them)")
        idx = index.detach().cpu().long().numpy()
        if b and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"item index out of range 0..{n - 1}: {idx.min()}..{idx.max()}")
        if not (torch.isfinite(values).all() and torch.isfinite(logsumexp).all()):
            raise ValueError("teacher logits are not finite (do they overflow float16?); the cache holds finite ones")
        if b and int(indices.min()) < 0:
            raise ValueError("token indices must be non-negative")
        self._files["values"][2][idx] = values.detach().cpu().numpy()
        self._files["indices"][2][idx] = indices.detach().cpu().to(torch.int32).numpy()
        self._files["logsumexp"][2][idx] = logsumexp.detach().cpu().numpy()
        self._written[idx] = True

    def finish(self) -> None:
        """Checksum the arrays, rename them into place, then write the metadata (atomically, last)."""
        missing = np.flatnonzero(~self._written)
        if len(missing):
            raise ValueError(f"{len(missing)} of {len(self._written)} items were never written (first: {missing[0]})")
        entries = {}
        for name, (_, handle, array) in self._files.items():
            array.flush()
            handle.flush()
            os.fsync(handle.fileno())
            filename = ARRAYS[name][0]
            entries[name] = {"file": filename, "dtype": np.dtype(ARRAYS[name][1]).name, "shape": list(array.shape),
                             "bytes": array.nbytes, "sha256": _sha256_fd(handle.fileno())}
        for name, (tmp, handle, _) in self._files.items():
            handle.close()
            os.replace(tmp, self.directory / ARRAYS[name][0])
        self._files = {}
        files.fsync_dir(self.directory)
        metadata = {"format": FORMAT, **self.shape, "identity": self.identity, "arrays": entries}
        files.atomic_write_text(self.directory / METADATA, json.dumps(metadata, indent=1, sort_keys=True))

    def abort(self) -> None:
        """Drop an unfinished cache's temporary files."""
        for tmp, handle, _ in self._files.values():
            handle.close()
            tmp.unlink(missing_ok=True)
        self._files = {}

    def __enter__(self) -> TeacherCacheWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: Any) -> None:
        if kind is None:
            self.finish()
        else:
            self.abort()


@dataclass
class TeacherCache:
    """A finished cache, opened read-only after every check; `lookup` reads items by index."""

    directory: Path
    n_items: int
    seq_len: int
    k: int
    identity: dict[str, str]
    values: np.memmap
    indices: np.memmap
    logsumexp: np.memmap

    @classmethod
    def open(cls, directory: str | Path, identity: dict[str, str]) -> TeacherCache:
        """Open the cache in `directory` for a run of this `identity`: a mismatch of any identity key (teacher,
        tokenizer, data; k, seq_len, n_items where given), a missing, truncated or altered file, or a link
        is one line naming the fix. Every file's sha256 is verified (a read of the whole cache)."""
        folder = Path(directory)
        _refuse_link(folder)
        meta_path = folder / METADATA
        _refuse_link(meta_path)
        if not meta_path.is_file():
            raise PadkdError(f"teacher cache '{folder}' has no {METADATA}: it was never finished (or is no cache); "
                             f"{_FIX}")
        try:
            meta = files.read_json(meta_path, _META_LIMIT, "teacher cache metadata")
        except PadkdError as err:
            raise PadkdError(f"teacher cache '{folder}': {err}; {_FIX}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise PadkdError(f"teacher cache '{folder}': {METADATA} is not a {FORMAT} cache; {_FIX}")
        try:
            shape = {key: int(meta[key]) for key in SHAPE_KEYS}
            stored = {str(key): str(value) for key, value in dict(meta["identity"]).items()}
            entries = {name: dict(meta["arrays"][name]) for name in ARRAYS}
        except (KeyError, TypeError, ValueError):
            raise PadkdError(f"teacher cache '{folder}': {METADATA} lacks its shape, identity or arrays; "
                             f"{_FIX}") from None
        _check_identity(folder, stored, {str(key): str(value) for key, value in identity.items()})
        try:
            _temperature(stored)
        except ValueError as err:
            raise PadkdError(f"teacher cache '{folder}': {err}; {_FIX}") from None
        arrays = {name: _open_array(folder, name, entries[name], _shape(name, **shape)) for name in ARRAYS}
        return cls(folder, shape["n_items"], shape["seq_len"], shape["k"], stored, **arrays)

    def __len__(self) -> int:
        return self.n_items

    @property
    def temperature(self) -> float:
        """The temperature the cached logits were divided by (identity key `temperature`; 1 when absent)."""
        return _temperature(self.identity)

    def lookup(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Items `index [B]`: top-k values fp16 `[B, T, k]`, their ids long `[B, T, k]`, logsumexp fp32 `[B, T]`
        (on the CPU; only these rows are read from disk)."""
        idx = index.detach().cpu().long().numpy()
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_items):
            raise IndexError(f"item index out of range 0..{self.n_items - 1}: {idx.min()}..{idx.max()}")
        return (torch.from_numpy(self.values[idx]), torch.from_numpy(self.indices[idx].astype(np.int64)),
                torch.from_numpy(self.logsumexp[idx]))


def _temperature(identity: dict[str, str]) -> float:
    try:
        value = float(identity.get("temperature", "1"))
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"identity 'temperature' must be a positive number, got {identity['temperature']!r}")
    return value


def _short(value: str | None) -> str:
    return "(none)" if value is None else (value[:12] + "…" if len(value) > 12 else value)


def _check_identity(folder: Path, stored: dict[str, str], given: dict[str, str]) -> None:
    """Every identity key matches; the shape keys only where the run gives them."""
    for key in sorted(set(stored) | set(given)):
        if key in SHAPE_KEYS and key not in given:
            continue
        if stored.get(key) != given.get(key):
            raise PadkdError(f"teacher cache '{folder}' was made for another {key} (cached {_short(stored.get(key))}, "
                             f"this run {_short(given.get(key))}); {_FIX}")


def _open_array(folder: Path, name: str, entry: dict[str, Any], shape: tuple[int, ...]) -> np.memmap:
    filename, dtype, _ = ARRAYS[name]
    path = folder / filename
    _refuse_link(path)
    try:
        fd = files.open_no_follow(path, os.O_RDONLY)
    except FileNotFoundError:
        raise PadkdError(f"teacher cache '{folder}': {filename} is missing; {_FIX}") from None
    handle = os.fdopen(fd, "rb")
    try:
        size = os.fstat(fd).st_size
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not stat.S_ISREG(os.fstat(fd).st_mode) or size != expected or entry.get("bytes") != expected:
            raise PadkdError(f"teacher cache '{folder}': {filename} holds {size} bytes, {expected} expected "
                             f"(truncated?); {_FIX}")
        if _sha256_fd(fd) != entry.get("sha256"):
            raise PadkdError(f"teacher cache '{folder}': {filename} does not match its sha256 (altered or corrupt); "
                             f"{_FIX}")
        return np.memmap(handle, dtype=dtype, mode="r", shape=shape)
    finally:
        handle.close()  # the memmap keeps its own mapping


def model_identity(model: nn.Module) -> str:
    """sha256 over the model's class and every state_dict entry's name, dtype, shape and bytes."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\0".encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_identity(dataset: Any) -> str:
    """sha256 of what a data split's items are: a text split's `fingerprint` (its token file's sha256, its
    documents and block layout); for any other data set, the bytes of every item's tensors in order
    (valid for a cache only where the items are deterministic: augmentation off)."""
    fingerprint = getattr(dataset, "fingerprint", None)
    if fingerprint is not None:
        return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    h = hashlib.sha256(f"{type(dataset).__qualname__}\0{len(dataset)}\0".encode())
    for i in range(len(dataset)):
        inputs, targets, _ = dataset[i]
        for t in tree_leaves(default_collate([(inputs, targets)])):  # ints and arrays become tensors
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
