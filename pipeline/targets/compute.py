"""One teacher pass → the target tensors of a batch, as the cache stores them and the online source serves them,
without a [B, H, T, T] map or the [B, T, V] logits ever existing.

The teacher runs with SDPA on every layer (`AttentionCapture(eager=False)` keeps what each captured layer's attention
function was given: post-RoPE queries and keys, the values, the score scale). Its last hidden states go through the
output layer a block at a time, each block reduced to the top k as it comes (`logits.logit_targets`). Then
each captured layer is computed in up to two passes over its query rows, a block at a time (memory
O(B · H · block · T)): the statistics every kind's `solve` needs over all rows (SHD's α), then the rows the cache
stores — all of them, or each sample's `cache.attn_row_fraction` sample (`rows.stored_rows`) — whose probabilities
are formed once per block for every kind. Every map that is linear in the teacher heads' rows (`head_weights`:
selective, squeezed, global) comes out of one product of the block with the stacked weights — the block is read once
however many kinds and head counts are cached — and each map's rows go to its encoding writer. Under the top-m
encoding the stacked maps come from the layer's queries and keys through `ops.topk_maps.topk_maps` instead, all stored
rows in one call (on a CPU the native kernel: a tile of rows' scores in cache, then softmax, product and top m in one
sweep per query row; elsewhere the same blocks as above), so neither scores nor probabilities are written out, unless
a kind that forms its own rows reads them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.data.prepare import calibration_sequences
from pipeline.models.capture import AttentionCapture, layer_circuits
from pipeline.ops.attention_rows import position_blocks
from pipeline.ops.shd import Circuits, combine_heads
from pipeline.ops.topk_maps import topk_maps
from pipeline.targets import kinds
from pipeline.targets.codecs import bits_for, pack_bits
from pipeline.targets.encoding import ENCODINGS, EncodeOptions
from pipeline.targets.kinds.base import LayerPass, TargetSettings
from pipeline.targets.logits import LOSS_MASK_TENSOR, logit_targets, pack_loss_mask, trained_positions
from pipeline.targets.rows import ROWS_TENSOR, stored_rows, stores_rows


@torch.no_grad()
def teacher_passes(teacher: nn.Module, input_ids: Tensor, layers: tuple[int, ...], circuits: bool) -> tuple:
    """(the last hidden states [B, T, d], `LayerPass` of every layer of `layers`) of one SDPA forward."""
    device = next(teacher.parameters()).device
    with AttentionCapture(teacher, layers, eager=False) as capture:
        hidden = teacher.base_model(input_ids=input_ids.to(device), use_cache=False).last_hidden_state
    per_layer = layer_circuits(teacher, layers) if circuits else {}
    passes = {}
    for layer in layers:
        inputs = capture.inputs[layer]
        output = None if inputs.output is None else inputs.output.transpose(1, 2)
        layer_pass = LayerPass(inputs.query, inputs.key, inputs.value, inputs.scale, output)
        if circuits:
            output, kv_heads = per_layer[layer]
            layer_pass.circuits = Circuits(inputs.value.float(), output, kv_heads)
        passes[layer] = layer_pass
    return hidden, passes


def stacked_weights(layer_pass: LayerPass, layer: int, jobs: list, states: list) -> tuple:
    """(the `head_weights` of every linear map stacked [B, ΣH, H_t] or None, map name → its [start, stop) in the
    stack, the (kind, variant, state) of the kinds that form their rows themselves)."""
    weights: dict[str, Tensor] = {}
    others = []
    for (kind, variant), state in zip(jobs, states, strict=True):
        linear = kind.head_weights(layer_pass, layer, variant, state)
        names = {spec.name for spec in kind.maps(layer, variant)}
        if linear and set(linear) != names:
            raise ValueError(
                f"target kind {kind.name!r} gives head_weights for {sorted(linear)}, not for all its maps "
                f"{sorted(names)}: give them for every map of a variant, or none and form the rows in rows()"
            )
        weights.update(linear)
        if not linear:
            others.append((kind, variant, state))
    spans, start = {}, 0
    for name, weight in weights.items():
        spans[name] = (start, start + weight.shape[1])
        start += weight.shape[1]
    return (torch.cat(list(weights.values()), dim=1) if weights else None), spans, others


def solved_kinds(layer: int, layer_pass: LayerPass, settings: TargetSettings) -> tuple[list, list]:
    """(every (kind, variant) of `settings`, each one's `solve` state on this layer): the statistics pass over all
    rows, for the kinds that need one, then each kind's solve (SHD's α)."""
    jobs = [(kinds.get(name), variant) for name in settings.kinds for variant in kinds.get(name).variants(settings)]
    heads = layer_pass.num_heads
    groups = [group for kind, variant in jobs for group in kind.stats_groups(variant, heads)]
    overlaps = [group for kind, variant in jobs for group in kind.overlap_groups(variant, heads)]
    stats = layer_pass.statistics(groups, overlaps) if groups else {}
    return jobs, [kind.solve(layer_pass, layer, variant, stats, settings) for kind, variant in jobs]


def _layer_targets(layer: int, layer_pass: LayerPass, positions: Tensor, settings: TargetSettings) -> dict:
    """The stored tensors of every kind's maps of one layer (and their extras)."""
    jobs, states = solved_kinds(layer, layer_pass, settings)
    options = EncodeOptions(
        settings.attn_top_m, settings.dtype, settings.temperatures, settings.attn_value_bits, layer_pass.query.shape[2]
    )
    encoding = ENCODINGS[settings.encoding]
    specs = [spec for kind, variant in jobs for spec in kind.maps(layer, variant)]
    writers = {spec.name: encoding.writer(spec.name, options) for spec in specs}
    stacked, spans, others = stacked_weights(layer_pass, layer, jobs, states)
    probabilities = any(kind.uses_attention for kind, _, _ in others) or (stacked is not None and not encoding.top_rows)
    if stacked is not None and not probabilities:
        query, key, scale = layer_pass.query, layer_pass.key, layer_pass.scale
        top = topk_maps(query, key, scale, positions, stacked, settings.attn_top_m, settings.temperatures)
        for name, (start, stop) in spans.items():
            writers[name].add_top(*(part[:, start:stop] for part in top))
    batch, heads, seq_len = layer_pass.query.shape[:3]
    for block in position_blocks(positions, batch, heads, seq_len) if probabilities or others else ():
        attention = layer_pass.attention(block) if probabilities else None
        if stacked is not None and attention is not None:
            combined = combine_heads(attention, stacked)
            for name, (start, stop) in spans.items():
                writers[name].add(combined[:, start:stop], block)
        for kind, variant, state in others:
            for name, maps in kind.rows(layer_pass, layer, variant, state, attention, block).items():
                writers[name].add(maps, block)
    targets = {}
    for writer in writers.values():
        targets.update(writer.tensors())
    for (kind, variant), state in zip(jobs, states, strict=True):
        targets.update(kind.extra_values(layer, variant, state))
    return targets


