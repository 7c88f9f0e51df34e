"""The offline teacher cache (padkd.lmcache): exact round trip and remaining mass, and every refusal."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from padkd.data import TensorData
from padkd.errors import PadkdError
from padkd.lmcache import (
    TeacherCache,
    TeacherCacheWriter,
    cached_log_probs,
    dataset_identity,
    model_identity,
    topk_entries,
)

IDENTITY = {"teacher": "a" * 64, "tokenizer": "b" * 64, "data": "c" * 64}
N, T, K, V = 5, 3, 2, 7


def teacher_logits() -> torch.Tensor:
    """[N, T, V] logits that fp16 holds exactly (multiples of 1/4 in -4..4), seeded."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(-16, 17, (N, T, V), generator=g).float() / 4


def write_cache(folder: Path, logits: torch.Tensor | None = None, identity: dict[str, str] | None = None) -> None:
    entries = topk_entries(teacher_logits() if logits is None else logits, K)
    with TeacherCacheWriter(folder, n_items=N, seq_len=T, k=K, identity=identity or IDENTITY) as writer:
        for index in ([3, 0, 4], [1, 2]):  # out of order, in two batches
            i = torch.tensor(index)
            writer.write(i, entries[0][i], entries[1][i], entries[2][i])


def refused(folder: Path, *fragments: str, identity: dict[str, str] | None = None) -> None:
    with pytest.raises(PadkdError) as err:
        TeacherCache.open(folder, IDENTITY if identity is None else identity)
    message = str(err.value)
    assert "\n" not in message, message
    assert "padkd cache-teacher" in message or "symbolic link" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_remaining_mass_is_exact_on_hand_written_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 3.0]])
    values, indices, lse = topk_entries(logits, 2)
    assert values.dtype == torch.float16 and indices.dtype == torch.int32 and lse.dtype == torch.float32
    assert indices.tolist() == [[5, 0]] and values.tolist() == [[3.0, 2.0]]
    z = math.exp(2) + math.exp(1) + math.exp(0.5) + math.exp(-1) + math.exp(0) + math.exp(3)
    assert float(lse) == pytest.approx(math.log(z), rel=1e-7)
    log_probs, log_tail = cached_log_probs(values, lse)
    assert log_probs.exp().tolist()[0] == pytest.approx([math.exp(3) / z, math.exp(2) / z], rel=1e-6)
    tail = (math.exp(1) + math.exp(0.5) + math.exp(-1) + math.exp(0)) / z  # the four tokens outside the top 2
    assert float(log_tail.exp()) == pytest.approx(tail, rel=1e-6)
    assert float(log_probs.exp().sum() + log_tail.exp()) == pytest.approx(1.0, abs=1e-7)
    # all the mass in the top k: the tail is exactly zero, not a rounding residue
    _, log_tail = cached_log_probs(*topk_entries(torch.tensor([[0.0, -200.0]]), 1)[::2])
    assert float(log_tail) == -math.inf


def test_topk_of_a_bf16_teacher_holds_its_logits_bitwise() -> None:
    logits = (torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 5).bfloat16()
    values, indices, lse = topk_entries(logits, 50)
    full = torch.log_softmax(logits.float(), dim=-1)
    log_probs, _ = cached_log_probs(values, lse)
    assert torch.equal(values.float(), logits.float().gather(-1, indices.long()))
    assert torch.allclose(log_probs, full.gather(-1, indices.long()), atol=1e-6, rtol=1e-6)  # fp32 rounding


