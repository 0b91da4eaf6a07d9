"""Losses between a student's row-stochastic causal maps, computed from its scores, and cached teacher maps.

An attention map (and a MiniLMv2 relation map) is softmax(q kᵀ · scale) under a causal mask. The student's map is
never materialised and never logged from a clamped probability: for a block of query rows the scores are recomputed
from the captured (post-RoPE) queries and keys, masked, divided by τ and turned into log-probabilities with
`log_softmax`; the loss of each row against the matching target rows is summed, and the block is recomputed in the
backward pass. A block of rows [a, b) reads only keys [0, b) (the rest are causally masked), so the blocks together
touch about half of the T × T scores. Peak memory is O(B · H · rows · T) instead of O(B · H · T · T), and with
top-m targets only the m gathered log-probabilities and the row's complement log-sum-exp are needed. The common case,
dense KL per head, runs as one fused autograd function (`_DenseKLBlock`) whose backward forms (p − t)/τ directly.
In global mode the heads' τ = 1 maps are averaged before the mean map is softened and masked, as the cached mean
teacher map is (`student_log_probs`).

Targets: `DenseTarget` (the packed causal triangle the cache stores, probabilities at τ = 1) or `SparseTarget` (the
top m entries of every row plus the tail sum R_τ = Σ_tail t^{1/τ} at the loss temperature, so the (m+1)-bucket KL is
exact at τ) — of every query row, or of a sample of rows per sequence (`SparseTarget.rows`): then only the student's
rows at those positions are formed, in blocks of stored rows, and the sum runs over them. Per query row: `kl`
KL(t ‖ s) summed over keys (0 · log 0 = 0), `mse` Σ_keys (s − t)², `cosine`
½‖t/‖t‖ − s/‖s‖‖² (= 1 − cos). Rows are averaged over heads, then summed over valid query rows (the caller divides
by the global row count once). Pure tensor maths: nothing here knows about models, ranks or files.
"""

from __future__ import annotations

import math
from functools import lru_cache, partial
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from pipeline.ops.kd import check_sparse_target_shapes, soften_topk, sparse_kl_with_tail

MapLossKind = Literal["kl", "mse", "cosine"]

ROW_BLOCK_ELEMENTS = 1 << 21
"""Score entries (B · H · rows · T) per block of query rows: 8 MB of fp32 per intermediate, a few of them alive at a
time; small enough to stay out of the peak of a student step, large enough that T ≤ 512 runs as one block."""

MASKED = torch.finfo(torch.float32).min
"""Score of a key a query may not see. Finite (unlike -inf), so fully masked rows and padding stay NaN-free; it is
applied after the division by τ, so no temperature can overflow it."""


class ScoreInputs(NamedTuple):
    """What one layer's attention function was given, recorded by a non-eager capture (with autograd graph).

    The layer's maps are softmax(query keyᵀ · scale) under the causal mask (``map_losses.student_log_probs``).
    """

    query: Tensor
    """``[B, H, T, dh]`` post-RoPE queries, in the model's dtype."""
    key: Tensor
    """``[B, H_kv, T, dh]`` post-RoPE keys, once per KV head (query head h reads KV head h // (H / H_kv))."""
    value: Tensor
    """``[B, H_kv, T, dh]`` values, once per KV head."""
    scale: float
    """The score scaling the layer uses (1/√dh, times GPT-2's inverse-layer-index factor where configured)."""
    output: Tensor | None = None
    """``[B, T, H, dh]`` the attention function's output (each head's A_h V_{kv(h)}, before the output projection)."""


class DenseTarget(NamedTuple):
    """Exact target maps as the cache stores them: the causal lower triangle, row-major."""

    packed: Tensor
    """[B, H, T(T+1)/2] probabilities at τ = 1 (any float dtype)."""


class SparseTarget(NamedTuple):
    """Top-m target rows with their tail bucket."""

    values: Tensor
    """[B, H, T, m] probabilities at τ = 1 (any float dtype); entries at masked keys are 0."""
    indices: Tensor
    """[B, H, T, m] key positions (any int dtype)."""
    tail: Tensor
    """[B, H, T] R_τ = Σ over the keys not kept of t^{1/τ}, at the temperature of the loss (τ = 1: the tail mass)."""
    rows: Tensor | None = None
    """[B, R] sorted query positions of the rows held (values, indices and tail are then [B, H, R, …]); None: all
    T rows."""


