"""Which dtype `train.amp` trains in on a device: float16 on CUDA (with a GradScaler), bfloat16 on
CPUs with AMX bf16 tiles (Intel Sapphire Rapids and later), float32 otherwise.

On a CPU without AMX, bfloat16 convolutions run through slower emulation paths than float32 ones,
so `amp` there would only cost accuracy; the trainer falls back to float32 and says so.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """The `amx_bf16` flag of /proc/cpuinfo (Linux); elsewhere torch's AMX tile check."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
        return "amx_bf16" in flags.split()
    return bool(torch.cpu._is_amx_tile_supported())


def autocast_dtype(device: torch.device, *, amp: bool) -> torch.dtype | None:
    """The autocast dtype of `train.amp` on `device`, or None for float32 training."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        if cpu_has_amx_bf16():
            return torch.bfloat16
        warnings.warn("train.amp: this CPU has no AMX bf16 units (no amx_bf16 flag); training in float32", stacklevel=2)
    return None
