"""Our checkpoint format: one file, `torch.save` of a dict (docs/design.md, "Checkpoints").

    {"format": "maskrcnn/1", "model_config": dataclasses.asdict(ModelConfig), "model": state_dict,
     "labels": [{"label": 1, "id": 1, "name": "person"}, ...],  # optional: label_space.py
     ...optional keys: the trainer's state (engine/training_state.py), "categories", "converted_from"}

Everything in it is a tensor or a plain Python container (configs are saved as dicts, never as
our classes), so every reader here uses `torch.load(..., weights_only=True)`: opening a
checkpoint never runs code from the file.

Files are written to a temporary file in the same directory, flushed, fsynced and renamed over
the old one (`os.replace` is atomic on POSIX and Windows), then the directory is fsynced: a
crash at any moment leaves either the old file or the new one, never half a file.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import re
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelConfig, from_dict
from ..model.mask_rcnn import MaskRCNN, build_model
from .label_space import check_labels, checkpoint_labels

FORMAT = "maskrcnn/1"


# --------------------------------------------------------------------------- writing
def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj, path)` that never leaves a partial file at `path`.

    On any error the temporary file is removed, the previous `path` (if any) is untouched and
    the error propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory: os.replace is only atomic within one file system.
    # The writer's host and pid in the name tell a later run whether the file is another live save.
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # makes the rename itself durable
    return path


def writer_tag() -> str:
    """HOST-PID of this process: in a temporary file's name, so that a later run can tell a killed save."""
    return f"{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())}-{os.getpid()}"


STALE_AFTER_SECONDS = 3600.0  # a save in progress keeps writing: its file's mtime stays recent


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Deletes `.NAME.pth.*.tmp` files that a killed save left in `directory`; returns them.

    A file is stale when its writer (host and pid in the name) is this host's and no longer
    runs, or when nothing has written to it for STALE_AFTER_SECONDS (older names carry no
    writer). Another live process's save in progress is left alone.
    """
    removed = []
    for path in Path(directory).glob(".*.pth.*.tmp"):
        match = re.fullmatch(r"\..+?\.pth\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\..+\.tmp", path.name)
        try:
            idle = time.time() - path.stat().st_mtime
        except FileNotFoundError:  # its writer renamed it meanwhile
            continue
        writer_gone = match is not None and match["host"] == writer_tag().rsplit("-", 1)[0] and not _alive(int(match["pid"]))
        if writer_gone or idle > STALE_AFTER_SECONDS:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_checkpoint(path: str | Path, model: nn.Module, *, model_config: ModelConfig, **extra: Any) -> Path:
    """Write `{"format", "model_config", "model", **extra}` atomically (see `atomic_save`).

    `extra` must be tensors and plain containers, so that the file loads with weights_only=True.
    The model's label table (`model.label_space`) is saved as "labels" unless `extra` has one."""
    model = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    checkpoint = {
        "format": FORMAT,
        "model_config": dataclasses.asdict(model_config),
        "model": model.state_dict(),
        **extra,
    }
    if checkpoint.get("labels") is None and getattr(model, "label_space", None):
        checkpoint["labels"] = [dict(entry) for entry in model.label_space]
    return atomic_save(checkpoint, path)


# --------------------------------------------------------------------------- reading
def read_weights_file(path: str | Path, *, map_location: str | torch.device = "cpu", what: str = "weights",
                      mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` with errors that name the file: FileNotFoundError
    when it does not exist, ValueError when it holds more than tensors and containers (a whole
    pickled model) or is not a torch file at all.

    mmap: map the file instead of reading it (files in torch's zip format; others are read), so
    that only the tensors that are used take memory: copying the weights out of a training
    checkpoint leaves its optimizer state on disk. For reading weights to copy, not to keep: a
    kept tensor stays backed by the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        if mmap and zipfile.is_zipfile(path):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        pickled_class = re.search(r"GLOBAL (\S+)", str(error))  # torch names the class it refused
        if pickled_class is None:
            raise ValueError(f"{what} {path} cannot be read (UnpicklingError: not a torch file?)") from error
        raise ValueError(
            f"{what} {path} cannot be read: it holds more than weights ({pickled_class[1]}: a whole pickled "
            "model?); load it yourself with torch.load(..., weights_only=False) if you trust the file, and pass "
            "the model"
        ) from error
    except Exception as error:  # torch raises several types for a file it cannot read
        raise ValueError(f"{what} {path} cannot be read ({type(error).__name__}: {_first_line(error)})") from error


def _first_line(error: Exception) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), "")


def is_checkpoint(obj: Any) -> bool:
    """True for a dict in our format (whatever else it holds)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def check_format(checkpoint: Any, *, where: str) -> dict:
    """`checkpoint` itself when it is ours; a ValueError that says what it is otherwise."""
    if not is_checkpoint(checkpoint):
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{where}: expected format {FORMAT!r}, found {found!r}: not a {FORMAT} checkpoint "
            "(torchvision weights load with from_torchvision() or convert with `maskrcnn convert`)"
        )
    return checkpoint


def read_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """One of our checkpoint files, read with weights_only=True (mmap: see read_weights_file);
    clear errors otherwise."""
    checkpoint = read_weights_file(path, map_location=map_location, what="checkpoint", mmap=mmap)
    return check_format(checkpoint, where=f"checkpoint {path}")


def load_checkpoint(source: str | Path | dict) -> MaskRCNN:
    """Rebuild the model from one of our checkpoints (a path or the loaded dict); eval mode.
    `model.label_space` is the checkpoint's label table (label_space.checkpoint_labels)."""
    if isinstance(source, (str, Path)):
        checkpoint = read_checkpoint(source)
    else:
        checkpoint = check_format(source, where="checkpoint")
    config = from_dict(ModelConfig, copy.deepcopy(checkpoint["model_config"]))
    config.backbone.weights = None  # ImageNet initialisation is superseded by the saved weights
    model = build_model(config)
    load_state_dict_checked(model, checkpoint["model"], what="checkpoint weights")
    model.label_space = checkpoint_labels(checkpoint)
    if model.label_space is not None:
        check_labels(model.label_space, num_classes=config.num_classes, where="checkpoint labels")
    return model.eval()


def load_state_dict_checked(model: nn.Module, state: dict[str, Tensor], *, what: str) -> None:
    """`load_state_dict(strict=True)` with an error that lists the mismatching names."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
                   if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{what} do not fit the model: {len(missing)} missing (e.g. {missing[:4]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:4]}), {len(wrong_shape)} of another shape "
            f"(e.g. {wrong_shape[:3]})"
        )
    model.load_state_dict(state)
