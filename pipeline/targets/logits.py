"""The teacher's sparse logits, stored in every shard beside the sample ids and tokens.

- `sample_ids` int64 [N], `input_ids` int32 [N, T]
- `topk_values` f16/bf16 [N, T, k]: the teacher's top-k log-probs (`distill.kd.top_k`), descending
- `topk_indices` uint16 (int32 when the vocabulary exceeds 65536) [N, T, k]: their token ids
- per cached temperature τ the tail sum R_τ = Σ_{not kept} p^{1/τ} f32 [N, T]: `tail_mass` (τ = 1: the
  probability outside the top k), `tail_mass.tau<τ>`; with R_τ the (k+1)-bucket KD is exact at τ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.ops.kd import IGNORE_INDEX, topk_targets
from pipeline.targets.encoding import INDEX_DTYPES, VALUE_DTYPES, TensorSpec, tail_name

UINT16_VOCAB_LIMIT = 65536
SAMPLE_TENSORS = ("sample_ids", "input_ids", "topk_values", "topk_indices")
"""Tensors every reader takes from every shard (plus the logits' tail sums at its temperature)."""


def vocab_index_dtype(vocab_size: int) -> torch.dtype:
    """Token ids of vocabularies up to 65536 (SmolLM2, GPT-2, LLaMA-2) fit uint16: 2 bytes per kept logit, not 4."""
    return torch.uint16 if vocab_size <= UINT16_VOCAB_LIMIT else torch.int32


def sample_tensors(fingerprint: dict[str, Any], num_rows: int) -> dict[str, TensorSpec]:
    """Name → spec of the ids, tokens and logit targets of a shard of `num_rows` samples."""
    seq_len, top_k, value_dtype = fingerprint["seq_len"], fingerprint["top_k"], VALUE_DTYPES[fingerprint["dtype"]]
    specs = {
        "sample_ids": TensorSpec("I64", (num_rows,), "ids"),
        "input_ids": TensorSpec("I32", (num_rows, seq_len), "tokens"),
        "topk_values": TensorSpec(value_dtype, (num_rows, seq_len, top_k), "logprobs", "tail_mass"),
        "topk_indices": TensorSpec(
            INDEX_DTYPES[vocab_index_dtype(fingerprint["vocab_size"])], (num_rows, seq_len, top_k), "vocab_indices"
        ),
    }
    for temperature in fingerprint["temperatures"]:
        specs[tail_name("tail_mass", temperature)] = TensorSpec("F32", (num_rows, seq_len), "tail")
    return specs


def sample_reads(kd_temperature: float) -> list[str]:
    """The tensors every reader takes: ids, tokens, top-k log-probs and ids, the tail sums at the KD temperature."""
    return [*SAMPLE_TENSORS, tail_name("tail_mass", kd_temperature)]


def logit_targets(logits: Tensor, top_k: int, temperatures: tuple[float, ...], dtype: torch.dtype) -> dict[str, Tensor]:
    """The stored logit tensors of teacher logits [B, T, V] (`ops.kd.topk_targets`), in their on-disk dtypes."""
    values, indices, tail_sums = topk_targets(logits, top_k, temperatures)
    targets = {"topk_values": values.to(dtype), "topk_indices": indices.to(vocab_index_dtype(logits.shape[-1]))}
    for position, temperature in enumerate(temperatures):
        targets[tail_name("tail_mass", temperature)] = tail_sums[..., position].contiguous()
    return targets


def sample_batch(raw: dict[str, Tensor], positions: Tensor, kd_temperature: float) -> dict[str, Any]:
    """The trainer's form of the sample tensors: int64 ids, next-token labels (-100 at the last position), float32
    logit targets with the tail sums at the KD temperature (`topk_tail`)."""
    input_ids = raw["input_ids"].long()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return {
        "sample_ids": raw["sample_ids"].long(),
        "positions": positions,
        "input_ids": input_ids,
        "labels": labels,
        "topk_values": raw["topk_values"].float(),
        "topk_indices": raw["topk_indices"].long(),
        "topk_tail": raw[tail_name("tail_mass", kd_temperature)].float(),
    }
