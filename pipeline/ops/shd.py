"""Squeezing-Heads Distillation (SHD): merge a teacher's H_t attention maps into H_s student targets (exact group
solve, the paper's pairwise merge, or uniform), each head's output share, and the student ↔ teacher layer map. The
losses that compare student maps with these targets are in `pipeline.ops.map_losses`.

Pure tensor maths in fp32 (the tiny per-group Gram systems in fp64); nothing here knows about ranks or models.
Shapes: B batch, H heads, T tokens, d model width, dh head width. Attention maps are row-stochastic and causal:
[B, H, T, T] with rows over keys and an upper triangle of exact zeros.
"""

import math
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from pipeline.ops.kd import PROB_FLOOR

SqueezeMethod = Literal["shd", "shd_pairwise", "uniform"]
SQUEEZE_METHODS: tuple[str, ...] = get_args(SqueezeMethod)

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
    the H query heads reads. SHD's α only needs products A_i V, dh·(KV heads of a group) wide instead of d wide: for
    SmolLM2 (9 heads on 3 KV heads, dh 64, d 576) 9× fewer FLOPs than with the dense X [B, H, T, d].
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

    def select(self, heads: slice) -> "Circuits":
        """The circuits of query heads `heads`, keeping only the KV heads they read."""
        kv_heads = self.kv_heads[heads]
        used = sorted(set(kv_heads))
        return Circuits(self.values[:, used], self.output[heads], tuple(used.index(kv) for kv in kv_heads))


def as_circuits(circuits: Tensor | Circuits, maps: Tensor) -> Circuits:
    """`circuits` (dense [B, H, T, d] or factored) as `Circuits`, checked against `maps` [B, H, T, T]."""
    batch, heads, seq = maps.shape[:3]
    if isinstance(circuits, Tensor):
        if circuits.dim() != 4 or circuits.shape[:3] != maps.shape[:3]:
            raise ValueError(f"circuits {tuple(circuits.shape)}: expected [{batch}, {heads}, {seq}, d] like the maps")
        return Circuits.from_dense(circuits)
    values, output, kv_heads = circuits
    if (
        values.dim() != 4
        or (values.shape[0], values.shape[2]) != (batch, seq)
        or output.dim() != 3
        or output.shape[:2] != (heads, values.shape[3])
        or len(kv_heads) != heads
        or not all(0 <= kv < values.shape[1] for kv in kv_heads)
    ):
        raise ValueError(
            f"circuits with values {tuple(values.shape)}, output {tuple(output.shape)}, {len(kv_heads)} kv_heads: "
            f"expected values [{batch}, H_kv, {seq}, dh], output [{heads}, dh, d] and {heads} kv_heads in [0, H_kv)"
        )
    return circuits


