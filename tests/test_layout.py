"""The shard schema and the map encodings: top-m rows with tail sums per temperature, names, requested tensors."""

import math

import pytest
import torch

from pipeline.targets import compute, kinds
from pipeline.targets.encoding import tail_name, topk_rows, unpack_triangle
from pipeline.targets.kinds.base import LayerPass, MapSpec
from pipeline.targets.layout import cached_maps, expected_tensors, requested_tensors
from pipeline.targets.needs import MapNeed, TargetNeeds
from tests.cache_fixtures import encode_maps, map_name


def _maps(seed: int, batch: int = 2, heads: int = 3, seq: int = 8) -> torch.Tensor:
    scores = torch.randn(batch, heads, seq, seq, generator=torch.Generator().manual_seed(seed)) * 2
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, -math.inf), -1)


def _fingerprint(**changes: object) -> dict:
    fingerprint = {
        "seq_len": 8,
        "top_k": 4,
        "vocab_size": 384,
        "dtype": "float16",
        "encoding": "topk",
        "attn_top_m": 3,
        "attn_row_fraction": 1.0,
        "attn_value_bits": 16,
        "logit_value_bits": 16,
        "temperatures": [1.0, 2.0],
        "cached_layers": [1, 3],
        "attn_targets": ["global", "relations", "shd", "uniform"],
        "student_head_counts": [2, 3],
        "rel_heads": 4,
        "teacher_num_heads": 6,
    }
    return {**fingerprint, **changes}


def test_topk_rows_values_indices_and_tail_sums_per_temperature() -> None:
    seq, m = 8, 3
    maps = _maps(90)
    values, indices, tails = topk_rows(maps, m, (1.0, 2.0, 0.5))
    assert values.shape == indices.shape == (2, 3, seq, m) and indices.dtype == torch.int64
    assert tails.shape == (2, 3, seq, 3)
    assert torch.equal(values, maps.gather(-1, indices))
    torch.testing.assert_close(values.sum(-1) + tails[..., 0], torch.ones(2, 3, seq), atol=1e-6, rtol=0)
    rest = maps.double().scatter(-1, indices, 0.0)
    for position, tau in enumerate((1.0, 2.0, 0.5)):
        torch.testing.assert_close(tails[..., position].double(), rest.pow(1 / tau).sum(-1), rtol=1e-5, atol=1e-9)
    assert torch.all(tails[..., :m, :] == 0) and torch.all(tails[..., m:, :] > 0)
    wide_values, wide_indices, wide_tails = topk_rows(maps[..., :2, :2], 3)
    assert torch.equal(wide_values[..., 2], torch.zeros(2, 3, 2)) and torch.all(wide_indices[..., 2] == 2)
    assert torch.all(wide_tails == 0)
    with pytest.raises(ValueError, match="m=0"):
        topk_rows(maps, 0)


def test_a_kind_that_weights_only_some_of_its_maps_is_named() -> None:
    class HalfLinear(kinds.get("shd").__class__):
        def maps(self, layer: int, variant: int | None) -> tuple[MapSpec, ...]:
            return (MapSpec(f"attn.L{layer}.a", 1, layer), MapSpec(f"attn.L{layer}.b", 1, layer))

        def head_weights(self, layer_pass: LayerPass, layer: int, variant: int | None, state: object) -> dict:
            return {f"attn.L{layer}.a": torch.ones(1, 1, 2)}

    kind = HalfLinear("half", "test kind", frozenset())
    layer_pass = LayerPass(torch.zeros(1, 2, 4, 8), torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), 1.0)
    with pytest.raises(ValueError, match=r"'half' gives head_weights for \['attn\.L0\.a'\], not for all its maps"):
        compute.stacked_weights(layer_pass, 0, [(kind, 1)], [None])


