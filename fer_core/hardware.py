"""Device and precision resolution: `auto` picks what is fast *and* correct on this machine."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FerError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise FerError(f"train.device: unknown device '{name}' (expected auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FerError(f"train.device: '{name}' requested but CUDA is not available here (use 'auto' or 'cpu')")
    return dev


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True only where bf16 matmuls run in hardware (AVX512-BF16 or AMX on x86, BF16 on Arm).

    Emulated bf16 (e.g. AVX2-only CPUs) is many times *slower* than fp32, so it must not be
    picked by `auto`.
    """
    if cpuinfo.is_file():
        flags: set[str] = set()
        for line in cpuinfo.read_text(errors="ignore").splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False  # unknown OS/CPU: fp32 is the safe choice


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    dtype: torch.dtype | None  # autocast dtype, None = no autocast
    grad_scaler: bool
    reason: str


def resolve_precision(name: str, device: torch.device) -> Precision:
    if name == "fp32":
        return Precision("fp32", None, False, "requested")
    if name == "bf16":
        return Precision("bf16", torch.bfloat16, False, "requested")
    if name == "fp16":
        if device.type == "cpu":
            raise FerError("train.precision: fp16 is not supported on CPU (use bf16, fp32 or auto)")
        return Precision("fp16", torch.float16, device.type == "cuda", "requested")
    # auto
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", torch.bfloat16, False, "CUDA device supports bf16")
        return Precision("fp16", torch.float16, True, "CUDA device without bf16: fp16 + GradScaler")
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return Precision("bf16", torch.bfloat16, False, "CPU has native bf16 (AVX512-BF16/AMX)")
        return Precision("fp32", None, False, "CPU without native bf16: emulated bf16 would be slower")
    return Precision("fp32", None, False, f"{device.type}: fp32")


def autocast(device: torch.device, precision: Precision):
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if k == "image" and channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out
