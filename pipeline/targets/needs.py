"""What a run needs of the teacher's targets, and whether a cache has it — decided in one place.

The loss terms declare their needs (`MapNeed`: a target kind, a teacher layer, a variant — the student's head count
for head-dependent kinds — and the temperature of the tail sums read); the objective collects them into
`TargetNeeds` once per run. The cache stage writes what they name (`cache.attn_targets` empty), the online source
computes exactly them, the reader reads only their tensors, and `check_cache` decides whether a cache serves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from pipeline.targets import kinds
from pipeline.targets.encoding import ENCODINGS
from pipeline.targets.kinds.base import MapSpec
from pipeline.targets.logits import loss_mask, sample_reads
from pipeline.targets.manifest import CacheError
from pipeline.targets.rows import ROWS_TENSOR


@dataclass(frozen=True)
class MapNeed:
    """One target map set a loss term reads: `kind` of teacher layer `layer`, variant `variant`, tail sums at
    `temperature` (used by top-m encodings; dense targets are exact at any τ)."""

    kind: str
    layer: int
    variant: int | None
    temperature: float = 1.0

    def specs(self) -> tuple[MapSpec, ...]:
        """The maps this need reads (`TargetKind.maps`)."""
        return kinds.get(self.kind).maps(self.layer, self.variant)


@dataclass(frozen=True)
class TargetNeeds:
    """Everything a run reads from its targets: the maps of its terms and the logits' KD temperature and top k."""

    maps: tuple[MapNeed, ...]
    kd_temperature: float = 1.0
    top_k: int = 64
    temperature_keys: tuple[tuple[str, float], ...] = ()
    """Config key → τ of every temperature the run uses, for error messages (`distill.kd.temperature` …)."""

    def kinds(self) -> tuple[str, ...]:
        """The target kinds read, sorted."""
        return tuple(sorted({need.kind for need in self.maps}))

    def layers(self) -> tuple[int, ...]:
        """The teacher layers read, sorted."""
        return tuple(sorted({need.layer for need in self.maps}))

    def temperatures(self) -> tuple[float, ...]:
        """τ = 1, the KD temperature and every map temperature, sorted."""
        return tuple(sorted({1.0, self.kd_temperature, *(need.temperature for need in self.maps)}))

    def reads(self) -> tuple[tuple[str, float], ...]:
        """(map name, τ) of every map read, in the order of the needs, each once."""
        return tuple(dict.fromkeys((spec.name, need.temperature) for need in self.maps for spec in need.specs()))

    def tensor_names(self, fingerprint: dict[str, Any]) -> list[str]:
        """Every stored tensor a reader of these needs takes from a shard of a cache with `fingerprint`."""
        names = sample_reads(fingerprint, self.kd_temperature)
        reads = self.reads()
        if reads and fingerprint["attn_row_fraction"] < 1:
            names.append(ROWS_TENSOR)
        for name, temperature in reads:
            names += ENCODINGS[fingerprint["encoding"]].reads(name, temperature, fingerprint)
        return list(dict.fromkeys(names))


def trained_rows(batch: dict[str, Any], *, skip_first: bool = False) -> Tensor:
    """The query rows of a batch a map term's sum runs over, bool [B, T]: the trained positions
    (`logits.loss_mask`: every row of text data, the rows predicting a reply token of chat data), without position 0
    when `skip_first` (the sink row, dropped)."""
    rows = loss_mask(batch)
    if skip_first:
        rows = rows.clone()
        rows[:, 0] = False
    return rows


def stored_row_count(batch: dict[str, Any], *, skip_first: bool = False) -> float:
    """Query rows a batch's attention targets hold and a map term's sum runs over: the `trained_rows` among all T
    rows, or among the stored rows `batch["attn_rows"]`."""
    rows = trained_rows(batch, skip_first=skip_first)
    stored = batch.get(ROWS_TENSOR)
    return float(rows.sum() if stored is None else rows.gather(1, stored).sum())


def check_cache(
    fingerprint: dict[str, Any], needs: TargetNeeds | None, provenance: dict[str, Any], source: Path | str
) -> None:
    """Refuse a cache that cannot serve a run, naming the first fingerprint field at fault.

    `provenance`: fingerprint fields that must be equal (teacher, tokenizer, data, split, seq_len …). `needs`: every
    map must be of a cached kind, layer and variant, the logits' top k equal, and every temperature whose sparse
    targets are read must have its tail sums (the attention's only against top-m targets).
    """
    for key, wanted in provenance.items():
        if fingerprint.get(key) != wanted:
            raise CacheError(
                f"{source}: fingerprint field '{key}' is {fingerprint.get(key)!r} in the cache, the config needs "
                f"{wanted!r}"
            )
    if needs is None:
        return
    if fingerprint.get("top_k") != needs.top_k:
        raise CacheError(
            f"{source}: fingerprint field 'top_k' is {fingerprint.get('top_k')!r} in the cache, the config needs "
            f"{needs.top_k!r} (distill.kd.top_k)"
        )
    cached_kinds, cached_layers = fingerprint.get("attn_targets") or [], fingerprint.get("cached_layers") or []
    for need in needs.maps:
        if need.kind not in cached_kinds:
            raise CacheError(
                f"{source}: fingerprint field 'attn_targets' is {cached_kinds}, but the run needs {need.kind!r} "
                "targets (distill.attn.match / distill.attn.squeeze / distill.rel.weight); add it to "
                "cache.attn_targets and re-run `distill cache` into a new cache.output_dir"
            )
        if need.layer not in cached_layers:
            raise CacheError(
                f"{source}: fingerprint field 'cached_layers' is {cached_layers}, but the student's layer map needs "
                f"teacher layer {need.layer}; cache it (cache.layers) or change distill.layer_map"
            )
        problem = kinds.get(need.kind).variant_problem(need.variant, fingerprint)
        if problem is not None:
            raise CacheError(f"{source}: {problem}")
    sparse_maps = fingerprint.get("encoding") != "dense"
    cached = fingerprint.get("temperatures") or []
    used = {needs.kd_temperature, *(need.temperature for need in needs.maps if sparse_maps)}
    for temperature in sorted(used):
        if not any(abs(temperature - value) <= 1e-9 for value in cached):
            key = next((key for key, value in needs.temperature_keys if value == temperature), f"τ {temperature:g}")
            raise CacheError(
                f"{source}: {key} is {temperature:g}, but the cache holds tail sums only for τ in {cached} "
                f"(fingerprint field 'temperatures'), so the sparse targets cannot be softened exactly; use one of "
                f"those or add {temperature:g} to cache.temperatures and re-run `distill cache` into a new "
                "cache.output_dir"
            )
