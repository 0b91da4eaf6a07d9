"""What a target kind is: one kind of teacher target map the cache can hold, declared in one place.

A kind says what it needs from the teacher's forward (attention maps, value–output circuits, q/k/v states), which
maps it stores for a cached layer (tensor names and head counts), how it computes them from a `TeacherPass`, what it
stores beside them (SHD's α) and where a cache records what a run needs of it. Config validation, the fingerprint,
the writer, the online source, the layout, the reader's checks and cache adequacy all ask the registry
(`pipeline.targets.kinds`) instead of knowing kinds by name. How maps are encoded on disk (dense triangle, top-m
rows) is the encoding's business (`pipeline.targets.encoding`), the same for every kind.

A kind's maps of one layer come in *variants*: one per student head count for the head-dependent kinds (the same
teacher layer squeezed for 3 and for 2 student heads), one per relation-head count for MiniLM relations, a single
one for the global mean map.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from pipeline.ops.shd import Circuits


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
    variants: dict[str, int] = field(default_factory=dict)
    """Kind name → its one variant, for the kinds with a `variant_key` (the relation heads R of `relations`)."""
    selected_heads: dict[str, list[int]] | None = None
    """`L<layer>.H<heads>` → teacher heads of the `selective` targets (`SelectiveKind.choose`)."""


@dataclass
class TeacherPass:
    """What one teacher forward on a batch recorded, for the kinds to compute their targets from (dicts keyed by
    teacher layer; `AttentionCapture` documents the shapes)."""

    maps: dict[int, Tensor]
    """Attention probabilities [B, H, T, T] fp32."""
    circuits: dict[int, Circuits] = field(default_factory=dict)
    qkv: dict[int, Any] = field(default_factory=dict)


class TargetKind(ABC):
    """One kind of target map. Subclasses set the class attributes and implement `variants`, `maps` and
    `compute`; the rest has defaults that fit most kinds."""

    name: ClassVar[str]
    description: ClassVar[str]
    """One line for the config reference."""
    capture: ClassVar[frozenset[str]] = frozenset()
    """What the teacher pass must record beyond the maps: `circuits` (value–output circuits), `qkv`."""
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

    @abstractmethod
    def compute(
        self, teacher_pass: TeacherPass, layer: int, variant: int | None, settings: TargetSettings
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(map name → maps [B, H, T, T] fp32 probabilities, extra tensor name → [B, width] fp32) of one variant of
        one layer."""

    def extras(self, layer: int, variant: int | None, teacher_heads: int) -> tuple[ExtraSpec, ...]:
        """Per-sample tensors stored beside the maps of one variant (none by default)."""
        return ()

    def variant_problem(self, variant: int | None, fingerprint: dict[str, Any]) -> str | None:
        """Why a cache with `fingerprint` lacks `variant` (None when it has it); every variant by default."""
        return None

    def prepare(
        self, teacher: nn.Module, calibration_ids: Tensor, layers: tuple[int, ...], head_counts: tuple[int, ...]
    ) -> dict[str, Any]:
        """Choices made once per cache before any shard, recorded in the manifest and handed back through
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