def test_a_tempered_cache_holds_the_tempered_distribution(tmp_path: Path) -> None:
    logits = teacher_logits()
    values, indices, lse = topk_entries(logits, K, temperature=2.0)
    assert torch.equal(values, (logits / 2).half().topk(K, dim=-1).values)
    log_probs, log_tail = cached_log_probs(values, lse)
    tempered = torch.softmax(logits / 2, dim=-1)  # logits/2 are multiples of 1/8: fp16 holds them exactly
    assert torch.allclose(log_probs.exp(), tempered.gather(-1, indices.long()), atol=1e-6)
    assert torch.allclose(log_tail.exp(), 1 - tempered.gather(-1, indices.long()).sum(-1), atol=1e-6)
    write_cache(tmp_path / "cache", identity={**IDENTITY, "temperature": "2"})
    assert TeacherCache.open(tmp_path / "cache", {**IDENTITY, "temperature": "2"}).temperature == 2.0
    refused(tmp_path / "cache", "another temperature (cached 2, this run (none))")
    write_cache(tmp_path / "plain")
    assert TeacherCache.open(tmp_path / "plain", IDENTITY).temperature == 1.0
    with pytest.raises(ValueError, match="'temperature' must be a positive number"):
        TeacherCacheWriter(tmp_path / "bad", n_items=N, seq_len=T, k=K, identity={"temperature": "-1"})
    with pytest.raises(ValueError, match="temperature must be positive"):
        topk_entries(logits, K, temperature=0.0)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    logits = teacher_logits()
    write_cache(tmp_path / "cache", logits)
    cache = TeacherCache.open(tmp_path / "cache", IDENTITY)
    assert (len(cache), cache.seq_len, cache.k) == (N, T, K)
    assert isinstance(cache.values, np.memmap) and cache.values.mode == "r"
    values, indices, lse = cache.lookup(torch.tensor([4, 0, 2]))
    want = topk_entries(logits[[4, 0, 2]], K)
    assert values.dtype == torch.float16 and indices.dtype == torch.long and lse.dtype == torch.float32
    assert torch.equal(values, want[0]) and torch.equal(indices, want[1].long()) and torch.equal(lse, want[2])
    assert sorted(os.listdir(tmp_path / "cache")) == ["indices.i32", "logsumexp.f32", "metadata.json", "values.f16"]
    meta = json.loads((tmp_path / "cache" / "metadata.json").read_text())
    assert meta["identity"] == {**IDENTITY, "n_items": "5", "seq_len": "3", "k": "2"}
    with pytest.raises(IndexError):
        cache.lookup(torch.tensor([5]))


