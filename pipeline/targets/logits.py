"""The teacher's sparse logits, stored in every shard beside the sample ids and tokens.

- `sample_ids` int64 [N], `input_ids` int32 [N, T]
- the teacher's top-k log-probs per position (`distill.kd.top_k`), descending: `topk_values` f16/bf16 [N, T, k]
  (`cache.logit_value_bits: 16`), or 8-bit codes of them (`topk_codes` u8 [N, T, k] with `topk_offset` and
  `topk_step` f16 [N, T]; `pipeline.targets.codecs`, |log p̂ − log p| ≤ step / 2)
- `topk_indices`: their token ids, ⌈log2 V⌉ bits each (16 for SmolLM2's 49152, 17 for LLaMA-3's 128256), packed per
  sample u8 [N, ⌈T·k·bits/8⌉]
- per cached temperature τ the tail sum R_τ = Σ_{not kept} p^{1/τ} f32 [N, T]: `tail_mass` (τ = 1: the probability
  outside the top k), `tail_mass.tau<τ>`; with R_τ the (k+1)-bucket KD is exact at τ.
- chat data only (fingerprint `loss_positions: response`): `loss_mask`, the positions whose next-token prediction is
  trained — those followed by a response token (`trained_positions`) — one bit each, packed u8 [N, ⌈T/8⌉]. Text
  data trains every position and stores no mask.

The teacher's logits are never formed whole: `logit_targets` takes the last hidden states and applies the output
layer a block at a time, reducing each block as it comes (`ops.kd.output_topk_targets`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipeline.ops.kd import IGNORE_INDEX, output_topk_targets
from pipeline.targets.codecs import bits_for, dequantize_logs, pack_bits, packed_bytes, quantize_logs, unpack_bits
from pipeline.targets.encoding import VALUE_DTYPES, TensorSpec, tail_name, unpack_indices
from pipeline.targets.manifest import CacheError

LOSS_MASK_TENSOR = "loss_mask"
RESPONSE_POSITIONS = "response"
"""The fingerprint's `loss_positions` of chat data: only positions that predict a response token are trained."""
SAMPLE_TENSORS = ("sample_ids", "input_ids", "topk_indices")
"""Tensors every reader takes from every shard (plus the logits' values and tail sums at its temperature)."""


def sample_tensors(fingerprint: dict[str, Any], num_rows: int) -> dict[str, TensorSpec]:
    """Name → spec of the ids, tokens and logit targets of a shard of `num_rows` samples."""
    seq_len, top_k = fingerprint["seq_len"], fingerprint["top_k"]
    rows = (num_rows, seq_len, top_k)
    specs = {
        "sample_ids": TensorSpec("I64", (num_rows,), "ids"),
        "input_ids": TensorSpec("I32", (num_rows, seq_len), "tokens"),
    }
    if fingerprint["logit_value_bits"] == 8:
        specs["topk_codes"] = TensorSpec("U8", rows, "logit_codes", ("tail_mass", "topk_offset", "topk_step"))
        specs["topk_offset"] = TensorSpec("F16", rows[:-1], "code_offset")
        specs["topk_step"] = TensorSpec("F16", rows[:-1], "code_step")
    else:
        specs["topk_values"] = TensorSpec(VALUE_DTYPES[fingerprint["dtype"]], rows, "logprobs", ("tail_mass",))
    packed = packed_bytes(seq_len * top_k, bits_for(fingerprint["vocab_size"]))
    specs["topk_indices"] = TensorSpec("U8", (num_rows, packed), "vocab_indices", unpacked=rows[1:])
    for temperature in fingerprint["temperatures"]:
        specs[tail_name("tail_mass", temperature)] = TensorSpec("F32", (num_rows, seq_len), "tail")
    if trains_responses(fingerprint):
        specs[LOSS_MASK_TENSOR] = TensorSpec(
            "U8", (num_rows, packed_bytes(seq_len, 1)), "loss_mask", unpacked=(seq_len,)
        )
    return specs


def trains_responses(fingerprint: dict[str, Any]) -> bool:
    """Whether a cache holds chat data's `loss_mask` (only response predictions are trained)."""
    return fingerprint.get("loss_positions") == RESPONSE_POSITIONS


def sample_reads(fingerprint: dict[str, Any], kd_temperature: float) -> list[str]:
    """The tensors every reader takes: ids, tokens, top-k values and ids, the tail sums at the KD temperature (and
    the loss mask of chat data)."""
    values = ["topk_codes", "topk_offset", "topk_step"] if fingerprint["logit_value_bits"] == 8 else ["topk_values"]
    mask = [LOSS_MASK_TENSOR] if trains_responses(fingerprint) else []
    return [*SAMPLE_TENSORS, *values, tail_name("tail_mass", kd_temperature), *mask]


def response_masks(rows: dict[str, Any], fingerprint: dict[str, Any], destination: Any) -> Any:
    """Chat data's `response_mask` column of `rows`, None for text data; rows that do not match the fingerprint's
    `loss_positions` are refused — a chat cache built without the mask would train prompts and padding."""
    chat = trains_responses(fingerprint)
    if chat != ("response_mask" in rows):
        raise CacheError(
            f"{destination}: the prepared rows {'lack' if chat else 'carry'} a response_mask column, but the targets "
            f"are for {'chat' if chat else 'text'} data (fingerprint field 'loss_positions' "
            f"{fingerprint.get('loss_positions')!r}); pass the columns of the prepared meta.json's data_format"
        )
    return rows.get("response_mask")


