"""The processor a run uses: how many CPU threads its operators use, and whether it runs bf16 natively.

Threads: one policy for `padkd train`, every demo and the study.

Measured by benchmarks/threads.py (docs/speed.md): for padkd's small CPU steps, more threads than the
machine has idle cores is many times slower (on a loaded 2-core machine, 2 threads ran the digits demo's
step at 1/40 of the speed of 1 thread), while on idle cores torch's default serves large models. So the
count is, first to last: `--threads N` (the PADKD_THREADS variable it sets, read by every command), the
config's `engine.threads`, OMP_NUM_THREADS when set, else the cores not busy when the run starts (the
usable cores minus the 1-minute load average, at least 1, at most torch's default).

bf16: `engine.precision: auto` trains in bf16 where the hardware has bf16 arithmetic units (a CUDA GPU that
supports bf16; a CPU with AMX or AVX512-BF16), in fp32 elsewhere (docs/speed.md: where bf16 pays off).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from padkd.errors import PadkdError

log = logging.getLogger(__name__)

#: Set by `padkd --threads N` / `padkd train ... --threads N`; wins over configs.
ENV = "PADKD_THREADS"
#: torch's own default, read before padkd changes it.
_TORCH_DEFAULT = torch.get_num_threads()


def idle_cores() -> int:
    """Cores this process may use that are not busy now: usable cores minus the 1-minute load average,
    at least 1 and at most torch's default thread count."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:  # no load average on this system: assume idle
        busy = 0.0
    return max(1, min(_TORCH_DEFAULT, usable - round(busy)))


def choose_threads(configured: int | None = None) -> tuple[int, str]:
    """The thread count by the policy (see the module docstring) and where it came from."""
    text = os.environ.get(ENV)
    if text:
        if not text.isdigit() or int(text) < 1:
            raise PadkdError(f"--threads / {ENV}={text!r}: give a positive whole number of threads, e.g. --threads 1")
        return int(text), "--threads"
    if configured is not None:
        return configured, "engine.threads"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) >= 1:
        return int(omp), "OMP_NUM_THREADS"
    return idle_cores(), "idle cores"


def set_threads(configured: int | None = None) -> int:
    """Apply the policy to torch's intra-op threads; returns the count used (recorded in final.json)."""
    threads, source = choose_threads(configured)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.debug("using %d CPU thread(s) (from %s)", threads, source)
    return threads


#: /proc/cpuinfo flags of CPUs with bf16 arithmetic units (Intel AMX; AVX512-BF16 on Intel and AMD Zen 4+).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as Linux reports them (lscpu reads the same); empty where unknown."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def native_bf16(device: torch.device) -> bool:
    """Whether `device` has bf16 arithmetic units (not emulated bf16, which is slower than fp32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return device.type == "cpu" and bool(cpu_flags() & set(BF16_FLAGS))


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` → bf16 where `device` runs it natively, else fp32; any other value as given."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"
