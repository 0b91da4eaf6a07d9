"""Squeezing-Heads Distillation (SHD): merge a teacher's H_t attention maps into H_s student targets (exact group
solve, the paper's pairwise merge, or uniform) and each head's output share — from statistics accumulated over
blocks of query rows, so that no [B, H, T, T] map has to exist.

Everything SHD's α and the head importance need of the maps is, per head group, the Gram of the heads' outputs in
their values' space: with V the group's values [T, w] (its KV heads side by side) and Y_i = A_i V,
P_ij = Y_iᵀ Y_j [w, w] and ⟨A_i, A_j⟩_F, summed over query rows (`GroupStats`, fp64). Every objective below is an
inner product of those with products of the heads' output maps: the T-sized work is one A V product per head and
row block, as in the attention itself — or none: a group whose heads read one KV head has Y_i = o_i, the head's
attention output, which the forward already computed (`group_stats_from_outputs`). The same solves on whole maps
are `pipeline.ops.shd_maps`.

Pure tensor maths in fp32 (statistics and the tiny per-group systems in fp64); nothing here knows about ranks or
models. Shapes: B batch, H heads, T tokens, d model width, dh head width, r heads of a group, w = dh · KV heads of
a group. Attention maps are row-stochastic and causal.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from pipeline.ops.kd import PROB_FLOOR
from pipeline.ops.matching import SQUEEZE_METHODS, SqueezeMethod, pairwise_pass_sizes

MAX_EXACT_GROUP_SIZE = 10
"""Largest group solved exactly by enumerating the 2^r − 1 supports of the simplex QP; larger groups fall back to
projected gradient."""

DEGENERATE_REL_EPS = 1e-10
"""A pair is degenerate (α = ½) when ‖D S‖² <= this · ‖D‖² ‖S‖²: then every α reconstructs equally well, up to
fp32 rounding of the products."""

_FEASIBILITY_TOL = 1e-9
_PROJECTED_GRADIENT_STEPS = 500


class Circuits(NamedTuple):
    """Value–output circuits X_h = V_{kv(h)} W_O^h of one layer, kept as their factors.

    `values` [B, H_kv, T, dh]: each KV head's values once (not repeated per query head under GQA); `output`
    [H, dh, d]: head h's slice of the output projection; `kv_heads`: the KV head (index into `values`) that each of
    the H query heads reads.
    """

    values: Tensor
    output: Tensor
    kv_heads: tuple[int, ...]

    @classmethod
    def from_dense(cls, circuits: Tensor) -> "Circuits":
        """Dense circuits X [B, H, T, d] as factors (values X, identity output maps), for callers that hold X."""
        heads, width = circuits.shape[1], circuits.shape[-1]
        identity = torch.eye(width, dtype=circuits.dtype, device=circuits.device).expand(heads, width, width)
        return cls(circuits, identity, tuple(range(heads)))

    def dense(self) -> Tensor:
        """X [B, H, T, d] fp32."""
        return torch.einsum("bhtk,hkd->bhtd", self.values.float()[:, list(self.kv_heads)], self.output.float())

    def group(self, heads: Sequence[int]) -> "GroupCircuits":
        """The circuits of query heads `heads` in their values' space (see `GroupCircuits`)."""
        used = sorted({self.kv_heads[head] for head in heads})
        batch, _, seq, head_dim = self.values.shape
        values = self.values[:, used].permute(0, 2, 1, 3).reshape(batch, seq, len(used) * head_dim)
        embedded = self.output.new_zeros(len(heads), len(used) * head_dim, self.output.shape[-1], dtype=torch.float64)
        for row, head in enumerate(heads):
            slot = used.index(self.kv_heads[head])
            embedded[row, slot * head_dim : (slot + 1) * head_dim] = self.output[head].double()
        return GroupCircuits(values.float(), embedded)


class GroupCircuits(NamedTuple):
    """A head group's circuits in its values' space: X_j = V Ŵ_j."""

    values: Tensor
    """V [B, T, w] fp32: the group's KV heads' values side by side."""
    outputs: Tensor
    """Ŵ [r, w, d] fp64: each head's output map placed at its KV head's rows (0 elsewhere)."""


