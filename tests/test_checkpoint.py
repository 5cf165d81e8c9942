"""Atomic checkpoint writes, the training-state format, random states and stop signals."""

import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from maskrcnn.config import Config, TrainConfig
from maskrcnn.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    StopSignal,
    atomic_save,
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    restore_training_state,
    training_state,
)
from maskrcnn.engine.optim import build_optimizer, build_scheduler


class _FailsWhilePickled:
    """Raises from inside torch.save, after part of the file has been written."""

    def __reduce__(self):
        raise RuntimeError("disk on fire")


def test_atomic_save_replaces_and_round_trips(tmp_path):
    path = tmp_path / "sub" / "last.pth"
    atomic_save({"a": torch.arange(3)}, path)
    atomic_save({"a": torch.arange(5)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(5))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pth"]  # no temporary left behind


def test_error_mid_write_leaves_old_file_intact(tmp_path):
    path = tmp_path / "last.pth"
    atomic_save({"iteration": 7, "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_save({"w": torch.zeros(100_000), "bad": _FailsWhilePickled()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_process_killed_mid_write_leaves_old_file_intact(tmp_path):
    """A hard crash (no Python cleanup at all) after the new bytes are written, before the rename."""
    path = tmp_path / "last.pth"
    atomic_save({"iteration": 7}, path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, torch
        from maskrcnn.engine import checkpoint
        os.fsync = lambda fd: os._exit(3)  # the process dies right there, like a power cut
        checkpoint.atomic_save({{"iteration": 8, "w": torch.zeros(10_000)}}, {str(path)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == 3, result.stderr.decode()
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True) == {"iteration": 7}


def test_rng_state_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in NumPy's state
    state = capture_rng_state()
    first = (random.random(), np.random.rand(3).tolist(), np.random.normal(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(state)
    again = (random.random(), np.random.rand(3).tolist(), np.random.normal(), torch.rand(3))
    assert first[:3] == again[:3]
    assert torch.equal(first[3], again[3])


def _model_and_optim():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    config = Config(train=TrainConfig(lr=0.1, iterations=10, schedule="cosine", warmup_iterations=2))
    optimizer = build_optimizer(model, config.train)
    return model, config, optimizer, build_scheduler(optimizer, config.train)


def _step(model, optimizer, scheduler, x):
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()
    scheduler.step()


def test_training_state_round_trip_continues_identically(tmp_path):
    x = torch.randn(5, 4)
    model, config, optimizer, scheduler = _model_and_optim()
    for _ in range(3):
        _step(model, optimizer, scheduler, x)
    state = training_state(model=model, config=config, optimizer=optimizer, scheduler=scheduler, scaler=None,
                           iteration=3, rng=[capture_rng_state()], data_position={"iteration": 3}, best_metric=0.5)
    atomic_save(state, tmp_path / "last.pth")
    for _ in range(2):
        _step(model, optimizer, scheduler, x)
    expected = [p.detach().clone() for p in model.parameters()]

    checkpoint = load_training_state(tmp_path / "last.pth")  # weights_only=True inside
    assert checkpoint["format"] == CHECKPOINT_FORMAT
    assert checkpoint["model_config"]["num_classes"] == config.model.num_classes
    assert checkpoint["config"]["train"]["lr"] == 0.1 and checkpoint["best_metric"] == 0.5
    model, _, optimizer, scheduler = _model_and_optim()
    assert restore_training_state(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None) == 3
    for _ in range(2):
        _step(model, optimizer, scheduler, x)
    for ours, reference in zip(model.parameters(), expected):
        assert torch.equal(ours.detach(), reference)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_training_state(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth cannot be read"):
        load_training_state(tmp_path / "junk.pth")
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="plain.pth: expected format"):
        load_training_state(tmp_path / "plain.pth")
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}, "model_config": {}}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="weights only"):
        load_training_state(tmp_path / "weights.pth")


def test_stop_signal_sets_a_flag_and_restores_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.received == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C forces the way out
            os.kill(os.getpid(), signal.SIGINT)
