"""Side-by-side timing for the benchmarks: variants alternate within every repeat, so machine noise hits all alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_alternately(
    variants: dict[str, Callable[[], None]],
    repeats: int,
    device: torch.device,
    after_each: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each variant per repeat, after one untimed warm-up call each.

    On CUDA the device is synchronised around every call so that queued kernels are counted where they run.
    `after_each` (e.g. dropping gradients) runs after every call, outside the timed span.
    """

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def settle() -> None:
        if after_each is not None:
            after_each()

    for step in variants.values():
        step()
        settle()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, step in variants.items():
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            times[name].append(time.perf_counter() - start)
            settle()
    return times
