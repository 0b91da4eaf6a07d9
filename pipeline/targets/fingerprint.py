"""What a cache is made from: the provenance fingerprint the writer records in `manifest.json` and stamps into every
shard, and the identity of the teacher's weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.data.prepare import data_format
from pipeline.infra import dist
from pipeline.targets import kinds
from pipeline.targets.kinds.base import TargetSettings
from pipeline.targets.layout import LAYOUT_VERSION
from pipeline.targets.logits import RESPONSE_POSITIONS
from pipeline.targets.manifest import CacheError, sha256_bytes, sha256_file


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


def teacher_weights_digest(teacher_dir: Path) -> str:
    """`weights_sha256` hashed once on rank 0 (all of a large teacher's bytes) and broadcast to every rank."""
    return dist.broadcast_value(weights_sha256(teacher_dir) if dist.is_main() else None)


def provenance(data_meta: dict[str, Any], split: str, teacher_sha256: str) -> dict[str, Any]:
    """The fingerprint fields that say where targets come from; a run and its cache must agree on every one. Chat
    data adds `loss_positions: response` (its caches hold the loss mask; text caches are unchanged)."""
    fields = {
        "teacher_weights_sha256": teacher_sha256,
        "tokenizer_sha256": data_meta["tokenizer_fingerprint"],
        "data_fingerprint": data_meta["fingerprint"],
        "split": split,
        "seq_len": data_meta["seq_len"],
    }
    return {**fields, **format_fields(data_format(data_meta))}


def format_fields(data_format: str) -> dict[str, Any]:
    """The fingerprint fields a data format adds: chat formats train their replies only (`loss_positions`), text adds
    nothing (text caches keep the fingerprint they had)."""
    return {} if data_format == "text" else {"loss_positions": RESPONSE_POSITIONS}


def cache_fingerprint(
    settings: TargetSettings,
    origin: dict[str, Any],
    *,
    teacher_num_heads: int,
    vocab_size: int,
    dtype: str,
) -> dict[str, Any]:
    """The fingerprint of targets computed with `settings` from `origin` (`provenance`), stored as `dtype`."""
    return {
        "layout_version": LAYOUT_VERSION,
        **origin,
        "teacher_num_heads": teacher_num_heads,
        "vocab_size": vocab_size,
        "student_head_counts": sorted(settings.head_counts),
        "cached_layers": sorted(settings.layers),
        "attn_targets": sorted(settings.kinds),
        **kinds.fingerprint_fields(settings),
        "encoding": settings.encoding,
        "attn_top_m": settings.attn_top_m if settings.encoding == "topk" else None,
        "attn_row_fraction": settings.row_fraction,
        "attn_value_bits": settings.attn_value_bits,
        "logit_value_bits": settings.logit_value_bits,
        "top_k": settings.top_k,
        "temperatures": sorted(settings.temperatures),
        "dtype": dtype,
    }


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a fingerprint; stamped into every shard's metadata."""
    return sha256_bytes(json.dumps(fingerprint, sort_keys=True).encode())
