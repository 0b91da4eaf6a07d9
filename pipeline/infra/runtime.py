"""Device, precision and logging choices shared by every stage driver."""

from __future__ import annotations

import logging
import os
from functools import cache
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    """The accelerator of this process (its local rank's GPU under a launcher), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


@cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and very slow."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(cpuinfo.read().split())
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 is fast on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """Map a precision setting (`auto`, `fp32`/`float32`, `bf16`/`bfloat16`, `float16`) to a dtype and log it."""
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }
    if setting == "auto":
        dtype = torch.bfloat16 if native_bf16(device) else torch.float32
        logger.info("precision auto on %s → %s", device, str(dtype).removeprefix("torch."))
        return dtype
    if setting not in names:
        raise ValueError(f"precision {setting!r}: expected one of auto, {', '.join(names)}")
    return names[setting]


def configure_logging(level: str = "INFO") -> None:
    """One log format for every stage; under a launcher each line carries the process rank."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A reader batch with every tensor (including those inside target-map tuples) moved to `device`."""

    def move(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*(move(part) for part in value))
        if isinstance(value, dict):
            return {key: move(item) for key, item in value.items()}
        return value

    return move(batch)
