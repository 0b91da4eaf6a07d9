"""The target-cache reader: global order and rank/worker partition, resume, contents, and refusal of bad caches."""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from pipeline.ops.map_losses import DenseTarget, SparseTarget
from pipeline.targets import store
from pipeline.targets.codecs import bits_for, pack_bits, unpack_bits
from pipeline.targets.encoding import unpack_triangle
from pipeline.targets.layout import read_header, shard_bytes, shard_file_name
from pipeline.targets.manifest import (
    FINGERPRINT_FIELDS,
    CacheError,
    read_manifest,
    sha256_bytes,
    write_manifest,
)
from pipeline.targets.needs import MapNeed, TargetNeeds
from pipeline.targets.store import open_cache, verify_cache
from pipeline.targets.stream import TargetStream
from tests.cache_fixtures import SAMPLE_ID_OFFSET, VOCAB_SIZE, squeeze_needs, unpacked, write_synthetic_cache

NUM_SAMPLES = 37
SHARD_SIZE = 8
NUM_SHARDS = 5
BATCH = 3
SEQ_LEN = 6
ALL_SAMPLE_IDS = [SAMPLE_ID_OFFSET + row for row in range(NUM_SAMPLES)]


@pytest.fixture(scope="module")
def dense_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """37 samples in 5 shards (the last one short), layers 1 and 3, head counts 2 and 3, fp16 packed triangles."""
    directory = tmp_path_factory.mktemp("dense")
    write_synthetic_cache(directory, NUM_SAMPLES, SHARD_SIZE, SEQ_LEN, encoding="dense", dtype="float16")
    return directory


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shape of cache with the `topk` attention encoding, in bf16."""
    directory = tmp_path_factory.mktemp("topk")
    write_synthetic_cache(directory, NUM_SAMPLES, SHARD_SIZE, SEQ_LEN, encoding="topk", dtype="bfloat16", seed=1)
    return directory


@pytest.fixture
def fresh_cache(tmp_path: Path) -> Path:
    """A private dense cache a test may damage."""
    write_synthetic_cache(tmp_path / "cache", NUM_SAMPLES, SHARD_SIZE, SEQ_LEN)
    return tmp_path / "cache"


def request(layers: list[int], heads: int) -> TargetNeeds:
    """The shd targets of `layers` for `heads` student heads, at τ = 1."""
    return squeeze_needs(layers, heads)


def make_stream(directory: Path, layers: tuple[int, ...] = (1, 3), heads: int = 2, **overrides: Any) -> TargetStream:
    options: dict[str, Any] = {"needs": request(list(layers), heads), "batch_size": BATCH, **overrides}
    return TargetStream(directory=directory, **options)


def collect(stream: TargetStream, num_workers: int = 0) -> list[dict[str, Any]]:
    if num_workers == 0:
        return list(stream)
    return list(DataLoader(stream, batch_size=None, num_workers=num_workers))


def collect_ranks(directory: Path, world_size: int, num_workers: int = 0, **overrides: Any) -> list[list[dict]]:
    """The batches of every rank of a `world_size`-rank job, rank by rank."""
    return [
        collect(make_stream(directory, rank=rank, world_size=world_size, **overrides), num_workers)
        for rank in range(world_size)
    ]


def interleave(per_rank: list[list[dict]]) -> tuple[list[int], list[int]]:
    """(positions, sample ids) in global order: micro-step by micro-step, rank by rank within a step."""
    positions: list[int] = []
    sample_ids: list[int] = []
    for step in range(max(len(batches) for batches in per_rank)):
        for batches in per_rank:
            if step < len(batches):
                positions += batches[step]["positions"].tolist()
                sample_ids += batches[step]["sample_ids"].tolist()
    return positions, sample_ids


def sample_sequence(directory: Path, length: int, **overrides: Any) -> list[int]:
    """Sample ids of global positions 0 .. length-1 from one single-rank stream."""
    options = {"batch_size": length, "num_batches": 1, **overrides}
    (batch,) = collect(make_stream(directory, **options))
    return batch["sample_ids"].tolist()


@pytest.fixture(scope="module")
def reference_sequence(dense_cache: Path) -> list[int]:
    """Sample ids of the first four epochs of an uninterrupted 2-rank job with micro-batch 5."""
    steps = -(-4 * NUM_SAMPLES // 10)
    positions, sample_ids = interleave(collect_ranks(dense_cache, 2, batch_size=5, num_batches=steps))
    assert positions == list(range(steps * 10))
    return sample_ids


# ---------------------------------------------------------------- order and partition


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_once_per_epoch_across_ranks_and_workers(dense_cache: Path, world_size: int) -> None:
    steps = -(-NUM_SAMPLES // (world_size * BATCH))
    for mode in ({"num_batches": steps}, {"one_pass": True}):
        by_workers = {}
        for num_workers in (0, 2):
            per_rank = collect_ranks(dense_cache, world_size, num_workers, **mode)
            positions, sample_ids = interleave(per_rank)
            if "one_pass" in mode:
                assert positions == list(range(NUM_SAMPLES))
                assert sorted(sample_ids) == ALL_SAMPLE_IDS
            else:
                assert positions == list(range(steps * world_size * BATCH))
                assert sorted(sample_ids[:NUM_SAMPLES]) == ALL_SAMPLE_IDS
            by_workers[num_workers] = [[batch["sample_ids"].tolist() for batch in batches] for batches in per_rank]
        assert by_workers[0] == by_workers[2]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_workers_keep_the_order_of_an_endless_stream(dense_cache: Path) -> None:
    stream = make_stream(dense_cache, rank=1, world_size=2, num_batches=9)
    single = [batch["positions"].tolist() for batch in collect(stream)]
    for num_workers in (2, 3):
        assert [batch["positions"].tolist() for batch in collect(stream, num_workers)] == single
    assert single[0] == [3, 4, 5] and single[1] == [9, 10, 11]


@pytest.mark.parametrize("start", [0, 5, 8, 13, 36, 37, 40, 75])
@pytest.mark.parametrize(("world_size", "batch_size"), [(1, 4), (2, 3), (3, 2)])
def test_resume_gives_the_remaining_sequence(
    dense_cache: Path, reference_sequence: list[int], start: int, world_size: int, batch_size: int
) -> None:
    steps = 7
    per_rank = collect_ranks(dense_cache, world_size, batch_size=batch_size, start_position=start, num_batches=steps)
    positions, sample_ids = interleave(per_rank)
    end = start + steps * world_size * batch_size
    assert positions == list(range(start, end))
    assert sample_ids == reference_sequence[start:end]


def test_resume_after_changing_world_size_and_batch_size(dense_cache: Path, reference_sequence: list[int]) -> None:
    _, before = interleave(collect_ranks(dense_cache, 2, batch_size=3, num_batches=5))
    consumed = 5 * 2 * 3
    _, after = interleave(collect_ranks(dense_cache, 3, batch_size=4, start_position=consumed, num_batches=6))
    assert before + after == reference_sequence[: consumed + 6 * 3 * 4]


def test_order_is_deterministic_from_seed_and_epoch(dense_cache: Path) -> None:
    two_epochs = sample_sequence(dense_cache, 2 * NUM_SAMPLES, seed=7)
    assert sample_sequence(dense_cache, 2 * NUM_SAMPLES, seed=7) == two_epochs
    assert sample_sequence(dense_cache, 2 * NUM_SAMPLES, seed=8) != two_epochs
    first, second = two_epochs[:NUM_SAMPLES], two_epochs[NUM_SAMPLES:]
    assert first != second
    assert sorted(first) == sorted(second) == ALL_SAMPLE_IDS
    # Shards are read one after the other: an epoch switches shard only NUM_SHARDS - 1 times.
    shards = [(sample_id - SAMPLE_ID_OFFSET) // SHARD_SIZE for sample_id in first]
    assert sum(a != b for a, b in itertools.pairwise(shards)) == NUM_SHARDS - 1
    assert sample_sequence(dense_cache, 2 * NUM_SAMPLES, shuffle=False) == ALL_SAMPLE_IDS * 2


def test_one_pass_ranks_stop_short_and_an_idle_rank_yields_nothing(dense_cache: Path) -> None:
    per_rank = collect_ranks(dense_cache, 3, batch_size=5, one_pass=True)
    assert [[len(batch["sample_ids"]) for batch in batches] for batches in per_rank] == [[5, 5, 5], [5, 5, 2], [5, 5]]
    assert [
        len(make_stream(dense_cache, rank=rank, world_size=3, batch_size=5, one_pass=True)) for rank in range(3)
    ] == [
        3,
        3,
        2,
    ]
    idle = make_stream(dense_cache, rank=13, world_size=14, one_pass=True)
    assert len(idle) == 0 and collect(idle) == [] and collect(idle, num_workers=2) == []


def test_length_and_samples_per_epoch(dense_cache: Path) -> None:
    stream = make_stream(dense_cache, num_batches=4)
    assert len(stream) == 4 and stream.samples_per_epoch == NUM_SAMPLES
    with pytest.raises(TypeError, match="endless"):
        len(make_stream(dense_cache))
    with pytest.raises(ValueError, match="rank=2"):
        make_stream(dense_cache, rank=2, world_size=2)


# ---------------------------------------------------------------- contents


def shard_rows(directory: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Sample id → that sample's row of every tensor, read straight from the shard files (packed indices
    unpacked by their spec: int64 of their logical shape)."""
    fingerprint = open_cache(directory).fingerprint
    rows = {}
    for index in range(NUM_SHARDS):
        tensors = unpacked(load_file(directory / shard_file_name(index)), fingerprint)
        for row, sample_id in enumerate(tensors["sample_ids"].tolist()):
            rows[sample_id] = {name: tensor[row] for name, tensor in tensors.items()}
    return rows