def head_groups(num_teacher_heads: int, num_student_heads: int) -> list[list[int]]:
    """Which teacher heads each student head is distilled from.

    H_s <= H_t: H_s contiguous groups whose sizes differ by at most one, larger groups first (numpy.array_split:
    9 → 2 is [0..4], [5..8]); every teacher head is in exactly one group, so H_s == H_t is the identity.
    H_s > H_t: student head j copies teacher head floor(j · H_t / H_s); every teacher head is used, some shared.
    """
    if num_teacher_heads < 1 or num_student_heads < 1:
        raise ValueError(f"head counts must be positive, got teacher={num_teacher_heads}, student={num_student_heads}")
    if num_student_heads > num_teacher_heads:
        return [[j * num_teacher_heads // num_student_heads] for j in range(num_student_heads)]
    base, extra = divmod(num_teacher_heads, num_student_heads)
    groups, start = [], 0
    for group in range(num_student_heads):
        size = base + (1 if group < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def _pairwise_pass_sizes(num_teacher_heads: int, num_student_heads: int) -> list[int]:
    """Pairs merged by each pass of `shd_pairwise`: min(⌊H/2⌋, H − H_s) of the H current heads, until H_s remain
    (9 → 3: [4, 2]; 25 → 12: [12, 1]); empty when H_s >= H_t."""
    sizes, heads = [], num_teacher_heads
    while heads > num_student_heads:
        pairs = min(heads // 2, heads - num_student_heads)
        sizes.append(pairs)
        heads -= pairs
    return sizes


def squeeze_groups(num_teacher_heads: int, num_student_heads: int, method: SqueezeMethod = "shd") -> list[list[int]]:
    """Which teacher heads each student head is distilled from under `method`.

    "shd" and "uniform": `head_groups`. "shd_pairwise" (SHD's Algorithm 1) squeezes by passes: each pass merges the
    adjacent pairs (2i, 2i + 1) of the current head list, only the first min(⌊H/2⌋, H − H_s) of them so that the
    count can stop at any H_s, and carries the rest over; the groups are what the passes build, contiguous and in
    order (9 → 5: [0, 1], [2, 3], [4, 5], [6, 7], [8]; 9 → 3: [0..3], [4..7], [8]; 9 → 2: [0..7], [8]).
    H_s >= H_t: `head_groups` for every method.
    """
    if method not in SQUEEZE_METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(map(repr, SQUEEZE_METHODS))}")
    groups = head_groups(num_teacher_heads, num_student_heads)
    if method != "shd_pairwise" or num_student_heads >= num_teacher_heads:
        return groups
    groups = [[head] for head in range(num_teacher_heads)]
    for pairs in _pairwise_pass_sizes(num_teacher_heads, num_student_heads):
        groups = [groups[2 * i] + groups[2 * i + 1] for i in range(pairs)] + groups[2 * pairs :]
    return groups


def _value_space(circuits: Circuits) -> tuple[Tensor, Tensor, Tensor]:
    """A group's circuits in the space of its values: V [B, T, w] fp32, the KV heads' values side by side
    (w = dh · KV heads), and the w × w products of the output maps, fp32: M = Ŵ_S Ŵ_Sᵀ [w, w] and N_j = Ŵ_S Ŵ_jᵀ
    [r, w, w], where Ŵ_j [w, d] is head j's output map placed at its KV head's rows (X_j = V Ŵ_j) and Ŵ_S = Σ_j Ŵ_j
    (S = V Ŵ_S). The d-wide contractions run in fp64; every T-sized product is then w wide instead of d."""
    values, output, kv_heads = circuits
    batch, num_kv, seq, head_dim = values.shape
    stacked = values.float().permute(0, 2, 1, 3).reshape(batch, seq, num_kv * head_dim)
    embedded = output.new_zeros(len(kv_heads), num_kv * head_dim, output.shape[-1], dtype=torch.float64)
    for head, kv in enumerate(kv_heads):
        embedded[head, kv * head_dim : (kv + 1) * head_dim] = output[head].double()
    summed = embedded.sum(0)
    return stacked, (summed @ summed.T).float(), torch.einsum("vd,jxd->jvx", summed, embedded).float()


def _inner(first: Tensor, second: Tensor) -> Tensor:
    """Frobenius inner products over the last two dims, accumulated in fp64."""
    return (first.double() * second.double()).sum((-2, -1))


def _pair_alpha(maps: Tensor, circuits: Circuits) -> Tensor:
    """SHD's closed-form weight of head p when merging heads p, q of `maps` [B, 2, T, T] into α A_p + (1 − α) A_q.

    The merged head applies one map to S = X_p + X_q and should reproduce A_p X_p + A_q X_q; with D = A_p − A_q the
    residual is D X_p − α D S, minimised over [0, 1] by α* = ⟨D X_p, D S⟩_F / ‖D S‖_F², clipped; α = ½ where ‖D S‖
    is (relatively) 0, i.e. where α does not matter. Computed with factored circuits, in the values' space: with
    Q = D V, ⟨D X_p, D S⟩ = ⟨Q N_pᵀ, Q⟩ and ‖D S‖² = ⟨Q M, Q⟩ (see `_value_space`; w × w products instead of T × d
    ones). Returns α [B] fp32 (1 − α is the weight of q)."""
    values, sum_gram, cross = _value_space(circuits)
    diff = maps[:, 0].float() - maps[:, 1].float()
    projected = diff @ values
    numerator = _inner(projected @ cross[0].T, projected)
    denominator = _inner(projected @ sum_gram, projected)
    scale = diff.square().sum((-2, -1), dtype=torch.float64) * _inner(values @ sum_gram, values)
    degenerate = denominator <= DEGENERATE_REL_EPS * scale
    alpha = numerator / torch.where(degenerate, 1.0, denominator)
    return torch.where(degenerate, 0.5, alpha.clamp(0.0, 1.0)).float()


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


def group_alphas(maps: Tensor, circuits: Tensor | Circuits, max_exact_group_size: int = MAX_EXACT_GROUP_SIZE) -> Tensor:
    """SHD weights of one group of r heads: α on the simplex minimising ‖Σ_i A_i X_i − (Σ_i α_i A_i) S‖_F²,
    S = Σ_i X_i.

    `maps` [B, r, T, T], `circuits` dense [B, r, T, d] or `Circuits` of the r heads → α [B, r] fp32. r = 1: 1;
    r = 2: `_pair_alpha` (exact). r > 2: the QP with Gram matrix G_ij = ⟨A_i S, A_j S⟩ and c_i = ⟨A_i S, Σ_j A_j X_j⟩,
    in fp64 after scaling G to unit mean diagonal; solved exactly up to `max_exact_group_size` heads, by projected
    gradient beyond. G = 0 → uniform. With P_i = A_i V (see `Circuits`), G_ij = ⟨P_i Ŵ_S Ŵ_Sᵀ, P_j⟩ and
    c_i = ⟨P_i, Σ_j P_j Ŵ_j Ŵ_Sᵀ⟩: the only T × T product is A_i V.
    """
    if maps.dim() != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"maps {tuple(maps.shape)}: expected [B, r, T, T]")
    circuits = as_circuits(circuits, maps)
    batch, size = maps.shape[:2]
    if size == 1:
        return maps.new_ones(batch, 1, dtype=torch.float32)
    if size == 2:
        alpha = _pair_alpha(maps, circuits)
        return torch.stack([alpha, 1 - alpha], dim=1)
    values, sum_gram, cross = _value_space(circuits)
    projected = maps.float() @ values[:, None]
    gram = (projected @ sum_gram).double().flatten(2) @ projected.double().flatten(2).transpose(1, 2)
    linear = _inner(projected, torch.einsum("bjtx,jvx->btv", projected, cross)[:, None])
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)
    degenerate = scale <= 0
    scale = torch.where(degenerate, 1.0, scale)
    gram, linear = gram / scale[:, None, None], linear / scale[:, None]
    if size <= max_exact_group_size:
        weights = _exact_simplex_qp(gram, linear)
    else:
        weights = _projected_gradient_simplex_qp(gram, linear)
    return torch.where(degenerate[:, None], 1 / size, weights).float()


class _MergedHead(NamedTuple):
    """A head of `pairwise_alphas`'s current list: its teacher heads, map [B, T, T] fp32, the KV heads its circuit
    reads and its output map [H_kv, dh, d] fp64, Σ of its teacher heads' W_O placed at their KV heads' rows (the
    circuit X_p + X_q of a merge is V times the sum of the two output maps)."""

    heads: list[int]
    map: Tensor
    kv_heads: frozenset[int]
    output: Tensor


def pairwise_alphas(maps: Tensor, circuits: Tensor | Circuits, num_student_heads: int) -> Tensor:
    """SHD's Algorithm 1: effective weights of merging adjacent pairs pass by pass (see `squeeze_groups`).

    `maps` [B, H_t, T, T], `circuits` dense [B, H_t, T, d] or `Circuits` → α [B, H_t] fp32, summing to 1 over each
    `squeeze_groups(..., "shd_pairwise")` group. Merging current heads p and q takes the closed-form `_pair_alpha` of
    their current maps and circuits; the merged head has map α A_p + (1 − α) A_q and circuit X_p + X_q. A teacher
    head's weight is the product of the α (or 1 − α) on its path. Factored: a merged circuit is V Ŵ with Ŵ the summed
    output maps of its teacher heads, so each pair is a `_pair_alpha` on the values of the KV heads it reads, laid
    side by side as one wide value head (w = dh · those KV heads); H_t − H_s pair solves, each one T × T × w product.
    """
    if maps.dim() != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"maps {tuple(maps.shape)}: expected [B, H_t, T, T]")
    values, output, kv_heads = as_circuits(circuits, maps)
    batch, num_teacher_heads, seq = maps.shape[:3]
    num_kv, head_dim = values.shape[1], values.shape[3]
    maps = maps.float()
    alphas = maps.new_ones(batch, num_teacher_heads)
    current = []
    for head, kv in enumerate(kv_heads):
        placed = output.new_zeros(num_kv, head_dim, output.shape[-1], dtype=torch.float64)
        placed[kv] = output[head].double()
        current.append(_MergedHead([head], maps[:, head], frozenset([kv]), placed))
    for pairs in _pairwise_pass_sizes(num_teacher_heads, num_student_heads):
        merged = []
        for first, second in zip(current[: 2 * pairs : 2], current[1 : 2 * pairs : 2], strict=True):
            used = sorted(first.kv_heads | second.kv_heads)
            wide_values = values[:, used].permute(0, 2, 1, 3).reshape(batch, 1, seq, len(used) * head_dim)
            wide_output = torch.stack([first.output[used], second.output[used]]).flatten(1, 2)
            pair_maps = torch.stack([first.map, second.map], dim=1)
            alpha = _pair_alpha(pair_maps, Circuits(wide_values, wide_output, (0, 0)))
            alphas[:, first.heads] *= alpha[:, None]
            alphas[:, second.heads] *= 1 - alpha[:, None]
            merged_map = torch.lerp(second.map, first.map, alpha[:, None, None])
            merged.append(
                _MergedHead(
                    first.heads + second.heads,
                    merged_map,
                    first.kv_heads | second.kv_heads,
                    first.output + second.output,
                )
            )
        current = merged + current[2 * pairs :]
    return alphas


