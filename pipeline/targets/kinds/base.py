"""What a target kind is: one kind of teacher target map the cache can hold, declared in one place.

A kind says what it needs of the teacher's forward, which maps it stores for a cached layer (tensor names and head
counts), how it computes their rows from a `LayerPass`, what it stores beside them (SHD's α) and where a cache
records what a run needs of it. Config validation, the fingerprint, the writer, the online source, the layout, the
reader's checks and cache adequacy all ask the registry (`pipeline.targets.kinds`) instead of knowing kinds by name.
How maps are encoded on disk (dense triangle, top-m rows, 8-bit values) is the encoding's business
(`pipeline.targets.encoding`), the same for every kind.

The teacher runs with SDPA on every layer; a `LayerPass` holds what a captured layer's attention function was given
(post-RoPE queries and keys, the values, the score scale) and forms probabilities a block of query rows at a time, so
no [B, H, T, T] map exists. A kind computes a layer in up to two passes over the rows: `solve` (statistics over
every row, e.g. SHD's α, which needs the Grams of `LayerPass.statistics`) and its maps at the stored rows, block by
block. Most kinds' maps are linear in the teacher heads' rows (a selection, a mean, SHD's α-weighted sums): they give
`head_weights`, and the emit pass forms every such map of a layer with one product per block; the others (MiniLM's
relations) compute `rows` themselves.

A kind's maps of one layer come in *variants*: one per student head count for the head-dependent kinds (the same
teacher layer squeezed for 3 and for 2 student heads), one per relation-head count for MiniLM relations, a single
one for the global mean map.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from pipeline.ops.attention_rows import attention_rows, block_size, row_blocks
from pipeline.ops.shd import (
    Circuits,
    GroupStats,
    accumulate_group_stats,
    combine_heads,
    group_stats_from_outputs,
    new_group_stats,
)

HeadGroup = tuple[int, ...]
"""Teacher heads whose statistics are accumulated together."""


class MapSpec(NamedTuple):
    """One cached target map: its tensor name (the prefix of its encoded tensors), head count and teacher layer."""

    name: str
    heads: int
    layer: int


class ExtraSpec(NamedTuple):
    """A per-sample tensor a kind stores beside its maps (fp32 [N, width]), e.g. SHD's α per teacher head."""

    name: str
    width: int
    layer: int
    role: str
    """What it holds, for the value checks (`checks`): `alpha` (weights in [0, 1])."""
    statistics_key: str
    """Its key in the manifest's summary statistics (`alpha_stats`)."""


@dataclass(frozen=True)
class TargetSettings:
    """What the teacher pass computes for every sample: the cache's targets, or the live targets of a run."""

    layers: tuple[int, ...]
    head_counts: tuple[int, ...]
    kinds: tuple[str, ...]
    """Target map kinds (names in the registry)."""
    encoding: str
    attn_top_m: int
    top_k: int
    temperatures: tuple[float, ...]
    """Temperatures of the cached tail sums (τ = 1 among them)."""
    dtype: torch.dtype
    """The 16-bit values' dtype (the live source computes in fp32)."""
    variants: dict[str, int] = field(default_factory=dict)
    """Kind name → its one variant, for the kinds with a `variant_key` (the relation heads R of `relations`)."""
    selected_heads: dict[str, list[int]] | None = None
    """`L<layer>.H<heads>` → teacher heads of the `selective` targets (`SelectiveKind.prepare`)."""
    row_fraction: float = 1.0
    """Share of every sample's query rows whose attention targets are stored (`pipeline.targets.rows`)."""
    attn_value_bits: int = 16
    logit_value_bits: int = 16


