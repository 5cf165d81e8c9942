"""Where bfloat16 pays, and which dtype `train.amp` trains in on a device: float16 on CUDA (with a
GradScaler), bfloat16 on CPUs with bf16 matrix units, float32 otherwise.

bf16 units: Intel's AMX tiles (`amx_bf16`, Sapphire Rapids and later) and the AVX-512 bf16 dot
products (`avx512_bf16`: AMD Zen 4 and later, Intel Cooper Lake), which oneDNN's bf16 convolutions
use. On a CPU with neither (AVX2 only, or AVX-512 without bf16), bfloat16 convolutions run through
slower emulation paths than float32 ones, so `amp` there would only cost accuracy; the trainer
falls back to float32 and says so, and the bf16 inference mode falls back to fp32.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def read_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo does not exist, e.g. macOS)."""
    try:
        with open(path) as file:
            for line in file:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_fast_bf16(cpu_flags: Iterable[str] | None = None) -> bool:
    """Whether bf16 matrix products are fast here: one of `BF16_CPU_FLAGS` in /proc/cpuinfo's flags
    (pass `cpu_flags` to decide for another CPU, e.g. in tests) and oneDNN's bf16 kernels."""
    flags = read_cpu_flags() if cpu_flags is None else set(cpu_flags)
    return any(flag in flags for flag in BF16_CPU_FLAGS) and torch.backends.mkldnn.is_available()


def bf16_kernels_available() -> bool:
    """Whether this process's oneDNN can run bf16 kernels on this CPU at all: it needs AVX-512
    (BW, VL, DQ), AVX-NE-CONVERT or AMX, and refuses bf16 weights on an AVX2-only CPU. On real
    CPUs `has_fast_bf16` implies it; it differs when `cpu_flags` are given for another CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query: let oneDNN decide
        return True


def autocast_dtype(device: torch.device, *, amp: bool) -> torch.dtype | None:
    """The autocast dtype of `train.amp` on `device`, or None for float32 training."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        if has_fast_bf16():
            return torch.bfloat16
        warnings.warn("train.amp: this CPU has no bf16 units (neither amx_bf16 nor avx512_bf16 flag); "
                      "training in float32", stacklevel=2)
    return None