class GroupStats(NamedTuple):
    """What α and the importance of one head group need of its maps, summed over query rows (fp64)."""

    products: Tensor
    """[B, r, r, w, w]: P_ij = Σ_rows (A_i V)ᵀ (A_j V)."""
    overlaps: Tensor
    """[B, r, r]: ⟨A_i, A_j⟩_F."""
    values_gram: Tensor
    """[B, w, w]: VᵀV over every key (what ‖S‖² needs)."""


def new_group_stats(circuits: GroupCircuits, size: int) -> GroupStats:
    """Empty statistics of a group of `size` heads over `circuits.values`, with VᵀV already summed."""
    values = circuits.values.double()
    batch, _, width = values.shape
    return GroupStats(
        values.new_zeros(batch, size, size, width, width),
        values.new_zeros(batch, size, size),
        values.transpose(1, 2) @ values,
    )


def group_stats_from_outputs(outputs: Tensor, values: Tensor) -> GroupStats:
    """The statistics of a group whose heads all read one KV head, from the attention's own outputs: there
    A_i V = the head's output o_i [B, T, dh] (what SDPA computed), so P_ij = Σ_rows o_iᵀ o_j needs no map. `outputs`
    [B, r, T, dh], `values` [B, T, dh] (the KV head's). ⟨A_i, A_j⟩ needs the maps and is left NaN: only the pair α
    (groups of two, the pairwise merge) reads it, and those groups take the map pass."""
    batch, size, rows, width = outputs.shape
    flat = outputs.float().transpose(2, 3).reshape(batch, size * width, rows)
    gram = (flat @ flat.transpose(1, 2)).double().view(batch, size, width, size, width).permute(0, 1, 3, 2, 4)
    values = values.double()
    overlaps = gram.new_full((batch, size, size), math.nan)
    return GroupStats(gram.contiguous(), overlaps, values.transpose(1, 2) @ values)


def accumulate_group_stats(stats: GroupStats, maps: Tensor, values: Tensor) -> GroupStats:
    """`stats` plus the query rows of `maps` [B, r, rows, K] (the group's probabilities of some rows over keys
    0..K−1) with `values` [B, T, w] (the group's `GroupCircuits.values`; keys ≥ K are 0 in every row).

    Each block's sums are fp32 matrix products (the block's rows at most), accumulated across blocks in fp64."""
    maps = maps.float()
    batch, size, rows, keys = maps.shape
    width = values.shape[-1]
    projected = maps @ values[:, None, :keys].float()
    flat = projected.transpose(2, 3).reshape(batch, size * width, rows)
    gram = (flat @ flat.transpose(1, 2)).double().view(batch, size, width, size, width).permute(0, 1, 3, 2, 4)
    flat_maps = maps.reshape(batch, size, rows * keys)
    overlaps = (flat_maps @ flat_maps.transpose(1, 2)).double()
    return GroupStats(stats.products + gram, stats.overlaps + overlaps, stats.values_gram)


def _inner(products: Tensor, matrix: Tensor) -> Tensor:
    """⟨P_ij, M⟩ for every pair: `products` [B, r, r, w, w], `matrix` [w, w] → [B, r, r]."""
    return torch.einsum("bijvx,vx->bij", products, matrix)


