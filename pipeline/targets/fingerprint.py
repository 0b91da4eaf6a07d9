"""What a cache is made from, as the writer records it and as the trainer requires it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.infra import dist
from pipeline.models.capture import AttentionDims
from pipeline.ops.shd import layer_map
from pipeline.targets.layout import LAYOUT_VERSION

HEADLESS_KINDS = ("global", "relations")
"""Target map kinds that do not depend on the student's head count."""


def teacher_weights_digest(teacher_dir: Path) -> str:
    """The teacher's identity in fingerprints: its weights digest, hashed once on rank 0 (all of a large teacher's
    bytes) and broadcast to every rank."""
    from pipeline.targets.writer import weights_sha256

    return dist.broadcast_value(weights_sha256(teacher_dir) if dist.is_main() else None)


def student_layers(config: Config, num_teacher_layers: int) -> list[int]:
    """Teacher layers the configured student's layer map matches, one per student layer."""
    try:
        return layer_map(config.student.num_layers, num_teacher_layers, config.distill.layer_map)
    except ValueError as error:
        raise ConfigError(f"distill.layer_map: {error} (the teacher has {num_teacher_layers} layers)") from None


def cached_layers(config: Config, num_teacher_layers: int) -> list[int]:
    """Teacher layers to cache: `cache.layers` when given, else those the student's layer map needs."""
    if config.cache.layers:
        bad = [layer for layer in config.cache.layers if layer >= num_teacher_layers]
        if bad:
            raise ConfigError(
                f"cache.layers: layer {bad[0]} does not exist; the teacher has {num_teacher_layers} layers "
                f"(0..{num_teacher_layers - 1})"
            )
        return sorted(set(config.cache.layers))
    return sorted(set(student_layers(config, num_teacher_layers)))


def cache_fingerprint(
    config: Config,
    data_meta: dict[str, Any],
    split: str,
    teacher_sha256: str,
    teacher_dims: AttentionDims,
    vocab_size: int,
    layers: list[int],
) -> dict[str, Any]:
    """The provenance fingerprint the cache writer records in `manifest.json`."""
    encoding = config.cache.encoding
    kinds = config.cache_attn_targets()
    return {
        "layout_version": LAYOUT_VERSION,
        "teacher_weights_sha256": teacher_sha256,
        "teacher_num_heads": teacher_dims.num_heads,
        "vocab_size": vocab_size,
        "tokenizer_sha256": data_meta["tokenizer_fingerprint"],
        "data_fingerprint": data_meta["fingerprint"],
        "split": split,
        "seq_len": data_meta["seq_len"],
        "student_head_counts": sorted(config.cache_head_counts()),
        "cached_layers": sorted(layers),
        "attn_targets": kinds,
        "rel_heads": config.distill.rel_heads if "relations" in kinds else None,
        "encoding": encoding,
        "attn_top_m": config.cache.attn_top_m if encoding == "topk" else None,
        "top_k": config.distill.top_k,
        "temperatures": config.cache_temperatures(),
        "dtype": config.cache.dtype,
    }


def training_requirements(
    config: Config, data_meta: dict[str, Any], split: str, teacher_sha256: str, num_teacher_layers: int
) -> dict[str, Any]:
    """What a student run needs from a cache (checked with `manifest.check_compatible`): the same provenance, its
    head count, the teacher layers its layer map matches, the target map kinds its loss terms read (the attention
    kind always: evaluation reports the attention KL whatever its weight), and the tail sums of its temperatures
    (config key → τ; the attention's counts only against top-m attention targets, dense ones are exact at any τ)."""
    kinds = [config.attention_kind(), *(["relations"] if config.distill.w_rel > 0 else [])]
    requirements: dict[str, Any] = {
        "teacher_weights_sha256": teacher_sha256,
        "tokenizer_sha256": data_meta["tokenizer_fingerprint"],
        "data_fingerprint": data_meta["fingerprint"],
        "split": split,
        "seq_len": data_meta["seq_len"],
        "cached_layers": student_layers(config, num_teacher_layers),
        "attn_targets": kinds,
        "top_k": config.distill.top_k,
        "temperatures": {
            "distill.kd_temperature": config.distill.kd_temperature,
            "distill.attn_temperature": config.distill.attn_temperature,
        },
    }
    if any(kind not in HEADLESS_KINDS for kind in kinds):
        requirements["student_head_counts"] = config.student.num_heads
    if "relations" in kinds:
        requirements["rel_heads"] = config.distill.rel_heads
    return requirements
