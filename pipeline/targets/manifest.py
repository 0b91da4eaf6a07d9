"""`manifest.json`: what a cache holds, where it came from, and the checksum of every shard.

The manifest is the cache's single source of truth: a reader trusts only shards it lists, and only after their
sha256 matches. It is always replaced atomically (write a temporary file, fsync, rename), so a crash leaves either
the old or the new manifest, never half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.infra.atomic import atomic_write_bytes
from pipeline.targets import kinds

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
FINGERPRINT_FIELDS = (
    "layout_version",
    "teacher_weights_sha256",
    "teacher_num_heads",
    "vocab_size",
    "tokenizer_sha256",
    "data_fingerprint",
    "split",
    "seq_len",
    "student_head_counts",
    "cached_layers",
    "attn_targets",
    "encoding",
    "attn_top_m",
    "top_k",
    "temperatures",
    "dtype",
    *kinds.fingerprint_field_names(),
)
"""Every field a cache's fingerprint holds: the provenance and settings, then what the target kinds add."""


class CacheError(PipelineError):
    """A cache is missing, corrupt, incomplete or does not match the config; the message names file and field."""


@dataclass
class ShardEntry:
    """One shard file and the rows of its split it holds."""

    file: str
    """The shard's file name, relative to the cache directory."""
    first_sample: int
    num_samples: int
    bytes: int
    sha256: str
    sample_id_min: int | None = None
    sample_id_max: int | None = None
    """The smallest and largest sample id in the shard. Shards whose ranges do not overlap cannot share a sample
    id, so the reader proves uniqueness across a cache from the manifest alone and checks each shard's ids against
    its range on first use (see `reader.check_sample_id_ranges`); None in manifests written before the ranges."""


@dataclass
class Manifest:
    """Everything a reader needs to trust and stream a cache directory."""

    fingerprint: dict[str, Any]
    num_samples: int
    shard_size: int
    shards: list[ShardEntry] = field(default_factory=list)
    alpha_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    """`L<layer>.H<heads>.<squeeze>` → summary of the squeeze weights α (mean, std, histogram, per teacher head)."""
    selected_heads: dict[str, list[int]] = field(default_factory=dict)
    """`L<layer>.H<heads>` → the teacher heads behind the `selective` targets (chosen once per cache)."""
    head_importance: dict[str, list[float]] = field(default_factory=dict)
    """`L<layer>` → each teacher head's mean output share on the calibration samples the selection used."""
    complete: bool = False
    schema_version: int = SCHEMA_VERSION

    @property
    def num_shards(self) -> int:
        """Shards the cache is planned to hold (all listed once complete)."""
        return -(-self.num_samples // self.shard_size)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of an in-memory buffer."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Atomically (re)write `directory/manifest.json`."""
    text = json.dumps(dataclasses.asdict(manifest), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(directory / MANIFEST_NAME, text.encode())


def read_manifest(directory: Path) -> Manifest:
    """Load and structurally check `directory/manifest.json`; errors name the file and the field."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise CacheError(f"{path}: no cache manifest here (run `distill cache` first)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CacheError(f"{path}: not valid JSON ({error})") from error
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(
            f"{path}: schema_version {raw.get('schema_version')!r}, this reader expects {SCHEMA_VERSION} (a cache "
            "written by another version of shd-distill); re-run `distill cache` into a new cache.output_dir"
        )
    for key in ("fingerprint", "num_samples", "shard_size", "shards"):
        if key not in raw:
            raise CacheError(f"{path}: missing field '{key}'")
    for key in FINGERPRINT_FIELDS:
        if key not in raw["fingerprint"]:
            raise CacheError(f"{path}: missing field 'fingerprint.{key}'")
    try:
        shards = [ShardEntry(**entry) for entry in raw["shards"]]
    except TypeError as error:
        raise CacheError(f"{path}: malformed entry in 'shards' ({error})") from error
    return Manifest(
        fingerprint=raw["fingerprint"],
        num_samples=raw["num_samples"],
        shard_size=raw["shard_size"],
        shards=shards,
        alpha_stats=raw.get("alpha_stats", {}),
        selected_heads=raw.get("selected_heads", {}),
        head_importance=raw.get("head_importance", {}),
        complete=raw.get("complete", False),
    )
