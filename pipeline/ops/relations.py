"""MiniLMv2 self-attention relations: the head-count-free baseline SHD is compared against.

MiniLMv2 sidesteps head-count mismatch differently from SHD: it concatenates all heads' queries (keys, values) into
one ``[T, H·dh]`` matrix, re-splits it into R *relation heads* chosen independently of both models' head counts, and
matches the scaled dot-product self-relations ``softmax(X_r X_rᵀ / √d_r)`` of teacher and student with a KL. Under
a causal mask each relation is a row-stochastic causal T × T map, exactly like an attention map, so the teacher's
relation maps are cached with the attention encodings (dense triangle or top-m rows) and the student's are compared
from its scores with `pipeline.ops.map_losses` (row blocks, log_softmax, no T × T student map).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from pipeline.ops.map_losses import MapTarget, map_loss_sum, student_log_probs

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


def relation_loss_sum(
    student_qkv: Sequence[Tensor],
    targets: Sequence[MapTarget],
    num_relation_heads: int,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Σ over valid query rows of KL(teacher relation ‖ student relation), averaged over the R relation heads and the
    three relations → fp32 scalar with graph into the student states.

    `student_qkv`: (queries, keys, values), each ``[B, H_s, T, dh_s]`` (keys and values repeated per query head);
    `targets`: the teacher's q, k and v relation maps for the same R (dense or top-m, τ = 1; see `relation_maps`).
    R must divide H_s·dh_s (and the teacher's width, which the cache checked).
    """
    if len(student_qkv) != 3 or len(targets) != 3:
        raise ValueError("student_qkv and targets must each hold the (queries, keys, values) relations")
    total = None
    for states, target in zip(student_qkv, targets, strict=True):
        relation = relation_states(states, num_relation_heads)
        part = map_loss_sum(
            relation,
            relation,
            relation_scale(relation),
            target,
            query_mask=query_mask,
            key_mask=key_mask,
        )
        total = part if total is None else total + part
    return total / len(RELATIONS)


def repeat_kv(states: Tensor, num_heads: int) -> Tensor:
    """Keys or values ``[B, H_kv, T, dh]`` repeated per query head → ``[B, H, T, dh]`` (GQA as attention sees it)."""
    return states if states.shape[1] == num_heads else states.repeat_interleave(num_heads // states.shape[1], dim=1)


def states_for_relations(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(queries, keys, values) ``[B, H, T, dh]`` each, keys and values repeated per query head."""
    heads = query.shape[1]
    return query, repeat_kv(key, heads), repeat_kv(value, heads)
