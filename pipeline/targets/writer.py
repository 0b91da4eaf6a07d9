"""Run the teacher once and write its squeezed attention targets and sparse logits as shards.

Each rank owns the shards whose index ≡ rank (mod world size) and computes every shard with the same batches, so
the bytes of a shard do not depend on how many ranks wrote the cache. A shard appears under its final name only by
an atomic rename once complete; a re-run keeps every shard that is already there and still carries this cache's
fingerprint, so a job killed at any moment resumes to the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import PreTrainedModel

from pipeline import dist
from pipeline.atomic import atomic_write_bytes
from pipeline.attention import AttentionCapture
from pipeline.kd import topk_targets
from pipeline.shd import squeeze_heads, topk_rows
from pipeline.targets.layout import (
    LAYOUT_VERSION,
    alpha_key,
    attn_key,
    declared_file_size,
    index_dtype,
    pack_triangle,
    read_header,
    shard_bytes,
    shard_file_name,
    vocab_index_dtype,
)
from pipeline.targets.manifest import (
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


@dataclass(frozen=True)
class TargetSettings:
    """What to compute for every sample."""

    layers: tuple[int, ...]
    head_counts: tuple[int, ...]
    squeeze: str
    encoding: str
    attn_top_m: int
    top_k: int
    dtype: torch.dtype


def weights_sha256(model_dir: Path) -> str:
    """A digest of a model directory's weight files (names and bytes), the teacher's identity in fingerprints."""
    files = sorted(Path(model_dir).glob("*.safetensors")) or sorted(Path(model_dir).glob("*.bin"))
    if not files:
        raise CacheError(f"{model_dir}: no *.safetensors or *.bin weight files to fingerprint")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a fingerprint; stamped into every shard's metadata."""
    return sha256_bytes(json.dumps(fingerprint, sort_keys=True).encode())