@pytest.mark.parametrize("keys", [512, 549, 640])
def test_topk_rows_by_blocks_equals_a_full_sort_on_strided_rows(keys: int) -> None:
    """Rows long enough for the blocked path (≥ 2 · m · 64 keys; a ragged end or none), taken as a head slice of a
    larger batch (non-contiguous, as the emit pass hands each map its span of the stacked maps)."""
    m, temperatures = 4, (1.0, 2.0)
    generator = torch.Generator().manual_seed(keys)
    stacked = torch.softmax(torch.randn(2, 7, 5, keys, generator=generator) * 4, dim=-1)
    maps = stacked[:, 2:5]
    assert not maps.is_contiguous()
    values, indices, tails = topk_rows(maps, m, temperatures)
    reference_values, reference_indices = maps.double().sort(dim=-1, descending=True)
    torch.testing.assert_close(values.double(), reference_values[..., :m], rtol=0, atol=0)
    assert torch.equal(indices, reference_indices[..., :m])
    rest = reference_values[..., m:]
    for position, tau in enumerate(temperatures):
        torch.testing.assert_close(tails[..., position].double(), rest.pow(1 / tau).sum(-1), rtol=1e-5, atol=1e-9)


def test_encoded_maps_match_the_schema_and_round_trip() -> None:
    maps = _maps(91)
    fingerprint = _fingerprint()
    encoded = encode_maps(
        "attn.L1.H3.shd", maps, encoding="topk", attn_top_m=3, dtype=torch.float16, temperatures=(1.0, 2.0)
    )
    specs = expected_tensors(fingerprint, 2)
    assert set(encoded) == {
        "attn.L1.H3.shd.values",
        "attn.L1.H3.shd.indices",
        "attn.L1.H3.shd.tail",
        "attn.L1.H3.shd.tail.tau2",
    }
    for name, tensor in encoded.items():
        assert specs[name].shape == tuple(tensor.shape)
    dense = encode_maps("x", maps, encoding="dense", attn_top_m=1, dtype=torch.float32, temperatures=(1.0,))
    torch.testing.assert_close(unpack_triangle(dense["x"], 8), maps)


def test_schema_names_every_map_kind_once() -> None:
    names = [spec.name for spec in cached_maps(_fingerprint())]
    assert names[:6] == [
        "attn.L1.global",
        "rel.L1.R4.q",
        "rel.L1.R4.k",
        "rel.L1.R4.v",
        "attn.L1.H2.shd",
        "attn.L1.H3.shd",
    ]
    assert len(names) == len(set(names)) == 2 * (1 + 3 + 2 + 2)
    specs = expected_tensors(_fingerprint(), 5)
    alpha = specs["alpha.L3.H2.uniform"]
    assert (alpha.dtype, alpha.shape, alpha.role, alpha.layer) == ("F32", (5, 6), "alpha", 3)
    assert "alpha.L3.H2.global" not in str(specs)
    tail = specs[tail_name("tail_mass", 2.0)]
    assert (tail.dtype, tail.shape, tail.role) == ("F32", (5, 8), "tail") and tail_name("tail_mass", 1.0) == "tail_mass"
    assert specs["attn.L1.H3.shd.values"].companions == ("attn.L1.H3.shd.tail",)
    assert map_name(3, "selective", 2) == "attn.L3.H2.selective"
    assert [spec.name for spec in kinds.get("relations").maps(1, 4)] == ["rel.L1.R4.q", "rel.L1.R4.k", "rel.L1.R4.v"]
    with pytest.raises(KeyError, match="unknown target kind 'relation'"):
        kinds.get("relation")


def test_requested_tensors_are_the_needs_tensors() -> None:
    fingerprint = _fingerprint()
    needs = TargetNeeds((MapNeed("shd", 1, 3, 2.0), MapNeed("relations", 3, 4, 1.0)), 2.0, 4)
    names = set(requested_tensors(fingerprint, needs, 4))
    assert names == {
        "sample_ids",
        "input_ids",
        "topk_values",
        "topk_indices",
        "tail_mass.tau2",
        "attn.L1.H3.shd.values",
        "attn.L1.H3.shd.indices",
        "attn.L1.H3.shd.tail.tau2",
        *(f"rel.L3.R4.{relation}.{part}" for relation in "qkv" for part in ("values", "indices", "tail")),
    }
    assert names <= set(expected_tensors(fingerprint, 4))
