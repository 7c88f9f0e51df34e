"""The offline teacher cache: cached KD with k = vocabulary equals online KD on the same (fp16-rounded) teacher
logits through the Distiller; `padkd cache-teacher` writes a cache that `padkd train` reads; a cache made for
another teacher is refused in one line. Needs `padkd.lmcache` (the cache format)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

lmcache = pytest.importorskip("padkd.lmcache")
pytest.importorskip("padkd.data.text")
TeacherCacheWriter = lmcache.TeacherCacheWriter

from padkd.batch import stack_collate  # noqa: E402
from padkd.distiller import Distiller, Term  # noqa: E402
from padkd.methods import METHODS  # noqa: E402
from padkd.models import MODELS  # noqa: E402
from padkd.tasks import TASKS  # noqa: E402
from padkd.tasks.language import write_teacher_cache  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import language_data  # noqa: E402

language_data.register()
TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": language_data.BLOCK}


def _cache(tmp_path: Path, teacher: torch.nn.Module, data, k: int):  # type: ignore[no-untyped-def]
    task = TASKS.create("language_modeling", {"teacher_cache": str(tmp_path / "cache"), "cache_k": k})
    loader = [stack_collate([data.train[i] for i in range(j, j + 8)]) for j in range(0, len(data.train), 8)]
    with TeacherCacheWriter(tmp_path / "cache", n_items=len(data.train), seq_len=language_data.BLOCK, k=k,
                            identity=task.cache_identity(teacher, data)) as writer:
        assert write_teacher_cache(teacher, loader, writer, k, 1.0) == len(data.train)
    return task, loader


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_cached_kd_with_k_equal_to_the_vocabulary_equals_online_kd(tmp_path: Path, name: str) -> None:
    from padkd.data import DATASETS

    data = DATASETS.create("tiny_tokens", {})
    torch.manual_seed(0)
    teacher = MODELS.create("gpt2", TINY | {"n_embd": 32}, "t", vocab_size=language_data.VOCAB).eval()
    student = MODELS.create("gpt2", TINY, "s", vocab_size=language_data.VOCAB)
    cached_task, loader = _cache(tmp_path, teacher, data, k=language_data.VOCAB)
    cached_task.use_teacher(teacher, data)
    batch = loader[1]
    cached = Distiller(student, teacher, [Term("kd", METHODS.create(name))], task=cached_task)
    cached.prepare(batch)
    cached.train()
    loss = cached(batch).losses["kd"]

    class Rounded(torch.nn.Module):  # the teacher as the cache holds it: logits rounded to fp16
        def forward(self, **inputs):  # type: ignore[no-untyped-def]
            return teacher(**inputs).logits.half().float()

    online = Distiller(student, Rounded(), [Term("kd", METHODS.create(name))], task=TASKS.create("language_modeling"))
    online.prepare(batch)
    online.train()
    assert loss.item() == pytest.approx(online(batch).losses["kd"].item(), rel=1e-5)
    raw = Distiller(student, teacher, [Term("kd", METHODS.create(name))], task=TASKS.create("language_modeling"))
    raw.prepare(batch)
    raw.train()
    assert loss.item() == pytest.approx(raw(batch).losses["kd"].item(), rel=1e-2)


def test_cache_of_another_teacher_is_refused_in_one_line(tmp_path: Path) -> None:
    from padkd.data import DATASETS
    from padkd.errors import PadkdError

    data = DATASETS.create("tiny_tokens", {})
    teacher = MODELS.create("gpt2", TINY, "t", vocab_size=language_data.VOCAB)
    task, _ = _cache(tmp_path, teacher, data, k=4)
    other = MODELS.create("gpt2", TINY, "t", vocab_size=language_data.VOCAB)
    with pytest.raises(PadkdError, match="another teacher") as err:
        task.use_teacher(other, data)
    assert "\n" not in str(err.value)
    task.use_teacher(teacher, data)  # its own teacher opens it
    assert task.cache is not None and task.cache.k == 4


@pytest.mark.slow
def test_cache_teacher_then_train_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from padkd.cli import main

    teacher = MODELS.create("gpt2", TINY, "t", vocab_size=language_data.VOCAB)
    from padkd import checkpoint as ckpt

    ckpt.save(tmp_path / "teacher.pt", "export", model={"name": "gpt2", **TINY}, student=teacher.state_dict())
    raw = {"name": "cached", "output_dir": str(tmp_path / "run"), "device": "cpu", "seed": 0,
           "task": {"name": "language_modeling", "teacher_cache": str(tmp_path / "cache"), "cache_k": 8},
           "data": {"name": "tiny_tokens", "batch_size": 8},
           "teacher": {"model": {"name": "gpt2", **TINY}, "checkpoint": str(tmp_path / "teacher.pt")},
           "student": {"model": {"name": "gpt2", **TINY}},
           "log": {"tensorboard": False, "progress": "none"},
           "stages": [{"name": "main", "epochs": 1, "optimizer": {"name": "adamw", "lr": 0.01},
                       "terms": [{"name": "kd", "method": {"name": "forward_kl"}}]}]}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config), "--quiet"]) == 2  # no cache yet
    assert "teacher cache" in capsys.readouterr().err
    assert main(["cache-teacher", str(config)]) == 0
    assert "top-8 logits of 64 training sequences" in capsys.readouterr().out
    assert main(["train", str(config), "--quiet"]) == 0, capsys.readouterr().err
