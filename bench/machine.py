"""The machine a bench record was measured on: records from different CPUs must not be mixed
(the development machines here differ fivefold in training speed: AMX-BF16 vs AVX2-only)."""

from __future__ import annotations

import platform
from pathlib import Path

# the instruction sets that decide how fast training and inference run here, best first
_SPEED_ISA = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name and its fastest relevant instruction set, e.g. 'AMD EPYC (avx512_bf16)',
    from /proc/cpuinfo (or the text given).

    Virtual machines often report only a generic model name ('AMD EPYC' was seen both for an
    AVX2-only Zen 1 and an AVX512-BF16 Zen 5, which train 5x apart), so the name alone cannot
    tell two machines apart; the flag can."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine()
    lines = cpuinfo.splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())
    flags = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())
    isa = next((f for f in _SPEED_ISA if f in flags), None)
    return f"{name} ({isa})" if isa else name


def speed_isa(cpu: str) -> str | None:
    """The instruction set cpu_name() put in a record's CPU name ('AMD EPYC (avx2)' → 'avx2'); None
    for names without one (records from before it was added, or CPUs with none of _SPEED_ISA)."""
    tail = cpu.rpartition(" (")[2].removesuffix(")") if cpu.endswith(")") else ""
    return tail if tail in _SPEED_ISA else None
