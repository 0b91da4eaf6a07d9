"""`relations` targets: MiniLMv2's Q-Q, K-K and V-V self-relation maps of a teacher layer over R relation heads,
stored as `rel.L<layer>.R<R>.q|k|v` (R heads each); R is the relation term's `distill.rel.heads`.

MiniLMv2 sidesteps head-count mismatch differently from SHD: it concatenates all heads' queries (keys, values) into
one ``[T, H·dh]`` matrix, re-splits it into R *relation heads* chosen independently of both models' head counts, and
matches the scaled dot-product self-relations ``softmax(X_r X_rᵀ / √d_r)`` of teacher and student with a KL. Under
a causal mask each relation is a row-stochastic causal T × T map, exactly like an attention map, so the teacher's
relation maps are cached with the attention encodings (dense triangle or top-m rows) and the student's are compared
from its scores (`pipeline.objective.terms.relations`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from pipeline.ops.map_losses import student_log_probs
from pipeline.targets.kinds.base import MapSpec, TargetKind, TargetSettings, TeacherPass

RELATIONS = ("q", "k", "v")
"""The three self-relations, in cache-key order (`rel.L<l>.R<r>.q` …)."""


def relation_states(states: Tensor, num_relation_heads: int) -> Tensor:
    """Per-head states ``[B, H, T, dh]`` as R relation heads ``[B, R, T, H·dh / R]`` (heads concatenated, re-split).

    Under GQA, pass keys and values repeated per query head (as attention sees them), so the width is H·dh for all
    three relations.
    """
    batch, heads, length, head_dim = states.shape
    width = heads * head_dim
    if num_relation_heads < 1 or width % num_relation_heads != 0:
        raise ValueError(
            f"num_relation_heads={num_relation_heads} does not divide the concatenated head width "
            f"{heads}×{head_dim}={width}"
        )
    concatenated = states.transpose(1, 2).reshape(batch, length, num_relation_heads, width // num_relation_heads)
    return concatenated.transpose(1, 2)


def relation_scale(relation_states: Tensor) -> float:
    """The MiniLMv2 scaling 1/√d_r of relation heads ``[B, R, T, d_r]``."""
    return relation_states.shape[-1] ** -0.5


def relation_maps(states: Tensor, num_relation_heads: int, key_mask: Tensor | None = None) -> Tensor:
    """Teacher relation maps ``softmax(X_r X_rᵀ / √d_r)`` under the causal mask: ``[B, R, T, T]`` fp32 probabilities,
    exact zeros at masked keys (the same form as attention maps, so the cache encodes them alike)."""
    relation = relation_states(states.float(), num_relation_heads)
    length = relation.shape[2]
    log_probs = student_log_probs(relation, relation, relation_scale(relation), 0, length, key_mask=key_mask)
    return log_probs.exp()


class RelationsKind(TargetKind):
    name = "relations"
    per_student_heads = False
    variant_key = "distill.rel.heads"
    fingerprint_field = "rel_heads"
    description = "MiniLMv2 Q-Q/K-K/V-V relation maps over R relation heads"
    capture = frozenset({"qkv"})

    def variants(self, settings: TargetSettings) -> tuple[int | None, ...]:
        return (settings.variants.get(self.name),)

    def maps(self, layer: int, variant: int | None) -> tuple[MapSpec, ...]:
        return tuple(MapSpec(f"rel.L{layer}.R{variant}.{relation}", int(variant), layer) for relation in RELATIONS)

    def compute(
        self, teacher_pass: TeacherPass, layer: int, variant: int | None, settings: TargetSettings
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        states = teacher_pass.qkv[layer]
        specs = self.maps(layer, variant)
        return {spec.name: relation_maps(state, int(variant)) for spec, state in zip(specs, states, strict=True)}, {}

    def variant_problem(self, variant: int | None, fingerprint: dict[str, Any]) -> str | None:
        if fingerprint.get("rel_heads") == variant:
            return None
        return (
            f"fingerprint field 'rel_heads' is {fingerprint.get('rel_heads')!r}, the run needs relation maps over "
            f"{variant} relation heads (distill.rel.heads); re-run `distill cache` into a new cache.output_dir"
        )


KINDS = (RelationsKind(),)