def _pair_alpha(products: Tensor, overlaps: Tensor, values_gram: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """SHD's closed-form weight of merged head p (output map `first` [w, d]) against q (`second`): the pair's map is
    α Ã_p + (1 − α) Ã_q with D = Ã_p − Ã_q = Σ_i d_i A_i given by `overlaps`-sized coefficients folded in by the
    caller (`products` [B, w, w] = (DV)ᵀ(DV), `overlaps` [B] = ‖D‖²). The merged head applies one map to
    S = X_p + X_q and should reproduce Ã_p X_p + Ã_q X_q; the residual D X_p − α D S is minimised over [0, 1] by
    α* = ⟨D X_p, D S⟩_F / ‖D S‖_F², clipped; α = ½ where ‖D S‖ is (relatively) 0, i.e. where α does not matter.
    Returns α [B] fp32."""
    summed = first + second
    numerator = torch.einsum("bvx,vx->b", products, first @ summed.T)
    denominator = torch.einsum("bvx,vx->b", products, summed @ summed.T)
    scale = overlaps * torch.einsum("bvx,vx->b", values_gram, summed @ summed.T)
    degenerate = denominator <= DEGENERATE_REL_EPS * scale
    alpha = numerator / torch.where(degenerate, 1.0, denominator)
    return torch.where(degenerate, 0.5, alpha.clamp(0.0, 1.0)).float()


def _combined(stats: GroupStats, coefficients: Tensor) -> tuple[Tensor, Tensor]:
    """((DV)ᵀ(DV) [B, w, w], ‖D‖² [B]) of D = Σ_i c_i A_i, `coefficients` [B, r] (fp64)."""
    products = torch.einsum("bi,bj,bijvx->bvx", coefficients, coefficients, stats.products)
    overlaps = torch.einsum("bi,bj,bij->b", coefficients, coefficients, stats.overlaps)
    return products, overlaps


def _qp_objective(gram: Tensor, linear: Tensor, weights: Tensor) -> Tensor:
    """αᵀ G α − 2 cᵀ α for `weights` [N, C, r] against `gram` [N, r, r], `linear` [N, r] → [N, C]."""
    quadratic = torch.einsum("nci,nij,ncj->nc", weights, gram, weights)
    return quadratic - 2 * torch.einsum("nci,ni->nc", weights, linear)


def _project_to_simplex(points: Tensor) -> Tensor:
    """Euclidean projection of each row of `points` [N, r] onto the probability simplex (sort-based)."""
    size = points.shape[-1]
    ordered = points.sort(dim=-1, descending=True).values
    cumulative = ordered.cumsum(dim=-1) - 1
    ranks = torch.arange(1, size + 1, device=points.device, dtype=points.dtype)
    support = (ordered - cumulative / ranks > 0).sum(dim=-1, keepdim=True)
    threshold = cumulative.gather(-1, support - 1) / support
    return (points - threshold).clamp_min(0)


def _exact_simplex_qp(gram: Tensor, linear: Tensor) -> Tensor:
    """Exact minimiser of αᵀ G α − 2 cᵀ α on the simplex, `gram` [N, r, r], `linear` [N, r] → [N, r].

    The optimum lies in the relative interior of some face, where it solves the equality-constrained KKT system on
    that face's support. All 2^r − 1 supports are solved at once (padded (r + 1)² systems, coordinates outside the
    support pinned to 0); every feasible solution is scored by the true objective and the best kept, with the
    uniform point as the first candidate, so ties and singular faces fall back to it.
    """
    num, size = linear.shape
    codes = torch.arange(1, 2**size, device=gram.device)
    subsets = ((codes[:, None] >> torch.arange(size, device=gram.device)) & 1).to(gram.dtype)
    kkt = gram.new_zeros(num, len(codes), size + 1, size + 1)
    kkt[..., :size, :size] = gram[:, None] * (subsets[:, :, None] * subsets[:, None, :]) + torch.diag_embed(1 - subsets)
    kkt[..., :size, size] = subsets
    kkt[..., size, :size] = subsets
    rhs = gram.new_zeros(num, len(codes), size + 1)
    rhs[..., :size] = linear[:, None] * subsets
    rhs[..., size] = 1
    solution, info = torch.linalg.solve_ex(kkt, rhs)
    weights = solution[..., :size]
    feasible = (info == 0) & weights.isfinite().all(-1) & (weights >= -_FEASIBILITY_TOL).all(-1)
    weights = torch.where(feasible[..., None], weights.clamp_min(0) * subsets, 0.0)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(PROB_FLOOR)
    uniform = gram.new_full((num, 1, size), 1 / size)
    candidates = torch.cat([uniform, weights], dim=1)
    objective = _qp_objective(gram, linear, candidates)
    objective[:, 1:] = torch.where(feasible, objective[:, 1:], math.inf)
    best = objective.argmin(dim=1)
    return candidates[torch.arange(num, device=gram.device), best]


def _projected_gradient_simplex_qp(gram: Tensor, linear: Tensor) -> Tensor:
    """Fallback for large groups: projected gradient from the uniform point with step 1/λ_max(G).

    With that step each iteration cannot increase the objective; the best iterate is kept anyway, so the result is
    never worse than uniform. Approximate (`_PROJECTED_GRADIENT_STEPS` iterations), unlike `_exact_simplex_qp`.
    """
    num, size = linear.shape
    step = 1 / torch.linalg.eigvalsh(gram)[:, -1].clamp_min(PROB_FLOOR)
    weights = gram.new_full((num, size), 1 / size)
    best, best_objective = weights, _qp_objective(gram, linear, weights[:, None])[:, 0]
    for _ in range(_PROJECTED_GRADIENT_STEPS):
        gradient = (gram @ weights[..., None]).squeeze(-1) - linear
        weights = _project_to_simplex(weights - step[:, None] * gradient)
        objective = _qp_objective(gram, linear, weights[:, None])[:, 0]
        improved = objective < best_objective
        best = torch.where(improved[:, None], weights, best)
        best_objective = torch.where(improved, objective, best_objective)
    return best


def group_alphas_from_stats(
    stats: GroupStats, outputs: Tensor, max_exact_group_size: int = MAX_EXACT_GROUP_SIZE
) -> Tensor:
    """SHD weights of one group of r heads: α on the simplex minimising ‖Σ_i A_i X_i − (Σ_i α_i A_i) S‖_F²,
    S = Σ_i X_i, from its statistics and output maps `outputs` [r, w, d] → α [B, r] fp32.

    r = 1: 1; r = 2: the closed-form pair α (exact). r > 2: the QP with Gram matrix G_ij = ⟨A_i S, A_j S⟩ =
    ⟨P_ij, Ŵ_S Ŵ_Sᵀ⟩ and c_i = ⟨A_i S, Σ_j A_j X_j⟩ = Σ_j ⟨P_ij, Ŵ_S Ŵ_jᵀ⟩, in fp64 after scaling G to unit mean
    diagonal; solved exactly up to `max_exact_group_size` heads, by projected gradient beyond. G = 0 → uniform.
    """
    batch, size = stats.overlaps.shape[:2]
    if size == 1:
        return stats.overlaps.new_ones(batch, 1, dtype=torch.float32)
    if size == 2:
        difference = stats.overlaps.new_tensor([1.0, -1.0]).expand(batch, 2)
        alpha = _pair_alpha(*_combined(stats, difference), stats.values_gram, outputs[0], outputs[1])
        return torch.stack([alpha, 1 - alpha], dim=1)
    summed = outputs.sum(0)
    gram = _inner(stats.products, summed @ summed.T)
    linear = torch.einsum("bijvx,jvx->bi", stats.products, torch.einsum("vd,jxd->jvx", summed, outputs))
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)
    degenerate = scale <= 0
    scale = torch.where(degenerate, 1.0, scale)
    gram, linear = gram / scale[:, None, None], linear / scale[:, None]
    if size <= max_exact_group_size:
        weights = _exact_simplex_qp(gram, linear)
    else:
        weights = _projected_gradient_simplex_qp(gram, linear)
    return torch.where(degenerate[:, None], 1 / size, weights).float()