def test_dense_batches_hold_the_shard_contents(dense_cache: Path) -> None:
    expected = shard_rows(dense_cache)
    for batch in collect(make_stream(dense_cache, heads=3, batch_size=4, num_batches=11)):
        assert batch["input_ids"].dtype == batch["labels"].dtype == batch["topk_indices"].dtype == torch.int64
        assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
        assert (batch["labels"][:, -1] == -100).all()
        for slot, sample_id in enumerate(batch["sample_ids"].tolist()):
            stored = expected[sample_id]
            assert torch.equal(batch["input_ids"][slot], stored["input_ids"].long())
            assert torch.equal(batch["topk_values"][slot], stored["topk_values"].float())
            assert torch.equal(batch["topk_indices"][slot], stored["topk_indices"].long())
            assert torch.equal(batch["topk_tail"][slot], stored["tail_mass"])
            for layer in (1, 3):
                target = batch["maps"][f"attn.L{layer}.H3.shd"]
                assert isinstance(target, DenseTarget)
                assert torch.equal(target.packed[slot], stored[f"attn.L{layer}.H3.shd"].float())
        for layer in (1, 3):
            maps = unpack_triangle(batch["maps"][f"attn.L{layer}.H3.shd"].packed, SEQ_LEN)
            assert maps.shape == (4, 3, SEQ_LEN, SEQ_LEN) and maps.dtype == torch.float32
            torch.testing.assert_close(maps.sum(-1), torch.ones(4, 3, SEQ_LEN), atol=2e-3, rtol=0)
            assert (maps.triu(diagonal=1) == 0).all()


