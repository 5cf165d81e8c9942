"""Optimizer groups, warm-up + step / cosine / constant schedules, gradient clipping.

References: closed forms written out here, and torch's own LinearLR / MultiStepLR /
CosineAnnealingLR chained together (what torchvision's detection references do).
"""

import math

import pytest
import torch
from torch import nn

from maskrcnn.config import TrainConfig
from maskrcnn.engine.optim import (
    WarmupSchedule,
    apply_hyperparameters,
    build_optimizer,
    build_scheduler,
    clip_gradients,
)


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1, bias=False), nn.BatchNorm2d(2))


def _lrs(scheduler, optimizer, iterations):
    """Learning rate used by each iteration 0..iterations-1."""
    lrs = []
    for _ in range(iterations):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_step_closed_form_and_torch_chain():
    config = TrainConfig(lr=0.1, iterations=30, schedule="step", steps=[10, 20], gamma=0.5,
                         warmup_iterations=5, warmup_factor=0.01)
    optimizer = build_optimizer(_tiny_model(), config)
    ours = _lrs(build_scheduler(optimizer, config), optimizer, 30)

    closed = []
    for i in range(30):
        warm = 0.01 + (1 - 0.01) * i / 5 if i < 5 else 1.0
        closed.append(0.1 * warm * 0.5 ** ((i >= 10) + (i >= 20)))
    assert ours == pytest.approx(closed, rel=1e-12, abs=0)
    assert ours[0] == pytest.approx(0.001) and ours[5] == pytest.approx(0.1) and ours[29] == pytest.approx(0.025)

    reference_optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    reference = torch.optim.lr_scheduler.ChainedScheduler([
        torch.optim.lr_scheduler.LinearLR(reference_optimizer, start_factor=0.01, total_iters=5),
        torch.optim.lr_scheduler.MultiStepLR(reference_optimizer, milestones=[10, 20], gamma=0.5),
    ])
    assert ours == pytest.approx(_lrs(reference, reference_optimizer, 30), rel=1e-9)


def test_warmup_then_cosine_closed_form_and_torch_chain():
    config = TrainConfig(lr=0.04, iterations=40, schedule="cosine", warmup_iterations=8, warmup_factor=0.1)
    optimizer = build_optimizer(_tiny_model(), config)
    ours = _lrs(build_scheduler(optimizer, config), optimizer, 40)
    closed = [0.04 * (0.1 + 0.9 * i / 8 if i < 8 else 1.0) * 0.5 * (1 + math.cos(math.pi * i / 40)) for i in range(40)]
    assert ours == pytest.approx(closed, rel=1e-12)
    assert WarmupSchedule(schedule="cosine", iterations=40)(40) == pytest.approx(0.0, abs=1e-15)

    reference_optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.04)
    reference = torch.optim.lr_scheduler.ChainedScheduler([
        torch.optim.lr_scheduler.LinearLR(reference_optimizer, start_factor=0.1, total_iters=8),
        torch.optim.lr_scheduler.CosineAnnealingLR(reference_optimizer, T_max=40),
    ])
    assert ours == pytest.approx(_lrs(reference, reference_optimizer, 40), rel=1e-6, abs=1e-12)


def test_constant_and_no_warmup():
    config = TrainConfig(lr=0.3, iterations=6, schedule="constant", warmup_iterations=0)
    optimizer = build_optimizer(_tiny_model(), config)
    assert _lrs(build_scheduler(optimizer, config), optimizer, 6) == [0.3] * 6


def test_scheduler_state_round_trip_continues_the_same_values():
    config = TrainConfig(lr=0.1, iterations=20, schedule="cosine", warmup_iterations=4, warmup_factor=0.2)
    optimizer = build_optimizer(_tiny_model(), config)
    scheduler = build_scheduler(optimizer, config)
    uninterrupted = _lrs(scheduler, optimizer, 20)

    optimizer = build_optimizer(_tiny_model(), config)
    scheduler = build_scheduler(optimizer, config)
    first = _lrs(scheduler, optimizer, 7)
    state = (optimizer.state_dict(), scheduler.state_dict())
    optimizer = build_optimizer(_tiny_model(), config)
    scheduler = build_scheduler(optimizer, config)
    optimizer.load_state_dict(state[0])
    scheduler.load_state_dict(state[1])
    assert first + _lrs(scheduler, optimizer, 13) == uninterrupted


