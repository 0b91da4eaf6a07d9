"""The shard schema and the map encodings: top-m rows with tail sums per temperature, names, requested tensors."""

import math

import pytest
import torch

from pipeline.targets.layout import (
    TargetRequest,
    cached_maps,
    encode_maps,
    expected_tensors,
    map_name,
    relation_name,
    requested_tensors,
    tail_name,
    topk_rows,
    unpack_triangle,
)


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
    with pytest.raises(ValueError, match="m=9"):
        topk_rows(maps, 9)


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
        assert specs[name][1] == tuple(tensor.shape)
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
    assert specs["alpha.L3.H2.uniform"] == ("F32", (5, 6)) and "alpha.L3.H2.global" not in str(specs)
    assert specs[tail_name("tail_mass", 2.0)] == ("F32", (5, 8)) and tail_name("tail_mass", 1.0) == "tail_mass"
    assert map_name(3, "selective", 2) == "attn.L3.H2.selective" and relation_name(1, 4, "v") == "rel.L1.R4.v"
    with pytest.raises(ValueError, match="map kind 'relations'"):
        map_name(1, "relations", 2)


def test_requested_tensors_are_a_subset_and_name_what_is_missing() -> None:
    fingerprint = _fingerprint()
    request = TargetRequest((("attn.L1.H3.shd", 2.0), ("rel.L3.R4.k", 1.0)), kd_temperature=2.0)
    names = set(requested_tensors(fingerprint, request, 4))
    assert names == {
        "sample_ids",
        "input_ids",
        "topk_values",
        "topk_indices",
        "tail_mass.tau2",
        "attn.L1.H3.shd.values",
        "attn.L1.H3.shd.indices",
        "attn.L1.H3.shd.tail.tau2",
        "rel.L3.R4.k.values",
        "rel.L3.R4.k.indices",
        "rel.L3.R4.k.tail",
    }
    with pytest.raises(KeyError, match=r"tail_mass\.tau3"):
        requested_tensors(fingerprint, TargetRequest((), kd_temperature=3.0), 4)
    with pytest.raises(KeyError, match=r"attn\.L1\.H3\.selective"):
        requested_tensors(fingerprint, TargetRequest((("attn.L1.H3.selective", 1.0),)), 4)