def test_topk_batches_hold_the_shard_contents(topk_cache: Path) -> None:
    expected = shard_rows(topk_cache)
    for batch in collect(make_stream(topk_cache, layers=[3], heads=2, batch_size=5, num_batches=8)):
        assert list(batch["maps"]) == ["attn.L3.H2.shd"]
        values, indices, tail, rows = batch["maps"]["attn.L3.H2.shd"]
        assert rows is None and isinstance(batch["maps"]["attn.L3.H2.shd"], SparseTarget)
        assert values.dtype == tail.dtype == torch.float32 and indices.dtype == torch.int64
        assert values.shape == indices.shape == (5, 2, SEQ_LEN, 3) and tail.shape == (5, 2, SEQ_LEN)
        torch.testing.assert_close(values.sum(-1) + tail, torch.ones(5, 2, SEQ_LEN), atol=2e-2, rtol=0)
        for slot, sample_id in enumerate(batch["sample_ids"].tolist()):
            stored = expected[sample_id]
            assert torch.equal(values[slot], stored["attn.L3.H2.shd.values"].float())
            assert torch.equal(indices[slot], stored["attn.L3.H2.shd.indices"].long())
            assert torch.equal(tail[slot], stored["attn.L3.H2.shd.tail"])
            assert torch.equal(batch["topk_values"][slot], stored["topk_values"].float())


def test_prefetch_does_not_change_the_batches_and_stops_its_thread(dense_cache: Path) -> None:
    with_thread = collect(make_stream(dense_cache, num_batches=6))
    without = collect(make_stream(dense_cache, num_batches=6, prefetch=False))
    name = "attn.L1.H2.shd"
    assert all(
        torch.equal(a["maps"][name].packed, b["maps"][name].packed) for a, b in zip(with_thread, without, strict=True)
    )
    before = set(threading.enumerate())  # another test's stream may still be collected; this stream's thread must go
    batches = iter(make_stream(dense_cache))
    next(batches)
    assert [
        thread for thread in threading.enumerate() if thread.name == "target-stream-prefetch" and thread not in before
    ]
    batches.close()
    assert not [
        thread for thread in threading.enumerate() if thread.name == "target-stream-prefetch" and thread not in before
    ]