def squeeze_heads(
    maps: Tensor, circuits: Tensor | Circuits | None, num_student_heads: int, method: SqueezeMethod = "shd"
) -> tuple[Tensor, Tensor]:
    """Squeeze teacher maps [B, H_t, T, T] into student targets [B, H_s, T, T] along `squeeze_groups`.

    Each target is Σ_i α_i A_i over its group with α on the simplex, so rows stay stochastic and causal. "shd"
    chooses α per sample and group with `group_alphas`, "shd_pairwise" by SHD's pass-wise pair merges
    (`pairwise_alphas`, on its own grouping); both need `circuits` (dense [B, H_t, T, d] or `Circuits`, as
    `AttentionCapture` records them). "uniform" (the constant merge baseline) uses 1/r and ignores them; H_s = 1 with
    "uniform" is the mean map over all heads. H_s == H_t returns `maps` itself (fp32); H_s > H_t copies the shared
    teacher heads; neither needs circuits. Returns (squeezed fp32, alphas [B, H_t] fp32): the weight of each teacher
    head inside its group, summing to 1 over each group (all ones when H_s >= H_t).
    """
    if maps.dim() != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"maps {tuple(maps.shape)}: expected [B, H_t, T, T]")
    batch, num_teacher_heads = maps.shape[:2]
    groups = squeeze_groups(num_teacher_heads, num_student_heads, method)
    maps = maps.float()
    alphas = maps.new_ones(batch, num_teacher_heads)
    if num_student_heads >= num_teacher_heads:
        squeezed = maps if num_student_heads == num_teacher_heads else maps[:, [group[0] for group in groups]]
        return squeezed, alphas
    if method != "uniform":
        if circuits is None:
            raise ValueError(
                f"method={method!r} squeezing {num_teacher_heads} -> {num_student_heads} heads needs the "
                "value-output circuits [B, H_t, T, d]; pass circuits or use method='uniform'"
            )
        circuits = as_circuits(circuits, maps)
    if method == "shd_pairwise":
        alphas = pairwise_alphas(maps, circuits, num_student_heads)
    squeezed_groups = []
    for group in groups:
        heads = slice(group[0], group[-1] + 1)
        group_maps = maps[:, heads]
        if method == "uniform":
            alphas[:, heads] = 1 / len(group)
        elif method == "shd":
            alphas[:, heads] = group_alphas(group_maps, circuits.select(heads))
        squeezed_groups.append(torch.einsum("br,brqk->bqk", alphas[:, heads], group_maps))
    return torch.stack(squeezed_groups, dim=1), alphas