@torch.no_grad()
def compute_targets(
    teacher: nn.Module,
    input_ids: Tensor,
    sample_ids: Tensor,
    settings: TargetSettings,
    response_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """The cached tensors of one batch, on the CPU in their on-disk dtypes.

    `input_ids` [B, T] (packed text, or one right-padded conversation per row), `sample_ids` [B] (they decide the
    stored rows), `response_mask` [B, T] of chat data (then the stored rows are drawn among the trained positions and
    the loss mask is stored). The teacher sees every token either way. Returns the tensors
    `layout.expected_tensors` names except the sample ids and tokens.
    """
    circuits = kinds.needs_capture(settings.kinds, "circuits")
    hidden, passes = teacher_passes(teacher, input_ids, settings.layers, circuits)
    targets = logit_targets(
        hidden,
        teacher.get_output_embeddings(),
        settings.top_k,
        settings.temperatures,
        settings.dtype,
        settings.logit_value_bits,
    )
    del hidden
    seq_len = input_ids.shape[1]
    trained = None if response_mask is None else trained_positions(response_mask.cpu())
    if trained is not None:
        targets[LOSS_MASK_TENSOR] = pack_loss_mask(trained)
    positions = stored_rows(sample_ids.cpu(), seq_len, settings.row_fraction, trained)
    if stores_rows(settings.row_fraction, settings.kinds):
        targets[ROWS_TENSOR] = pack_bits(positions, bits_for(seq_len))
    positions = positions.to(next(teacher.parameters()).device)
    for layer in settings.layers:
        targets.update(_layer_targets(layer, passes.pop(layer), positions, settings))
    return _to_host(targets)


def _to_host(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors on the CPU. From a GPU, through pinned buffers with one synchronisation for the whole batch: a
    pageable `.cpu()` per tensor, each waiting for the device, took half the cache stage's time on an H100."""
    if not any(tensor.is_cuda for tensor in tensors.values()):
        return tensors
    host = {name: torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True) for name, tensor in tensors.items()}
    for name, tensor in tensors.items():
        host[name].copy_(tensor, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    return host


def calibration_passes(
    teacher: nn.Module, input_ids: Tensor, layers: tuple[int, ...], batch_size: int
) -> Iterator[dict[int, LayerPass]]:
    """The teacher's `LayerPass`es of `layers` (with circuits) over `input_ids` [N, T], `batch_size` samples at a
    time: what a kind's `prepare` reads."""
    for start in range(0, len(input_ids), batch_size):
        yield teacher_passes(teacher, input_ids[start : start + batch_size], layers, True)[1]


def prepare_kinds(
    teacher: nn.Module, train_rows: Any, settings: TargetSettings, batch_size: int
) -> tuple[TargetSettings, dict[str, Any]]:
    """`settings` with what the kinds choose once per cache (`TargetKind.prepare`: the selective targets' teacher
    heads, from the first train samples — chat data's real tokens packed without padding — `batch_size` at a time;
    the cache stage and the online source choose alike), and every record of those choices for the manifest.
    `train_rows`: the prepared train split."""
    records: dict[str, Any] = {}
    for name in settings.kinds:
        kind = kinds.get(name)
        if not kind.calibration_samples:
            continue
        ids = calibration_sequences(train_rows, kind.calibration_samples)
        passes = calibration_passes(teacher, ids, settings.layers, batch_size)
        records.update(kind.prepare(passes, settings.layers, settings.head_counts))
    chosen = records.get("selected_heads")
    return (dataclasses.replace(settings, selected_heads=chosen) if chosen else settings), records
