"""A moving average of h_theta's weights (`FitConfig.ema_decay`): the run ends with it, and model selection scores it.

The min-max game does not settle. h_theta moves what is left of the attribute while CLUB's q chases it, so a fresh
probe's reading of one step's h_theta swings from one check to the next (by 0.1-0.2 on the digits job). An
exponential moving average of the weights (Polyak averaging, as kept for GAN generators, or timm's model EMA)
averages those moves out. torch's `AveragedModel` holds it; it is attached as `objective.h_average` during training,
so checkpoints carry it and a resumed run continues it exactly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import FitConfig
from ..core.objective import DeepMinMax
from .checkpoint import Checkpoint


def new_average(objective: DeepMinMax, decay: float) -> AveragedModel:
    """An empty average of `objective.h` (its first update copies the weights)."""
    average = AveragedModel(objective.h, multi_avg_fn=get_ema_multi_avg_fn(decay))
    return average.requires_grad_(False)


def start_average(objective: DeepMinMax, cfg: FitConfig) -> None:
    """A new run: attach `objective.h_average` when `cfg.ema_decay` is set."""
    if cfg.ema_decay is not None:
        objective.h_average = new_average(objective, cfg.ema_decay)


def restore_average(objective: DeepMinMax, resumed: Checkpoint, cfg: FitConfig) -> None:
    """A resumed run: an empty average for the checkpoint's to load into; the two runs must agree on averaging."""
    resumed.require_same("h_average.", cfg.ema_decay is not None, "ema_decay", f"ema_decay={cfg.ema_decay!r}")
    start_average(objective, cfg)


def update(objective: DeepMinMax) -> None:
    """After an update of h_theta: fold its weights into the average (a no-op without one)."""
    if hasattr(objective, "h_average"):
        objective.h_average.update_parameters(objective.h)


def scored(objective: DeepMinMax) -> nn.Module:
    """The h_theta a run ends with, up to model selection: the average when there is one, else h_theta itself."""
    return objective.h_average.module if hasattr(objective, "h_average") else objective.h


def finish_average(objective: DeepMinMax) -> None:
    """After the last step: h_theta takes the averaged weights (model selection, when on, overrides them)."""
    if hasattr(objective, "h_average") and int(objective.h_average.n_averaged) > 0:
        with torch.no_grad():
            vector_to_parameters(parameters_to_vector(objective.h_average.module.parameters()).clone(),
                                 objective.h.parameters())


__all__ = ["finish_average", "new_average", "restore_average", "scored", "start_average", "update"]
