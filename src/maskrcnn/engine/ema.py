"""An exponential moving average of the weights (`train.ema_decay`, `train.ema_start`).

After iteration t (completed optimizer steps) past `train.ema_start` the average is

    ema = w_t                                  at the first update (t = ema_start + 1)
    ema = decay * ema + (1 - decay) * w_t      after that

over the parameters and the floating-point buffers alike (`torch.optim.swa_utils.AveragedModel`
with `get_ema_multi_avg_fn`, `use_buffers=True`). Starting after the learning-rate warm-up keeps
the near-random early weights out of a short run's average. The average is of the unwrapped
module, so under DistributedDataParallel every rank holds the same average of the same weights.

Once it has started, the average is the run's model: evaluation, the pictures, `TrainSummary.model`
and the checkpoints' `"model"` weights are the average's. A training checkpoint then also holds
the weights being trained (`"training_model"`) and the number of updates (`"ema_updates"`), so
that a resumed run goes on exactly (engine/training_state.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def build_ema(model: nn.Module, *, decay: float, device: torch.device) -> AveragedModel | None:
    """The average of `model` (unwrapped) on `device`; None when `decay` is 0 (off)."""
    if decay == 0:
        return None
    ema = AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)  # a copy for evaluation: it is never trained
    return ema


def ema_started(ema: AveragedModel | None) -> bool:
    """Whether the average holds trained weights (it has been updated at least once)."""
    return ema is not None and int(ema.n_averaged) > 0


def model_to_evaluate(model: nn.Module, ema: AveragedModel | None) -> nn.Module:
    """The run's model: the average once it has started, else `model` (unwrapped) itself."""
    return ema.module if ema_started(ema) else model


def ema_checkpoint_entries(model: nn.Module, ema: AveragedModel | None) -> dict:
    """The checkpoint's weights: `{"model": ...}`, plus the trained weights and the count when averaging."""
    weights = model.state_dict()
    if ema is None:
        return {"model": weights}
    averaged = ema.module.state_dict() if ema_started(ema) else weights
    return {"model": averaged, "training_model": weights, "ema_updates": int(ema.n_averaged)}


def restore_ema(checkpoint: dict, *, model: nn.Module, ema: AveragedModel | None) -> None:
    """Loads the trained weights into `model` (unwrapped) and the average into `ema` (see module docstring).

    A checkpoint written without an average gives `model` its weights and leaves `ema` to start
    afresh; one written with an average, resumed without, continues from the trained weights.
    """
    model.load_state_dict(checkpoint.get("training_model", checkpoint["model"]))
    if ema is None:
        return
    updates = int(checkpoint.get("ema_updates", 0)) if "training_model" in checkpoint else 0
    if updates > 0:
        ema.module.load_state_dict(checkpoint["model"])
    ema.n_averaged.fill_(updates)
