"""The processor policy: how many threads a run uses, and what `precision: auto` picks; both recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from padkd.cli import main
from padkd.engine import cpu
from padkd.errors import PadkdError


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """Set the machine the policy sees: usable cores, load average, torch's default threads."""

    def set_machine(cores: int, load: float, default: int = 64) -> None:
        monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(cpu.os, "getloadavg", lambda: (load, load, load))
        monkeypatch.setattr(cpu, "_TORCH_DEFAULT", default)

    monkeypatch.delenv(cpu.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return set_machine


@pytest.mark.parametrize(("cores", "load", "default", "expected"),
                         [(8, 0.0, 64, 8), (8, 5.4, 64, 3), (8, 5.6, 64, 2), (2, 6.5, 64, 1), (16, 0.2, 4, 4)])
def test_the_default_is_the_idle_cores(machine, cores: int, load: float, default: int, expected: int) -> None:
    machine(cores, load, default)
    assert cpu.choose_threads() == (expected, "idle cores")


def test_threads_come_from_the_command_line_then_the_config_then_omp(machine, monkeypatch) -> None:
    machine(8, 0.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu.choose_threads() == (3, "OMP_NUM_THREADS")
    assert cpu.choose_threads(2) == (2, "engine.threads")
    monkeypatch.setenv(cpu.ENV, "1")
    assert cpu.choose_threads(2) == (1, "--threads")
    monkeypatch.setenv(cpu.ENV, "zero")
    with pytest.raises(PadkdError, match="--threads"):
        cpu.choose_threads()


def test_cpu_flags_and_native_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert {"avx512_bf16", "amx_tile", "fpu"} <= cpu.cpu_flags(info)
    assert cpu.cpu_flags(tmp_path / "missing") == set()
    for flags, native in (({"avx512f"}, False), ({"amx_bf16"}, True), ({"avx512_bf16"}, True)):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: flags)
        assert cpu.native_bf16(torch.device("cpu")) is native
        assert cpu.resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
        assert cpu.resolve_precision("fp16", torch.device("cpu")) == "fp16"


@pytest.mark.parametrize("native", [False, True])
def test_a_run_records_its_threads_and_the_precision_auto_chose(tmp_path: Path, plain_config, write_yaml, native,
                                                                monkeypatch, capsys) -> None:
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"amx_bf16"} if native else set())
    raw = plain_config(tmp_path / "run")
    raw["engine"] = {"precision": "auto"}
    config = write_yaml(tmp_path / "c.yaml", raw)
    threads = torch.get_num_threads()
    try:
        assert main(["train", str(config), "--threads", "1", "--quiet"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["engine"] == {"threads": 1, "precision": "bf16" if native else "fp32"}
    assert "precision: auto" in (tmp_path / "run" / "config.yaml").read_text()  # what was asked, beside what ran
