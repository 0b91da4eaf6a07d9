"""Figures: heat maps (layout, colour scale, masking, zoom), α statistics, curves and montages render as PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colors
from matplotlib import image as mpimg

from pipeline.reports.figures import (
    HEATMAP_GAMMA,
    HEATMAP_MAX_TOKENS,
    HEATMAP_ZOOM_TOKENS,
    Curve,
    alpha_figure,
    attention_heatmap_figure,
    attention_heatmap_figures,
    curve_figure,
    moving_mean,
    save_figure,
    side_by_side,
)

ALPHA_STATS = {
    "L1.H2": {"mean": 0.33, "std": 0.02, "per_teacher_head_mean": [0.3, 0.35, 0.35, 0.3], "histogram": [0, 10, 5, 0]},
    "L3.H3": {"mean": 0.5, "std": 0.03, "per_teacher_head_mean": [0.5] * 4, "histogram": [0, 3, 12, 0]},
}


def _maps(heads: int, tokens: int, layers: tuple[int, ...] = (0, 1), seed: int = 0) -> dict[int, torch.Tensor]:
    """Causal row-stochastic [heads, tokens, tokens] maps with a first-token sink, like real attention."""
    generator = torch.Generator().manual_seed(seed)
    maps = {}
    for layer in layers:
        scores = torch.randn(heads, tokens, tokens, generator=generator)
        scores[..., 0] += 4.0
        future = torch.ones(tokens, tokens, dtype=torch.bool).triu(1)
        maps[layer] = scores.masked_fill(future, float("-inf")).softmax(-1)
    return maps


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and mpimg.imread(path).ndim == 3


def _panels(figure) -> list:
    """The heat-map axes (those holding an image), leaving out the colour bar."""
    return [axis for axis in figure.axes if axis.get_images() and axis.get_label() != "<colorbar>"]


def test_heatmap_puts_targets_beside_the_student_with_a_zoom_on_a_shared_power_scale(tmp_path: Path) -> None:
    student, target = _maps(3, 300, seed=1), _maps(3, 300, seed=2)
    figure = attention_heatmap_figure(student, target, {0: 6, 1: 14}, layers=[1])
    panels = _panels(figure)
    assert len(panels) == 3 * 4  # one row per head: target, student, target zoom, student zoom
    titles = [axis.get_title() for axis in panels[:4]]
    assert titles == [
        f"teacher target (L14)\nfirst {HEATMAP_MAX_TOKENS} tokens",  # of 300
        f"student\nfirst {HEATMAP_MAX_TOKENS} tokens",
        f"teacher target (L14)\nfirst {HEATMAP_ZOOM_TOKENS} tokens",
        f"student\nfirst {HEATMAP_ZOOM_TOKENS} tokens",
    ]
    assert [axis.get_ylabel().splitlines()[0] for axis in panels[::4]] == [
        "student L1 head 0",
        "student L1 head 1",
        "student L1 head 2",
    ]
    images = [axis.get_images()[0] for axis in panels]
    assert {image.get_array().shape for image in images[0::4]} == {(HEATMAP_MAX_TOKENS, HEATMAP_MAX_TOKENS)}
    assert {image.get_array().shape for image in images[2::4]} == {(HEATMAP_ZOOM_TOKENS, HEATMAP_ZOOM_TOKENS)}
    norms = {id(image.norm) for image in images}
    assert len(norms) == 1  # one colour bar serves every panel
    norm = images[0].norm
    assert isinstance(norm, colors.PowerNorm) and norm.gamma == HEATMAP_GAMMA and norm.vmin == 0
    expected_max = max(maps[1][:, :HEATMAP_MAX_TOKENS, :HEATMAP_MAX_TOKENS].max().item() for maps in (student, target))
    assert norm.vmax == pytest.approx(expected_max)
    # Head 1 of the student, zoomed: the values drawn are the map's, future cells masked (not drawn as zero).
    drawn = images[4 + 3].get_array()
    reference = student[1][1, :HEATMAP_ZOOM_TOKENS, :HEATMAP_ZOOM_TOKENS].double().numpy()
    below = np.tril(np.ones_like(reference, dtype=bool))
    assert np.array_equal(np.isnan(np.asarray(drawn.filled(np.nan))), ~below)
    np.testing.assert_allclose(np.asarray(drawn)[below], reference[below], rtol=1e-6)
    assert _is_png(save_figure(figure, tmp_path / "heat.png"))


def test_one_head_per_layer_and_short_contexts_need_no_zoom(tmp_path: Path) -> None:
    single = _maps(1, 16, layers=(2,))
    figure = attention_heatmap_figure(single, single, {2: 29})
    panels = _panels(figure)
    assert len(panels) == 2  # target and student; 16 tokens fit the full view, no zoom
    assert panels[0].get_images()[0].get_array().shape == (16, 16)
    assert panels[0].get_title() == "teacher target (L29)\nall 16 tokens"
    assert _is_png(save_figure(figure, tmp_path / "global.png"))


def test_several_layers_in_one_figure_name_the_teacher_layer_per_row_in_the_title() -> None:
    maps = _maps(2, 40)
    figure = attention_heatmap_figure(maps, maps, {0: 6, 1: 29})
    panels = _panels(figure)
    assert len(panels) == 2 * 2 * 4
    assert panels[0].get_title().startswith("teacher target\n")  # the teacher layer differs between rows
    assert [axis.get_ylabel().splitlines()[0] for axis in panels[::4]] == [
        "student L0 head 0",
        "student L0 head 1",
        "student L1 head 0",
        "student L1 head 1",
    ]
    assert "student L0 ← teacher L6, student L1 ← teacher L29" in figure.get_suptitle()


def test_heatmaps_split_into_one_figure_per_layer_or_head_group() -> None:
    maps = {0: _maps(3, 40)[0], 3: _maps(6, 40)[0]}
    figures = attention_heatmap_figures(maps, maps, {0: 6, 3: 29}, heads_per_figure=4)
    assert list(figures) == ["layer-0", "layer-3-heads-0-3", "layer-3-heads-4-5"]
    assert [len(_panels(figure)) for figure in figures.values()] == [3 * 4, 4 * 4, 2 * 4]
    assert _panels(figures["layer-3-heads-4-5"])[0].get_ylabel().startswith("student L3 head 4")


def test_alpha_figure_has_two_panels_per_cached_layer() -> None:
    figure = alpha_figure(ALPHA_STATS)
    assert len(figure.axes) == 2 * 2
    assert figure.axes[0].get_title().startswith("L1.H2: α histogram (mean 0.330")
    assert alpha_figure({}).axes[0].get_title() == "no α statistics in the manifest"


def test_moving_mean_is_a_trailing_mean() -> None:
    values = [1.0, 2.0, 6.0, float("nan"), 4.0]
    expected = [1.0, 1.5, 3.0, 4.0, 5.0]  # window 3, NaN ignored
    np.testing.assert_allclose(moving_mean(values, 3), expected)


def test_curves_mark_sparse_points_smooth_dense_ones_and_move_a_long_legend_out(tmp_path: Path) -> None:
    sparse = curve_figure("eval/ppl", [Curve("a", [2, 4], [40.0, 30.0])], x_label="step", log_y=True)
    axis = sparse.axes[0]
    assert axis.get_yscale() == "log" and axis.lines[0].get_marker() == "o"
    assert _is_png(save_figure(sparse, tmp_path / "sparse.png"))
    steps = np.arange(100.0)
    dense = curve_figure(
        "train/loss",
        [Curve(f"run{index}", steps, 5 - steps / 50, steps * 0, steps * 0 + 1) for index in range(6)],
        x_label="step",
    )
    axis = dense.axes[0]
    assert len(axis.lines) == 2 * 6 and axis.lines[0].get_alpha() == 0.25  # raw faint + moving mean per run
    assert len(axis.collections) == 6  # one shaded band per curve
    assert axis.get_legend().get_bbox_to_anchor().x0 > axis.get_window_extent().x1 - 1  # right of the axes
    assert _is_png(save_figure(dense, tmp_path / "dense.png"))


def test_side_by_side_fits_the_row_width(tmp_path: Path) -> None:
    from matplotlib import pyplot as plt

    sources = []
    for index, width in enumerate((3, 3, 3)):
        figure, axis = plt.subplots(figsize=(width, 2))
        axis.plot([0, 1], [0, index])
        sources.append((f"run{index}", save_figure(figure, tmp_path / f"{index}.png")))
    side_by_side(sources, tmp_path / "row.png")
    row = mpimg.imread(tmp_path / "row.png")
    assert row.shape[1] >= 3 * 300 and row.shape[0] < 2 * 200  # three 300 × 200-pixel images fit in one row
    wide = []
    for index in range(2):
        figure, axis = plt.subplots(figsize=(14, 3))
        wide.append((f"wide{index}", save_figure(figure, tmp_path / f"wide{index}.png")))
    side_by_side(wide, tmp_path / "stacked.png")
    stacked = mpimg.imread(tmp_path / "stacked.png")
    assert stacked.shape[0] > 2 * 300 and stacked.shape[1] < 2 * 1400  # two 1400-pixel images stack
