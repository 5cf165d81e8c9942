"""Training checkpoints: the full training state, random states, stop signals.

A training checkpoint is the model checkpoint of docs/design.md plus what a run needs to go on
exactly where it stopped:

    {"format": "maskrcnn/1", "model_config": {...}, "model": state_dict,
     "config": {...}, "iteration": int (completed iterations), "optimizer": ..., "scheduler": ...,
     "scaler": ..., "rng": [state of rank 0, state of rank 1, ...], "data_position": {...},
     "best_metric": float | None, "categories": [COCO category dicts of the training data]}

With `train.ema_decay` on, "model" is the moving average of the weights once it has started, and
the checkpoint also holds "training_model" (the weights being trained) and "ema_updates"
(engine/ema.py).

Like every checkpoint it is written by `checkpoint.format.atomic_save` and read with
`torch.load(..., weights_only=True)` (`checkpoint.format.read_checkpoint`), so everything in it
is a tensor or a plain Python container.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from maskrcnn.checkpoint.format import FORMAT, read_checkpoint
from maskrcnn.engine.ema import ema_checkpoint_entries, restore_ema

LAST = "last.pth"
BEST = "best.pth"


# --------------------------------------------------------------------------- random states
def capture_rng_state() -> dict:
    """Python, NumPy, torch (CPU) and CUDA generator states as tensors and plain containers."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # NumPy's key array becomes a tensor so that the checkpoint loads with weights_only=True.
        "numpy": {
            "kind": numpy_state[0],
            "key": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["kind"],
        numpy_state["key"].numpy().astype(np.uint32),
        numpy_state["pos"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Run a block without moving the global random generators (Python, NumPy, torch, CUDA).

    Anything that draws from them outside the loss computation (a DataLoader's base seed,
    evaluation) would otherwise shift the training stream and break exact resume.
    """
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


# --------------------------------------------------------------------------- training state
def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (its keys have no `module.`)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def training_state(
    *,
    model: nn.Module,
    config: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    iteration: int,
    rng: list[dict],
    data_position: dict,
    best_metric: float | None,
    categories: list[dict] | None = None,
    ema: AveragedModel | None = None,
) -> dict:
    """The checkpoint dict of a run after `iteration` completed iterations (module docstring).

    `categories` are the training data's COCO categories (names, ids, keypoint names and
    skeleton), so that `predict` and `evaluate` can name the labels without the data.
    `ema`: the moving average of the weights (engine/ema.py), or None when it is off."""
    config_dict = dataclasses.asdict(config)
    return {
        "format": FORMAT,
        "model_config": config_dict["model"],
        **ema_checkpoint_entries(unwrap_model(model), ema),
        "config": config_dict,
        "iteration": int(iteration),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": rng,
        "data_position": data_position,
        "best_metric": best_metric,
        "categories": [dict(category) for category in categories or []],
    }


def load_training_state(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """Read a training checkpoint, with a clear error for a file that is not one."""
    checkpoint = read_checkpoint(path, map_location=map_location)
    missing = [key for key in ("model", "optimizer", "scheduler", "iteration") if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {path} has no {', '.join(missing)}: it holds weights only and cannot resume a run")
    return checkpoint


def restore_training_state(
    checkpoint: dict,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    scaler: torch.amp.GradScaler | None,
    rank: int = 0,
    ema: AveragedModel | None = None,
) -> int:
    """Load model, optimizer, scheduler, scaler, the weights' average and this rank's random state;
    returns the iteration.

    scheduler None: leave it out (the trainer rebuilds its schedule from the config instead).
    """
    restore_ema(checkpoint, model=unwrap_model(model), ema=ema)
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    rng = checkpoint.get("rng") or []
    if rank < len(rng):
        restore_rng_state(rng[rank])
    return int(checkpoint["iteration"])


# --------------------------------------------------------------------------- stop signals
class StopSignal:
    """Turns SIGINT / SIGTERM into a flag that the training loop polls between iterations.

    The loop then saves `last.pth` and returns cleanly instead of dying mid-step. A second
    SIGINT while the flag is set raises KeyboardInterrupt, for a user who really wants out.
    Use as a context manager; the previous handlers come back on exit. Outside the main
    thread signals cannot be caught, and the object only holds the flag.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None  # name of the first signal received
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, number: int, frame: Any) -> None:
        if self.received is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name

    def __enter__(self) -> StopSignal:
        try:
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


@contextlib.contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Processes started inside this block (DataLoader workers) inherit SIGINT as ignored.

    Ctrl-C in a terminal sends SIGINT to the whole foreground process group. Workers that die
    of it take the loader down before the training loop can save; ignoring it there leaves the
    main process to stop them cleanly after `last.pth` is written. (An ignored disposition
    survives fork and exec, and a spawned Python keeps it.)
    """
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing can be done, nothing to restore
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