def pairwise_alphas_from_stats(
    stats: Sequence[GroupStats], outputs: Sequence[Tensor], groups: Sequence[Sequence[int]], num_teacher_heads: int
) -> Tensor:
    """SHD's Algorithm 1: effective weights of merging adjacent pairs pass by pass (see `matching.squeeze_groups`),
    from the statistics and output maps of each final group (`groups`: `squeeze_groups(..., "shd_pairwise")`; every
    merge stays inside one of them) → α [B, H_t] fp32, summing to 1 over each group.

    Merging current heads p and q takes the closed-form pair α of their current maps (linear combinations of the
    group's teacher maps) and circuits; the merged head has map α Ã_p + (1 − α) Ã_q and circuit X_p + X_q. A teacher
    head's weight is the product of the α (or 1 − α) on its path.
    """
    batch = stats[0].overlaps.shape[0]
    home = {head: (index, position) for index, group in enumerate(groups) for position, head in enumerate(group)}
    alphas = stats[0].overlaps.new_ones(batch, num_teacher_heads, dtype=torch.float32)
    current = []
    for head in range(num_teacher_heads):
        index, position = home[head]
        coefficients = stats[index].overlaps.new_zeros(batch, len(groups[index]))
        coefficients[:, position] = 1.0
        current.append(([head], index, coefficients, outputs[index][position]))
    for pairs in pairwise_pass_sizes(num_teacher_heads, len(groups)):
        merged = []
        for first, second in zip(current[: 2 * pairs : 2], current[1 : 2 * pairs : 2], strict=True):
            index = first[1]
            products, overlaps = _combined(stats[index], first[2] - second[2])
            alpha = _pair_alpha(products, overlaps, stats[index].values_gram, first[3], second[3])
            alphas[:, first[0]] *= alpha[:, None]
            alphas[:, second[0]] *= 1 - alpha[:, None]
            weight = alpha.double()[:, None]
            coefficients = weight * first[2] + (1 - weight) * second[2]
            merged.append((first[0] + second[0], index, coefficients, first[3] + second[3]))
        current = merged + current[2 * pairs :]
    return alphas


