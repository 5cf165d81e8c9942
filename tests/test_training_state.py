"""The training-state checkpoint, random states and stop signals."""

import os
import random
import signal

import numpy as np
import pytest
import torch
from torch import nn

from maskrcnn.checkpoint.format import FORMAT as CHECKPOINT_FORMAT
from maskrcnn.checkpoint.format import atomic_save
from maskrcnn.config import Config, TrainConfig
from maskrcnn.engine.optim import build_optimizer, build_scheduler
from maskrcnn.engine.training_state import (
    StopSignal,
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    restore_training_state,
    training_state,
)


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
