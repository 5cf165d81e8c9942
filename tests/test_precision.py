"""train.amp's dtype per device: float16 on CUDA, bfloat16 on CPUs with bf16 units, float32 with a warning elsewhere."""

from pathlib import Path

import pytest
import torch

from maskrcnn.engine import precision


def test_bf16_units_are_read_from_cpuinfo():
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    expected = ("amx_bf16" in flags or "avx512_bf16" in flags) and torch.backends.mkldnn.is_available()
    assert precision.has_fast_bf16() == expected
    # AMX (Sapphire Rapids) or AVX-512 bf16 (Zen 4, Cooper Lake) count; AVX-512 without bf16 does not
    assert precision.has_fast_bf16({"amx_bf16"}) and precision.has_fast_bf16({"avx512f", "avx512_bf16"})
    assert not precision.has_fast_bf16({"avx512f", "avx2"})


def test_autocast_dtype_per_device(monkeypatch):
    assert precision.autocast_dtype(torch.device("cpu"), amp=False) is None
    assert precision.autocast_dtype(torch.device("cuda"), amp=True) == torch.float16
    monkeypatch.setattr(precision, "has_fast_bf16", lambda: True)
    assert precision.autocast_dtype(torch.device("cpu"), amp=True) == torch.bfloat16


def test_cpu_without_amx_falls_back_to_float32_and_says_so(monkeypatch):
    monkeypatch.setattr(precision, "has_fast_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 units.*float32"):
        assert precision.autocast_dtype(torch.device("cpu"), amp=True) is None