def trained_positions(response_mask: Tensor) -> Tensor:
    """The loss mask bool [B, T] of chat data's `response_mask` [B, T] (1 on the reply tokens): position t is
    trained when token t + 1 is a reply token — its prediction is of that token. The last position never is."""
    mask = torch.zeros(response_mask.shape, dtype=torch.bool, device=response_mask.device)
    mask[:, :-1] = response_mask[:, 1:].bool()
    return mask


def pack_loss_mask(loss_mask: Tensor) -> Tensor:
    """bool [B, T] → the stored `loss_mask` u8 [B, ⌈T/8⌉]."""
    return pack_bits(loss_mask.long(), 1)


def unpack_loss_mask(packed: Tensor, seq_len: int) -> Tensor:
    """The stored `loss_mask` u8 [B, ⌈T/8⌉] → bool [B, T]."""
    return unpack_bits(packed, 1, seq_len).bool()


def loss_mask(batch: dict[str, Any]) -> Tensor:
    """The positions of a batch whose predictions are trained, bool [B, T]: `batch["loss_mask"]`, or every
    position for a batch without one (text data)."""
    mask = batch.get(LOSS_MASK_TENSOR)
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask


@torch.no_grad()
def logit_targets(
    hidden: Tensor,
    output_layer: nn.Module,
    top_k: int,
    temperatures: tuple[float, ...],
    dtype: torch.dtype,
    value_bits: int,
) -> dict[str, Tensor]:
    """The stored logit tensors from the teacher's last hidden states [B, T, d] and its output layer
    (`ops.kd.output_topk_targets` over the flattened B·T positions), in their on-disk dtypes."""
    batch, seq_len, width = hidden.shape
    vocab_size = output_layer.weight.shape[0]
    rows = hidden.reshape(batch * seq_len, width)
    values, indices, tail_sums = (
        part.reshape(batch, seq_len, -1) for part in output_topk_targets(rows, output_layer, top_k, temperatures)
    )
    return stored_logit_tensors(values, indices, tail_sums, vocab_size, temperatures, dtype, value_bits)


def stored_logit_tensors(
    values: Tensor,
    indices: Tensor,
    tail_sums: Tensor,
    vocab_size: int,
    temperatures: tuple[float, ...],
    dtype: torch.dtype,
    value_bits: int,
) -> dict[str, Tensor]:
    """`topk_targets`' output (log-probs [B, T, k], token ids [B, T, k], tail sums [B, T, len(temperatures)]) in
    the stored form: 16-bit values or 8-bit codes, packed ids, one tail tensor per τ."""
    if value_bits == 8:
        codes, offset, step_sizes = quantize_logs(values)
        targets = {"topk_codes": codes, "topk_offset": offset, "topk_step": step_sizes}
    else:
        targets = {"topk_values": values.to(dtype)}
    targets["topk_indices"] = pack_bits(indices.flatten(1), bits_for(vocab_size))
    for position, temperature in enumerate(temperatures):
        targets[tail_name("tail_mass", temperature)] = tail_sums[..., position].contiguous()
    return targets


def trained_labels(batch: dict[str, Any]) -> Tensor:
    """The batch's next-token labels with -100 wherever its `loss_mask` is off: what CE, perplexity and every count
    of labels go by."""
    return batch["labels"].masked_fill(~loss_mask(batch), IGNORE_INDEX)


def sample_batch(
    raw: dict[str, Tensor], positions: Tensor, kd_temperature: float, fingerprint: dict[str, Any]
) -> dict[str, Any]:
    """The trainer's form of the sample tensors: int64 ids, next-token labels (-100 at the last position and, for
    chat data, wherever `loss_mask` is off), float32 top-k log-probs (decoded from 8-bit codes where stored so) and
    int64 token ids, the tail sums at the KD temperature (`topk_tail`), and `loss_mask` bool [B, T] (every position
    for text data)."""
    input_ids = raw["input_ids"].long()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if LOSS_MASK_TENSOR in raw:
        trained = unpack_loss_mask(raw[LOSS_MASK_TENSOR], input_ids.shape[1])
        labels = labels.masked_fill(~trained, IGNORE_INDEX)
    else:
        trained = torch.ones_like(input_ids, dtype=torch.bool)
    if "topk_codes" in raw:
        values = dequantize_logs(raw["topk_codes"], raw["topk_offset"], raw["topk_step"])
    else:
        values = raw["topk_values"].float()
    shape = (*input_ids.shape, fingerprint["top_k"])
    return {
        "sample_ids": raw["sample_ids"].long(),
        "positions": positions,
        "input_ids": input_ids,
        "labels": labels,
        "topk_values": values,
        "topk_indices": unpack_indices(raw["topk_indices"], fingerprint["vocab_size"], shape),
        "topk_tail": raw[tail_name("tail_mass", kd_temperature)].float(),
        LOSS_MASK_TENSOR: trained,
    }
