"""Optimizer, learning-rate schedule and gradient clipping for the trainer.

The schedule is a function of the iteration (not the epoch): training is budgeted in
iterations, and `factor(i)` is the learning-rate multiplier used by iteration `i` (0-based):

    factor(i) = warmup(i) * main(i)
    warmup(i) = warmup_factor * (1 - a) + a,  a = i / warmup_iterations   (i < warmup_iterations)
              = 1                                                           (otherwise)
    main(i)   = gamma ** (number of steps <= i)        "step"
              = (1 + cos(pi * i / iterations)) / 2     "cosine" (reaches 0 after the last iteration)
              = 1                                      "constant"

This is the linear warm-up of Goyal et al. ("Accurate, large minibatch SGD", 2017) as written
in detectron2's WarmupParamScheduler and torchvision's reference LinearLR, multiplied onto the
main schedule.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from maskrcnn.config import TrainConfig

# Layers whose affine parameters are scale/shift of normalised activations: decaying them
# towards 0 fights the normalisation instead of regularising (He et al., "Bag of tricks").
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def parameter_groups(model: nn.Module, *, weight_decay: float, weight_decay_norm_bias: float) -> list[dict]:
    """Split trainable parameters into (regular, norm-or-bias) groups with their weight decay.

    A parameter belongs to the second group when it is owned by a normalisation layer or is
    a bias. Frozen parameters (requires_grad False) are left out. Shared parameters are listed
    once.
    """
    regular: list[nn.Parameter] = []
    norm_or_bias: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if isinstance(module, _NORM_TYPES) or name == "bias":
                norm_or_bias.append(parameter)
            else:
                regular.append(parameter)
    groups = [{"params": regular, "weight_decay": weight_decay}]
    if norm_or_bias:
        groups.append({"params": norm_or_bias, "weight_decay": weight_decay_norm_bias})
    return groups


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the model's trainable parameters.

    `config.weight_decay_norm_bias` (None = same as `weight_decay`) sets the decay of norm
    layers and biases; 0.0 turns it off for them.
    """
    decay_norm_bias = config.weight_decay if config.weight_decay_norm_bias is None else config.weight_decay_norm_bias
    groups = parameter_groups(model, weight_decay=config.weight_decay, weight_decay_norm_bias=decay_norm_bias)
    if not any(group["params"] for group in groups):
        raise ValueError("build_optimizer: the model has no trainable parameters")
    # The fused kernels update every parameter in one pass (the same numbers to rounding); the
    # default on a CPU is one small operator call per parameter and per term.
    fused = {"fused": True} if _fused_supported(groups) else {}
    match config.optimizer:
        case "sgd":
            return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, **fused)
        case "adamw":
            return torch.optim.AdamW(groups, lr=config.lr, **fused)
        case other:
            raise ValueError(f"train.optimizer: unknown optimizer {other!r}; expected 'sgd' or 'adamw'")


def _fused_supported(groups: list[dict]) -> bool:
    """Fused SGD / AdamW take floating-point parameters on the CPU or CUDA (not, e.g., MPS in every release)."""
    parameters = [p for group in groups for p in group["params"]]
    return all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in parameters)


@dataclass
class WarmupSchedule:
    """The learning-rate multiplier of iteration `i` (see the module docstring).

    A callable object rather than a closure so that LambdaLR saves it in its state_dict.
    """

    schedule: str  # "step" | "cosine" | "constant"
    iterations: int
    steps: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_iterations: int = 0
    warmup_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in ("step", "cosine", "constant"):
            raise ValueError(f"train.schedule: unknown schedule {self.schedule!r}; expected step, cosine or constant")
        if self.iterations <= 0:
            raise ValueError(f"train.iterations: expected a positive number, got {self.iterations}")
        if list(self.steps) != sorted(self.steps):
            raise ValueError(f"train.steps: expected increasing iterations, got {self.steps}")

    def __call__(self, iteration: int) -> float:
        if self.schedule == "step":
            main = self.gamma ** bisect_right(self.steps, iteration)
        elif self.schedule == "cosine":
            main = 0.5 * (1.0 + math.cos(math.pi * min(iteration, self.iterations) / self.iterations))
        else:
            main = 1.0
        if iteration < self.warmup_iterations:
            alpha = iteration / self.warmup_iterations
            return main * (self.warmup_factor * (1.0 - alpha) + alpha)
        return main


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, *,
                    start_iteration: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `WarmupSchedule`; call `.step()` once after every optimizer step.

    start_iteration: iterations already done (resuming). The schedule is a function of the
    config and the iteration alone, so a resumed run rebuilds it instead of loading it: the
    same numbers when the config is unchanged, and the new schedule when, say,
    `train.iterations` was raised to train longer.
    """
    schedule = WarmupSchedule(
        schedule=config.schedule,
        iterations=config.iterations,
        steps=list(config.steps),
        gamma=config.gamma,
        warmup_iterations=config.warmup_iterations,
        warmup_factor=config.warmup_factor,
    )
    if start_iteration == 0:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr  # LambdaLR's base rate when it starts past iteration 0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=start_iteration - 1)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """Set the config's weight decay and momentum on an optimizer whose state was loaded.

    `optimizer.load_state_dict` brings back the saved hyperparameters along with the momentum
    buffers; the config (what the user asked for now) decides the former. Groups are in
    `parameter_groups` order: regular, then norm-or-bias.
    """
    decay_norm_bias = config.weight_decay if config.weight_decay_norm_bias is None else config.weight_decay_norm_bias
    for group, decay in zip(optimizer.param_groups, (config.weight_decay, decay_norm_bias)):
        group["weight_decay"] = decay
        if "momentum" in group:
            group["momentum"] = config.momentum


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
    """Scale gradients so that their global L2 norm is at most `max_norm`; returns the norm before.

    None disables clipping (returns None). With a GradScaler, call `scaler.unscale_(optimizer)`
    first so that the norm is measured on the true gradients.
    """
    if max_norm is None:
        return None
    return torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_norm)