@dataclass
class LayerPass:
    """One captured teacher layer of a batch: what its attention function was given, its output, and its circuits."""

    query: Tensor
    """[B, H, T, dh] post-RoPE queries."""
    key: Tensor
    """[B, H_kv, T, dh] post-RoPE keys, once per KV head."""
    value: Tensor
    """[B, H_kv, T, dh] values, once per KV head."""
    scale: float
    output: Tensor | None = None
    """[B, H, T, dh] each head's attention output A_h V_{kv(h)}, as the forward computed it."""
    circuits: Circuits | None = None
    """The value–output circuits (values, each head's slice of W_O, its KV head), when a kind needs them."""

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    def attention(self, positions: Tensor) -> Tensor:
        """Probabilities [B, H, R, K] of the query rows `positions` ([R] or [B, R], sorted)."""
        return attention_rows(self.query, self.key, self.scale, positions)

    def statistics(
        self, groups: Iterable[HeadGroup], overlap_groups: Iterable[HeadGroup] = ()
    ) -> dict[HeadGroup, tuple[GroupStats, Tensor]]:
        """Every group's `GroupStats` over all query rows and its output maps.

        A group whose heads read one KV head takes its statistics from the heads' fp32 outputs (no map formed); the
        others, and `overlap_groups` (whose ⟨A_i, A_j⟩ a pair α needs), from the maps, in one pass of row blocks."""
        if self.circuits is None:
            raise ValueError("statistics need the layer's circuits (a kind with capture = {'circuits'})")
        plans = {group: self.circuits.group(group) for group in dict.fromkeys(groups)}
        needs_maps = set(overlap_groups)
        stats: dict[HeadGroup, GroupStats] = {}
        for group, plan in plans.items():
            one_kv_head = plan.values.shape[-1] == self.query.shape[-1]
            exact_output = self.output is not None and self.output.dtype == torch.float32
            if one_kv_head and exact_output and group not in needs_maps:
                stats[group] = group_stats_from_outputs(self.output[:, list(group)], plan.values)
        mapped = {group: plan for group, plan in plans.items() if group not in stats}
        for group, plan in mapped.items():
            stats[group] = new_group_stats(plan, len(group))
        if mapped:
            batch, heads, seq_len = self.query.shape[:3]
            for start, stop in row_blocks(seq_len, block_size(batch, heads, seq_len)):
                probs = self.attention(torch.arange(start, stop, device=self.query.device))
                for group, plan in mapped.items():
                    stats[group] = accumulate_group_stats(stats[group], probs[:, list(group)], plan.values)
        return {group: (stats[group], plans[group].outputs) for group in plans}