MapTarget = DenseTarget | SparseTarget


def triangle_offset(row: int) -> int:
    """Offset of query row `row` in the packed causal triangle: rows 0..row−1 hold 1 + 2 + … + row entries."""
    return row * (row + 1) // 2


@lru_cache(maxsize=256)
def _causal_positions(start: int, stop: int, width: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(flat index into a [rows, width] block of every causal entry of rows [start, stop), row-major — the order of
    the packed triangle —, the causal mask [rows, width], its complement); cached: every step reuses the blocks."""
    rows = torch.arange(start, stop, device=device)
    causal = torch.arange(width, device=device)[None, :] <= rows[:, None]
    return causal.flatten().nonzero().squeeze(-1), causal, ~causal


def dense_rows(packed: Tensor, start: int, stop: int, width: int) -> Tensor:
    """Rows [start, stop) of packed maps [..., T(T+1)/2] as [..., stop − start, width] (keys 0..width−1, width ≥
    stop) with exact zeros above the diagonal. The rows of a block are one contiguous slice of the packed triangle,
    so no full map is formed."""
    flat = _causal_positions(start, stop, width, packed.device)[0]
    block = packed.new_zeros(*packed.shape[:-1], (stop - start) * width)
    block.index_copy_(-1, flat, packed[..., triangle_offset(start) : triangle_offset(stop)])
    return block.view(*packed.shape[:-1], stop - start, width)


def key_visibility(start: int, stop: int, key_mask: Tensor | None, device: torch.device) -> Tensor:
    """[B|1, 1, rows, stop] bool over keys 0..stop−1 (no later key is visible to rows < stop): key j visible to
    query i when j ≤ i (causal) and key j is not padding."""
    return _visible(_causal_positions(start, stop, stop, device)[2], key_mask)


def _repeat_keys(query: Tensor, key: Tensor) -> Tensor:
    """`key` [B, H_k, T, d] repeated to the query heads [B, H, T, d] (GQA: query head h reads key head h // (H/H_k))."""
    heads, key_heads = query.shape[1], key.shape[1]
    if heads % key_heads:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)}: key heads must divide query heads")
    return key if key_heads == heads else key.repeat_interleave(heads // key_heads, dim=1)


def student_log_probs(
    query: Tensor,
    key: Tensor,
    scale: float,
    start: int,
    stop: int,
    *,
    temperature: float = 1.0,
    key_mask: Tensor | None = None,
    head_mean: bool = False,
) -> Tensor:
    """log softmax(q kᵀ · scale / τ) of query rows [start, stop) over the visible keys among 0..stop−1, fp32 →
    [B, H, rows, stop].

    With `head_mean` ([B, 1, rows, stop]) the heads' τ = 1 maps over all causal keys are averaged first (a
    log-sum-exp over heads), and the mean map is then softened and restricted: log m̄ / τ, keys outside `key_mask`
    masked, renormalised. That is the operation the cached mean teacher map goes through (averaged at τ = 1 when
    cached, softened and renormalised over the visible keys in the loss), so a student whose heads equal the
    teacher's gets loss 0 at every τ and with the sink dropped; softening or masking each head before averaging
    would not (the mean of softened maps is not the softened mean).

    `query` [B, H, T, d], `key` [B, H_k, T, d] with H_k dividing H (GQA: query head h reads key head h // (H/H_k)).
    Keys a row may not see carry log-probabilities near `MASKED` (finite; their probability is 0 in fp32).
    """
    key = _repeat_keys(query, key)
    head_temperature = 1.0 if head_mean else temperature
    scores = query[:, :, start:stop].float() @ key[:, :, :stop].float().transpose(-1, -2) * (scale / head_temperature)
    future = _causal_positions(start, stop, stop, query.device)[2]
    return _log_probs(scores, future, key_mask, temperature, head_mean)


def student_log_probs_at(
    query: Tensor,
    key: Tensor,
    scale: float,
    positions: Tensor,
    *,
    temperature: float = 1.0,
    key_mask: Tensor | None = None,
    head_mean: bool = False,
) -> Tensor:
    """`student_log_probs` of the query rows at `positions` [B, R] (sorted per sample) over keys 0..K−1, K = the
    last position + 1 → [B, H, R, K] (or [B, 1, R, K] with `head_mean`)."""
    key = _repeat_keys(query, key)
    width = int(positions.max()) + 1
    index = positions[:, None, :, None].expand(query.shape[0], query.shape[1], positions.shape[1], query.shape[-1])
    rows = query.gather(2, index).float()
    head_temperature = 1.0 if head_mean else temperature
    scores = rows @ key[:, :, :width].float().transpose(-1, -2) * (scale / head_temperature)
    future = torch.arange(width, device=query.device) > positions[:, None, :, None]
    return _log_probs(scores, future, key_mask, temperature, head_mean)


def _visible(future: Tensor, key_mask: Tensor | None) -> Tensor:
    """Keys a row may see: not in its future, and real tokens (`key_mask` [B, T]) — [B|1, 1, rows, K]."""
    visible = ~future if future.dim() == 4 else ~future[None, None]
    if key_mask is not None:
        visible = visible & key_mask[:, : future.shape[-1]].bool()[:, None, None, :]
    return visible


def _log_probs(scores: Tensor, future: Tensor, key_mask: Tensor | None, temperature: float, head_mean: bool) -> Tensor:
    """Log-probabilities of score rows [B, H, rows, K] (already scaled, and divided by τ unless `head_mean`) whose
    `future` keys ([rows, K] or [B, 1, rows, K]) are causally hidden: see `student_log_probs`."""
    if not head_mean:
        return torch.log_softmax(scores.masked_fill(~_visible(future, key_mask), MASKED), dim=-1)
    log_probs = torch.log_softmax(scores.masked_fill(future, MASKED), dim=-1)
    log_mean = torch.logsumexp(log_probs, dim=1, keepdim=True) - math.log(scores.shape[1])
    if temperature == 1.0 and key_mask is None:
        return log_mean
    # Masked after the division: causal zeros sit near MASKED and overflow to -inf for τ < 1 until refilled.
    return torch.log_softmax((log_mean / temperature).masked_fill(~_visible(future, key_mask), MASKED), dim=-1)


def _soften_dense(target: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(t_τ, log t_τ) of dense target rows [..., T]: renormalised t^{1/τ} over the positive entries; zeros stay
    exact zeros (log -inf) and an all-zero row stays zero. A NaN target stays NaN, so that the loss is not finite and
    the trainer stops on it, instead of counting it as 0."""
    positive = (target > 0) | target.isnan()
    log_target = torch.where(positive, target.clamp_min(torch.finfo(torch.float32).tiny).log(), -math.inf)
    if temperature != 1.0:
        scaled = log_target / temperature
        normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)
        log_target = scaled - torch.where(torch.isneginf(normaliser), 0.0, normaliser)
    return torch.where(positive, log_target.exp(), 0.0), log_target


def _unit_rows(rows: Tensor) -> Tensor:
    """Rows [..., K] scaled to unit L2 norm; all-zero rows stay 0 with a finite gradient."""
    return rows / rows.square().sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny).sqrt()


def _dense_row_loss(
    log_probs: Tensor, target: Tensor, kind: MapLossKind, temperature: float, visible: Tensor | None
) -> Tensor:
    """Per-row loss [B, H, rows] of student log-probs [B, H, rows, T] against dense target rows (τ = 1 probs),
    the targets restricted to the `visible` keys and renormalised there (None: every causal key)."""
    target = target.float()
    if visible is not None:
        target = torch.where(visible, target, 0.0)
        target = target / target.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    target_probs, target_log = _soften_dense(target, temperature)
    if kind == "kl":
        terms = torch.where((target_probs > 0) | target_probs.isnan(), target_probs * (target_log - log_probs), 0.0)
        return terms.sum(-1)
    probs = log_probs.exp()
    if kind == "mse":
        return (probs - target_probs).square().sum(-1)
    return 0.5 * (_unit_rows(probs) - _unit_rows(target_probs)).square().sum(-1)


def _sparse_row_loss(
    log_probs: Tensor, values: Tensor, indices: Tensor, tail: Tensor, temperature: float, visible: Tensor | None
) -> Tensor:
    """Per-row (m+1)-bucket KL [B, H, rows] of student log-probs [B, H, rows, T] against top-m rows; kept entries at
    keys that are not `visible` are dropped (the buckets renormalise without them; a hidden key inside the tail
    cannot be taken out of the tail sum)."""
    values = values.float()
    # Keys past the block's last row are not in `log_probs`; a kept index there (a causal zero picked by a short row)
    # points at one extra masked column instead.
    width = log_probs.shape[-1]
    indices = indices.clamp_max(width)
    log_probs = F.pad(log_probs, (0, 1), value=MASKED)
    if visible is not None:
        visible = F.pad(visible.expand(*log_probs.shape[:-1], width), (0, 1), value=False)
        values = torch.where(visible.gather(-1, indices), values, 0.0)
    present = (values > 0) | values.isnan()  # a NaN target reaches the loss (and stops training) instead of vanishing
    target_log = torch.where(present, values.clamp_min(torch.finfo(torch.float32).tiny).log(), -math.inf)
    target_log, target_log_tail = soften_topk(target_log, tail, temperature)
    kept = log_probs.gather(-1, indices)
    rest = torch.logsumexp(log_probs.scatter(-1, indices, MASKED), dim=-1)
    return sparse_kl_with_tail(target_log, target_log_tail, kept, rest)


def _dense_target_rows(
    packed: Tensor, start: int, stop: int, temperature: float, key_mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """(t_τ [B, H, rows, stop], per-row Σ t_τ log t_τ [B, H, rows]) of dense targets for rows [start, stop):
    restricted to the visible keys and renormalised there when `key_mask` is given, then softened. As stored (τ = 1,
    no mask) the rows are used as they are and their entropy is summed over the packed slice itself."""
    if temperature == 1.0 and key_mask is None:
        piece = packed[..., triangle_offset(start) : triangle_offset(stop)].float()
        terms = torch.where(
            (piece > 0) | piece.isnan(), piece * piece.clamp_min(torch.finfo(torch.float32).tiny).log(), 0.0
        )
        lengths = torch.arange(start + 1, stop + 1, device=packed.device).expand(*packed.shape[:-1], stop - start)
        entropy = torch.segment_reduce(terms, "sum", lengths=lengths.contiguous(), axis=terms.dim() - 1)
        return dense_rows(packed, start, stop, stop).float(), entropy
    target = dense_rows(packed, start, stop, stop).float()
    if key_mask is not None:
        target = torch.where(key_visibility(start, stop, key_mask, packed.device), target, 0.0)
        target = target / target.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    target, target_log = _soften_dense(target, temperature)
    return target, torch.where((target > 0) | target.isnan(), target * target_log, 0.0).sum(-1)


class _DenseKLBlock(torch.autograd.Function):
    """KL(t_τ ‖ softmax(s/τ)) per query row of one block against dense targets, s = q kᵀ · scale over keys
    0..stop−1, with a hand-written backward: ∂KL/∂s = (p · Σt − t)/τ, formed directly from the recomputed scores.

    Only the row log-sum-exp is kept between the passes; the scores and the target rows (sliced from the packed
    triangle) are recomputed, so a block's memory is freed at once. KL = Σ t log t − Σ t·s_τ + lse·Σ t, which is the
    row's KL when Σ t = 1 and 0 for a row without target mass (padding, or the first row without its only key).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: Tensor,
        key: Tensor,
        packed: Tensor,
        key_mask: Tensor | None,
        start: int,
        coefficient: float,
        temperature: float,
    ) -> Tensor:
        stop = start + query.shape[2]
        scores = _masked_scores(query, key, coefficient, start, stop, key_mask)
        target, entropy = _dense_target_rows(packed, start, stop, temperature, key_mask)
        normaliser = torch.logsumexp(scores, dim=-1)
        per_row = entropy - (target * scores).sum(-1) + normaliser * target.sum(-1)
        ctx.save_for_backward(query, key, packed, key_mask, normaliser)
        ctx.block = (start, coefficient, temperature)
        return per_row

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        query, key, packed, key_mask, normaliser = ctx.saved_tensors
        start, coefficient, temperature = ctx.block
        stop = start + query.shape[2]
        scores = _masked_scores(query, key, coefficient, start, stop, key_mask)
        if temperature == 1.0 and key_mask is None:
            target = dense_rows(packed, start, stop, stop).float()  # as stored: no softening, no entropy needed
        else:
            target, _ = _dense_target_rows(packed, start, stop, temperature, key_mask)
        probs = (scores - normaliser[..., None]).exp_()
        grad_scores = (probs.mul_(target.sum(-1, keepdim=True)).sub_(target)).mul_(grad_rows[..., None] * coefficient)
        grad_query = (grad_scores @ key.float()).to(query.dtype)
        grad_key = (grad_scores.transpose(-1, -2) @ query.float()).to(key.dtype)
        return grad_query, grad_key, None, None, None, None, None


def _masked_scores(
    query: Tensor, key: Tensor, coefficient: float, start: int, stop: int, key_mask: Tensor | None
) -> Tensor:
    """q kᵀ · coefficient [B, H, rows, stop] fp32 of query rows `query` (rows [start, stop)) against keys
    0..stop−1, keys a row may not see at `MASKED`."""
    scores = (query.float() @ key.float().transpose(-1, -2)).mul_(coefficient)
    if key_mask is None:
        return scores.masked_fill_(_causal_positions(start, stop, stop, query.device)[2], MASKED)
    return scores.masked_fill_(~key_visibility(start, stop, key_mask, query.device), MASKED)


def _block_loss(
    query: Tensor,
    key: Tensor,
    query_mask: Tensor | None,
    key_mask: Tensor | None,
    *target_rows: Tensor,
    start: int,
    stop: int,
    scale: float,
    kind: MapLossKind,
    temperature: float,
    head_mean: bool,
) -> Tensor:
    """Σ over the valid query rows [start, stop) of the row loss averaged over heads: fp32 scalar."""
    log_probs = student_log_probs(
        query, key, scale, start, stop, temperature=temperature, key_mask=key_mask, head_mean=head_mean
    )
    visible = None if key_mask is None else key_visibility(start, stop, key_mask, query.device)
    if len(target_rows) == 1:
        per_row = _dense_row_loss(log_probs, target_rows[0], kind, temperature, visible)
    else:
        per_row = _sparse_row_loss(log_probs, *target_rows, temperature, visible)
    per_row = per_row.mean(1)
    if query_mask is not None:
        per_row = torch.where(query_mask[:, start:stop].bool(), per_row, 0.0)
    return per_row.sum()


def _stored_block_loss(
    query: Tensor,
    key: Tensor,
    positions: Tensor,
    query_mask: Tensor | None,
    key_mask: Tensor | None,
    values: Tensor,
    indices: Tensor,
    tail: Tensor,
    *,
    scale: float,
    temperature: float,
    head_mean: bool,
) -> Tensor:
    """`_block_loss` of the stored query rows at `positions` [B, r] against their top-m target rows."""
    log_probs = student_log_probs_at(
        query, key, scale, positions, temperature=temperature, key_mask=key_mask, head_mean=head_mean
    )
    future = torch.arange(log_probs.shape[-1], device=query.device) > positions[:, None, :, None]
    visible = None if key_mask is None else _visible(future, key_mask)
    per_row = _sparse_row_loss(log_probs, values, indices, tail, temperature, visible).mean(1)
    if query_mask is not None:
        per_row = torch.where(query_mask.bool().gather(1, positions), per_row, 0.0)
    return per_row.sum()


def block_rows(batch: int, heads: int, seq_len: int, budget: int = ROW_BLOCK_ELEMENTS) -> int:
    """Query rows per block so that a block's scores hold at most `budget` entries (at least one row)."""
    return max(1, budget // max(1, batch * heads * seq_len))


def _check_target(query: Tensor, target: MapTarget, head_mean: bool, kind: str) -> None:
    batch, heads, seq_len = query.shape[:3]
    target_heads = 1 if head_mean else heads
    if isinstance(target, DenseTarget):
        expected = (batch, target_heads, seq_len * (seq_len + 1) // 2)
        if tuple(target.packed.shape) != expected:
            raise ValueError(f"dense target {tuple(target.packed.shape)}: expected [B, H, T(T+1)/2] = {expected}")
        return
    if kind != "kl":
        raise ValueError(f"kind={kind!r}: top-m (sparse) targets support only 'kl'")
    if target.rows is not None:
        count = target.rows.shape[-1]
        if target.rows.shape != (batch, count) or count > seq_len:
            raise ValueError(f"target rows {tuple(target.rows.shape)}: expected [B, R] with R ≤ T = {seq_len}")
        seq_len = count
    reference = query.new_empty(batch, target_heads, seq_len, query.shape[2])
    check_sparse_target_shapes(
        reference,
        target.values,
        target.indices,
        target.tail,
        ("student maps", "target values", "indices", "target tail"),
        "[B, H, T, T], [B, H, T, m], [B, H, T, m]",
    )


def map_loss_sum(
    query: Tensor,
    key: Tensor,
    scale: float,
    target: MapTarget,
    *,
    kind: MapLossKind = "kl",
    temperature: float = 1.0,
    head_mean: bool = False,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    rows_per_block: int | None = None,
) -> Tensor:
    """Σ over valid query rows of the loss between the student maps softmax(q kᵀ · scale) and `target`, each row
    averaged over heads → fp32 scalar with autograd graph into `query` and `key`. A `SparseTarget` with `rows` sums
    over those rows only.

    `query` [B, H, T, d] and `key` [B, H_k, T, d] (post-RoPE, as the attention function saw them; H_k divides H);
    `scale` the score scaling (1/√d, or what the model uses); `target` of H heads, or of one head with `head_mean`
    (the student's maps averaged over heads: the `global` matching mode). Both sides are softened by τ (dense
    targets: renormalised t^{1/τ}; sparse: exact with `SparseTarget.tail` = R_τ). `query_mask`/`key_mask` [B, T] bool
    (True = a real token): padding rows contribute exactly 0, padding keys are never attended, and the targets are
    renormalised over the keys that remain (a no-op for targets that already give padding keys 0 — and the way to
    leave out the first key, the attention sink); None = no padding. Order in global mode: average the heads' τ = 1
    maps over the causal keys, then soften by τ and restrict to the `key_mask` keys — on both sides, so a student
    whose heads equal the teacher's gets 0 (`student_log_probs`). There padding keys are dropped with the sink after
    the average: right padding is never causally visible to a real row; a left-padded key would still count in each
    head's normaliser.
    """
    if kind not in ("kl", "mse", "cosine"):
        raise ValueError(f"kind={kind!r}: expected 'kl', 'mse' or 'cosine'")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: expected a positive number")
    if query.dim() != 4 or key.dim() != 4 or key.shape[0] != query.shape[0] or key.shape[2:] != query.shape[2:]:
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)}: expected [B, H, T, d], [B, H_k, T, d]")
    _check_target(query, target, head_mean, kind)
    batch, heads, seq_len = query.shape[:3]
    step = rows_per_block or block_rows(batch, heads, seq_len)
    recompute = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    total = query.new_zeros((), dtype=torch.float32)
    if isinstance(target, SparseTarget) and target.rows is not None:
        block = partial(_stored_block_loss, scale=scale, temperature=temperature, head_mean=head_mean)
        for start in range(0, target.rows.shape[1], step):
            parts = (
                target.rows[:, start : start + step].long(),
                query_mask,
                key_mask,
                target.values[:, :, start : start + step],
                target.indices[:, :, start : start + step].long(),
                target.tail[:, :, start : start + step],
            )
            if recompute:
                total = total + checkpoint(block, query, key, *parts, use_reentrant=False)
            else:
                total = total + block(query, key, *parts)
        return total
    if isinstance(target, DenseTarget) and kind == "kl" and not head_mean:
        keys = _repeat_keys(query, key)
        for start in range(0, seq_len, step):
            stop = min(start + step, seq_len)
            per_row = _DenseKLBlock.apply(
                query[:, :, start:stop],
                keys[:, :, :stop],
                target.packed,
                key_mask,
                start,
                scale / temperature,
                temperature,
            ).mean(1)
            if query_mask is not None:
                per_row = torch.where(query_mask[:, start:stop].bool(), per_row, 0.0)
            total = total + per_row.sum()
        return total
    for start in range(0, seq_len, step):
        stop = min(start + step, seq_len)
        if isinstance(target, DenseTarget):
            rows: tuple[Tensor, ...] = (dense_rows(target.packed, start, stop, stop),)
        else:
            rows = (
                target.values[:, :, start:stop],
                target.indices[:, :, start:stop].long(),
                target.tail[:, :, start:stop],
            )
        block = partial(
            _block_loss,
            start=start,
            stop=stop,
            scale=scale,
            kind=kind,
            temperature=temperature,
            head_mean=head_mean,
        )
        if recompute:
            total = total + checkpoint(block, query, key, query_mask, key_mask, *rows, use_reentrant=False)
        else:
            total = total + block(query, key, query_mask, key_mask, *rows)
    return total


def student_maps(query: Tensor, key: Tensor, scale: float, *, head_mean: bool = False) -> Tensor:
    """The full causal student maps softmax(q kᵀ · scale) [B, H, T, T] (or [B, 1, T, T] with `head_mean`), fp32, for
    figures and evaluation samples; training never forms them (see `map_loss_sum`)."""
    seq_len = query.shape[2]
    return student_log_probs(query, key, scale, 0, seq_len, head_mean=head_mean).exp()