def reconstruction_error(
    maps: Tensor,
    circuits: Tensor | Circuits,
    num_student_heads: int,
    alphas: Tensor,
    groups: list[list[int]] | None = None,
) -> Tensor:
    """SHD objective summed over groups: Σ_g ‖Σ_{i∈g} A_i X_i − (Σ_{i∈g} α_i A_i) Σ_{i∈g} X_i‖_F².

    `maps` [B, H_t, T, T], `circuits` [B, H_t, T, d] (a `Circuits` is made dense), `alphas` [B, H_t] as returned by
    `squeeze_heads` → [B] fp64 (for logging and for comparing α choices; 0 when H_s >= H_t). `groups`: the grouping
    the α belong to, one list of teacher heads per student head (default `head_groups`; pass
    `squeeze_groups(H_t, H_s, "shd_pairwise")` for the pairwise α). Computed directly from the dense circuits: the
    reference the factored α computation is checked against.
    """
    num_teacher_heads = maps.shape[1]
    if groups is None:
        groups = head_groups(num_teacher_heads, num_student_heads)
    elif len(groups) != num_student_heads or not all(
        group and all(0 <= head < num_teacher_heads for head in group) for group in groups
    ):
        raise ValueError(
            f"groups {groups}: expected {num_student_heads} non-empty lists of teacher heads in "
            f"[0, {num_teacher_heads})"
        )
    if isinstance(circuits, Circuits):
        circuits = circuits.dense()
    maps, circuits, alphas = maps.float(), circuits.float(), alphas.float()
    error = maps.new_zeros(maps.shape[0], dtype=torch.float64)
    for group in groups:
        group_maps, group_circuits = maps[:, group], circuits[:, group]
        target = (group_maps @ group_circuits).sum(1)
        merged = torch.einsum("br,brqk->bqk", alphas[:, group], group_maps)
        residual = target - merged @ group_circuits.sum(1)
        error = error + residual.square().sum((-2, -1), dtype=torch.float64)
    return error


