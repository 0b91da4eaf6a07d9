"""Synthetic teacher-target caches for reader tests: valid shards of random targets, no teacher needed.

The real cache writer produces the same format from a teacher; these shards only have to be valid and distinct
(sample ids are 1000 + row so that they never equal a row or a position).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.targets import kinds
from pipeline.targets.codecs import bits_for, pack_bits
from pipeline.targets.encoding import ENCODINGS, EncodeOptions, unpack_indices
from pipeline.targets.layout import LAYOUT_VERSION, expected_tensors, packed_limit, shard_bytes, shard_file_name
from pipeline.targets.logits import stored_logit_tensors
from pipeline.targets.manifest import Manifest, ShardEntry, sha256_bytes, write_manifest
from pipeline.targets.needs import MapNeed, TargetNeeds
from pipeline.targets.rows import ROWS_TENSOR, stored_rows

SAMPLE_ID_OFFSET = 1000
VOCAB_SIZE = 50


def map_name(layer: int, kind: str, heads: int | None = None) -> str:
    """The tensor name of `kind`'s map of teacher layer `layer` for `heads` student heads (the kind's own spelling)."""
    variant = heads if kinds.get(kind).per_student_heads else None
    return kinds.get(kind).maps(layer, variant)[0].name


def relation_name(layer: int, relation_heads: int, relation: str) -> str:
    """The tensor name of the teacher's `relation` (q, k or v) map of layer `layer` over R relation heads."""
    specs = kinds.get("relations").maps(layer, relation_heads)
    return next(spec.name for spec in specs if spec.name.endswith(f".{relation}"))


def alpha_name(layer: int, heads: int, squeeze: str) -> str:
    """The name of the squeeze weights stored beside `map_name(layer, squeeze, heads)`."""
    return kinds.get(squeeze).extras(layer, heads, 0)[0].name


