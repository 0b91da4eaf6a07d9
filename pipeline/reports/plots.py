"""The figures of a comparison: a curve per loss term and eval metric with a line per run (`plot_metrics`), seed
bands per variant (`metric_bands`, `plot_metric_bands`, with the variants table in `write_variants`), and the runs'
own figures — their latest α histograms and attention heat maps — downloaded and put side by side
(`latest_images`, `compose_run_images`)."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.reports.figures import Curve, curve_figure, save_figure, side_by_side
from pipeline.reports.runs import RunSummary
from pipeline.reports.tables import TOKENS_METRIC, markdown_table, metric_columns, variants_table

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

PLOTTED_PREFIXES = ("train/loss", "eval/")
"""Every loss term and every eval metric gets a curve, including ones added to training later."""
LOG_SCALE_WORDS = ("ppl",)
"""Metrics whose name holds one of these are drawn on a log y axis (perplexity spans orders of magnitude)."""
IMAGE_KINDS = {"alpha_histograms": ("alpha",), "attention_heatmaps": ("heat", "attention")}
"""Side-by-side figure name → words that mark a run's PNG artifact as that kind (matched in the lower-cased name)."""


def file_stem(key: str) -> str:
    """A metric key or experiment name as a file name (`train/loss_attn` → `train_loss_attn`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")


def plotted_keys(summaries: Sequence[RunSummary]) -> list[str]:
    """Loss terms and eval metrics any run logged, in column order: the metrics that get curves."""
    return metric_columns(key for summary in summaries for key in summary.histories if key.startswith(PLOTTED_PREFIXES))


def plot_metrics(summaries: Sequence[RunSummary], directory: Path) -> list[Path]:
    """One PNG per loss term and eval metric: value against step, one line per run (`step/`), and against tokens
    (`tokens/`) for the runs that log `train/tokens` (eval steps placed by interpolating the token count).
    Perplexity on a log axis."""
    written = []
    for axis_name in ("step", "tokens"):
        for key in plotted_keys(summaries):
            curves = []
            for summary in summaries:
                history = summary.histories.get(key)
                tokens = summary.histories.get(TOKENS_METRIC)
                if not history or (axis_name == "tokens" and not tokens):
                    continue
                steps = np.array([step for step, _ in history], dtype=float)
                if axis_name == "tokens":
                    steps = np.interp(steps, [step for step, _ in tokens], [value for _, value in tokens])
                curves.append(Curve(summary.label, steps, [value for _, value in history]))
            if curves:
                figure = curve_figure(
                    key,
                    curves,
                    x_label="optimizer step" if axis_name == "step" else "training tokens",
                    log_y=any(word in key for word in LOG_SCALE_WORDS),
                )
                written.append(save_figure(figure, directory / axis_name / f"{file_stem(key)}.png"))
    return written


@dataclass
class Band:
    """One variant's metric over its seeds, at the steps every seed logged: [S] arrays."""

    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    """Sample standard deviation over seeds (ddof 1); zero for a single seed."""
    runs: int


def metric_bands(groups: Mapping[str, Sequence[RunSummary]], key: str) -> dict[str, Band]:
    """Mean and std over each variant's runs of `key` at the steps all its runs logged (the last value logged at
    a step); variants where no run logged `key`, or whose runs share no step, are left out."""
    bands = {}
    for name, members in groups.items():
        series = [dict(member.histories.get(key, [])) for member in members]
        steps = sorted(set.intersection(*(set(points) for points in series)))
        if not steps:
            continue
        values = np.array([[points[step] for step in steps] for points in series], dtype=float)
        std = values.std(axis=0, ddof=1) if len(members) > 1 else np.zeros(len(steps))
        bands[name] = Band(np.array(steps, dtype=float), values.mean(axis=0), std, len(members))
    return bands


def plot_metric_bands(groups: Mapping[str, Sequence[RunSummary]], key: str, path: Path) -> Path | None:
    """`key` against step, one line per variant: the mean over its seeds, shaded ± one std; None when no variant
    logged `key`."""
    bands = metric_bands(groups, key)
    if not bands:
        return None
    curves = [
        Curve(f"{name} (n={band.runs})", band.steps, band.mean, band.mean - band.std, band.mean + band.std)
        for name, band in bands.items()
    ]
    log_y = any(word in key for word in LOG_SCALE_WORDS)
    figure = curve_figure(key, curves, x_label="optimizer step", log_y=log_y, note="mean ± std over seeds")
    return save_figure(figure, path)


