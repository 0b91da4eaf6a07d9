"""What a cache is made from, as the writer records it and as the trainer requires it."""

from __future__ import annotations

from typing import Any

from pipeline.attention import AttentionDims
from pipeline.config import Config
from pipeline.shd import layer_map
from pipeline.targets.layout import LAYOUT_VERSION


def student_layers(config: Config, num_teacher_layers: int) -> list[int]:
    """Teacher layers the configured student's layer map matches, one per student layer."""
    return layer_map(config.student.num_layers, num_teacher_layers, config.distill.layer_map)


def cached_layers(config: Config, num_teacher_layers: int) -> list[int]:
    """Teacher layers to cache: `cache.layers` when given, else those the student's layer map needs."""
    if config.cache.layers:
        bad = [layer for layer in config.cache.layers if layer >= num_teacher_layers]
        if bad:
            raise ValueError(f"cache.layers: layer {bad[0]} does not exist; the teacher has {num_teacher_layers}")
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
        "squeeze": config.distill.squeeze,
        "encoding": encoding,
        "attn_top_m": config.cache.attn_top_m if encoding == "topk" else None,
        "top_k": config.distill.top_k,
        "dtype": config.cache.dtype,
    }


def training_requirements(
    config: Config, data_meta: dict[str, Any], split: str, teacher_sha256: str, num_teacher_layers: int
) -> dict[str, Any]:
    """What a student run needs from a cache (checked with `manifest.check_compatible`)."""
    return {
        "teacher_weights_sha256": teacher_sha256,
        "tokenizer_sha256": data_meta["tokenizer_fingerprint"],
        "data_fingerprint": data_meta["fingerprint"],
        "split": split,
        "seq_len": data_meta["seq_len"],
        "student_head_counts": config.student.num_heads,
        "cached_layers": student_layers(config, num_teacher_layers),
        "squeeze": config.distill.squeeze,
        "top_k": config.distill.top_k,
    }
