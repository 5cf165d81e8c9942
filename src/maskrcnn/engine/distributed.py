"""Distributed data parallel: process-group set-up from torchrun's environment and small helpers.

`torchrun --nproc_per_node=N -m maskrcnn train ...` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT for every process; `init_distributed` reads them. Without them
(a plain `python -m maskrcnn train`) everything here is a no-op for a single process, so the
trainer calls these helpers unconditionally.

Why one rank with an empty batch does not hang: DDP all-reduces gradients in buckets that
fill as each parameter's gradient becomes ready. If one rank skipped a head (no positive
RoIs), that head's parameters would never be ready there and the other ranks would wait
forever. Our model's losses stay connected to the graph when a batch has no annotations
(zero, but computed through every head), so every parameter gets a gradient on every rank
and `find_unused_parameters` can stay off (it costs a graph traversal per iteration).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0  # global rank of this process
    world_size: int = 1
    local_rank: int = 0  # rank on this machine: the CUDA device index

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes checkpoints and metrics."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun?)") from None


def init_distributed(device_type: str) -> DistributedContext:
    """Join the process group described by torchrun's environment variables, if any.

    `device_type` is "cuda" or "cpu" (or another torch device type): NCCL for CUDA, gloo for
    everything else. Returns the single-process context when WORLD_SIZE is unset or 1.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    context = DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)
    if world_size <= 1:
        return context
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world_size - 1}")
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)  # before NCCL picks a device
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return context


def select_device(name: str, context: DistributedContext) -> torch.device:
    """"auto" = CUDA when available (this process's LOCAL_RANK GPU under torchrun), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={name!r} but CUDA is not available; use 'auto' or 'cpu'")
        if device.index is None:
            device = torch.device("cuda", context.local_rank)
    return device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap_model(model: nn.Module, context: DistributedContext, device: torch.device) -> nn.Module:
    """DistributedDataParallel when running on several processes, the model itself otherwise.

    DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts from
    the same weights whatever its own initialisation.
    """
    if not context.enabled:
        return model
    device_ids = [device.index if device.index is not None else context.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks (a new tensor; the input is unchanged)."""
    if not is_distributed():
        return tensor.clone()
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (`[obj]` in a single process). Picklable objects only.

    Used to gather per-rank evaluation results (detections of each rank's shard of images) on
    every rank, and each rank's random state for checkpoints.
    """
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