class TargetKind(ABC):
    """One kind of target map. Subclasses set the class attributes and implement `variants`, `maps` and either
    `head_weights` (maps linear in the teacher heads' rows) or `rows`; the rest has defaults that fit most kinds."""

    name: ClassVar[str]
    description: ClassVar[str]
    """One line for the config reference."""
    capture: ClassVar[frozenset[str]] = frozenset()
    """What the teacher pass must keep beyond queries, keys and values: `circuits` (each head's slice of W_O)."""
    uses_attention: ClassVar[bool] = True
    """Its rows are computed from the teacher's attention probabilities of the block (formed once for all kinds)."""
    per_student_heads: ClassVar[bool] = True
    """Its variants are student head counts (`cache.head_counts`): a student with H heads reads variant H."""
    calibration_samples: ClassVar[int] = 0
    """Train samples its `prepare` reads (0: it has nothing to prepare)."""
    variant_key: ClassVar[str | None] = None
    """A kind whose one variant is a setting of the run, not a student head count: the config key that sets it
    (`distill.rel.heads`), read into `TargetSettings.variants` by whoever builds the settings."""
    fingerprint_field: ClassVar[str | None] = None
    """Where a cache's fingerprint records that variant (`rel_heads`; null in caches without the kind)."""

    @abstractmethod
    def variants(self, settings: TargetSettings) -> tuple[int | None, ...]:
        """The variants a cache with `settings` stores per layer."""

    @abstractmethod
    def maps(self, layer: int, variant: int | None) -> tuple[MapSpec, ...]:
        """The maps of one variant of teacher layer `layer`."""

    def stats_groups(self, variant: int | None, num_heads: int) -> tuple[HeadGroup, ...]:
        """Head groups whose statistics over every row `solve` needs (none by default)."""
        return ()

    def overlap_groups(self, variant: int | None, num_heads: int) -> tuple[HeadGroup, ...]:
        """Those of `stats_groups` whose map overlaps ⟨A_i, A_j⟩ `solve` reads (none by default)."""
        return ()

    def solve(
        self,
        layer_pass: LayerPass,
        layer: int,
        variant: int | None,
        stats: dict[HeadGroup, tuple[GroupStats, Tensor]],
        settings: TargetSettings,
    ) -> Any:
        """What the kind decides for a layer before its rows are formed, from the statistics of every row
        (`stats_groups`) and the settings (SHD's α, the selective heads); None by default."""
        return None

    def head_weights(self, layer_pass: LayerPass, layer: int, variant: int | None, state: Any) -> dict[str, Tensor]:
        """Map name → weights [B, H, H_t] for every map of the variant when each row of a map is a fixed combination
        of the teacher heads' rows at the same query (row h = Σ_t w[h, t] · A_t); empty for kinds whose `rows` form
        their maps otherwise."""
        return {}

    def rows(
        self,
        layer_pass: LayerPass,
        layer: int,
        variant: int | None,
        state: Any,
        attention: Tensor | None,
        positions: Tensor,
    ) -> dict[str, Tensor]:
        """Map name → its rows [B, H, R, K] at query `positions` [B, R] (keys 0..K−1), from the block's teacher
        `attention` [B, H_t, R, K] (None for kinds that do not use it) and the `solve` state; by default the
        `head_weights` applied to `attention`."""
        weights = self.head_weights(layer_pass, layer, variant, state)
        if not weights:
            raise NotImplementedError(f"target kind {self.name!r} gives neither head_weights nor rows")
        return {name: combine_heads(attention, weight) for name, weight in weights.items()}

    def extras(self, layer: int, variant: int | None, teacher_heads: int) -> tuple[ExtraSpec, ...]:
        """Per-sample tensors stored beside the maps of one variant (none by default)."""
        return ()

    def extra_values(self, layer: int, variant: int | None, state: Any) -> dict[str, Tensor]:
        """The `extras` of a batch from its `solve` state: name → [B, width] fp32 (none by default)."""
        return {}

    def variant_problem(self, variant: int | None, fingerprint: dict[str, Any]) -> str | None:
        """Why a cache with `fingerprint` lacks `variant` (None when it has it); every variant by default."""
        return None

    def prepare(
        self, passes: Iterable[dict[int, LayerPass]], layers: tuple[int, ...], head_counts: tuple[int, ...]
    ) -> dict[str, Any]:
        """Choices made once per cache before any shard, from the teacher passes of the first
        `calibration_samples` train samples (batch by batch), recorded in the manifest and handed back through
        `TargetSettings` (none by default; the `selective` kind picks its teacher heads here)."""
        return {}


def layer_key(layer: int, heads: int) -> str:
    """`L<layer>.H<heads>`: how manifests key per-layer, per-head-count records (selected heads, α statistics)."""
    return f"L{layer}.H{heads}"


def student_heads_problem(variant: int | None, fingerprint: dict[str, Any]) -> str | None:
    """The cache lacks targets for `variant` student heads (the head-dependent kinds' `variant_problem`)."""
    have = fingerprint.get("student_head_counts") or []
    if variant in have:
        return None
    return (
        f"fingerprint field 'student_head_counts' is {have}, but the student has {variant} heads; re-run `distill "
        f"cache` with {variant} in cache.head_counts"
    )


def single_heads(num_heads: int) -> Sequence[HeadGroup]:
    """Every head alone: the groups whose statistics give each head's output share."""
    return [(head,) for head in range(num_heads)]