def head_importance(maps: Tensor, circuits: Tensor | Circuits) -> Tensor:
    """Each teacher head's share of its layer's attention output, ‖A_h X_h‖_F / Σ_j ‖A_j X_j‖_F, per sample: what the
    `selective` matching mode and carving a student from the teacher rank heads by.

    `maps` [B, H, T, T], `circuits` dense [B, H, T, d] or `Circuits` → [B, H] fp32, each row summing to 1 (uniform
    where every head's output is 0). In the values' space: with P_h = A_h V_{kv(h)} [B, T, dh] (fp32),
    ‖P_h W_O^h‖² = ⟨P_hᵀ P_h, W_O^h W_O^hᵀ⟩, two dh × dh matrices accumulated in fp64; no T × d tensor is formed.
    """
    if maps.dim() != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"maps {tuple(maps.shape)}: expected [B, H, T, T]")
    values, output, kv_heads = as_circuits(circuits, maps)
    projected = (maps.float() @ values.float()[:, list(kv_heads)]).double()
    output = output.double()
    squared = (projected.mT @ projected * (output @ output.mT)).sum((-2, -1))
    norms = squared.clamp_min(0).sqrt()
    total = norms.sum(1, keepdim=True)
    shares = norms / torch.where(total > 0, total, 1.0)
    return torch.where(total > 0, shares, 1 / maps.shape[1]).float()