class SpyHandle:
    """Wraps a safe_open handle and records which tensors were read, and how."""

    def __init__(self, handle: Any, sliced: set[str], loaded: set[str]) -> None:
        self.handle, self.sliced, self.loaded = handle, sliced, loaded

    def __enter__(self) -> SpyHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def keys(self) -> list[str]:
        return self.handle.keys()

    def get_slice(self, name: str) -> Any:
        self.sliced.add(name)
        return self.handle.get_slice(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        self.loaded.add(name)
        return self.handle.get_tensor(name)


def test_only_the_requested_tensors_are_read(
    dense_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sliced: set[str] = set()
    loaded: set[str] = set()
    real_safe_open = store.safe_open

    def spy_safe_open(*args: Any, **kwargs: Any) -> SpyHandle:
        return SpyHandle(real_safe_open(*args, **kwargs), sliced, loaded)

    monkeypatch.setattr(store, "safe_open", spy_safe_open)
    stream = make_stream(dense_cache, layers=[3], heads=2, num_batches=13)
    collect(stream)
    assert sliced == {"sample_ids", "input_ids", "topk_values", "topk_indices", "tail_mass", "attn.L3.H2.shd"}
    assert loaded == set()
    monkeypatch.undo()

    # Garbage in every H3 tensor changes nothing for a heads=2 reader that skips checksums.
    damaged = tmp_path / "damaged"
    shutil.copytree(dense_cache, damaged)
    for index in range(NUM_SHARDS):
        path = damaged / shard_file_name(index)
        for layer in (1, 3):
            overwrite_tensor_bytes(path, f"attn.L{layer}.H3.shd", b"\xff")
    clean = collect(make_stream(dense_cache, num_batches=13))
    unchecked = collect(make_stream(damaged, num_batches=13, verify_checksums=False))
    for a, b in zip(clean, unchecked, strict=True):
        for layer in (1, 3):
            name = f"attn.L{layer}.H2.shd"
            assert torch.equal(a["maps"][name].packed, b["maps"][name].packed)


# ---------------------------------------------------------------- bad caches


def overwrite_tensor_bytes(path: Path, name: str, fill: bytes | None = None) -> None:
    """Flip one byte in the middle of tensor `name`'s data, or overwrite all of its data with `fill`."""
    header, _ = read_header(str(path))
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin, end = (8 + header_len + offset for offset in header[name]["data_offsets"])
    if fill is None:
        data[(begin + end) // 2] ^= 0xFF
    else:
        data[begin:end] = fill * (end - begin)
    path.write_bytes(bytes(data))


def rewrite_shard(directory: Path, index: int, tensors: dict[str, torch.Tensor]) -> None:
    """Replace a shard with other tensors and list its new size and checksum, so only its contents are wrong."""
    data = shard_bytes(tensors, {"layout_version": 1})
    (directory / shard_file_name(index)).write_bytes(data)
    manifest = read_manifest(directory)
    manifest.shards[index] = dataclasses.replace(manifest.shards[index], bytes=len(data), sha256=sha256_bytes(data))
    write_manifest(directory, manifest)


def record_sample_id_ranges(directory: Path) -> None:
    """Give every manifest entry its shard's sample id range, as the cache writer records it (the synthetic caches
    are written without): `open_cache` then proves uniqueness from the manifest instead of reading the ids."""
    manifest = read_manifest(directory)
    for index, entry in enumerate(manifest.shards):
        ids = load_file(directory / entry.file)["sample_ids"]
        ranged = dataclasses.replace(entry, sample_id_min=int(ids.min()), sample_id_max=int(ids.max()))
        manifest.shards[index] = ranged
    write_manifest(directory, manifest)


def test_corrupt_byte_is_caught_by_verify_and_while_streaming(fresh_cache: Path) -> None:
    overwrite_tensor_bytes(fresh_cache / shard_file_name(3), "topk_values")
    overwrite_tensor_bytes(fresh_cache / shard_file_name(1), "attn.L1.H2.shd")
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: sha256"):
        verify_cache(fresh_cache)
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: sha256"):
        collect(make_stream(fresh_cache, shuffle=False, num_batches=13))
    with pytest.raises(CacheError, match=r"shard-00003\.safetensors: sha256"):
        collect(make_stream(fresh_cache, shuffle=False, start_position=24, num_batches=1, prefetch=False))
    # Without checksums the flipped byte still stops the stream: its attention row no longer sums to 1.
    unchecked = make_stream(fresh_cache, shuffle=False, num_batches=13, verify_checksums=False)
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: tensor 'attn\.L1\.H2\.shd' \(teacher layer 1\): "):
        collect(unchecked)
    other_token = fresh_cache.parent / "other-token"
    write_synthetic_cache(other_token, NUM_SAMPLES, SHARD_SIZE, SEQ_LEN)
    path = other_token / shard_file_name(1)
    header, _ = read_header(str(path))
    data = bytearray(path.read_bytes())
    first_token = 8 + int.from_bytes(data[:8], "little") + header["input_ids"]["data_offsets"][0]
    data[first_token] = (data[first_token] + 1) % VOCAB_SIZE  # another valid token: only the sha256 tells
    path.write_bytes(bytes(data))
    assert len(collect(make_stream(other_token, num_batches=13, verify_checksums=False))) == 13
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: sha256"):
        collect(make_stream(other_token, num_batches=13))


def test_truncated_shard(fresh_cache: Path) -> None:
    path = fresh_cache / shard_file_name(4)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match=r"shard-00004\.safetensors: \d+ bytes, the manifest lists"):
        verify_cache(fresh_cache)
    with pytest.raises(CacheError, match=r"shard-00004\.safetensors: \d+ bytes"):
        collect(make_stream(fresh_cache, shuffle=False, num_batches=13))
    # Without sample id ranges in the manifest, open_cache reads every shard's ids (after checking its size).
    with pytest.raises(CacheError, match=r"shard-00004\.safetensors: \d+ bytes"):
        collect(make_stream(fresh_cache, shuffle=False, num_batches=13, verify_checksums=False))


def test_missing_shard(fresh_cache: Path) -> None:
    stream = make_stream(fresh_cache, shuffle=False, num_batches=13)
    (fresh_cache / shard_file_name(2)).unlink()
    for action in (open_cache, verify_cache, make_stream):
        with pytest.raises(CacheError, match=r"shard-00002\.safetensors: shard file is missing"):
            action(fresh_cache)
    with pytest.raises(CacheError, match=r"shard-00002\.safetensors: shard file is missing"):
        collect(stream)


def test_incomplete_cache_and_gaps_are_refused(fresh_cache: Path) -> None:
    manifest = read_manifest(fresh_cache)
    write_manifest(fresh_cache, dataclasses.replace(manifest, complete=False))
    for action in (open_cache, verify_cache, make_stream):
        with pytest.raises(CacheError, match=r"manifest\.json: 'complete' is false: the cache run did not finish"):
            action(fresh_cache)
    write_manifest(fresh_cache, dataclasses.replace(manifest, shards=manifest.shards[:2] + manifest.shards[3:]))
    with pytest.raises(CacheError, match=r"shard-00003\.safetensors holds samples 24\.\.31, expected .* start at 16"):
        open_cache(fresh_cache)


NEEDED_FIELDS = ("student_head_counts", "cached_layers", "attn_targets", "temperatures", "top_k")
"""Fingerprint fields a run's needs are checked against (membership); every other field must equal the run's."""


def unmet(field: str, value: Any) -> tuple[dict[str, Any], TargetNeeds]:
    """(provenance, needs) of a run that the cache's fingerprint value of `field` does not serve."""
    needs = squeeze_needs([1, 3], 2)
    if field == "student_head_counts":
        return {}, squeeze_needs([1, 3], 5)
    if field == "cached_layers":
        return {}, squeeze_needs([0, 1], 2)
    if field == "attn_targets":
        return {}, TargetNeeds((MapNeed("global", 1, None),), 1.0, 4)
    if field == "temperatures":
        return {}, squeeze_needs([1, 3], 2, kd_temperature=3.0)
    if field == "top_k":
        return {}, squeeze_needs([1, 3], 2, top_k=value + 1)
    if isinstance(value, str):
        return {field: value + "-other"}, needs
    return {field: 7 if value is None else value + 1}, needs


@pytest.mark.parametrize("field", FINGERPRINT_FIELDS)
def test_fingerprint_mismatch_names_the_field(dense_cache: Path, field: str) -> None:
    found = open_cache(dense_cache).fingerprint
    provenance, needs = unmet(field, found[field])
    with pytest.raises(CacheError, match=f"fingerprint field '{field}'"):
        open_cache(dense_cache, provenance, needs)
    with pytest.raises(CacheError, match=f"fingerprint field '{field}'"):
        TargetStream(directory=dense_cache, needs=needs, provenance={"seq_len": SEQ_LEN, **provenance}, batch_size=1)


def test_matching_needs_and_uncached_requests(dense_cache: Path) -> None:
    found = open_cache(dense_cache).fingerprint
    provenance = {key: found[key] for key in ("teacher_weights_sha256", "data_fingerprint", "split", "seq_len")}
    assert len(make_stream(dense_cache, heads=3, layers=(3,), provenance=provenance, num_batches=1)) == 1
    with pytest.raises(CacheError, match=r"'student_head_counts' is \[2, 3\], but the student has 4 heads"):
        make_stream(dense_cache, heads=4)
    with pytest.raises(CacheError, match=r"'cached_layers' is \[1, 3\], but .* needs teacher layer 2"):
        make_stream(dense_cache, layers=[1, 2])
    with pytest.raises(CacheError, match=r"τ 2 is 2, but the cache holds tail sums only for τ in \[1\.0\]"):
        TargetStream(directory=dense_cache, needs=TargetNeeds((), 2.0, 4), batch_size=BATCH)


def test_verify_checks_tensor_shapes_dtypes_and_sample_ids(fresh_cache: Path) -> None:
    assert verify_cache(fresh_cache).num_samples == NUM_SAMPLES
    original = {name: tensor.clone() for name, tensor in load_file(fresh_cache / shard_file_name(2)).items()}
    bad_shards = {
        r"tensor 'tail_mass' is F16 \[8, 6\], the manifest's fingerprint needs F32 \[8, 6\]": {
            **original,
            "tail_mass": original["tail_mass"].half(),
        },
        r"tensor 'attn.L3.H2.shd' is F16 \[8, 2, 20\], .* needs F16 \[8, 2, 21\]": {
            **original,
            "attn.L3.H2.shd": original["attn.L3.H2.shd"][..., :-1].contiguous(),
        },
        "tensor 'alpha.L1.H3.shd' is missing": {name: t for name, t in original.items() if name != "alpha.L1.H3.shd"},
        "tensor 'attn.L2.H2.shd' is not part of": {**original, "attn.L2.H2.shd": original["attn.L3.H2.shd"].clone()},
        "sample id 1016 is already held": {**original, "sample_ids": original["sample_ids"][[0, 0, 2, 3, 4, 5, 6, 7]]},
        "sample id 1008 is already held": {**original, "sample_ids": original["sample_ids"] - SHARD_SIZE},
    }
    for message, tensors in bad_shards.items():
        rewrite_shard(fresh_cache, 2, tensors)
        with pytest.raises(CacheError, match=rf"shard-00002\.safetensors: {message}"):
            verify_cache(fresh_cache)
    rewrite_shard(fresh_cache, 2, {**original, "attn.L3.H2.shd": original["attn.L3.H2.shd"][..., :-1].contiguous()})
    with pytest.raises(CacheError, match=r"shard-00002\.safetensors: tensor 'attn.L3.H2.shd' is F16 \[8, 2, 20\]"):
        collect(make_stream(fresh_cache, shuffle=False, num_batches=13))


# ---------------------------------------------------------------- bad values, ids and paths behind matching checksums


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()
    }


def _damaged(original: dict[str, torch.Tensor], name: str, change: Any) -> dict[str, torch.Tensor]:
    tensor = original[name].clone()
    change(tensor)
    return {**original, name: tensor}


def _set(index: tuple, value: float) -> Any:
    def change(tensor: torch.Tensor) -> None:
        tensor[index] = value

    return change


def _set_packed(index: tuple, value: int, limit: int, shape: tuple[int, ...]) -> Any:
    """Set one integer of a packed tensor (values below `limit`, `shape` per sample) and pack it again."""

    def change(tensor: torch.Tensor) -> None:
        count = torch.Size(shape).numel()
        values = unpack_bits(tensor, bits_for(limit), count).reshape(len(tensor), *shape)
        values[index] = value
        tensor.copy_(pack_bits(values.flatten(1), bits_for(limit)))

    return change


def _halve_row(tensor: torch.Tensor) -> None:
    tensor[0, 0, 3:6] *= 0.5  # query row 2 of head 0: triangle entries 3, 4, 5


def _move_mass_negative(tensor: torch.Tensor) -> None:
    tensor[1, 0, 1] = -0.25  # query row 1 still sums to 1
    tensor[1, 0, 2] += 0.25


def _log_probs_as_probs(tensor: torch.Tensor) -> None:
    tensor.copy_(tensor.float().exp())


DENSE_DAMAGE = {
    "nan in an attention target": (
        "attn.L3.H2.shd",
        _set((5, 1, 7), float("nan")),
        r"tensor 'attn\.L3\.H2\.shd' \(teacher layer 3\): nan at sample id 1021 \(shard row 5\), head 1, query row 3, "
        r"key 1; expected a finite value",
    ),
    "inf in the logits": (
        "topk_values",
        _set((3, 2, 0), float("-inf")),
        r"tensor 'topk_values': -inf at sample id 1019 \(shard row 3\), position 2, entry 0; expected a finite value",
    ),
    "nan in the tail mass": (
        "tail_mass",
        _set((2, 4), float("nan")),
        r"tensor 'tail_mass': nan at sample id 1018 \(shard row 2\), position 4; expected a finite value",
    ),
    "an attention row not summing to 1": (
        "attn.L1.H3.shd",
        _halve_row,
        r"tensor 'attn\.L1\.H3\.shd' \(teacher layer 1\): the entries of a causal row sum to 0\.49\d* at sample id "
        r"1016 \(shard row 0\), head 0, query row 2; expected 1 ± 0\.0011 \(a probability distribution\)",
    ),
    "a negative probability": (
        "attn.L1.H2.shd",
        _move_mass_negative,
        r"tensor 'attn\.L1\.H2\.shd' \(teacher layer 1\): -0\.25 at sample id 1017 \(shard row 1\), head 0, query row "
        r"1, key 0; expected a value ≥ 0",
    ),
    "log-probabilities stored as probabilities": (
        "topk_values",
        _log_probs_as_probs,
        r"tensor 'topk_values': the top-k probabilities and the tail mass sum to [\d.]+ at sample id 1016 \(shard "
        r"row 0\), position 0; expected 1 ± ",
    ),
    "a token outside the vocabulary": (
        "input_ids",
        _set((4, 1), VOCAB_SIZE),
        rf"tensor 'input_ids': token id {VOCAB_SIZE} at sample id 1020 \(shard row 4\), position 1; expected "
        rf"0 ≤ token id < {VOCAB_SIZE}",
    ),
}


@pytest.mark.parametrize("case", list(DENSE_DAMAGE))
def test_bad_values_behind_a_matching_checksum_are_refused_naming_tensor_and_sample(
    fresh_cache: Path, case: str
) -> None:
    """The shard is rewritten and the manifest lists its new checksum: only the values are wrong. The stream refuses
    it on first use (with and without checksums), `verify` too, and neither changes a byte."""
    name, change, message = DENSE_DAMAGE[case]
    original = {key: tensor.clone() for key, tensor in load_file(fresh_cache / shard_file_name(2)).items()}
    rewrite_shard(fresh_cache, 2, _damaged(original, name, change))
    before = snapshot(fresh_cache)
    pattern = rf"shard-00002\.safetensors: {message}"
    with pytest.raises(CacheError, match=pattern):
        verify_cache(fresh_cache)
    heads = 3 if ".H3." in name else 2
    for verify_checksums in (True, False):
        with pytest.raises(CacheError, match=pattern):
            collect(make_stream(fresh_cache, heads=heads, num_batches=13, verify_checksums=verify_checksums))
    assert snapshot(fresh_cache) == before


def test_the_value_check_covers_only_what_a_run_reads_and_runs_once_per_shard(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = {key: tensor.clone() for key, tensor in load_file(fresh_cache / shard_file_name(2)).items()}
    rewrite_shard(fresh_cache, 2, _damaged(original, "attn.L1.H3.shd", _set((0, 0, 0), float("nan"))))
    assert len(collect(make_stream(fresh_cache, heads=2, num_batches=13))) == 13  # heads=2 never reads H3 maps
    calls: list[str] = []
    real = store.checks.tensor_problem

    def counting(name: str, *args: Any, **kwargs: Any) -> str | None:
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(store.checks, "tensor_problem", counting)
    store._checked_targets.clear()
    collect(make_stream(fresh_cache, heads=2, num_batches=26, prefetch=False))  # two epochs
    read = ["input_ids", "topk_values", "topk_indices", "tail_mass", "attn.L1.H2.shd", "attn.L3.H2.shd"]
    assert sorted(calls) == sorted(read * NUM_SHARDS)  # each tensor of each shard checked once, not per epoch


TOPK_DAMAGE = {
    "nan in top-m values": (
        "attn.L1.H3.shd.values",
        _set((6, 2, 5, 1), float("nan")),
        r"tensor 'attn\.L1\.H3\.shd\.values' \(teacher layer 1\): nan at sample id 1022 \(shard row 6\), head 2, "
        r"stored row 5, entry 1; expected a finite value",
    ),
    "a tail that does not complete the row": (
        "attn.L3.H2.shd.tail",
        _set((3, 1, 4), 0.5),
        r"tensor 'attn\.L3\.H2\.shd\.values' \(teacher layer 3\): the top-m values and the tail of a row sum to "
        r"1\.[\d]+ at sample id 1019 \(shard row 3\), head 1, stored row 4; expected 1 ± 0\.0079",
    ),
    "a key index beyond the sequence": (
        "attn.L3.H2.shd.indices",
        _set_packed((7, 0, 5, 2), SEQ_LEN, SEQ_LEN, (2, SEQ_LEN, 3)),
        rf"tensor 'attn\.L3\.H2\.shd\.indices' \(teacher layer 3\): key index {SEQ_LEN} at sample id 1023 \(shard "
        rf"row 7\), head 0, stored row 5, entry 2; expected 0 ≤ key index < {SEQ_LEN}",
    ),
}


@pytest.mark.parametrize("case", list(TOPK_DAMAGE))
def test_bad_topk_targets_are_refused(topk_cache: Path, tmp_path: Path, case: str) -> None:
    directory = tmp_path / "topk"
    shutil.copytree(topk_cache, directory)
    name, change, message = TOPK_DAMAGE[case]
    original = {key: tensor.clone() for key, tensor in load_file(directory / shard_file_name(2)).items()}
    rewrite_shard(directory, 2, _damaged(original, name, change))
    before = snapshot(directory)
    heads = 3 if ".H3." in name else 2
    for action in (
        lambda: verify_cache(directory),
        lambda: collect(make_stream(directory, heads=heads, num_batches=13)),
    ):
        with pytest.raises(CacheError, match=rf"shard-00002\.safetensors: {message}"):
            action()
    assert snapshot(directory) == before


@pytest.fixture(scope="module")
def compact_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The topk cache's shape at half the query rows, with 8-bit attention values and logits."""
    directory = tmp_path_factory.mktemp("compact")
    write_synthetic_cache(
        directory,
        NUM_SAMPLES,
        SHARD_SIZE,
        SEQ_LEN,
        encoding="topk",
        seed=2,
        row_fraction=0.5,
        attn_value_bits=8,
        logit_value_bits=8,
    )
    return directory


def _shift(index: tuple, amount: float) -> Any:
    def change(tensor: torch.Tensor) -> None:
        tensor[index] += amount

    return change


COMPACT_DAMAGE = {
    "a stored row the sample id does not draw": (
        "attn_rows",
        _set_packed((4, 0), 5, SEQ_LEN, (3,)),
        r"tensor 'attn_rows': query row 5 at sample id 1020 \(shard row 4\), stored row 0; expected row [01] "
        r"\(the rows",
    ),
    "codes in a row whose step is 0": (
        "attn.L3.H2.shd.step",
        _set((5, 1, 2), 0.0),
        r"tensor 'attn\.L3\.H2\.shd\.codes' \(teacher layer 3\): code \d+ in a row whose step is 0 at sample id 1021 "
        r"\(shard row 5\), head 1, stored row 2, entry \d; expected code 0 or 255",
    ),
    "a logit offset off by one nat": (
        "topk_offset",
        _shift((2, 4), 1.0),
        r"tensor 'topk_codes': the top-k probabilities and the tail mass sum to [\d.]+ at sample id 1018 \(shard row "
        r"2\), position 4; expected 1 ± ",
    ),
    "a token id beyond the vocabulary": (
        "topk_indices",
        _set_packed((1, 2, 0), VOCAB_SIZE + 5, VOCAB_SIZE, (SEQ_LEN, 4)),
        rf"tensor 'topk_indices': token id {VOCAB_SIZE + 5} at sample id 1017 \(shard row 1\), position 2, entry 0; "
        rf"expected 0 ≤ token id < {VOCAB_SIZE}",
    ),
}


def test_a_compact_cache_reads_its_stored_rows_and_decodes_its_codes(compact_cache: Path) -> None:
    expected = shard_rows(compact_cache)
    for batch in collect(make_stream(compact_cache, layers=[3], heads=2, batch_size=5, num_batches=8)):
        target = batch["maps"]["attn.L3.H2.shd"]
        assert target.values.shape == (5, 2, 3, 3) and torch.equal(target.rows, batch["attn_rows"])
        torch.testing.assert_close(target.values.sum(-1) + target.tail, torch.ones(5, 2, 3), atol=0.05, rtol=0)
        for slot, sample_id in enumerate(batch["sample_ids"].tolist()):
            assert torch.equal(batch["attn_rows"][slot], expected[sample_id]["attn_rows"])
            assert torch.equal(target.indices[slot], expected[sample_id]["attn.L3.H2.shd.indices"])


@pytest.mark.parametrize("case", list(COMPACT_DAMAGE))
def test_bad_compact_targets_are_refused(compact_cache: Path, tmp_path: Path, case: str) -> None:
    """`cache verify` and the reader check the packed and coded tensors: rows, decodable codes, sums, ranges."""
    directory = tmp_path / "compact"
    shutil.copytree(compact_cache, directory)
    name, change, message = COMPACT_DAMAGE[case]
    original = {key: tensor.clone() for key, tensor in load_file(directory / shard_file_name(2)).items()}
    rewrite_shard(directory, 2, _damaged(original, name, change))
    before = snapshot(directory)
    for action in (
        lambda: verify_cache(directory),
        lambda: collect(make_stream(directory, layers=[3], heads=2, num_batches=13)),
    ):
        with pytest.raises(CacheError, match=rf"shard-00002\.safetensors: {message}"):
            action()
    assert snapshot(directory) == before


def test_sample_id_uniqueness_from_the_manifests_ranges(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the writer's per-shard id ranges, `open_cache` proves uniqueness without opening a shard; a shard whose
    ids leave its range is refused on first use; overlapping ranges make `open_cache` read and compare those ids."""
    opened: list[str] = []
    real_safe_open = store.safe_open

    def counting_safe_open(path: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path).name)
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(store, "safe_open", counting_safe_open)
    open_cache(fresh_cache)
    assert sorted(opened) == [shard_file_name(index) for index in range(NUM_SHARDS)]  # no ranges: every shard's ids
    record_sample_id_ranges(fresh_cache)
    opened.clear()
    open_cache(fresh_cache)
    assert opened == []
    monkeypatch.undo()

    original = {key: tensor.clone() for key, tensor in load_file(fresh_cache / shard_file_name(2)).items()}
    rewrite_shard(fresh_cache, 2, {**original, "sample_ids": original["sample_ids"] - SHARD_SIZE})
    before = snapshot(fresh_cache)
    open_cache(fresh_cache)  # the manifest's ranges are still disjoint ...
    outside = r"shard-00002\.safetensors: tensor 'sample_ids': sample id 1008 \(shard row 0\) is outside the shard's "
    with pytest.raises(CacheError, match=outside + r"range in the manifest; expected an id in \[1016, 1023\]"):
        collect(make_stream(fresh_cache, num_batches=13))  # ... but the shard's ids are not in its range
    assert snapshot(fresh_cache) == before

    manifest = read_manifest(fresh_cache)
    manifest.shards[2] = dataclasses.replace(manifest.shards[2], sample_id_min=1008, sample_id_max=1015)
    write_manifest(fresh_cache, manifest)
    twice = r"shard-00002\.safetensors: sample id 1008 is already held by shard 'shard-00001\.safetensors', so it "
    with pytest.raises(CacheError, match=twice + "would be trained on twice per epoch"):
        open_cache(fresh_cache)
    manifest.shards[2] = dataclasses.replace(manifest.shards[2], sample_id_min=1016, sample_id_max=1018)
    write_manifest(fresh_cache, manifest)
    small = r"shard 'shard-00002\.safetensors' holds 8 samples but its sample id range \[1016, 1018\] has room for "
    with pytest.raises(CacheError, match=small + "fewer distinct ids"):
        open_cache(fresh_cache)


def _list_as(directory: Path, index: int, file: str) -> None:
    manifest = read_manifest(directory)
    manifest.shards[index] = dataclasses.replace(manifest.shards[index], file=file)
    write_manifest(directory, manifest)


def test_shard_paths_stay_inside_the_cache_and_are_listed_once(fresh_cache: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(fresh_cache / shard_file_name(1), outside / shard_file_name(1))
    cases = {
        str(outside / shard_file_name(1)): r"shard path '/.*' is not a file name inside the cache directory",
        f"../outside/{shard_file_name(1)}": r"shard path '\.\./outside/.*' is not a file name inside",
        "escape.safetensors": r"shard 'escape\.safetensors' resolves to .*outside/shard-00001\.safetensors, outside "
        r"the cache directory .* \(a link out of the cache\)",
        shard_file_name(0): r"shard 'shard-00000\.safetensors' is listed twice \(also as 'shard-00000\.safetensors'\)",
        "hard-link.safetensors": r"shard 'hard-link\.safetensors' is listed twice \(also as 'shard-00000\.safetensors'",
    }
    (fresh_cache / "escape.safetensors").symlink_to(outside / shard_file_name(1))
    os.link(fresh_cache / shard_file_name(0), fresh_cache / "hard-link.safetensors")
    for file, message in cases.items():
        _list_as(fresh_cache, 1, file)
        before = snapshot(fresh_cache)
        for action in (open_cache, verify_cache, make_stream):
            with pytest.raises(CacheError, match=rf"manifest\.json: {message}"):
                action(fresh_cache)
        assert snapshot(fresh_cache) == before


def test_verify_names_files_the_manifest_does_not_list(fresh_cache: Path) -> None:
    (fresh_cache / "notes.txt").write_text("mine")
    (fresh_cache / ".shard-00009.safetensors.tmp-123").write_bytes(b"partial")
    (fresh_cache / "old").mkdir()
    before = snapshot(fresh_cache)
    listed = r"3 file\(s\) the manifest does not list: \.shard-00009\.safetensors\.tmp-123, notes\.txt, old; "
    with pytest.raises(CacheError, match=listed + r"expected only manifest\.json and its shards"):
        verify_cache(fresh_cache)
    assert len(collect(make_stream(fresh_cache, num_batches=13))) == 13  # readers ignore them
    assert snapshot(fresh_cache) == before