def importance_from_stats(stats: Sequence[GroupStats], outputs: Sequence[Tensor]) -> Tensor:
    """Each head's share of its layer's attention output ‖A_h X_h‖_F / Σ_j ‖A_j X_j‖_F per sample, from the
    one-head group statistics of every head (in head order) → [B, H] fp32, rows summing to 1 (uniform where every
    head's output is 0). ‖A_h X_h‖² = ⟨P_hh, Ŵ_h Ŵ_hᵀ⟩."""
    squared = torch.stack(
        [_inner(head.products, output[0] @ output[0].T)[:, 0, 0] for head, output in zip(stats, outputs, strict=True)],
        dim=1,
    )
    norms = squared.clamp_min(0).sqrt()
    total = norms.sum(1, keepdim=True)
    shares = norms / torch.where(total > 0, total, 1.0)
    return torch.where(total > 0, shares, 1 / len(stats)).float()


def squeeze_alphas(
    stats: Sequence[GroupStats] | None,
    outputs: Sequence[Tensor] | None,
    groups: Sequence[Sequence[int]],
    num_teacher_heads: int,
    method: SqueezeMethod,
    batch: int,
) -> Tensor:
    """Each teacher head's weight inside its group [B, H_t] fp32 under `method`, from the groups' statistics (None
    for `uniform`, which needs none): the α `squeeze_rows` combines maps with."""
    if method not in SQUEEZE_METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(map(repr, SQUEEZE_METHODS))}")
    alphas = torch.ones(batch, num_teacher_heads)
    if len(groups) >= num_teacher_heads:
        return alphas
    if method == "shd_pairwise":
        return pairwise_alphas_from_stats(stats, outputs, groups, num_teacher_heads)
    for index, group in enumerate(groups):
        if method == "uniform":
            alphas[:, group] = 1 / len(group)
        else:
            alphas[:, group] = group_alphas_from_stats(stats[index], outputs[index]).to(alphas.device)
    return alphas


def squeeze_weights(alphas: Tensor, groups: Sequence[Sequence[int]], num_teacher_heads: int) -> Tensor:
    """The squeeze as head weights [B, H_s, H_t] fp32: row s holds α_i at the heads of group s, 0 elsewhere (the
    group's single head with weight 1 when H_s ≥ H_t)."""
    alphas = alphas.float()
    weights = alphas.new_zeros(alphas.shape[0], len(groups), num_teacher_heads)
    copies = len(groups) >= num_teacher_heads
    for student_head, group in enumerate(groups):
        if copies:
            weights[:, student_head, group[0]] = 1.0
        else:
            weights[:, student_head, list(group)] = alphas[:, list(group)]
    return weights


def combine_heads(maps: Tensor, weights: Tensor) -> Tensor:
    """Maps [B, H_t, rows, K] → [B, S, rows, K], row s = Σ_h weights[b, s, h] · A_h: a squeeze, a head selection or a
    mean as one batched product, so the rows are read once however many maps are formed from them."""
    batch, heads = maps.shape[:2]
    combined = weights.to(maps.device, torch.float32) @ maps.float().reshape(batch, heads, -1)
    return combined.view(batch, weights.shape[1], *maps.shape[2:])


def squeeze_rows(maps: Tensor, alphas: Tensor, groups: Sequence[Sequence[int]]) -> Tensor:
    """Student targets of some query rows: maps [B, H_t, rows, K] → [B, H_s, rows, K], each Σ_i α_i A_i over its
    group (the group's single head copied when H_s ≥ H_t), so rows stay stochastic and causal."""
    heads = maps.shape[1]
    if len(groups) >= heads:
        maps = maps.float()
        return maps if len(groups) == heads else maps[:, [group[0] for group in groups]]
    return combine_heads(maps, squeeze_weights(alphas.to(maps.device), groups, heads))
