"""The top-m rows of target maps from raw attention scores: the native CPU kernel against the torch form and a
float64 reference, and how the kernel is built, cached and done without."""

import logging
import math
import sys

import pytest
import torch

from pipeline.ops import native, topk_maps

needs_kernel = pytest.mark.skipif(native.library() is None, reason="no C compiler: the torch form is what runs")


def _case(seed: int, batch: int, heads: int, key_heads: int, seq: int, maps: int, dim: int = 16) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, seq, dim, generator=generator) * 2
    key = torch.randn(batch, key_heads, seq, dim, generator=generator)
    weights = torch.rand(batch, maps, heads, generator=generator)
    weights = weights * (torch.rand(batch, maps, heads, generator=generator) > 0.5)
    weights[:, 0] = 0.0
    weights[:, 0, 1] = 1.0  # a head selection
    return query, key, weights


def _reference(query: torch.Tensor, key: torch.Tensor, scale: float, rows: torch.Tensor, weights: torch.Tensor):
    """The maps in float64 from the queries and keys: Σ_h w_h · softmax_h over each row's visible keys."""
    batch, heads = query.shape[:2]
    per_sample = rows if rows.dim() == 2 else rows.expand(batch, -1)
    picked = query.double().gather(2, per_sample[:, None, :, None].expand(-1, heads, -1, query.shape[-1]))
    keys = key.double().repeat_interleave(heads // key.shape[1], dim=1)
    scores = picked @ keys.transpose(-1, -2) * scale
    hidden = torch.arange(scores.shape[-1]) > per_sample[:, None, :, None]
    probabilities = torch.softmax(scores.masked_fill(hidden, -math.inf), dim=-1)
    return torch.einsum("bsh,bhrk->bsrk", weights.double(), probabilities)


def _assert_top_rows(top: tuple, reference: torch.Tensor, rows: torch.Tensor, m: int, temperatures: tuple) -> None:
    """`top` holds the m largest entries of every reference row (ties to the lower key), padded with exact zeros at
    keys the row cannot see, and the tails of the keys it did not keep."""
    values, indices, tails = top
    batch, maps = reference.shape[:2]
    reference = torch.nn.functional.pad(reference, (0, max(0, m - reference.shape[-1])))  # K < m: zero keys beyond
    per_sample = (rows if rows.dim() == 2 else rows.expand(batch, -1))[:, None, :, None]
    visible = (per_sample + 1).expand(-1, maps, -1, m)
    real = torch.arange(m) < visible
    sorted_values, sorted_keys = reference.sort(dim=-1, descending=True, stable=True)
    torch.testing.assert_close(values.double(), sorted_values[..., :m].where(real, 0.0), rtol=1e-5, atol=1e-9)
    assert torch.equal(indices[real], sorted_keys[..., :m][real])
    assert torch.all(values[~real] == 0) and torch.all(indices[~real] >= visible[~real])
    kept = torch.zeros_like(reference, dtype=torch.bool).scatter_(-1, indices, True)
    for position, tau in enumerate(temperatures):
        rest = reference.masked_fill(kept, 0.0).pow(1 / tau).sum(-1)
        torch.testing.assert_close(tails[..., position].double(), rest, rtol=3e-5, atol=1e-8)


CASES = [
    # batch, heads, key heads, T, rows (per sample or shared), maps, m, head dim
    (2, 6, 2, 40, torch.arange(0, 40), 5, 16, 16),  # rows shorter than m: padded with exact zeros
    (1, 9, 3, 3000, torch.arange(2900, 2956)[None], 9, 16, 16),  # long rows: the grouped selection
    (3, 4, 4, 300, torch.tensor([[3, 90, 91, 299], [0, 1, 150, 200], [5, 6, 7, 8]]), 4, 5, 16),  # subsampled rows
    (2, 4, 1, 2500, torch.arange(0, 2500, 97), 3, 7, 16),  # one tile of rows of every length; T not a multiple of 32
    (1, 2, 1, 5, torch.arange(0, 3), 2, 8, 16),  # fewer keys than m (K 3 < m 8)
    (2, 8, 2, 333, torch.arange(0, 333), 4, 16, 64),  # 4 heads per KV head (tiles of 64 query vectors), head dim 64
]


@needs_kernel
@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_native_kernel_equals_the_float64_maps(case: int) -> None:
    batch, heads, key_heads, seq, rows, maps, m, dim = CASES[case]
    query, key, weights = _case(case, batch, heads, key_heads, seq, maps, dim)
    temperatures = (1.0, 2.0, 0.5)
    top = native.topk_map_qk(query, key, 0.25, rows, weights, m, temperatures)
    _assert_top_rows(top, _reference(query, key, 0.25, rows, weights), rows, m, temperatures)


@needs_kernel
def test_the_portable_score_product_equals_the_vector_one(tmp_path) -> None:
    """Machines without AVX-512 build the plain C form of the score product (`SHD_DISTILL_PORTABLE`): same maps."""
    portable = tmp_path / "libtopk_rows.so"
    native._build(native.shutil.which("cc"), portable, ("SHD_DISTILL_PORTABLE",))
    query, key, weights = _case(11, 2, 9, 3, 700, 9, 64)
    rows = torch.arange(0, 700, 3)
    plain = native.topk_map_qk(query, key, 0.125, rows, weights, 16, (1.0, 2.0), kernel=native.load(portable))
    _assert_top_rows(plain, _reference(query, key, 0.125, rows, weights), rows, 16, (1.0, 2.0))
    vector = native.topk_map_qk(query, key, 0.125, rows, weights, 16, (1.0, 2.0))
    torch.testing.assert_close(plain[0], vector[0], rtol=1e-5, atol=1e-9)


@needs_kernel
@pytest.mark.parametrize("m", [16, 40])
def test_the_kernel_ranks_rising_rows_with_ties_as_a_stable_sort_does(m: int) -> None:
    """Real attention rises towards the query's own key, the order a heap handles worst, and a head selection's row
    ties exactly wherever the scores do: plateaus of 7 equal scores that rise with the key, the last of them cut by
    the top m, must keep the lower keys of the cut plateau (m 40: more groups than the least the selection uses).
    Head 0's query reads one coordinate of the keys, so its scores are exact whatever the order of the products."""
    keys = 3000
    rows = torch.arange(keys - 24, keys)[None]
    rising = (torch.arange(keys) // 7).float() * 0.01
    noise = torch.randn(keys, generator=torch.Generator().manual_seed(0)) * 0.003
    key = torch.stack([rising, noise], dim=-1)[None, None]
    query = torch.tensor([[1.0, 0.0], [1.0, 1.0]])[None, :, None].expand(1, 2, keys, 2)
    weights = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])
    top = native.topk_map_qk(query, key, 1.0, rows, weights, m, (1.0,))
    _assert_top_rows(top, _reference(query, key, 1.0, rows, weights), rows, m, (1.0,))