def test_unfinished_cache_is_never_readable(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    write_cache(folder)
    writer = TeacherCacheWriter(folder, n_items=N, seq_len=T, k=K, identity=IDENTITY)
    refused(folder, "never finished")  # the old cache's metadata went first
    with pytest.raises(ValueError, match="5 of 5 items were never written"):
        writer.finish()
    writer.abort()
    assert sorted(os.listdir(folder)) == ["indices.i32", "logsumexp.f32", "values.f16"]  # no temporary left
    with pytest.raises(RuntimeError), TeacherCacheWriter(folder, n_items=N, seq_len=T, k=K, identity=IDENTITY):
        raise RuntimeError("the teacher crashed")
    assert not [name for name in os.listdir(folder) if name.startswith(".")]
    refused(folder, "never finished")


@pytest.mark.parametrize(("identity", "fragment"), [
    ({**IDENTITY, "teacher": "d" * 64}, "another teacher (cached aaaaaaaaaaaa…, this run dddddddddddd…)"),
    ({**IDENTITY, "tokenizer": "e" * 64}, "another tokenizer"),
    ({**IDENTITY, "data": "f" * 64}, "another data"),
    ({"teacher": "a" * 64, "tokenizer": "b" * 64}, "another data (cached cccccccccccc…, this run (none))"),
    ({**IDENTITY, "precision": "bf16"}, "another precision"),
    ({**IDENTITY, "k": "4"}, "another k (cached 2, this run 4)"),
    ({**IDENTITY, "seq_len": 256}, "another seq_len"),
])
def test_identity_mismatch_is_refused(tmp_path: Path, identity: dict[str, str], fragment: str) -> None:
    write_cache(tmp_path / "cache")
    refused(tmp_path / "cache", fragment, identity=identity)


def test_shape_keys_match_where_given(tmp_path: Path) -> None:
    write_cache(tmp_path / "cache")
    assert TeacherCache.open(tmp_path / "cache", {**IDENTITY, "k": "2", "seq_len": "3", "n_items": "5"}).k == 2


def test_missing_truncated_and_tampered_files_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    write_cache(folder)
    values = (folder / "values.f16").read_bytes()
    (folder / "values.f16").write_bytes(values[:-2])
    refused(folder, "values.f16 holds 58 bytes, 60 expected", "truncated")
    flipped = bytearray(values)
    flipped[7] ^= 0x01
    (folder / "values.f16").write_bytes(bytes(flipped))
    refused(folder, "values.f16 does not match its sha256")
    (folder / "values.f16").write_bytes(values)
    assert TeacherCache.open(folder, IDENTITY).n_items == N
    (folder / "indices.i32").unlink()
    refused(folder, "indices.i32 is missing")
    write_cache(folder)
    (folder / "metadata.json").write_text('{"format": "padkd-teacher-cache-1", "n_items": 5')
    refused(folder, "not valid JSON")
    (folder / "metadata.json").write_text(json.dumps({"format": "padkd-teacher-cache-1", "n_items": 5}))
    refused(folder, "lacks its shape, identity or arrays")
    (folder / "metadata.json").write_text(json.dumps({"format": "something else"}))
    refused(folder, "is not a padkd-teacher-cache-1 cache")


def test_links_are_never_followed(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    write_cache(folder)
    real = tmp_path / "elsewhere.f32"
    real.write_bytes((folder / "logsumexp.f32").read_bytes())
    (folder / "logsumexp.f32").unlink()
    (folder / "logsumexp.f32").symlink_to(real)
    refused(folder, "logsumexp.f32' is a symbolic link")
    (tmp_path / "via").symlink_to(folder)
    refused(tmp_path / "via", "is a symbolic link")
    with pytest.raises(PadkdError, match="is a symbolic link"):
        TeacherCacheWriter(tmp_path / "via", n_items=N, seq_len=T, k=K, identity=IDENTITY)
    target = tmp_path / "victim.json"
    target.write_text("keep")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metadata.json").symlink_to(target)
    with pytest.raises(PadkdError, match="is a symbolic link"):
        TeacherCacheWriter(fresh, n_items=N, seq_len=T, k=K, identity=IDENTITY)
    assert target.read_text() == "keep"


def test_writer_rejects_what_the_format_cannot_hold(tmp_path: Path) -> None:
    writer = TeacherCacheWriter(tmp_path / "cache", n_items=N, seq_len=T, k=K, identity=IDENTITY)
    values, indices, lse = topk_entries(teacher_logits()[:2], K)
    index = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="float16"):
        writer.write(index, values.float(), indices, lse)
    with pytest.raises(ValueError, match=r"values and indices \[B, 3, 2\]"):
        writer.write(index, values[:, :2], indices[:, :2], lse[:, :2])
    with pytest.raises(ValueError, match="out of range 0..4"):
        writer.write(torch.tensor([0, 5]), values, indices, lse)
    with pytest.raises(ValueError, match="not finite"):
        writer.write(index, torch.full_like(values, float("inf")), indices, lse)
    with pytest.raises(ValueError, match="contradicts"):
        TeacherCacheWriter(tmp_path / "other", n_items=N, seq_len=T, k=K, identity={"k": "3"})
    writer.abort()


def test_model_identity_sees_every_weight_bit_and_the_class() -> None:
    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    b = nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert model_identity(a) == model_identity(b)
    with torch.no_grad():
        b.weight[1, 2] = torch.nextafter(b.weight[1, 2], torch.tensor(1.0))
    assert model_identity(a) != model_identity(b)

    class Other(nn.Linear):
        pass

    c = Other(4, 3)
    c.load_state_dict(a.state_dict())
    assert model_identity(c) != model_identity(a)
    assert model_identity(copy.deepcopy(a).to(torch.bfloat16)) != model_identity(a)  # bf16 bytes hash too


def test_dataset_identity_of_in_memory_data_hashes_every_item() -> None:
    images = torch.arange(24.0).reshape(3, 2, 2, 2)
    labels = torch.tensor([0, 1, 2])
    same = dataset_identity(TensorData(images.clone(), labels.clone()))
    assert dataset_identity(TensorData(images, labels)) == same
    assert dataset_identity(TensorData(images, torch.tensor([0, 1, 1]))) != same
    changed = images.clone()
    changed[2, 1, 1, 1] += 1
    assert dataset_identity(TensorData(changed, labels)) != same


def test_dataset_identity_of_a_text_split_is_its_fingerprint(tmp_path: Path) -> None:
    from padkd.data import DATASETS

    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.txt").write_text(f"document number {i} " * (i + 1))

    def split(block_size: int) -> object:
        options = {"root": str(root), "cache_dir": str(tmp_path / "tokens"), "block_size": block_size}
        return DATASETS.create("text", options, "data").train

    assert dataset_identity(split(8)) == dataset_identity(split(8))
    assert dataset_identity(split(8)) != dataset_identity(split(16))