@torch.no_grad()
def compute_targets(
    teacher: PreTrainedModel, input_ids: torch.Tensor, settings: TargetSettings
) -> dict[str, torch.Tensor]:
    """The cached tensors of one batch, on the CPU in their on-disk dtypes (converted on the teacher's device).

    input_ids: [B, T] (packed sequences, no padding). Returns `topk_values` [B,T,k], `topk_indices` [B,T,k],
    `tail_mass` [B,T] and, per layer and head count, the encoded squeezed maps and the α of every teacher head.
    """
    device = next(teacher.parameters()).device
    with AttentionCapture(teacher, settings.layers, circuits=settings.squeeze == "shd") as capture:
        logits = teacher(input_ids=input_ids.to(device)).logits
    vocab_size = logits.shape[-1]
    values, indices, tail_mass = topk_targets(logits, settings.top_k)
    del logits
    targets = {
        "topk_values": values.to(settings.dtype),
        "topk_indices": indices.to(vocab_index_dtype(vocab_size)),
        "tail_mass": tail_mass.float(),
    }
    seq_len = input_ids.shape[1]
    for layer in settings.layers:
        maps = capture.maps.pop(layer)
        circuits = capture.circuits.pop(layer, None)
        for heads in settings.head_counts:
            squeezed, alphas = squeeze_heads(maps, circuits, heads, method=settings.squeeze)
            key = attn_key(layer, heads)
            targets[alpha_key(layer, heads)] = alphas.float()
            if settings.encoding == "dense":
                targets[key] = pack_triangle(squeezed).to(settings.dtype)
            else:
                row_values, row_indices, row_tail = topk_rows(squeezed, settings.attn_top_m)
                targets[f"{key}.values"] = row_values.to(settings.dtype)
                targets[f"{key}.indices"] = row_indices.to(index_dtype(seq_len))
                targets[f"{key}.tail"] = row_tail.float()
        del maps, circuits
    return _to_host(targets)


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on the CPU. From a GPU, through pinned buffers with one synchronisation for the whole batch: a
    pageable `.cpu()` per tensor, each waiting for the device, took half the cache stage's time on an H100."""
    if not any(tensor.is_cuda for tensor in tensors.values()):
        return tensors
    host = {name: torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True) for name, tensor in tensors.items()}
    for name, tensor in tensors.items():
        host[name].copy_(tensor, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    return host


def _shard_metadata(
    settings: TargetSettings, fingerprint: dict[str, Any], first_sample: int, num_samples: int
) -> dict[str, Any]:
    return {
        "layout_version": LAYOUT_VERSION,
        "dtype": str(settings.dtype).removeprefix("torch."),
        "seq_len": fingerprint["seq_len"],
        "head_counts": json.dumps(list(settings.head_counts)),
        "cached_layers": json.dumps(list(settings.layers)),
        "encoding": settings.encoding,
        "attn_top_m": settings.attn_top_m,
        "top_k": settings.top_k,
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


def _remove_stale_temporaries(directory: Path, file_name: str) -> None:
    for stale in directory.glob(f".{file_name}.tmp-*"):
        stale.unlink(missing_ok=True)


def _alpha_statistics(directory: Path, shards: list[ShardEntry], settings: TargetSettings) -> dict[str, dict]:
    """Summary of the squeeze weights per cached layer and head count (the distribution the paper plots)."""
    statistics: dict[str, dict] = {}
    for layer in settings.layers:
        for heads in settings.head_counts:
            alphas = []
            for entry in shards:
                with safe_open(directory / entry.file, framework="pt") as shard:
                    alphas.append(shard.get_tensor(alpha_key(layer, heads)))
            values = torch.cat(alphas).double()
            histogram = torch.histc(values.flatten(), bins=ALPHA_HISTOGRAM_BINS, min=0.0, max=1.0)
            statistics[f"L{layer}.H{heads}"] = {
                "mean": round(values.mean().item(), 6),
                "std": round(values.std(unbiased=False).item(), 6),
                "min": round(values.min().item(), 6),
                "max": round(values.max().item(), 6),
                "per_teacher_head_mean": [round(v, 6) for v in values.mean(0).tolist()],
                "histogram_bins": ALPHA_HISTOGRAM_BINS,
                "histogram": [int(v) for v in histogram.tolist()],
            }
    return statistics


def _up_to_date(directory: Path, fingerprint: dict[str, Any], num_samples: int) -> bool:
    try:
        manifest = read_manifest(directory)
    except CacheError:
        return False
    return (
        manifest.complete
        and manifest.fingerprint == fingerprint
        and manifest.num_samples == num_samples
        and all(
            (directory / e.file).is_file() and (directory / e.file).stat().st_size == e.bytes for e in manifest.shards
        )
    )


def _refuse_foreign_cache(directory: Path, fingerprint: dict[str, Any]) -> None:
    """Never mix shards of two different caches, nor overwrite a cache made from other inputs."""
    if not (directory / "manifest.json").exists():
        return
    existing = read_manifest(directory)
    for key, value in fingerprint.items():
        if existing.fingerprint.get(key) != value:
            raise CacheError(
                f"{directory / 'manifest.json'}: this directory holds a cache with fingerprint field '{key}' = "
                f"{existing.fingerprint.get(key)!r}, the config asks for {value!r}; choose another cache.output_dir "
                "or delete the old cache"
            )


def write_cache_split(
    teacher: PreTrainedModel,
    rows: SampleRows,
    directory: Path,
    settings: TargetSettings,
    fingerprint: dict[str, Any],
    *,
    shard_size: int,
    batch_size: int,
) -> Manifest:
    """Cache one split into `directory`; call on every rank. Returns the final manifest (on every rank).

    `rows[a:b]` must give `{"input_ids": LongTensor [b-a, T], "sample_id": LongTensor [b-a]}`, e.g. a prepared
    `datasets.Dataset` in torch format (memory-mapped, so a split larger than memory is fine).
    """
    directory.mkdir(parents=True, exist_ok=True)
    num_samples = len(rows)
    manifest = Manifest(fingerprint=fingerprint, num_samples=num_samples, shard_size=shard_size)
    if _up_to_date(directory, fingerprint, num_samples):
        logger.info(
            "%s: cache up to date (%d shards); `distill cache verify` re-checks checksums",
            directory,
            manifest.num_shards,
        )
        return read_manifest(directory)
    _refuse_foreign_cache(directory, fingerprint)
    dist.barrier()
    if dist.is_main() and not (directory / "manifest.json").exists():
        write_manifest(directory, manifest)

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
            path = directory / name
            if _existing_shard(path, fingerprint, first, count):
                logger.info("%s: kept from an earlier run", path)
                entries.append(ShardEntry(name, first, count, path.stat().st_size, sha256_file(path)))
                progress.update(count * seq_len)
                continue
            _remove_stale_temporaries(directory, name)
            shard_rows = rows[first : first + count]
            shard_input_ids = torch.as_tensor(shard_rows["input_ids"], dtype=torch.long)
            batches: list[dict[str, torch.Tensor]] = []
            for start in range(0, count, batch_size):
                batches.append(compute_targets(teacher, shard_input_ids[start : start + batch_size], settings))
                progress.update(min(batch_size, count - start) * seq_len)
            tensors = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
            tensors["sample_ids"] = torch.as_tensor(shard_rows["sample_id"], dtype=torch.int64)
            tensors["input_ids"] = shard_input_ids.to(torch.int32)
            data = shard_bytes(tensors, _shard_metadata(settings, fingerprint, first, count))
            atomic_write_bytes(path, data)
            entries.append(ShardEntry(name, first, count, len(data), sha256_bytes(data)))
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
        manifest.alpha_stats = _alpha_statistics(directory, all_entries, settings)
        manifest.complete = True
        write_manifest(directory, manifest)
        for stale in directory.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
        logger.info("%s: %d shards, %d samples written", directory, len(all_entries), num_samples)
    dist.barrier()
    return read_manifest(directory) if not dist.is_main() else manifest
