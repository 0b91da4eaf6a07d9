"""What a cache will cost before any teacher runs: bytes per token of every stored tensor, from the layout alone.

The plan reads the same schema the writer writes and `cache verify` checks (`layout.expected_tensors`), so its
figures are the shards' tensor bytes exactly; each shard adds its safetensors header (a few KB) and the manifest.
Tensors that differ only in their teacher layer are one row (`attn.L*.H8.shd.codes × 16 layers`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from pipeline.targets.codecs import bits_for
from pipeline.targets.layout import expected_tensors, packed_limit

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1}


@dataclass(frozen=True)
class PlanRow:
    """Tensors of one name pattern: their dtype, per-sample shape, how many (one per cached layer) and their bytes."""

    pattern: str
    dtype: str
    """The stored dtype, or `<b>-bit` for integers packed b bits each."""
    shape: tuple[int, ...]
    """Per sample (the integers' shape for a packed tensor)."""
    count: int
    bytes_per_sample: int


def tensor_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of one stored tensor."""
    return DTYPE_BYTES[dtype] * math.prod(shape)


def plan_rows(fingerprint: dict[str, Any]) -> list[PlanRow]:
    """Every stored tensor of a cache with `fingerprint`, grouped over layers, in layout order."""
    groups: dict[str, PlanRow] = {}
    for name, spec in expected_tensors(fingerprint, 1).items():
        pattern = re.sub(r"\.L\d+\.", ".L*.", name)
        size = tensor_bytes(spec.dtype, spec.shape)
        if pattern in groups:
            row = groups[pattern]
            groups[pattern] = PlanRow(pattern, row.dtype, row.shape, row.count + 1, row.bytes_per_sample + size)
            continue
        limit = packed_limit(spec.role, fingerprint)
        if limit is None:
            groups[pattern] = PlanRow(pattern, spec.dtype, tuple(spec.shape[1:]), 1, size)
        else:
            groups[pattern] = PlanRow(pattern, f"{bits_for(limit)}-bit", spec.unpacked, 1, size)
    return list(groups.values())


def bytes_per_token(fingerprint: dict[str, Any]) -> float:
    """Tensor bytes of a cache with `fingerprint` per cached token."""
    return sum(row.bytes_per_sample for row in plan_rows(fingerprint)) / fingerprint["seq_len"]


def human_bytes(count: float) -> str:
    """1536 → `1.5 KB` (powers of 1000, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(count) < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def format_plan(fingerprint: dict[str, Any], samples: dict[str, int | None], title: str) -> str:
    """The plan as a text table: per tensor pattern its dtype, shape per sample, layers and bytes per token, the
    total, and the bytes of each split (`samples`: split → cached samples, None where unknown)."""
    seq_len = fingerprint["seq_len"]
    rows = plan_rows(fingerprint)
    width = max(len(row.pattern) for row in rows)
    lines = [title, f"{'tensor':<{width}}  dtype   per sample            ×layers  bytes/token"]
    for row in rows:
        shape = "[" + ", ".join(str(extent) for extent in row.shape) + "]"
        per_token = row.bytes_per_sample / seq_len
        lines.append(f"{row.pattern:<{width}}  {row.dtype:<6}  {shape:<20}  {row.count:>7}  {per_token:>11.2f}")
    total = bytes_per_token(fingerprint)
    lines.append(f"{'total':<{width}}  {'':6}  {'':20}  {'':7}  {total:>11.2f}  ({human_bytes(total)} per token)")
    for split, count in samples.items():
        if count is None:
            lines.append(
                f"{split}: samples unknown (prepare the data first); {human_bytes(total * 1e9)} per 1 B tokens"
            )
        else:
            tokens = count * seq_len
            lines.append(
                f"{split}: {count} samples × {seq_len} tokens = {tokens} tokens → {human_bytes(total * tokens)}"
            )
    return "\n".join(lines)
