"""Run the teacher once and write its squeezed attention targets and sparse logits as shards.

Each rank owns the shards whose index ≡ rank (mod world size) and computes every shard with the same batches, so
the bytes of a shard do not depend on how many ranks wrote the cache. A shard appears under its final name only by
an atomic rename once complete; a re-run keeps every shard that is already there and still carries this cache's
fingerprint, so a job killed at any moment resumes to the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from pipeline.infra import dist
from pipeline.infra.atomic import atomic_write_bytes, recover_directory, replacement_directory, swap_directory
from pipeline.targets import checks, kinds
from pipeline.targets.compute import compute_targets
from pipeline.targets.fingerprint import fingerprint_digest
from pipeline.targets.kinds.base import TargetSettings
from pipeline.targets.layout import (
    LAYOUT_VERSION,
    STORED_DTYPES,
    declared_file_size,
    expected_tensors,
    read_header,
    shard_bytes,
    shard_file_name,
)
from pipeline.targets.logits import response_masks
from pipeline.targets.manifest import (
    MANIFEST_NAME,
    CacheError,
    Manifest,
    ShardEntry,
    read_manifest,
    sha256_bytes,
    sha256_file,
    write_manifest,
)

logger = logging.getLogger(__name__)

ALPHA_HISTOGRAM_BINS = 20


class SampleRows(Protocol):
    """Packed samples addressable by row range (a torch-formatted `datasets.Dataset` is one)."""

    def __len__(self) -> int: ...

    def __getitem__(self, rows: slice) -> dict[str, Any]: ...


def _shard_metadata(
    settings: TargetSettings, fingerprint: dict[str, Any], first_sample: int, num_samples: int
) -> dict[str, Any]:
    return {
        "layout_version": LAYOUT_VERSION,
        "dtype": str(settings.dtype).removeprefix("torch."),
        "seq_len": fingerprint["seq_len"],
        "head_counts": json.dumps(list(settings.head_counts)),
        "cached_layers": json.dumps(list(settings.layers)),
        "attn_targets": json.dumps(list(settings.kinds)),
        "encoding": settings.encoding,
        "attn_top_m": settings.attn_top_m,
        "top_k": settings.top_k,
        "temperatures": json.dumps(list(settings.temperatures)),
        "first_sample": first_sample,
        "num_samples": num_samples,
        "fingerprint_sha256": fingerprint_digest(fingerprint),
    }


def _existing_shard(path: Path, fingerprint: dict[str, Any], first_sample: int, num_samples: int) -> bool:
    """A shard left by an earlier run is kept when it is whole and was written for this very cache."""
    if not path.is_file():
        return False
    try:
        _, metadata = read_header(str(path))
        whole = path.stat().st_size == declared_file_size(str(path))
    except (ValueError, OSError, KeyError):
        return False
    return (
        whole
        and metadata.get("fingerprint_sha256") == fingerprint_digest(fingerprint)
        and metadata.get("first_sample") == str(first_sample)
        and metadata.get("num_samples") == str(num_samples)
    )


def _check_schema(tensors: dict[str, torch.Tensor], fingerprint: dict[str, Any], path: Path) -> None:
    """The writer produces exactly the tensors, dtypes and shapes the shared schema (`layout.expected_tensors`)
    names for this fingerprint: what the reader and `cache verify` will require."""
    specs = expected_tensors(fingerprint, len(tensors["sample_ids"]))
    if set(tensors) != set(specs):
        raise CacheError(
            f"{path}: the writer produced tensors {sorted(set(tensors) ^ set(specs))} that differ from the layout "
            "schema (a bug: the writer and layout.expected_tensors disagree)"
        )
    for name, spec in specs.items():
        found = (STORED_DTYPES.get(tensors[name].dtype, str(tensors[name].dtype)), tuple(tensors[name].shape))
        if found != (spec.dtype, spec.shape):
            wanted = (spec.dtype, spec.shape)
            raise CacheError(f"{path}: tensor '{name}' is {found}, the layout schema needs {wanted} (a bug)")


def _remove_stale_temporaries(directory: Path, file_name: str) -> None:
    for stale in directory.glob(f".{file_name}.tmp-*"):
        stale.unlink(missing_ok=True)


def _remove_temporaries(directory: Path) -> None:
    """Temporaries a killed run left (a finished cache holds only its manifest and shards)."""
    for stale in directory.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def _check_values(tensors: dict[str, torch.Tensor], fingerprint: dict[str, Any], path: Path) -> None:
    """Refuse to write targets the reader would refuse to train on: a non-finite value (a teacher that overflowed),
    a map row or logit distribution not summing to 1, an index out of range (`checks`)."""
    problem = checks.shard_problem(tensors, fingerprint)
    if problem is not None:
        raise CacheError(
            f"{path}: not written — {problem}. The teacher's targets for these samples cannot be trained on: check "
            "teacher.dtype (float16 overflows where bf16 or fp32 do not) and the teacher's weights; shards already "
            "written are kept and a re-run resumes after them"
        )


def _alpha_statistics(directory: Path, shards: list[ShardEntry], settings: TargetSettings) -> dict[str, dict]:
    """Summary of the squeeze weights per cached layer, head count and squeeze (the distribution the paper plots).

    Two passes over the shards, each opened once, reading only the α tensors [N, H_t] and keeping fp64 sums: memory
    does not grow with the sample count, and no shard stays mapped after its `with` (a tensor `safe_open` returns
    shares the file's memory map, so keeping one would keep the shard's pages resident).
    """
    keys = {
        extra.statistics_key: extra.name
        for layer in settings.layers
        for kind in map(kinds.get, settings.kinds)
        for variant in kind.variants(settings)
        for extra in kind.extras(layer, variant, 0)
        if extra.role == "alpha"
    }
    if not keys:
        return {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(keys, 0)
    lows: dict[str, float] = dict.fromkeys(keys, float("inf"))
    highs: dict[str, float] = dict.fromkeys(keys, float("-inf"))
    histograms = {key: torch.zeros(ALPHA_HISTOGRAM_BINS, dtype=torch.float64) for key in keys}
    for entry in shards:
        with safe_open(directory / entry.file, framework="pt") as shard:
            for key, name in keys.items():
                values = shard.get_tensor(name).double()
                sums[key] = sums.get(key, torch.zeros(values.shape[1], dtype=torch.float64)) + values.sum(0)
                counts[key] += len(values)
                lows[key] = min(lows[key], values.min().item())
                highs[key] = max(highs[key], values.max().item())
                histograms[key] += torch.histc(values.flatten(), bins=ALPHA_HISTOGRAM_BINS, min=0.0, max=1.0)
    means = {key: sums[key].sum().item() / (counts[key] * len(sums[key])) for key in keys}
    squares = dict.fromkeys(keys, 0.0)
    for entry in shards:
        with safe_open(directory / entry.file, framework="pt") as shard:
            for key, name in keys.items():
                squares[key] += (shard.get_tensor(name).double() - means[key]).square().sum().item()
    return {
        key: {
            "mean": round(means[key], 6),
            "std": round((squares[key] / (counts[key] * len(sums[key]))) ** 0.5, 6),
            "min": round(lows[key], 6),
            "max": round(highs[key], 6),
            "per_teacher_head_mean": [round(v, 6) for v in (sums[key] / counts[key]).tolist()],
            "histogram_bins": ALPHA_HISTOGRAM_BINS,
            "histogram": [int(v) for v in histograms[key].tolist()],
        }
        for key in keys
    }


def _settings_difference(
    manifest: Manifest, fingerprint: dict[str, Any], num_samples: int, shard_size: int
) -> tuple[str, Any, Any] | None:
    """The first field in which a cache differs from what the config asks for: (field, found, wanted), or None."""
    for key, value in fingerprint.items():
        if manifest.fingerprint.get(key) != value:
            return f"fingerprint field '{key}'", manifest.fingerprint.get(key), value
    if manifest.num_samples != num_samples:
        return "num_samples (cache.max_samples)", manifest.num_samples, num_samples
    if manifest.shard_size != shard_size:
        return "shard_size (cache.shard_size)", manifest.shard_size, shard_size
    return None


def _is_complete_cache(directory: Path) -> bool:
    try:
        return read_manifest(directory).complete
    except CacheError:
        return False


def _up_to_date(directory: Path, fingerprint: dict[str, Any], num_samples: int, shard_size: int) -> bool:
    try:
        manifest = read_manifest(directory)
    except CacheError:
        return False
    return (
        manifest.complete
        and _settings_difference(manifest, fingerprint, num_samples, shard_size) is None
        and all(
            (directory / e.file).is_file() and (directory / e.file).stat().st_size == e.bytes for e in manifest.shards
        )
    )


def _is_own_file(name: str) -> bool:
    """Files a cache run creates: shards, their temporaries, the manifest and its temporary."""
    return bool(re.fullmatch(r"shard-\d+\.safetensors|\.(shard-\d+\.safetensors|manifest\.json)\.tmp-\d+", name))


def _write_target(
    directory: Path, fingerprint: dict[str, Any], num_samples: int, shard_size: int, overwrite: bool
) -> Path:
    """The directory this run writes: `directory` itself for a new cache or one to resume (same inputs and sizes),
    its staging directory when `overwrite` replaces a cache of other inputs or sizes; anything else is refused,
    naming the first differing field.

    A directory without a manifest that holds files a cache run does not create is never written into, with or
    without `overwrite`: it is not a cache.
    """
    manifest_path = directory / MANIFEST_NAME
    staging = replacement_directory(directory)
    if not manifest_path.exists():
        if directory.exists() and not directory.is_dir():
            raise CacheError(f"{directory}: is a file, not a cache directory; choose another cache.output_dir")
        foreign = (
            sorted(path.name for path in directory.iterdir() if not _is_own_file(path.name))
            if directory.is_dir()
            else []
        )
        if foreign:
            raise CacheError(
                f"{directory}: holds {', '.join(foreign[:5])} and no {MANIFEST_NAME}: it is no cache, so it is never "
                "written into; choose another cache.output_dir or empty it"
            )
        return directory
    try:
        difference = _settings_difference(read_manifest(directory), fingerprint, num_samples, shard_size)
    except CacheError as error:
        if overwrite:
            return staging
        raise CacheError(f"{error}; or pass --overwrite to replace it") from None
    if difference is None:
        return directory
    if overwrite:
        logger.warning("--overwrite: the cache in %s is rebuilt in %s, then swapped in", directory, staging)
        return staging
    field, found, wanted = difference
    waiting = f"; an unfinished replacement waits in {staging}" if staging.exists() else ""
    raise CacheError(
        f"{manifest_path}: this directory holds a cache with {field} = {found!r}, the config asks for {wanted!r}; "
        f"pass --overwrite to replace it (`distill cache CONFIG --overwrite`{waiting}), or choose another "
        "cache.output_dir"
    )


def _prepare_target(target: Path, manifest: Manifest) -> None:
    """Rank 0: make `target` ready for this run's shards and write its incomplete manifest once. A staging directory
    that holds a replacement with other settings (an abandoned `--overwrite`) is this pipeline's own scratch space
    and is emptied first."""
    if target.name.endswith(".overwrite") and (target / MANIFEST_NAME).exists():
        try:
            stale = _settings_difference(
                read_manifest(target), manifest.fingerprint, manifest.num_samples, manifest.shard_size
            )
        except CacheError:
            stale = (MANIFEST_NAME, None, None)
        if stale is not None:
            shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    if not (target / MANIFEST_NAME).exists():
        write_manifest(target, manifest)


def _shard_entry(name: str, first: int, count: int, data_bytes: int, digest: str, ids: torch.Tensor) -> ShardEntry:
    return ShardEntry(name, first, count, data_bytes, digest, int(ids.min()), int(ids.max()))


def _kept_sample_ids(path: Path) -> torch.Tensor:
    with safe_open(path, framework="pt") as shard:
        return shard.get_tensor("sample_ids").clone()


def write_cache_split(
    teacher: nn.Module,
    rows: SampleRows,
    directory: Path,
    settings: TargetSettings,
    fingerprint: dict[str, Any],
    *,
    shard_size: int,
    batch_size: int,
    records: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Cache one split into `directory`; call on every rank. Returns the final manifest (on every rank).

    `records` (what the kinds chose once per cache, `TargetKind.prepare`, e.g. `head_importance`) are recorded in
    the manifest beside `settings.selected_heads`. A cache
    of the same inputs and sizes is resumed (or left alone when complete); one of other inputs, `num_samples` or
    `shard_size` is refused naming the field, or with `overwrite` rebuilt beside it and swapped in once complete
    (`_write_target`, `infra.atomic.swap_directory`). Every shard's values are checked
    (`checks.shard_problem`) before it is written.

    `rows[a:b]` must give `{"input_ids": LongTensor [b-a, T], "sample_id": LongTensor [b-a]}` (and chat data's
    `"response_mask"` [b-a, T]), e.g. a prepared `datasets.Dataset` in torch format (memory-mapped, so a split larger
    than memory is fine).
    """
    num_samples = len(rows)
    manifest = Manifest(
        fingerprint=fingerprint,
        num_samples=num_samples,
        shard_size=shard_size,
        selected_heads=dict(settings.selected_heads or {}),
        head_importance=dict((records or {}).get("head_importance", {})),
    )
    if dist.is_main():
        recover_directory(directory, _is_complete_cache)
    dist.barrier()
    if _up_to_date(directory, fingerprint, num_samples, shard_size):
        logger.info(
            "%s: cache up to date (%d shards); `distill cache verify` re-checks checksums",
            directory,
            manifest.num_shards,
        )
        if dist.is_main():
            _remove_temporaries(directory)
        return read_manifest(directory)
    target = _write_target(directory, fingerprint, num_samples, shard_size, overwrite)
    dist.barrier()
    if dist.is_main():
        _prepare_target(target, manifest)
    dist.barrier()

    rank, world = dist.rank(), dist.world_size()
    owned = [index for index in range(manifest.num_shards) if index % world == rank]
    seq_len = fingerprint["seq_len"]
    entries: list[ShardEntry] = []
    started, computed_tokens = time.perf_counter(), 0
    with tqdm(
        total=sum(min(shard_size, num_samples - i * shard_size) for i in owned) * seq_len,
        unit="tok",
        unit_scale=True,
        desc=f"cache {fingerprint['split']} (rank {rank})",
        disable=None,
    ) as progress:
        for index in owned:
            first = index * shard_size
            count = min(shard_size, num_samples - first)
            name = shard_file_name(index)
            path = target / name
            if _existing_shard(path, fingerprint, first, count):
                logger.info("%s: kept from an earlier run", path)
                size, digest = path.stat().st_size, sha256_file(path)
                entries.append(_shard_entry(name, first, count, size, digest, _kept_sample_ids(path)))
                progress.update(count * seq_len)
                continue
            _remove_stale_temporaries(target, name)
            shard_rows = rows[first : first + count]
            shard_input_ids = torch.as_tensor(shard_rows["input_ids"], dtype=torch.long)
            batches: list[dict[str, torch.Tensor]] = []
            shard_sample_ids = torch.as_tensor(shard_rows["sample_id"], dtype=torch.int64)
            responses = response_masks(shard_rows, fingerprint, directory)
            for start in range(0, count, batch_size):
                end = start + batch_size
                batch_responses = None if responses is None else torch.as_tensor(responses[start:end])
                batches.append(
                    compute_targets(
                        teacher, shard_input_ids[start:end], shard_sample_ids[start:end], settings, batch_responses
                    )
                )
                progress.update(min(batch_size, count - start) * seq_len)
            tensors = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
            tensors["sample_ids"] = shard_sample_ids
            tensors["input_ids"] = shard_input_ids.to(torch.int32)
            _check_schema(tensors, fingerprint, path)
            _check_values(tensors, fingerprint, path)
            data = shard_bytes(tensors, _shard_metadata(settings, fingerprint, first, count))
            atomic_write_bytes(path, data)
            entries.append(_shard_entry(name, first, count, len(data), sha256_bytes(data), tensors["sample_ids"]))
            computed_tokens += count * seq_len
            logger.info(
                "%s: %d samples, %.1f MB (%d of %d shards of this rank, %.0f tok/s)",
                path,
                count,
                len(data) / 1e6,
                len(entries),
                len(owned),
                computed_tokens / (time.perf_counter() - started),
            )

    all_entries = sorted((e for part in dist.gather_objects(entries) for e in part), key=lambda e: e.first_sample)
    if dist.is_main():
        manifest.shards = all_entries
        manifest.alpha_stats = _alpha_statistics(target, all_entries, settings)
        manifest.complete = True
        write_manifest(target, manifest)
        _remove_temporaries(target)
        if target != directory:
            swap_directory(target, directory)
            logger.info("%s: replaced the earlier cache", directory)
        logger.info("%s: %d shards, %d samples written", directory, len(all_entries), num_samples)
    dist.barrier()
    return read_manifest(directory) if not dist.is_main() else manifest