def select_heads(importance: Tensor, num_student_heads: int) -> list[int]:
    """The H_s teacher heads with the largest mean importance, in head order (ties go to the lower index).

    `importance` [N, H_t] (`head_importance` over N calibration samples) or [H_t] (already averaged).
    """
    if importance.dim() not in (1, 2) or importance.numel() == 0:
        raise ValueError(f"importance {tuple(importance.shape)}: expected [N, H_t] or [H_t]")
    mean = importance.double().reshape(-1, importance.shape[-1]).mean(0).tolist()
    if not 1 <= num_student_heads <= len(mean):
        raise ValueError(f"num_student_heads={num_student_heads}: expected an int in [1, {len(mean)}] (teacher heads)")
    ranked = sorted(range(len(mean)), key=lambda head: (-mean[head], head))
    return sorted(ranked[:num_student_heads])


def layer_map(num_student_layers: int, num_teacher_layers: int, spec: str | list[int]) -> list[int]:
    """Teacher layer matched by each student layer.

    "uniform": evenly spaced, last to last, m(j) = floor((j + 1) · L_t / L_s) − 1 (4 of 30 → [6, 14, 21, 29]);
    "spread": evenly spaced, first to last, m(j) = round(j · (L_t − 1) / (L_s − 1)) (4 of 30 → [0, 10, 19, 29]; one
    student layer → the last) — for students carved from the teacher, which then keep its first layer;
    "last": the last L_s teacher layers; a list: used as given after checking it has L_s entries, each in
    [0, L_t), non-decreasing (a list is also the way to share teacher layers when L_s > L_t).
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(
            f"layer counts must be positive, got student={num_student_layers}, teacher={num_teacher_layers}"
        )
    if isinstance(spec, str):
        if spec not in ("uniform", "spread", "last"):
            raise ValueError(
                f"layer map {spec!r}: expected 'uniform', 'spread', 'last' or a list of teacher layer indices"
            )
        if num_student_layers > num_teacher_layers:
            raise ValueError(
                f"layer map {spec!r} needs student layers ({num_student_layers}) <= teacher layers "
                f"({num_teacher_layers}); give an explicit list to share teacher layers"
            )
        if spec == "last":
            return list(range(num_teacher_layers - num_student_layers, num_teacher_layers))
        if spec == "spread":
            if num_student_layers == 1:
                return [num_teacher_layers - 1]
            span = (num_teacher_layers - 1) / (num_student_layers - 1)
            return [int(j * span + 0.5) for j in range(num_student_layers)]
        return [(j + 1) * num_teacher_layers // num_student_layers - 1 for j in range(num_student_layers)]
    mapping = list(spec)
    if len(mapping) != num_student_layers:
        raise ValueError(
            f"layer map {mapping} has {len(mapping)} entries, expected one per student layer ({num_student_layers})"
        )
    for j, layer in enumerate(mapping):
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_teacher_layers:
            raise ValueError(f"layer map entry {j} is {layer!r}: expected an int in [0, {num_teacher_layers - 1}]")
        if j > 0 and layer < mapping[j - 1]:
            raise ValueError(
                f"layer map entry {j} is {layer} < entry {j - 1} ({mapping[j - 1]}): must be non-decreasing"
            )
    return mapping
