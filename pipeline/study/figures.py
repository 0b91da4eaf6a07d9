"""The report's figures: per setting, each variant's curve as mean ± std over seeds, the paired difference from the
baseline per seed, and the tuning runs' validation curves. Built on `distill compare`'s seed bands."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.reports.figures import Curve, curve_figure, save_figure
from pipeline.reports.plots import metric_bands
from pipeline.reports.runs import RunSummary
from pipeline.study.grid import TUNE_STAGE
from pipeline.study.stats import grid_runs

Result = Mapping[str, Any]


def band_curves(groups: Mapping[str, Sequence[RunSummary]], key: str) -> list[Curve]:
    """One curve per variant: the mean over its seeds of `key`, ± one std as its band."""
    return [
        Curve(f"{name} (n={band.runs})", band.steps, band.mean, band.mean - band.std, band.mean + band.std)
        for name, band in metric_bands(groups, key).items()
    ]


def band_figure(results: Sequence[Result], setting: str, variants: Sequence[str], key: str, path: Path) -> Path | None:
    """`key` against step for every variant of a setting: the mean over seeds, ± one std shaded, on a log axis
    (perplexity and gradient norms span decades); evaluations at step 0 (before the first update, the same for every
    variant of a seed) are left out, so the axis shows where the variants differ."""
    groups = {}
    for variant in variants:
        members = [
            RunSummary(r["mlflow_run_id"], r["name"], {}, {key: [tuple(p) for p in r["curves"].get(key, []) if p[0]]})
            for r in grid_runs(results, setting, variant)
        ]
        if members:
            groups[variant] = members
    lines = band_curves(groups, key)
    if not lines:
        return None
    note = f"{setting}, mean ± std over seeds, step 0 left out"
    return save_figure(curve_figure(key, lines, x_label="optimizer step", log_y=True, note=note), path)


def delta_figure(
    results: Sequence[Result], setting: str, variants: Sequence[str], baseline: str, key: str, path: Path
) -> Path | None:
    """The paired comparison as curves: per seed, a variant's `key` minus `baseline`'s at the same step (the same
    validation batches, the same start and data order), mean ± one std over seeds; step 0 left out (Δ = 0)."""
    grid = grid_runs(results, setting)
    reference = {r["seed"]: dict(map(tuple, r["curves"].get(key, []))) for r in grid if r["variant"] == baseline}
    groups = {}
    for variant in variants:
        members = []
        for r in grid:
            if r["variant"] != variant or variant == baseline or r["seed"] not in reference:
                continue
            base = reference[r["seed"]]
            history = [(step, value - base[step]) for step, value in r["curves"].get(key, []) if step and step in base]
            members.append(RunSummary(r["mlflow_run_id"], r["name"], {}, {key: history}))
        if members:
            groups[variant] = members
    lines = band_curves(groups, key)
    if not lines:
        return None
    note = f"{setting}: variant − {baseline} per seed, mean ± std over seeds; < 0: better"
    figure = curve_figure(f"Δ {key}", lines, x_label="optimizer step", note=note)
    figure.axes[0].axhline(0.0, color="black", linewidth=0.8)
    return save_figure(figure, path)


def tuning_figure(results: Sequence[Result], path: Path) -> Path | None:
    """Validation perplexity (the 2-batch curve) of every tuning run against step."""
    runs = [r for r in results if r["stage"] == TUNE_STAGE]
    if not runs:
        return None
    lines = [
        Curve(r["name"].removeprefix("tune-"), *zip(*r["curves"]["eval/ppl"], strict=True))
        for r in runs
        if r["curves"].get("eval/ppl")
    ]
    figure = curve_figure("eval/ppl", lines, x_label="optimizer step", log_y=True, note="tuning runs, 2 batches")
    return save_figure(figure, path)
