"""The target-cache reader: global order and rank/worker partition, resume, contents, and refusal of bad caches."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from pipeline.map_losses import DenseTarget, SparseTarget
from pipeline.targets import reader
from pipeline.targets.layout import TargetRequest, map_name, read_header, shard_bytes, shard_file_name, unpack_triangle
from pipeline.targets.manifest import (
    FINGERPRINT_FIELDS,
    CacheError,
    read_manifest,
    sha256_bytes,
    write_manifest,
)
from pipeline.targets.reader import TargetStream, open_cache, verify_cache
from tests.cache_fixtures import SAMPLE_ID_OFFSET, write_synthetic_cache

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


def request(layers: list[int], heads: int) -> TargetRequest:
    """The shd targets of `layers` for `heads` student heads, at τ = 1."""
    return TargetRequest(tuple((map_name(layer, "shd", heads), 1.0) for layer in layers))


def make_stream(directory: Path, layers: tuple[int, ...] = (1, 3), heads: int = 2, **overrides: Any) -> TargetStream:
    options: dict[str, Any] = {"request": request(list(layers), heads), "batch_size": BATCH, **overrides}
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
    """Sample id → that sample's row of every tensor, read straight from the shard files."""
    rows = {}
    for index in range(NUM_SHARDS):
        tensors = load_file(directory / shard_file_name(index))
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
        values, indices, tail = batch["maps"]["attn.L3.H2.shd"]
        assert isinstance(batch["maps"]["attn.L3.H2.shd"], SparseTarget)
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
    batches = iter(make_stream(dense_cache))
    next(batches)
    batches.close()
    assert not [thread for thread in threading.enumerate() if thread.name == "target-stream-prefetch"]


class SpyHandle:
    """Wraps a safe_open handle and records which tensors were read, and how."""

    def __init__(self, handle: Any, sliced: set[str], loaded: set[str]) -> None:
        self.handle, self.sliced, self.loaded = handle, sliced, loaded

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
    real_safe_open = reader.safe_open

    def spy_safe_open(*args: Any, **kwargs: Any) -> SpyHandle:
        return SpyHandle(real_safe_open(*args, **kwargs), sliced, loaded)

    monkeypatch.setattr(reader, "safe_open", spy_safe_open)
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


def test_corrupt_byte_is_caught_by_verify_and_while_streaming(fresh_cache: Path) -> None:
    overwrite_tensor_bytes(fresh_cache / shard_file_name(3), "topk_values")
    overwrite_tensor_bytes(fresh_cache / shard_file_name(1), "attn.L1.H2.shd")
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: sha256"):
        verify_cache(fresh_cache)
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: sha256"):
        collect(make_stream(fresh_cache, shuffle=False, num_batches=13))
    with pytest.raises(CacheError, match=r"shard-00003\.safetensors: sha256"):
        collect(make_stream(fresh_cache, shuffle=False, start_position=24, num_batches=1, prefetch=False))
    assert len(collect(make_stream(fresh_cache, num_batches=13, verify_checksums=False))) == 13


def test_truncated_shard(fresh_cache: Path) -> None:
    path = fresh_cache / shard_file_name(4)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match=r"shard-00004\.safetensors: \d+ bytes, the manifest lists"):
        verify_cache(fresh_cache)
    with pytest.raises(CacheError, match=r"shard-00004\.safetensors: \d+ bytes"):
        collect(make_stream(fresh_cache, shuffle=False, num_batches=13))
    with pytest.raises(CacheError, match=r"shard-00004\.safetensors: unreadable shard"):
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


def changed(field: str, value: Any) -> Any:
    """A requirement that the cache's fingerprint value does not meet."""
    if field == "student_head_counts":
        return 5
    if field == "cached_layers":
        return [0, 1]
    if field == "attn_targets":
        return ["global"]
    if field == "temperatures":
        return {"distill.kd_temperature": 3.0}
    if isinstance(value, str):
        return value + "-other"
    return 7 if value is None else value + 1


@pytest.mark.parametrize("field", FINGERPRINT_FIELDS)
def test_fingerprint_mismatch_names_the_field(dense_cache: Path, field: str) -> None:
    found = open_cache(dense_cache).fingerprint
    with pytest.raises(CacheError, match=f"fingerprint field '{field}'"):
        open_cache(dense_cache, {field: changed(field, found[field])})
    with pytest.raises(CacheError, match=f"fingerprint field '{field}'"):
        make_stream(dense_cache, expected={"seq_len": SEQ_LEN, field: changed(field, found[field])})


def test_matching_expectations_and_uncached_requests(dense_cache: Path) -> None:
    found = open_cache(dense_cache).fingerprint
    expected = {**found, "student_head_counts": 3, "cached_layers": [3]}
    assert len(make_stream(dense_cache, heads=3, expected=expected, num_batches=1)) == 1
    with pytest.raises(CacheError, match=r"holds no tensor 'attn\.L1\.H4\.shd' .*student_head_counts \[2, 3\]"):
        make_stream(dense_cache, heads=4)
    with pytest.raises(CacheError, match=r"holds no tensor 'attn\.L2\.H2\.shd' .*cached_layers \[1, 3\]"):
        make_stream(dense_cache, layers=[1, 2])
    with pytest.raises(CacheError, match=r"holds no tensor 'tail_mass\.tau2' .*temperatures \[1\.0\]"):
        TargetStream(directory=dense_cache, request=TargetRequest((), kd_temperature=2.0), batch_size=BATCH)


def test_verify_checks_tensor_shapes_dtypes_and_sample_ids(fresh_cache: Path) -> None:
    assert verify_cache(fresh_cache).num_samples == NUM_SAMPLES
    original = load_file(fresh_cache / shard_file_name(2))
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
