"""Every figure the pipeline draws: α statistics, attention heat maps, metric curves and side-by-side montages.

Pure drawing on plain data (tensors, lists of points, PNG files): no MLflow, no runs. The stages log these figures
as artifacts; `distill compare` composes and plots them into its report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files

import numpy as np
from matplotlib import colors, ticker
from matplotlib import image as mpimg
from matplotlib import pyplot as plt

if TYPE_CHECKING:
    import torch
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

HEATMAP_MAX_TOKENS = 256
"""The full view shows at most this many query and key positions (one screen pixel or more per cell)."""
HEATMAP_ZOOM_TOKENS = 32
"""The zoom shows the first this many positions, where the attention sink and the local diagonal live."""
HEATMAP_GAMMA = 0.3
"""Power of the colour scale: the first-token sink (≈ 1) would otherwise paint every other cell (≈ 1e-2) black."""
HEATMAP_FULL_INCHES = 3.6
"""Side of a full-view panel: at `DPI`, 360 pixels for up to 256 positions."""
HEATMAP_ZOOM_INCHES = 2.7
HEATMAP_HEADS_PER_FIGURE = 4
"""Heads per heat-map figure; a layer with more heads is split into head groups, so a figure stays one screen."""
HEATMAP_TICKS = (0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 1.0)
"""Colour-bar ticks, spread evenly by the power scale."""
HEATMAP_CMAP = "magma"
FUTURE_COLOR = "#d9d9d9"
"""Cells above the diagonal (future keys, masked by causality) are drawn in this grey, not as zero attention."""
DPI = 100
MARKERS_BELOW = 30
"""Curves with fewer points than this get a marker per point, so sparse evaluations read as points, not a trend."""
SMOOTH_ABOVE = 60
"""Curves with more points than this are drawn faint, under a trailing moving mean."""
LEGEND_OUTSIDE_ABOVE = 5
"""With more lines than this the legend moves to the right of the axes, where it hides no curve."""
MONTAGE_MAX_WIDTH = 2400
"""Side-by-side montages put as many images in a row as fit this many pixels (at least one)."""


def save_figure(figure: Figure, path: Path) -> Path:
    """Write `figure` as a PNG at `DPI` (parents created) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        figure.savefig(path, dpi=DPI)
    finally:
        plt.close(figure)
    return path


def _alpha_order(key: str) -> tuple[int, int, str]:
    """Sort key of an α statistics key `L<layer>.H<heads>.<squeeze>`."""
    layer, heads, *squeeze = key.split(".")
    return int(layer[1:]), int(heads[1:]), ".".join(squeeze)


def alpha_figure(alpha_stats: Mapping[str, Mapping[str, Any]]) -> Figure:
    """α of every cached (layer, head count): histogram over [0, 1] (left) and mean per teacher head (right).

    `alpha_stats` is a manifest's `alpha_stats`: key `L<layer>.H<heads>.<squeeze>` → `histogram` (counts of equal
    bins over [0, 1]), `per_teacher_head_mean`, `mean`, `std`; rows sorted by layer, head count, squeeze.
    """
    keys = sorted(alpha_stats, key=_alpha_order)
    figure, axes = plt.subplots(max(len(keys), 1), 2, figsize=(9, 2.2 * max(len(keys), 1)), squeeze=False)
    for row, key in enumerate(keys):
        stats = alpha_stats[key]
        counts = stats["histogram"]
        width = 1 / len(counts)
        axes[row, 0].bar([i * width for i in range(len(counts))], counts, width=width, align="edge")
        axes[row, 0].set_xlim(0, 1)
        axes[row, 0].set_title(f"{key}: α histogram (mean {stats['mean']:.3f}, std {stats['std']:.3f})", fontsize=9)
        means = stats["per_teacher_head_mean"]
        axes[row, 1].bar(range(len(means)), means)
        axes[row, 1].set_ylim(0, 1)
        axes[row, 1].set_xticks(range(len(means)))
        axes[row, 1].set_title(f"{key}: mean α per teacher head", fontsize=9)
    if not keys:
        axes[0, 0].set_title("no α statistics in the manifest")
    figure.tight_layout()
    return figure


def heatmap_norm(vmax: float) -> colors.Normalize:
    """The colour scale of every heat map: a power law with `HEATMAP_GAMMA` from 0 to `vmax`."""
    return colors.PowerNorm(gamma=HEATMAP_GAMMA, vmin=0.0, vmax=vmax)


def _causal_view(maps: torch.Tensor, tokens: int) -> np.ndarray:
    """[H, T, T] → float64 [H, t, t] of the first `tokens` positions, future cells (key > query) set to NaN."""
    view = maps.detach().cpu()[:, :tokens, :tokens].double().numpy().copy()
    future = np.triu_indices(view.shape[-1], 1)
    view[:, future[0], future[1]] = np.nan
    return view


