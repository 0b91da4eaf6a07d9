"""One teacher pass → the target tensors of a batch, as the cache stores them and the online source serves them.

The teacher runs once with its target layers captured (`pipeline.models.capture`); the logits give the sparse logit
targets (`pipeline.targets.logits`); every kind of `settings.kinds` computes its maps of every cached layer from what
the pass recorded (`pipeline.targets.kinds`), and the cache's encoding stores them (`pipeline.targets.encoding`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.models.capture import AttentionCapture
from pipeline.targets import kinds
from pipeline.targets.encoding import ENCODINGS
from pipeline.targets.kinds.base import TargetSettings, TeacherPass
from pipeline.targets.logits import logit_targets


@torch.no_grad()
def compute_targets(teacher: nn.Module, input_ids: Tensor, settings: TargetSettings) -> dict[str, Tensor]:
    """The cached tensors of one batch, on the CPU in their on-disk dtypes (converted on the teacher's device).

    input_ids: [B, T] (packed sequences, no padding). Returns the tensors `layout.expected_tensors` names except the
    sample ids and tokens: top-k logits with their tail sums per temperature and, per cached layer, every target map
    of `settings.kinds` (per variant: student head count, relation heads), encoded, plus the kinds' extras (α).
    """
    device = next(teacher.parameters()).device
    circuits = kinds.needs_capture(settings.kinds, "circuits")
    qkv = kinds.needs_capture(settings.kinds, "qkv")
    with AttentionCapture(teacher, settings.layers, circuits=circuits, qkv=qkv) as capture:
        logits = teacher(input_ids=input_ids.to(device)).logits
    targets = logit_targets(logits, settings.top_k, settings.temperatures, settings.dtype)
    del logits
    encoding = ENCODINGS[settings.encoding]
    for layer in settings.layers:
        teacher_pass = TeacherPass(
            {layer: capture.maps.pop(layer)},
            {layer: capture.circuits.pop(layer)} if layer in capture.circuits else {},
            {layer: capture.qkv.pop(layer)} if layer in capture.qkv else {},
        )
        for name in settings.kinds:
            kind = kinds.get(name)
            for variant in kind.variants(settings):
                maps, extras = kind.compute(teacher_pass, layer, variant, settings)
                for map_name, values in maps.items():
                    targets.update(
                        encoding.encode(
                            map_name,
                            values,
                            attn_top_m=settings.attn_top_m,
                            dtype=settings.dtype,
                            temperatures=settings.temperatures,
                        )
                    )
                targets.update(extras)
        del teacher_pass
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


def prepare_kinds(
    teacher: nn.Module, train_rows: Any, settings: TargetSettings
) -> tuple[TargetSettings, dict[str, Any]]:
    """`settings` with what the kinds choose once per cache (`TargetKind.prepare`: the selective targets' teacher
    heads, from the first train samples — the cache stage and the online source choose alike), and every record of
    those choices for the manifest. `train_rows`: the prepared train split."""
    records: dict[str, Any] = {}
    for name in settings.kinds:
        kind = kinds.get(name)
        if kind.calibration_samples:
            ids = train_rows.with_format("torch", columns=["input_ids"])[: kind.calibration_samples]["input_ids"]
            records.update(kind.prepare(teacher, ids.long(), settings.layers, settings.head_counts))
    chosen = records.get("selected_heads")
    return (dataclasses.replace(settings, selected_heads=chosen) if chosen else settings), records