def test_norm_and_bias_groups_and_frozen_parameters():
    model = _tiny_model()
    model[0].weight.requires_grad_(False)  # frozen: must not reach the optimizer
    optimizer = build_optimizer(model, TrainConfig(weight_decay=1e-4, weight_decay_norm_bias=0.0, optimizer="sgd", momentum=0.8))
    regular, norm_bias = optimizer.param_groups
    assert {id(p) for p in regular["params"]} == {id(model[2].weight)}
    expected = {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[3].weight), id(model[3].bias)}
    assert {id(p) for p in norm_bias["params"]} == expected
    assert (regular["weight_decay"], norm_bias["weight_decay"], regular["momentum"]) == (1e-4, 0.0, 0.8)

    default = build_optimizer(_tiny_model(), TrainConfig(weight_decay=1e-4, optimizer="adamw", lr=1e-3))
    assert isinstance(default, torch.optim.AdamW)
    assert [g["weight_decay"] for g in default.param_groups] == [1e-4, 1e-4]


def test_sgd_step_equals_hand_computed_update():
    weight = nn.Parameter(torch.tensor([1.0, -2.0]))
    model = nn.Module()
    model.weight = weight
    optimizer = build_optimizer(model, TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.01))
    (weight * torch.tensor([3.0, 4.0])).sum().backward()
    optimizer.step()
    # first SGD step: buffer = grad + wd * w; w -= lr * buffer
    expected = torch.tensor([1.0 - 0.1 * (3.0 + 0.01), -2.0 - 0.1 * (4.0 - 0.02)])
    torch.testing.assert_close(weight.detach(), expected)


def test_bad_names_are_clear():
    with pytest.raises(ValueError, match="train.optimizer.*'adam'"):
        build_optimizer(_tiny_model(), TrainConfig(optimizer="adam"))
    with pytest.raises(ValueError, match="train.schedule.*'poly'"):
        WarmupSchedule(schedule="poly", iterations=10)
    with pytest.raises(ValueError, match="train.steps"):
        WarmupSchedule(schedule="step", iterations=10, steps=[8, 3])


def test_clip_gradients_scales_to_max_norm():
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 0.0, 0.0])
    b.grad = torch.tensor([0.0, 4.0])
    norm = clip_gradients([a, b], 1.0)
    assert norm.item() == pytest.approx(5.0)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.0, 0.0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, torch.tensor([0.0, 0.8]), rtol=1e-5, atol=1e-6)
    assert clip_gradients([a, b], None) is None
    torch.testing.assert_close(b.grad, torch.tensor([0.0, 0.8]), rtol=1e-5, atol=1e-6)


def test_scheduler_built_at_a_start_iteration_continues_the_same_values():
    config = TrainConfig(lr=0.1, iterations=20, schedule="step", steps=[6, 12], warmup_iterations=4, warmup_factor=0.2)
    optimizer = build_optimizer(_tiny_model(), config)
    uninterrupted = _lrs(build_scheduler(optimizer, config), optimizer, 20)
    optimizer = build_optimizer(_tiny_model(), config)
    first = _lrs(build_scheduler(optimizer, config), optimizer, 9)
    saved = optimizer.state_dict()
    optimizer = build_optimizer(_tiny_model(), config)
    optimizer.load_state_dict(saved)
    assert first + _lrs(build_scheduler(optimizer, config, start_iteration=9), optimizer, 11) == uninterrupted


def test_resumed_optimizer_takes_the_configs_hyperparameters():
    old = TrainConfig(lr=0.1, momentum=0.9, weight_decay=1e-4, weight_decay_norm_bias=0.0, iterations=10, schedule="cosine")
    optimizer = build_optimizer(_tiny_model(), old)
    _lrs(build_scheduler(optimizer, old), optimizer, 4)
    saved = optimizer.state_dict()
    new = TrainConfig(lr=0.2, momentum=0.8, weight_decay=1e-3, iterations=40, schedule="cosine", warmup_iterations=0)
    optimizer = build_optimizer(_tiny_model(), new)
    optimizer.load_state_dict(saved)  # brings back the old hyperparameters with the state...
    apply_hyperparameters(optimizer, new)  # ...and the new config wins
    scheduler = build_scheduler(optimizer, new, start_iteration=4)
    assert [(g["weight_decay"], g["momentum"]) for g in optimizer.param_groups] == [(1e-3, 0.8), (1e-3, 0.8)]
    assert _lrs(scheduler, optimizer, 3) == pytest.approx([0.2 * 0.5 * (1 + math.cos(math.pi * i / 40)) for i in (4, 5, 6)])