def _position_ticks(axis: Axes, size: int) -> None:
    ticks = list(range(0, size, max(size // 4, 1)))
    axis.set_xticks(ticks)
    axis.set_yticks(ticks)
    axis.tick_params(labelsize=7, length=2)


def attention_heatmap_figure(
    student_maps: Mapping[int, torch.Tensor],
    target_maps: Mapping[int, torch.Tensor],
    teacher_layers: Mapping[int, int],
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> Figure:
    """Teacher targets beside the student, one row per (student layer, head), on one shared power colour scale.

    `student_maps[j]`, `target_maps[j]`: [H, T, T] probabilities of one sample (any float dtype, any device; H may
    be 1, e.g. one head-averaged map per layer); `teacher_layers[j]` = m(j). `layers` and `heads` select the rows
    (default: all). Columns: target and student over the first `HEATMAP_MAX_TOKENS` positions, then both again over
    the first `HEATMAP_ZOOM_TOKENS` (left out when T is no longer than that). Future cells are grey.
    """
    layers = sorted(student_maps) if layers is None else list(layers)
    heads = range(student_maps[layers[0]].shape[0]) if heads is None else heads
    length = student_maps[layers[0]].shape[-1]
    tokens = min(length, HEATMAP_MAX_TOKENS)
    views = [(tokens, "all" if tokens == length else "first")]
    views += [(HEATMAP_ZOOM_TOKENS, "first")] if tokens > HEATMAP_ZOOM_TOKENS else []
    rows = [(layer, head) for layer in layers for head in heads]
    columns = [(size, name, side) for size, name in views for side in ("target", "student")]
    maps = {
        (layer, side, size): _causal_view((target_maps if side == "target" else student_maps)[layer], size)
        for layer in layers
        for side in ("target", "student")
        for size, _ in views
    }
    vmax = max(float(np.nanmax(view)) for view in maps.values())
    norm = heatmap_norm(vmax if vmax > 0 else 1.0)
    cmap = plt.get_cmap(HEATMAP_CMAP).with_extremes(bad=FUTURE_COLOR)
    widths = [HEATMAP_FULL_INCHES if size == tokens else HEATMAP_ZOOM_INCHES for size, _, _ in columns]
    # A fixed grid in inches (constrained layout would double the drawing time of these figures).
    left, right, top, bottom, gap_x, gap_y = 0.95, 1.15, 0.95, 0.6, 0.45, 0.25
    width = left + sum(widths) + gap_x * (len(columns) - 1) + right
    height = top + HEATMAP_FULL_INCHES * len(rows) + gap_y * (len(rows) - 1) + bottom
    figure = plt.figure(figsize=(width, height))
    grid = figure.add_gridspec(
        len(rows),
        len(columns),
        width_ratios=widths,
        left=left / width,
        right=1 - right / width,
        top=1 - top / height,
        bottom=bottom / height,
        wspace=gap_x / np.mean(widths),
        hspace=gap_y / HEATMAP_FULL_INCHES,
    )
    image = None
    for row, (layer, head) in enumerate(rows):
        for column, (size, name, side) in enumerate(columns):
            axis = figure.add_subplot(grid[row, column])
            image = axis.imshow(maps[layer, side, size][head], cmap=cmap, norm=norm, interpolation="nearest")
            _position_ticks(axis, size)
            axis.tick_params(labelbottom=row == len(rows) - 1, labelleft=side == "target")
            if row == 0:
                who = (
                    "student"
                    if side == "student"
                    else "teacher target" + (f" (L{teacher_layers[layer]})" if len(layers) == 1 else "")
                )
                axis.set_title(f"{who}\n{name} {size} tokens", fontsize=9)
            if column == 0:
                axis.set_ylabel(f"student L{layer} head {head}\nquery position", fontsize=9)
            if row == len(rows) - 1:
                axis.set_xlabel("key position", fontsize=8)
    plot_height = 1 - (top + bottom) / height
    bar_axis = figure.add_axes(
        (1 - (right - 0.2) / width, bottom / height + 0.2 * plot_height, 0.15 / width, 0.6 * plot_height)
    )
    bar = figure.colorbar(image, cax=bar_axis)
    bar.set_ticks([tick for tick in HEATMAP_TICKS if tick <= norm.vmax])
    bar.ax.yaxis.set_major_formatter("{x:g}")
    bar.set_label(f"attention probability (power scale, γ = {HEATMAP_GAMMA:g})", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    mapping = ", ".join(f"student L{layer} ← teacher L{teacher_layers[layer]}" for layer in layers)
    figure.suptitle(f"Attention of one validation sample: {mapping}; grey = future keys", fontsize=10)
    return figure


def attention_heatmap_figures(
    student_maps: Mapping[int, torch.Tensor],
    target_maps: Mapping[int, torch.Tensor],
    teacher_layers: Mapping[int, int],
    *,
    heads_per_figure: int = HEATMAP_HEADS_PER_FIGURE,
) -> dict[str, Figure]:
    """`attention_heatmap_figure` split into one figure per matched layer, or per group of at most
    `heads_per_figure` heads when the layer has more: name (`layer-<j>`, or `layer-<j>-heads-<a>-<b>`) → figure.

    Shapes as in `attention_heatmap_figure`. Log each as `heatmaps/step-<step>/<name>.png`.
    """
    figures = {}
    for layer in sorted(student_maps):
        count = student_maps[layer].shape[0]
        for first in range(0, count, heads_per_figure):
            heads = range(first, min(first + heads_per_figure, count))
            name = f"layer-{layer}" if len(heads) == count else f"layer-{layer}-heads-{heads[0]}-{heads[-1]}"
            figures[name] = attention_heatmap_figure(
                student_maps, target_maps, teacher_layers, layers=[layer], heads=heads
            )
    return figures


@dataclass
class Curve:
    """One line of a metric plot: x and y of equal length, optionally a band [lower, upper] around y."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    lower: Sequence[float] | None = None
    upper: Sequence[float] | None = None


def moving_mean(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start), NaNs ignored."""
    array = np.asarray(values, dtype=float)
    return np.array([np.nanmean(array[max(0, end - window + 1) : end + 1]) for end in range(len(array))])


def curve_figure(key: str, curves: Sequence[Curve], *, x_label: str, log_y: bool = False, note: str = "") -> Figure:
    """One metric against `x_label`, one line per curve (with its band shaded where given).

    Sparse curves (< `MARKERS_BELOW` points) get markers; dense ones (> `SMOOTH_ABOVE`) are drawn faint under a
    trailing moving mean over 1/20 of their points; the legend leaves the axes when there are many lines.
    """
    figure, axis = plt.subplots(figsize=(8, 4.2))
    smoothed_window = 0
    palette = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20").colors
    for index, curve in enumerate(curves):
        color = palette[index % len(palette)]
        x = np.asarray(curve.x, dtype=float)
        y = np.asarray(curve.y, dtype=float)
        if curve.lower is not None and curve.upper is not None:
            axis.fill_between(x, curve.lower, curve.upper, color=color, alpha=0.2, linewidth=0)
        if len(y) > SMOOTH_ABOVE:
            smoothed_window = max(len(y) // 20, 2)
            axis.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
            axis.plot(x, moving_mean(y, smoothed_window), color=color, label=curve.label)
        else:
            axis.plot(
                x, y, color=color, marker="o" if len(y) < MARKERS_BELOW else None, markersize=4, label=curve.label
            )
    if log_y:
        axis.set_yscale("log")
        # plain numbers at the decades and, over spans of up to two decades, at some steps between them
        axis.yaxis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=False))
        axis.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    title = key + (f" ({note})" if note else "")
    if smoothed_window:
        title += "; faint: raw, solid: moving mean"
    axis.set_title(title, fontsize=10)
    axis.set_xlabel(x_label)
    axis.set_ylabel(key)
    axis.grid(alpha=0.3, which="both")
    if len(curves) > LEGEND_OUTSIDE_ABOVE:
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def side_by_side(images: Sequence[tuple[str, Path]], path: Path) -> None:
    """Compose PNGs into one figure, each titled with its label, as many per row as fit `MONTAGE_MAX_WIDTH` pixels.

    Panels are sized to the largest image's pixels (within 2–16 inches at `DPI`), so heat-map cells are neither
    blurred by upscaling nor lost to downscaling."""
    pictures = [(label, mpimg.imread(source)) for label, source in images]
    widest = max(picture.shape[1] for _, picture in pictures)
    columns = max(1, min(len(pictures), MONTAGE_MAX_WIDTH // widest))
    rows = math.ceil(len(pictures) / columns)
    aspect = max(picture.shape[1] / picture.shape[0] for _, picture in pictures)
    panel_height = min(max(2.0, max(picture.shape[0] for _, picture in pictures) / DPI), 16.0)
    figure, axes = plt.subplots(
        rows, columns, figsize=(panel_height * aspect * columns, (panel_height + 0.4) * rows), squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    for axis, (label, picture) in zip(axes.flat, pictures, strict=False):
        axis.imshow(picture)
        axis.set_title(label, fontsize=12)
    figure.tight_layout()
    save_figure(figure, path)
