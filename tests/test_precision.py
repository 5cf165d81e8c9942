"""train.amp's dtype per device: float16 on CUDA, bfloat16 on AMX CPUs, float32 with a warning elsewhere."""

from pathlib import Path

import pytest
import torch

from maskrcnn.engine import precision


def test_amx_flag_is_read_from_cpuinfo():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else None
    if flags is None:
        pytest.skip("no /proc/cpuinfo on this system")  # then torch's tile check answers
    assert precision.cpu_has_amx_bf16() == (" amx_bf16" in flags)


def test_autocast_dtype_per_device(monkeypatch):
    assert precision.autocast_dtype(torch.device("cpu"), amp=False) is None
    assert precision.autocast_dtype(torch.device("cuda"), amp=True) == torch.float16
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    assert precision.autocast_dtype(torch.device("cpu"), amp=True) == torch.bfloat16


def test_cpu_without_amx_falls_back_to_float32_and_says_so(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no AMX bf16.*float32"):
        assert precision.autocast_dtype(torch.device("cpu"), amp=True) is None
