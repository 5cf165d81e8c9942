"""One thread pool per thread count for the process: CPU inference spreads GIL-releasing
single-threaded kernels (torchvision's `roi_align`, small `F.interpolate` calls) over it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[int, ThreadPoolExecutor] = {}


def thread_pool(num_threads: int) -> ThreadPoolExecutor:
    """The process's pool of `num_threads` threads, made on first use."""
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if num_threads not in _POOLS:
        _POOLS[num_threads] = ThreadPoolExecutor(num_threads, thread_name_prefix="maskrcnn")
    return _POOLS[num_threads]