def _artifact_pngs(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    """Every PNG artifact of a run, as paths relative to its artifact root, found recursively."""
    found = []
    for entry in client.list_artifacts(run_id, path):
        if entry.is_dir:
            found += _artifact_pngs(client, run_id, entry.path)
        elif entry.path.lower().endswith(".png"):
            found.append(entry.path)
    return found


def _step_in_name(path: str) -> int:
    """The step a figure's name carries: the number after `step`, else the last number in the file name, else -1."""
    after_step = re.findall(r"step\D{0,2}(\d+)", path, flags=re.IGNORECASE)
    if after_step:
        return int(after_step[-1])
    numbers = re.findall(r"\d+", Path(path).stem)
    return int(numbers[-1]) if numbers else -1


def _in_step_directory(path: str) -> bool:
    """Whether a figure sits in a directory named after a step (`heatmaps/step-00000024/layer-0.png`): one of a set
    of figures logged together, named by its file."""
    return re.search(r"step\D{0,2}\d+", Path(path).parent.name, flags=re.IGNORECASE) is not None


def latest_images(paths: Iterable[str]) -> dict[str, str]:
    """Figure name → the artifact with the highest step in its name, for each kind of `IMAGE_KINDS`.

    A single figure per step (`heatmaps/step-00000024.png`) is named after its kind; a set of figures logged into
    a step's directory (`heatmaps/step-00000024/layer-0.png`, …) gives one name per file (`attention_heatmaps_layer-0`).
    Of several sets at the latest step (training's and `distill eval`'s), the last by path is taken."""
    paths = list(paths)
    chosen: dict[str, str] = {}
    for kind, words in IMAGE_KINDS.items():
        matching = [path for path in paths if any(word in path.lower() for word in words)]
        if not matching:
            continue
        latest = max(_step_in_name(path) for path in matching)
        sets: dict[str, list[str]] = {}
        for path in sorted(path for path in matching if _step_in_name(path) == latest):
            sets.setdefault(str(Path(path).parent) if _in_step_directory(path) else path, []).append(path)
        for path in sets[max(sets)]:
            chosen[f"{kind}_{Path(path).stem}" if _in_step_directory(path) else kind] = path
    return chosen


def compose_run_images(client: MlflowClient, summaries: Sequence[RunSummary], directory: Path) -> list[Path]:
    """Download each run's latest α histogram and attention heat maps and put the runs' images side by side, one
    PNG per figure name; returns the PNGs written."""
    # One MLflow progress bar per downloaded figure would bury the progress log; a user's explicit setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    per_name: dict[str, list[tuple[str, Path]]] = {}
    written = []
    with tempfile.TemporaryDirectory() as downloads:
        for summary in summaries:
            chosen = latest_images(_artifact_pngs(client, summary.run_id))
            run_downloads = Path(downloads) / summary.run_id
            run_downloads.mkdir()
            for name, artifact in chosen.items():
                local = client.download_artifacts(summary.run_id, artifact, str(run_downloads))
                per_name.setdefault(name, []).append((summary.label, Path(local)))
        for kind in IMAGE_KINDS:
            if not any(name == kind or name.startswith(f"{kind}_") for name in per_name):
                logger.info("no %s among the runs' PNG artifacts", kind.replace("_", " "))
        for name, images in sorted(per_name.items()):
            path = directory / f"{name}.png"
            side_by_side(images, path)
            written.append(path)
            logger.info("%s: %d runs side by side → %s", name.replace("_", " "), len(images), path.name)
    return written


def write_variants(groups: Mapping[str, Sequence[RunSummary]], keys: Sequence[str], directory: Path) -> list[Path]:
    """`variants.md` (mean ± std over seeds of the final metrics) and one seed-band plot per key under `bands/`;
    returns the plots written."""
    columns, rows = variants_table(groups)
    (directory / "variants.md").write_text(markdown_table(columns, rows))
    plots = [plot_metric_bands(groups, key, directory / "bands" / f"{file_stem(key)}.png") for key in keys]
    return [plot for plot in plots if plot is not None]
