"""The study's statistics over finished results: mean ± std over seeds, paired differences against another variant
seed by seed, and what a run costs (for the plan and the time left)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.study.grid import GRID_STAGE


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof 1 (0 for one value), count) over the values that are not None or NaN; NaN mean
    for none."""
    array = np.asarray([value for value in values if value is not None and not math.isnan(value)], dtype=float)
    if not len(array):
        return math.nan, math.nan, 0
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0, len(array)


@dataclass(frozen=True)
class Paired:
    """A variant against another, seed by seed: Δ = metric(variant) − metric(other) per seed both finished."""

    deltas: tuple[float, ...]
    seeds: tuple[int, ...]

    @property
    def wins(self) -> int:
        """Seeds where the variant is lower (better, for perplexity)."""
        return sum(delta < 0 for delta in self.deltas)


def grid_runs(
    results: Iterable[Mapping[str, Any]], setting: str, variant: str | None = None
) -> list[Mapping[str, Any]]:
    """The finished grid results of one setting (of one variant, if given); tuning runs are never part of it."""
    return [
        result
        for result in results
        if result["setting"] == setting
        and result["stage"] == GRID_STAGE
        and (variant is None or result["variant"] == variant)
    ]


def paired(results: Iterable[Mapping[str, Any]], setting: str, variant: str, other: str, metric: str) -> Paired:
    """Per-seed differences of `metric` between two variants of one setting, over the seeds both have."""
    by_seed: dict[str, dict[int, float]] = {variant: {}, other: {}}
    for result in grid_runs(results, setting):
        if result["variant"] in by_seed:
            by_seed[result["variant"]][result["seed"]] = result["metrics"][metric]
    seeds = tuple(sorted(set(by_seed[variant]) & set(by_seed[other])))
    return Paired(tuple(by_seed[variant][seed] - by_seed[other][seed] for seed in seeds), seeds)


@dataclass(frozen=True)
class Timing:
    """What a run costs: seconds per optimizer step and the rest of a run (set-up, evaluations, saving, test)."""

    step_s: float
    overhead_s: float
    source: str


def measured_timing(results: Sequence[Mapping[str, Any]], source: str) -> Timing | None:
    """Medians over finished runs; None when there are none."""
    if not results:
        return None
    step = statistics.median(result["step_seconds_median"] for result in results)
    overhead = statistics.median(
        result["train_seconds"] + result["eval_seconds"] - result["steps"] * result["step_seconds_median"]
        for result in results
    )
    return Timing(step, max(overhead, 0.0), f"{source}: medians of {len(results)} finished runs")


def estimate_seconds(pending_runs: int, steps: int, timing: Timing) -> float:
    return pending_runs * (steps * timing.step_s + timing.overhead_s)


def format_duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "?"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 0)} min"
