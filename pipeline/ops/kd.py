"""Logit distillation: cross-entropy and top-k KD with an explicit tail bucket, fused in one vocabulary pass.

Pure tensor maths, computed in fp32 whatever the input dtype: a softmax over a 50k vocabulary underflows in bf16.
Every loss offers `reduction="sum"` because the training driver divides by a global count of valid tokens itself,
once, across ranks and micro-batches; `"mean"` is for tests and single-batch use.

The tail-bucket KL (`sparse_kl_with_tail`) is generic over leading dimensions: `pipeline.ops.shd` reuses it for sparse
top-m attention targets.
"""

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.ops import native

Reduction = Literal["mean", "sum"]

IGNORE_INDEX = -100
"""Label of a position without a target (padding): the torch / transformers convention."""

PROB_FLOOR = torch.finfo(torch.float32).tiny
"""Student-side clamp before a log: the smallest normal fp32, so only exact (or underflowed) zeros are clamped and
every representable probability keeps its gradient."""

LOG_FLOOR = math.log(PROB_FLOOR)
"""`log(PROB_FLOOR)`: stands in for a student log-probability of -inf."""

STUDENT_TAIL_FLOOR = 1e-6
"""Smallest student tail mass the sparse KD resolves. The tail is 1 − Σ top-k, taken from the k gathered
log-probs (no second pass over the vocabulary, which would cost as much as the cross-entropy itself); fp32 cannot
resolve 1 − Σ much below this, and the floor keeps the gradient of log(1 − Σ) finite when the top k hold it all."""


def _check_temperatures(temperatures: Sequence[float]) -> None:
    if not temperatures or not all(temperature > 0 for temperature in temperatures):
        raise ValueError(f"temperatures={list(temperatures)}: expected one or more positive numbers")


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: expected a positive number")


def masked_reduce(values: Tensor, mask: Tensor | None, reduction: Reduction) -> Tensor:
    """Sum or average per-position losses `values` [B, T] over the positions where `mask` [B, T] (bool) is True.

    Masked positions are dropped with `torch.where`, not multiplied by 0, so whatever was computed for a padding
    position (even NaN) never reaches the loss. `mask=None` means every position is valid. A "mean" over zero valid
    positions is 0, so an all-padding micro-batch cannot poison an accumulated loss.
    """
    _check_reduction(reduction)
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    if mask.shape != values.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(values.shape)} like the losses")
    total = torch.where(mask, values, 0.0).sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp_min(1)


def valid_token_count(labels: Tensor) -> Tensor:
    """Number of labels [B, T] that are not `IGNORE_INDEX`: the denominator the driver sums across ranks."""
    return (labels != IGNORE_INDEX).sum()