@needs_kernel
def test_topk_maps_gives_the_same_rows_with_and_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = torch.arange(2900, 2956)[None]
    query, key, weights = _case(7, 1, 9, 3, 3000, 9)
    native_rows = topk_maps.topk_maps(query, key, 0.25, rows, weights, 16, (1.0, 2.0))
    monkeypatch.setattr(native, "library", lambda: None)
    torch_rows = topk_maps.topk_maps(query, key, 0.25, rows, weights, 16, (1.0, 2.0))
    torch.testing.assert_close(native_rows[0], torch_rows[0], rtol=1e-5, atol=1e-9)
    assert torch.equal(native_rows[1], torch_rows[1])
    torch.testing.assert_close(native_rows[2], torch_rows[2], rtol=3e-5, atol=1e-8)


@needs_kernel
def test_negative_weights_go_through_the_torch_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's maps are probabilities (its padding and tails assume entries ≥ 0): other weights are refused by
    it and taken by the torch form."""
    rows = torch.arange(30, 40)[None]
    query, key, _ = _case(3, 1, 2, 1, 40, 1)
    weights = torch.tensor([[[1.0, -0.5]]])
    with pytest.raises(ValueError, match="non-negative weights"):
        native.topk_map_qk(query, key, 0.25, rows, weights, 4, (1.0,))
    with pytest.raises(ValueError, match="non-negative weights"):
        native.topk_map_qk(query, key, 0.25, rows, torch.ones(2, 1, 2), 4, (1.0,))
    chosen = topk_maps.topk_maps(query, key, 0.25, rows, weights, 4, (1.0, 2.0))
    monkeypatch.setattr(native, "library", lambda: None)
    expected = topk_maps.topk_maps(query, key, 0.25, rows, weights, 4, (1.0, 2.0))
    for got, want in zip(chosen, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@needs_kernel
def test_the_kernel_refuses_rows_outside_the_sequence_or_out_of_order() -> None:
    query, key, _ = _case(5, 1, 2, 1, 8, 1)
    weights = torch.ones(1, 1, 2)
    with pytest.raises(ValueError, match="in \\[0, 8\\)"):
        native.topk_map_qk(query, key, 0.25, torch.tensor([[1, 2, 8]]), weights, 2, (1.0,))
    with pytest.raises(ValueError, match="m=0"):
        native.topk_map_qk(query, key, 0.25, torch.tensor([[1, 2, 3]]), weights, 0, (1.0,))
    with pytest.raises(ValueError, match="out of order"):
        native.topk_map_qk(query, key, 0.25, torch.tensor([[1, 3, 2]]), weights, 2, (1.0,))
    with pytest.raises(ValueError, match="keys of shape"):
        native.topk_map_qk(query, key[:, :, :5], 0.25, torch.tensor([[1, 2]]), weights, 2, (1.0,))


@needs_kernel
def test_loading_the_kernel_leaves_denormals_alone() -> None:
    """Built with -ffast-math but linked without it: no flush-to-zero for the whole process."""
    assert native.library() is not None
    assert sys.float_info.min / 2 > 0
    assert torch.tensor(1e-40, dtype=torch.float32).item() > 0


def test_the_kernel_is_built_once_per_machine_and_done_without_when_it_cannot_be(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        monkeypatch.setenv(native.ENV_SWITCH, "0")
        assert native.library() is None
        native.library.cache_clear()
        monkeypatch.delenv(native.ENV_SWITCH)
        monkeypatch.setenv("CC", "false")  # a compiler that fails every build
        with caplog.at_level(logging.WARNING, logger="pipeline.ops.native"):
            assert native.library() is None
        assert "could not be built or loaded" in caplog.text
        assert not list((tmp_path / "cache").rglob("*.so"))
        native.library.cache_clear()
        monkeypatch.setenv("CC", "no-such-compiler")
        with caplog.at_level(logging.WARNING, logger="pipeline.ops.native"):
            assert native.library() is None
        assert "no C compiler" in caplog.text
        if native.shutil.which("cc") is not None:
            native.library.cache_clear()
            monkeypatch.delenv("CC")
            assert native.library() is not None
            built = list((tmp_path / "cache").rglob("libtopk_rows.so"))
            assert len(built) == 1
            stamp = built[0].stat().st_mtime_ns
            native.library.cache_clear()
            assert native.library() is not None and built[0].stat().st_mtime_ns == stamp
    finally:
        native.library.cache_clear()
