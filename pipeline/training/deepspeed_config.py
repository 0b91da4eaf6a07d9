"""The DeepSpeed JSON, generated from the config in one place.

Precedence, lowest first: the preset file (`deepspeed.preset`), then the values generated from `train.*` (batch
sizes, clipping, precision, optimizer, ZeRO stage), then `deepspeed.overrides`. Mappings merge key by key; a `null`
in the overrides deletes the key below it (e.g. `{optimizer: {type: SGD, params: {torch_adam: null}}}`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, ConfigError

DEFAULT_ZERO_STAGE = 2
"""ZeRO stage when neither `deepspeed.zero_stage` nor the preset names one."""


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` merged into a copy of `base`: nested mappings key by key, other values replaced, None deletes."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_preset(path: str | None) -> dict[str, Any]:
    """The preset JSON file as a dict ({} without a preset); errors name the file."""
    if path is None:
        return {}
    try:
        preset = json.loads(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"deepspeed.preset: cannot read {path!r} ({error.strerror})") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"deepspeed.preset: {path!r} is not valid JSON ({error})") from error
    if not isinstance(preset, dict):
        raise ConfigError(f"deepspeed.preset: {path!r} holds {type(preset).__name__}, expected a JSON object")
    return preset


def zero_stage(config: Config) -> int:
    """`deepspeed.zero_stage`, else the preset's `zero_optimization.stage`, else `DEFAULT_ZERO_STAGE`."""
    if config.deepspeed.zero_stage is not None:
        return config.deepspeed.zero_stage
    stage = read_preset(config.deepspeed.preset).get("zero_optimization", {}).get("stage", DEFAULT_ZERO_STAGE)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.preset: zero_optimization.stage is {stage!r}, expected 0, 1, 2 or 3")
    return stage


def deepspeed_config(config: Config, dtype: torch.dtype, *, load_universal: bool = False) -> dict[str, Any]:
    """The dict handed to `deepspeed.initialize` for training in `dtype` (fp32 or bf16).

    `train_batch_size` is left out: DeepSpeed derives it as micro batch × accumulation × data-parallel ranks.
    `load_universal` makes `load_checkpoint` read a universal checkpoint (a resume at another world size).
    """
    train = config.train
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": zero_stage(config)},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            # torch_adam: torch.optim.AdamW instead of DeepSpeed's fused/CPU Adam, which are JIT-compiled at the
            # first launch (minutes) and unavailable on machines without a compiler toolchain.
            "params": {"lr": train.lr, "weight_decay": train.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 10**9,
    }
    if load_universal:
        generated["checkpoint"] = {"load_universal": True}
    return merge(merge(read_preset(config.deepspeed.preset), generated), config.deepspeed.overrides)
