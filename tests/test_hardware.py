from __future__ import annotations

import pytest
import torch

from fer_core import hardware
from fer_core.errors import FerError
from fer_core.hardware import resolve_device, resolve_precision


def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu).dtype is torch.bfloat16
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    p = resolve_precision("auto", cpu)
    assert p.name == "fp32" and p.dtype is None and "slower" in p.reason


def test_cpu_flag_detection_reads_cpuinfo(tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor: 0\nflags\t\t: fpu sse avx2 fma\n")  # the AVX2-only EPYC: emulated bf16
    assert hardware.cpu_has_native_bf16(fake) is False
    fake.write_text("processor: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert hardware.cpu_has_native_bf16(fake) is True
    assert hardware.cpu_has_native_bf16(tmp_path / "absent") is False


def test_fp16_on_cpu_and_missing_cuda_are_clear_errors():
    with pytest.raises(FerError, match="fp16 is not supported on CPU"):
        resolve_precision("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(FerError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_picks_bf16_or_fp16_with_scaler():
    p = resolve_precision("auto", torch.device("cuda"))
    assert (p.name == "bf16") == torch.cuda.is_bf16_supported()
    assert p.grad_scaler == (p.name == "fp16")