def encode_maps(
    name: str,
    maps: torch.Tensor,
    *,
    encoding: str,
    attn_top_m: int,
    dtype: torch.dtype,
    temperatures: tuple,
    value_bits: int = 16,
    rows: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The stored tensors of whole maps [N, H, T, T] named `name` in `encoding`, through the cache's own writer
    (`rows` [N, R]: store only those query rows, top-m only)."""
    seq_len = maps.shape[-1]
    options = EncodeOptions(attn_top_m, dtype, temperatures, value_bits, seq_len)
    writer = ENCODINGS[encoding].writer(name, options)
    if rows is None:
        writer.add(maps, torch.arange(seq_len).expand(len(maps), seq_len))
    else:
        index = rows[:, None, :, None].expand(*maps.shape[:2], rows.shape[1], seq_len)
        writer.add(maps.gather(2, index), rows)
    return writer.tensors()


def unpacked(tensors: dict[str, torch.Tensor], fingerprint: dict) -> dict[str, torch.Tensor]:
    """A shard's tensors with every packed integer tensor (token ids, key indices, stored rows) unpacked to int64 of
    its logical shape [N, …]."""
    specs = expected_tensors(fingerprint, len(tensors["sample_ids"]))
    decoded = {}
    for name, tensor in tensors.items():
        limit = packed_limit(specs[name].role, fingerprint)
        decoded[name] = tensor if limit is None else unpack_indices(tensor, limit, (len(tensor), *specs[name].unpacked))
    return decoded


def squeeze_needs(
    layers: list[int] | tuple[int, ...],
    heads: int,
    kd_temperature: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 4,
) -> TargetNeeds:
    """What a run matching `heads` student heads to the `shd` targets of teacher `layers` needs (the synthetic
    caches' kind), logits at `kd_temperature`."""
    maps = tuple(MapNeed("shd", layer, heads, temperature) for layer in layers)
    return TargetNeeds(maps, kd_temperature, top_k)


def _causal_maps(generator: torch.Generator, rows: int, heads: int, seq_len: int) -> torch.Tensor:
    """Random row-stochastic causal maps [rows, heads, T, T]."""
    scores = torch.randn(rows, heads, seq_len, seq_len, generator=generator)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def _squeeze(maps: torch.Tensor, heads: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random convex combinations of contiguous teacher-head groups: maps [N, H_t, T, T] → ([N, H, T, T], α [N, H_t]).

    With more student than teacher heads, student heads share teacher heads (α = 1 on the shared head).
    """
    rows, teacher_heads = maps.shape[:2]
    if heads > teacher_heads:
        shared = [head * teacher_heads // heads for head in range(heads)]
        return maps[:, shared], torch.ones(rows, teacher_heads)
    alphas = torch.empty(rows, teacher_heads)
    squeezed = []
    for group in torch.arange(teacher_heads).tensor_split(heads):
        weights = torch.rand(rows, len(group), generator=generator) + 0.1
        weights = weights / weights.sum(dim=1, keepdim=True)
        alphas[:, group] = weights
        squeezed.append((weights[:, :, None, None] * maps[:, group]).sum(dim=1))
    return torch.stack(squeezed, dim=1), alphas


def shard_tensors(
    first_sample: int,
    num_rows: int,
    seq_len: int,
    layers: list[int],
    head_counts: list[int],
    encoding: str,
    k: int,
    m: int,
    teacher_heads: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    row_fraction: float = 1.0,
    attn_value_bits: int = 16,
    logit_value_bits: int = 16,
) -> dict[str, torch.Tensor]:
    """Every tensor of one shard holding rows first_sample .. first_sample + num_rows - 1, in on-disk dtypes."""
    logprobs = torch.randn(num_rows, seq_len, VOCAB_SIZE, generator=generator).log_softmax(dim=-1)
    topk_values, topk_indices = logprobs.topk(k, dim=-1)
    sample_ids = torch.arange(first_sample, first_sample + num_rows, dtype=torch.int64) + SAMPLE_ID_OFFSET
    tail = (1 - topk_values.exp().sum(dim=-1, keepdim=True)).clamp_min(0)
    tensors = {
        "sample_ids": sample_ids,
        "input_ids": torch.randint(0, VOCAB_SIZE, (num_rows, seq_len), generator=generator, dtype=torch.int32),
        **stored_logit_tensors(topk_values, topk_indices, tail, VOCAB_SIZE, (1.0,), dtype, logit_value_bits),
    }
    rows = None
    if row_fraction < 1:
        rows = stored_rows(sample_ids, seq_len, row_fraction)
        tensors[ROWS_TENSOR] = pack_bits(rows, bits_for(seq_len))
    for layer in layers:
        maps = _causal_maps(generator, num_rows, teacher_heads, seq_len)
        for heads in head_counts:
            squeezed, alphas = _squeeze(maps, heads, generator)
            tensors[alpha_name(layer, heads, "shd")] = alphas
            tensors.update(
                encode_maps(
                    map_name(layer, "shd", heads),
                    squeezed,
                    encoding=encoding,
                    attn_top_m=m,
                    dtype=dtype,
                    temperatures=(1.0,),
                    value_bits=attn_value_bits,
                    rows=rows,
                )
            )
    return tensors


def synthetic_fingerprint(
    seq_len: int,
    layers: list[int],
    head_counts: list[int],
    encoding: str,
    k: int,
    m: int,
    dtype: str,
    seed: int,
    teacher_heads: int,
    row_fraction: float = 1.0,
    attn_value_bits: int = 16,
    logit_value_bits: int = 16,
) -> dict[str, object]:
    """A fingerprint with every field of `manifest.FINGERPRINT_FIELDS`."""
    return {
        "layout_version": LAYOUT_VERSION,
        "teacher_weights_sha256": "synthetic-teacher",
        "teacher_num_heads": teacher_heads,
        "vocab_size": VOCAB_SIZE,
        "tokenizer_sha256": "synthetic-tokenizer",
        "data_fingerprint": f"synthetic-data-{seed}",
        "split": "train",
        "seq_len": seq_len,
        "student_head_counts": sorted(head_counts),
        "cached_layers": sorted(layers),
        "attn_targets": ["shd"],
        "rel_heads": None,
        "encoding": encoding,
        "attn_top_m": m if encoding == "topk" else None,
        "attn_row_fraction": row_fraction,
        "attn_value_bits": attn_value_bits,
        "logit_value_bits": logit_value_bits,
        "top_k": k,
        "temperatures": [1.0],
        "dtype": dtype,
    }


def write_synthetic_cache(
    directory: Path,
    num_samples: int = 37,
    shard_size: int = 8,
    seq_len: int = 6,
    layers: tuple[int, ...] = (1, 3),
    head_counts: tuple[int, ...] = (2, 3),
    encoding: str = "dense",
    k: int = 4,
    m: int = 3,
    teacher_heads: int = 6,
    dtype: str = "float16",
    seed: int = 0,
    row_fraction: float = 1.0,
    attn_value_bits: int = 16,
    logit_value_bits: int = 16,
) -> Manifest:
    """Write a complete cache of random targets under `directory` and return its manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    compact = {"row_fraction": row_fraction, "attn_value_bits": attn_value_bits, "logit_value_bits": logit_value_bits}
    fingerprint = synthetic_fingerprint(
        seq_len, list(layers), list(head_counts), encoding, k, m, dtype, seed, teacher_heads, **compact
    )
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    manifest = Manifest(fingerprint=fingerprint, num_samples=num_samples, shard_size=shard_size, complete=True)
    for index, first in enumerate(range(0, num_samples, shard_size)):
        rows = min(shard_size, num_samples - first)
        tensors = shard_tensors(
            first,
            rows,
            seq_len,
            list(layers),
            list(head_counts),
            encoding,
            k,
            m,
            teacher_heads,
            torch_dtype,
            generator,
            **compact,
        )
        data = shard_bytes(tensors, {"layout_version": LAYOUT_VERSION, "first_sample": first, "num_samples": rows})
        name = shard_file_name(index)
        (directory / name).write_bytes(data)
        manifest.shards.append(ShardEntry(name, first, rows, len(data), sha256_bytes(data)))
    write_manifest(directory, manifest)
    return manifest