def cross_entropy(logits: Tensor, labels: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Next-token cross-entropy of `logits` [B, T, V] against `labels` [B, T] (int64, already shifted so that
    `labels[b, t]` is the target of `logits[b, t]`); `IGNORE_INDEX` positions contribute exactly 0.

    "mean" is over valid tokens (0 when there are none), "sum" is their sum.
    """
    _check_reduction(reduction)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: expected [B, T, V], [B, T]")
    total = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    return total / valid_token_count(labels).clamp_min(1)


def _kl_terms(target_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """Elementwise `t · (log t − log s)` with 0·log 0 = 0 on the target side and a finite student log.

    Both factors are made finite before the product (not only the result masked), so the backward pass cannot form
    0 · inf = NaN either.
    """
    target = target_logprobs.exp()
    present = (target > 0) | target.isnan()  # a NaN target keeps the loss NaN (the trainer stops), never 0
    target = torch.where(present, target, 0.0)
    target_log = torch.where(present, target_logprobs, 0.0)
    student_log = torch.where(torch.isneginf(student_logprobs), LOG_FLOOR, student_logprobs)
    return torch.where(present, target * (target_log - student_log), 0.0)


TOPK_BLOCK = 64
"""Width of the vocabulary blocks `topk_targets` ranks by their maxima: the top k entries lie in the k blocks with
the largest maxima, so only those k · TOPK_BLOCK candidates are ranked entry by entry."""

TOPK_CHUNK_ELEMENTS = {"cpu": 1 << 22, "other": 1 << 28}
"""Logit entries `topk_targets` processes at a time: on the CPU 16 MB of fp32, so that its passes over a chunk run
from cache rather than memory; on an accelerator 1 GB, few enough launches and a bounded fp32 temporary."""


def topk_targets(
    teacher_logits: Tensor, k: int, temperatures: Sequence[float] = (1.0,)
) -> tuple[Tensor, Tensor, Tensor]:
    """The cacheable sparse form of the teacher distribution: top-k log-probs at τ = 1 and, for every temperature
    τ in `temperatures`, the tail sum R_τ = Σ_{j ∉ top k} p_j^{1/τ}.

    `teacher_logits` [B, T, V] → `values` [B, T, k] fp32 top-k log-probs (descending), `indices` [B, T, k] int64,
    `tail_sums` [B, T, len(temperatures)] fp32. R_1 is the probability outside the top k. R_τ is what the softened
    teacher softmax(z/τ) needs beyond the kept entries: p_j^(τ) = p_j^{1/τ} / (Σ_kept p^{1/τ} + R_τ), so with R_τ
    stored the (k+1)-bucket KL is exact at τ (see `soften_topk`); R_τ cannot be recovered from R_1. Tails are summed
    over the complement itself (the entries not kept, relative to the row maximum) rather than taken as 1 − Σ top-k,
    so a small tail is not lost to cancellation and it is exactly 0 when k = V. Ties at the k-th value are broken
    arbitrarily.

    Two passes over the vocabulary per row plus one per extra temperature (block maxima, then exp-sums per block)
    instead of log-softmax, top-k, a scattered copy and a logsumexp: the cache stage runs this on every teacher
    token (see `_topk_rows`). On a CPU the native kernel (`pipeline.ops.native`) does it row by row in the core's
    cache, the same numbers to fp32 rounding.
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k}: expected 1 <= k <= vocabulary size {vocab}")
    _check_temperatures(temperatures)
    rows = teacher_logits.reshape(-1, vocab)
    if rows.device.type == "cpu" and native.library() is not None:
        values, indices, tail_sums = native.topk_logit_rows(rows, k, tuple(temperatures))
        leading = teacher_logits.shape[:-1]
        return values.view(*leading, k), indices.view(*leading, k), tail_sums.view(*leading, len(temperatures))
    chunk = TOPK_CHUNK_ELEMENTS["cpu" if rows.device.type == "cpu" else "other"]
    step = max(1, chunk // vocab)
    parts = [
        _topk_rows(rows[start : start + step].float(), k, tuple(temperatures))
        for start in range(0, rows.shape[0], step)
    ]
    values, indices, tail_sums = (torch.cat(part) for part in zip(*parts, strict=True))
    leading = teacher_logits.shape[:-1]
    return values.view(*leading, k), indices.view(*leading, k), tail_sums.view(*leading, len(temperatures))


LOGIT_CHUNK_ELEMENTS = 1 << 26
"""Logits (positions × vocabulary) `output_topk_targets` forms at a time without the native kernel: 256 MB of
fp32 whatever the context length."""


@torch.no_grad()
def output_topk_targets(
    hidden: Tensor, output_layer: nn.Module, k: int, temperatures: Sequence[float] = (1.0,)
) -> tuple[Tensor, Tensor, Tensor]:
    """`topk_targets` of `output_layer(hidden)` (hidden [N, d] → logits [N, V]) without the [N, V] logits ever
    existing: on a CPU with the native kernel and a linear output layer, the product a block of rows × tokens at a
    time, each block reduced while it is in the cache (`native.topk_output_rows`); elsewhere contiguous chunks of
    `LOGIT_CHUNK_ELEMENTS` logits, each reduced to its top k at once."""
    if hidden.device.type == "cpu" and native.library() is not None and type(output_layer) is nn.Linear:
        _check_temperatures(temperatures)
        return native.topk_output_rows(hidden, output_layer.weight, output_layer.bias, k, tuple(temperatures))
    step = max(1, LOGIT_CHUNK_ELEMENTS // output_layer.weight.shape[0])
    parts = [
        topk_targets(output_layer(hidden[start : start + step]), k, temperatures)
        for start in range(0, hidden.shape[0], step)
    ]
    values, indices, tail_sums = (torch.cat(part) for part in zip(*parts, strict=True))
    return values, indices, tail_sums


def _topk_rows(rows: Tensor, k: int, temperatures: tuple[float, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """`topk_targets` of fp32 `rows` [R, V].

    The vocabulary is cut into blocks of `TOPK_BLOCK`; the k blocks with the largest maxima hold the top k entries
    (k entries are >= the k-th largest block maximum), so the entry-wise top-k runs on those blocks plus the ragged
    end only. With m the row maximum, the normaliser is Z = Σ_blocks Σ exp(z − m) and the tail at τ the sum of
    exp((z − m)/τ) over the blocks not chosen plus the chosen blocks' entries not kept, divided by Z^{1/τ}: sums of
    positive terms, no cancellation.
    """
    num_rows, vocab = rows.shape
    tails: dict[float, Tensor] = {}
    if 2 * k * TOPK_BLOCK > vocab:
        values, indices = rows.topk(k, dim=-1)
        row_max = values[:, :1]
        for tau in dict.fromkeys((1.0, *temperatures)):
            exps = _shifted_exp(rows, row_max, tau)
            if tau == 1.0:
                total = exps.sum(-1)
            tails[tau] = exps.scatter_(-1, indices, 0.0).sum(-1)
    else:
        num_blocks = vocab // TOPK_BLOCK
        width = num_blocks * TOPK_BLOCK
        blocked = rows[:, :width].view(num_rows, num_blocks, TOPK_BLOCK)
        blocks = blocked.amax(-1).topk(k, dim=-1, sorted=False).indices
        offsets = torch.arange(TOPK_BLOCK, device=rows.device)
        ragged_end = torch.arange(width, vocab, device=rows.device).expand(num_rows, -1)
        candidates = torch.cat([(blocks[..., None] * TOPK_BLOCK + offsets).flatten(1), ragged_end], dim=1)
        candidate_logits = rows.gather(1, candidates)
        values, positions = candidate_logits.topk(k, dim=-1)
        indices = candidates.gather(1, positions)
        row_max = values[:, :1]
        for tau in dict.fromkeys((1.0, *temperatures)):
            block_sums = _shifted_exp(blocked, row_max[..., None], tau).sum(-1)
            candidate_exps = _shifted_exp(candidate_logits, row_max, tau)
            if tau == 1.0:
                total = block_sums.sum(-1) + candidate_exps[:, k * TOPK_BLOCK :].sum(-1)
            tails[tau] = block_sums.scatter_(1, blocks, 0.0).sum(-1) + candidate_exps.scatter_(1, positions, 0.0).sum(
                -1
            )
    log_total = total.log()
    tail_sums = torch.stack([tails[tau] * (-log_total / tau).exp() for tau in temperatures], dim=-1)
    return values - row_max - log_total[:, None], indices, tail_sums


def _shifted_exp(logits: Tensor, row_max: Tensor, temperature: float) -> Tensor:
    """exp((z − m) / τ) as a new tensor (written in place once allocated; the vocabulary-sized pass is the cost)."""
    shifted = logits - row_max
    return (shifted if temperature == 1.0 else shifted.div_(temperature)).exp_()


def soften_topk(logprobs: Tensor, tail_sum: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """The exact softened form of a sparse target: `logprobs` [..., k] of the kept entries at τ = 1 and the tail sum
    `tail_sum` [...] = R_τ = Σ_tail p^{1/τ} at this very τ (see `topk_targets`; at τ = 1 it is the tail mass) →
    (`logprobs` [..., k], `log_tail` [...]) over the k + 1 buckets of softmax(log p / τ), summing to 1.

    Kept entries become p_i^{1/τ} / Z_τ and the tail R_τ / Z_τ with Z_τ = Σ_kept p^{1/τ} + R_τ: exactly the
    bucket masses of the softened full distribution. An empty tail (R_τ = 0) gives log_tail = -inf; rows with no
    mass at all (all-zero padding rows) come out all -inf, not NaN.
    """
    _check_temperature(temperature)
    logprobs = logprobs.float() / temperature
    tail_sum = tail_sum.float()
    log_tail = torch.where(tail_sum > 0, tail_sum.clamp_min(PROB_FLOOR).log(), -math.inf)
    normaliser = torch.logsumexp(torch.cat([logprobs, log_tail.unsqueeze(-1)], dim=-1), dim=-1)
    normaliser = torch.where(torch.isneginf(normaliser), 0.0, normaliser)
    return logprobs - normaliser.unsqueeze(-1), log_tail - normaliser


def sparse_kl_with_tail(
    target_logprobs: Tensor, target_log_tail: Tensor, student_logprobs: Tensor, student_log_tail: Tensor
) -> Tensor:
    """KL over k + 1 buckets: Σ_i t_i (log t_i − log s_i) + t_tail (log t_tail − log s_tail).

    `target_logprobs`, `student_logprobs` [..., k] at the same indices; `target_log_tail`, `student_log_tail` [...]
    are the logs of the remaining mass. Everything is in log space so tiny tails keep their precision. Target
    entries of probability 0 (log = -inf: an empty tail, a causal zero) contribute exactly 0; a student log of -inf
    is read as `LOG_FLOOR`, so values and gradients stay finite. Returns [...]. By the data-processing inequality
    this is <= the full KL, with equality when the top k hold all the target mass.
    """
    if target_logprobs.shape != student_logprobs.shape:
        raise ValueError(f"target {tuple(target_logprobs.shape)} != student {tuple(student_logprobs.shape)} buckets")
    kept = _kl_terms(target_logprobs.float(), student_logprobs.float()).sum(-1)
    tail = _kl_terms(target_log_tail.float(), student_log_tail.float())
    return kept + tail


def check_sparse_target_shapes(
    dense: Tensor, values: Tensor, indices: Tensor, tail: Tensor, names: tuple[str, str, str, str], expected: str
) -> None:
    """The shape contract of every sparse target: `values`, `indices` [..., k] over the leading dims of the `dense`
    student tensor [..., N] it is compared with, `tail` [...]. `names` (of dense, values, indices, tail, as the
    caller calls them) and `expected` (the layout, e.g. "[B, T, V], [B, T, k], [B, T, k]") word the error."""
    dense_name, values_name, indices_name, tail_name = names
    if values.shape != indices.shape or indices.shape[:-1] != dense.shape[:-1]:
        raise ValueError(
            f"{dense_name} {tuple(dense.shape)}, {values_name} {tuple(values.shape)}, {indices_name} "
            f"{tuple(indices.shape)}: expected {expected}"
        )
    if tail.shape != dense.shape[:-1]:
        raise ValueError(f"{tail_name} {tuple(tail.shape)}: expected {tuple(dense.shape[:-1])}")


def _check_topk_shapes(student_logits: Tensor, topk_logprobs: Tensor, topk_indices: Tensor, tail_sum: Tensor) -> None:
    check_sparse_target_shapes(
        student_logits,
        topk_logprobs,
        topk_indices,
        tail_sum,
        ("student logits", "top-k values", "indices", "tail sums"),
        "[B, T, V], [B, T, k], [B, T, k]",
    )


def _safe_labels(labels: Tensor | None, logits: Tensor) -> Tensor:
    """Labels usable as gather indices (IGNORE_INDEX → 0; those positions are masked out of the CE anyway)."""
    if labels is None:
        return torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return torch.where(labels == IGNORE_INDEX, 0, labels)


class _FusedLogitLosses(torch.autograd.Function):
    """Per-position CE and τ²-scaled tail-bucket KD from one pass over the vocabulary, with a hand-written backward.

    The [B, T, V] tensors dominate a student step (a 50k vocabulary): autograd through logsumexp, two gathers and a
    complement would write several full-size tensors forward and backward. Here the forward keeps only the
    normalisers and the gathered entries; the backward forms softmax(z) once and writes the gradient in place:

        dCE/dz_j = s_j − [j = label]
        dKD/dz_j = τ · (s^τ_j · (1 − [j ∉ K] · t_tail / s_tail) − [j ∈ K] · t_j)     (s^τ = softmax(z/τ))

    where t is the softened teacher over the k kept entries K plus its tail, and the student tail is
    s_tail = 1 − Σ_K s^τ, floored at `STUDENT_TAIL_FLOOR`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        labels: Tensor,
        topk_logprobs: Tensor,
        topk_indices: Tensor,
        tail_sum: Tensor,
        temperature: float,
    ) -> tuple[Tensor, Tensor]:
        indices = topk_indices.long()
        target_logprobs, target_log_tail = soften_topk(topk_logprobs, tail_sum, temperature)
        z = logits.float()
        normaliser = torch.logsumexp(z, dim=-1, keepdim=True)
        ce = (normaliser - z.gather(-1, labels.unsqueeze(-1))).squeeze(-1)
        if temperature == 1.0:
            scaled_normaliser = normaliser
            student_logprobs = z.gather(-1, indices) - normaliser
        else:
            scaled_normaliser = torch.logsumexp(z / temperature, dim=-1, keepdim=True)
            student_logprobs = z.gather(-1, indices) / temperature - scaled_normaliser
        kept_log_mass = torch.logsumexp(student_logprobs, dim=-1).clamp(max=math.log1p(-STUDENT_TAIL_FLOOR))
        student_log_tail = torch.log(-torch.expm1(kept_log_mass))
        kd = sparse_kl_with_tail(target_logprobs, target_log_tail, student_logprobs, student_log_tail) * temperature**2
        ctx.save_for_backward(
            logits,
            labels,
            indices,
            normaliser,
            scaled_normaliser,
            target_logprobs.exp(),
            (target_log_tail - student_log_tail).exp(),
        )
        ctx.temperature = temperature
        return ce, kd

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_ce: Tensor, grad_kd: Tensor
    ) -> tuple[Tensor | None, ...]:
        logits, labels, indices, normaliser, scaled_normaliser, target_probs, tail_ratio = ctx.saved_tensors
        temperature = ctx.temperature
        z = logits.float()
        kd_scale = (grad_kd * temperature).unsqueeze(-1)
        outside = kd_scale * (1 - tail_ratio.unsqueeze(-1))
        probs = (z - normaliser).exp_()
        if temperature == 1.0:
            kept_probs = probs.gather(-1, indices)
            grad = probs.mul_(grad_ce.unsqueeze(-1) + outside)
        else:
            scaled_probs = (z / temperature - scaled_normaliser).exp_()
            kept_probs = scaled_probs.gather(-1, indices)
            grad = probs.mul_(grad_ce.unsqueeze(-1)).add_(scaled_probs.mul_(outside))
        grad.scatter_add_(-1, labels.unsqueeze(-1), -grad_ce.unsqueeze(-1))
        # Kept entries: replace the "outside" factor by the kept-entry gradient s_j − t_j.
        grad.scatter_add_(-1, indices, kd_scale * (kept_probs - target_probs) - outside * kept_probs)
        return grad.to(logits.dtype), None, None, None, None, None


def logit_losses(
    student_logits: Tensor,
    labels: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    tail_sum: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> tuple[Tensor, Tensor]:
    """(`cross_entropy`, top-k KD) of one batch from one logsumexp over the vocabulary when τ = 1.

    The KD term is τ² · KL from a cached top-k teacher (see `topk_targets`) with the remaining mass as a tail
    bucket: `topk_logprobs` [B, T, k] (τ = 1 log-probs, any float dtype), `topk_indices` [B, T, k] (any int dtype),
    `tail_sum` [B, T] = R_τ of `topk_targets` at this temperature, `mask` [B, T] bool. The teacher is softened
    exactly by `soften_topk`; the student is softmax(z_s/τ) over the full vocabulary, gathered at the indices, its
    tail 1 − Σ kept (floored at `STUDENT_TAIL_FLOOR`). It is the exact KL between the (k+1)-bucket distributions at τ
    (× τ²): the full KL when k = V, a lower bound of it otherwise; the teacher's tail is never renormalised away.

    The [B, T, V] passes dominate a student step (the output projection of a 50k vocabulary); computing both terms
    from the same normaliser makes the KD term nearly free. `student_logits` [B, T, V], `labels` [B, T]; the CE is
    over `labels` != IGNORE_INDEX, the KD over `mask`.
    """
    _check_temperature(temperature)
    _check_reduction(reduction)
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(student_logits.shape)} and labels {tuple(labels.shape)}: expected [B, T, V], [B, T]"
        )
    _check_topk_shapes(student_logits, topk_logprobs, topk_indices, tail_sum)
    ce, kd = _FusedLogitLosses.apply(
        student_logits, _safe_labels(labels, student_logits), topk_logprobs, topk_indices, tail_sum, temperature
    )
    return masked_reduce(ce, labels != IGNORE_INDEX, reduction), masked_reduce(kd, mask, reduction)
