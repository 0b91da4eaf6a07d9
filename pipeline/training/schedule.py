"""The learning-rate schedule: linear warm-up, then constant, linear or cosine decay to `train.min_lr`."""

from __future__ import annotations

import math
from functools import partial

import torch

from pipeline.config import Config


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak LR for the optimizer step with 0-based index `step`.

    Linear warm-up over `warmup_steps` (step k uses (k + 1) / warmup), then `constant`, or `linear`/`cosine` decay
    from the peak at the first step after warm-up to `min_ratio` at the last step (`max_steps` − 1) and after.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps - 1))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule as a `LambdaLR` for DeepSpeed to step and checkpoint.

    The factor is a `partial` (a callable without state of its own), so a checkpoint restores the step count only
    and the schedule always follows the current config (e.g. a resumed run with a larger `train.max_steps`).
    """
    train = config.train
    factor = partial(
        lr_factor,
        warmup_steps=train.warmup_steps,
        max_steps=train.max_steps,
        schedule=train.schedule,
        min_ratio=train.min_lr / train.lr,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
