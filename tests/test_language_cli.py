"""Language modelling through the CLI: `padkd list` shows the parts; the shipped PAD-over-tokens recipe (on a
tiny token data set registered here) trains, is interrupted, resumes bitwise, evaluates and exports; and
2-process DDP (gloo, torchrun) trains it with records holding every validation sequence."""

from __future__ import annotations

import csv
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
from padkd.config import load_config
from padkd.engine.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
import language_data  # noqa: E402

language_data.register()
CONFIGS = Path(__file__).resolve().parents[1] / "src" / "padkd" / "recipes" / "language"
TINY = {"name": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": language_data.BLOCK}


def recipe(name: str, run_dir: Path, teacher: Path | None = None, epochs: int = 2) -> dict[str, Any]:
    """A shipped config with the tiny data set and tiny models in place of the stdlib and the demo sizes."""
    raw = load_config(CONFIGS / name, []).model_dump(mode="json", exclude_none=True)
    raw |= {"output_dir": str(run_dir), "device": "cpu",
            "data": {"name": "tiny_tokens", "batch_size": 8},
            "log": {"tensorboard": False, "progress": "none", "interval": 4}}
    raw["student"] = {"model": TINY}
    if "teacher" in raw:
        raw["teacher"] = {"model": TINY | {"n_embd": 32}, "checkpoint": str(teacher)}
    raw["stages"][0]["epochs"] = epochs
    return raw


def write(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("lm-teacher")
    raw = recipe("teacher.yaml", base / "teacher", epochs=2)
    raw["student"] = {"model": TINY | {"n_embd": 32}}
    Trainer(load_config(write(base / "t.yaml", raw), []), quiet=True).run()
    return base / "teacher"


def test_list_shows_the_language_parts(capsys: pytest.CaptureFixture[str]) -> None:
    for what, names in (("tasks", ["language_modeling"]), ("models", ["gpt2", "llama", "hf_causal_lm"]),
                        ("methods", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "token_hint"]),
                        ("datasets", ["tiny_tokens"])):
        code, out, _ = cli(["list", what], capsys)
        assert code == 0 and all(f"\n{n} " in f"\n{out}" for n in names), (what, out)


def test_teacher_student_vocabulary_mismatch_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = recipe("forward_kl.yaml", tmp_path / "run", tmp_path / "unused")
    raw["teacher"] = {"model": {"name": "hf_causal_lm", "path": str(tmp_path / "hf")}}
    from padkd.models import MODELS

    options = {k: v for k, v in TINY.items() if k != "name"}
    MODELS.create("gpt2", options, "m", vocab_size=language_data.VOCAB + 3).save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    code, _, err = cli(["train", str(write(tmp_path / "c.yaml", raw)), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "vocabulary has 35 tokens" in err


@pytest.mark.slow
def test_pad_over_tokens_trains_resumes_bitwise_evaluates_and_exports(
        tmp_path: Path, teacher: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    a_cfg = write(tmp_path / "a.yaml", recipe("pad_forward_kl.yaml", tmp_path / "a", teacher))
    code, out, err = cli(["train", str(a_cfg), "--quiet"], capsys)
    assert code == 0, err
    reference = json.loads(out)
    assert reference["primary_metric"] == "perplexity"
    assert {"perplexity", "bpb", "teacher_agreement", "teacher_kl"} <= set(reference["last"])

    b_cfg = write(tmp_path / "b.yaml", recipe("pad_forward_kl.yaml", tmp_path / "b", teacher))
    original = Trainer.__init__

    def init(self: Trainer, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.callbacks.append(lambda trainer, step: trainer.request_stop() if step == 11 else None)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "__init__", init)
        code, _, err = cli(["train", str(b_cfg), "--quiet"], capsys)
    assert code == 130 and "--resume" in err
    code, out, err = cli(["train", str(b_cfg), "--resume", "--quiet"], capsys)
    assert code == 0, err
    assert {k: v for k, v in json.loads(out).items() if k != "run_dir"} == \
        {k: v for k, v in reference.items() if k != "run_dir"}
    a_last, b_last = ckpt.load(tmp_path / "a/checkpoints/last.pt"), ckpt.load(tmp_path / "b/checkpoints/last.pt")
    for part in ("student", "terms"):
        assert a_last[part].keys() == b_last[part].keys()
        assert all(torch.equal(a_last[part][k], b_last[part][k]) for k in a_last[part]), part

    records = tmp_path / "a" / "records"
    with open(records / "0-main-val.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and {"tokens", "student_nll", "teacher_kl", "kd.weight", "kd.log_var"} <= set(rows[0])
    with open(records / "0-main-val.task-rows.elements.csv", newline="") as f:
        tokens = list(csv.DictReader(f))
    assert {r["sequence"] for r in tokens} == {str(i) for i in range(8)}  # token_records: 8
    counted = {i: int(rows[i]["tokens"]) for i in range(8)}
    assert all(sum(r["sequence"] == str(i) for r in tokens) == n for i, n in counted.items())
    assert {"kd.discrepancy", "kd.log_var", "student_logp", "teacher_logp"} <= set(tokens[0])

    code, out, err = cli(["eval", str(tmp_path / "a"), "--split", "test"], capsys)
    assert code == 0, err
    assert json.loads(out)["perplexity"] == pytest.approx(reference["best"]["perplexity"], rel=1e-6)
    code, out, err = cli(["export", str(tmp_path / "a"), "-o", str(tmp_path / "student.pt")], capsys)
    assert code == 0, err
    exported = ckpt.load(tmp_path / "student.pt")
    assert set(exported["student"]) == set(a_last["student"])


_DDP = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import language_data
    language_data.register()
    from padkd.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
def test_ddp_trains_with_torchrun_and_records_every_sequence(tmp_path: Path, teacher: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to the interpreter")
    config = write(tmp_path / "ddp.yaml", recipe("pad_forward_kl.yaml", tmp_path / "run", teacher, epochs=1))
    (tmp_path / "launch.py").write_text(_DDP)
    import padkd

    source = str(Path(padkd.__file__).resolve().parents[1])  # the padkd under test, also from a checkout
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(tmp_path / "launch.py"),
                           str(Path(__file__).parent), "train", str(config), "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, [line for line in proc.stderr.splitlines() if "padkd" in line][-3:]
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch = next(e for e in events if e["event"] == "epoch")
    assert epoch["global_step"] == 4  # 64 sequences over 2 ranks, batches of 8
    assert {"perplexity", "bpb", "teacher_agreement"} <= set(epoch["val"])
    with open(tmp_path / "run" / "records" / "0-main-val.csv", newline="") as f:
        assert sorted(int(r["index"]) for r in csv.DictReader(f)) == list(range(16))
