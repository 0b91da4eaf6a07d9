"""Carve a student out of the teacher (Minitron-style structured pruning): keep layers, heads and channels.

Everything the carve decides comes from importance measured once on calibration batches (`measure_importance`,
one teacher forward with hooks, no T × T maps held):

- depth: the teacher layer each student layer copies, from the layer map or by block importance
  1 − cos(block input, block output) averaged over tokens (ShortGPT / Minitron), the largest kept in order;
- heads: each student head reduces its teacher head group (the heads its attention target is made of: the squeeze's
  `shd.squeeze_groups`, or under `attn.match: selective` the one selected teacher head) by
  `prune` (the group's most important head, importance = the head's share ‖A_h X_h‖_F / Σ_h' ‖A_h' X_h'‖_F of the
  layer's attention output) or `merge` (q/k/v slices averaged with the group's α, o slices summed: for heads on one
  KV head the merged head then applies its map to SHD's S = Σ_i X_i);
- MLP width: the intermediate channels with the largest mean |activation| (the down projection's input);
- model width: the hidden channels with the largest mean |output| of the kept layers' norms and the final norm.

GQA rule: student KV head g serves student query heads S_g = {j : j // (H_s / KV_s) = g}; it is the average of the
teacher KV heads those heads' teacher heads read, weighted by the query weights (prune: one per kept head; merge:
the α mass). A kept head thus always reads a KV head that contains its own teacher KV head, exactly its own when
every head of S_g comes from one teacher KV head (always so when H_s = H_t and KV_s = KV_t); otherwise the KV heads
are mean-pooled as in the GQA paper's MHA → GQA conversion.

A teacher head copied into several student heads (H_s > H_t) has its o slice divided among them, so that the
carved student with the teacher's own shape computes exactly the teacher's function.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from pipeline.errors import PipelineError
from pipeline.models.capture import CAPTURE_ATTENTION, attention_dims, find_attention_modules, model_family

HeadInit = Literal["prune", "merge"]


class CarveError(PipelineError):
    """The teacher cannot be carved into the configured student; the message names the parameter or key."""


# --------------------------------------------------------------------------------------------------------------------
# Importance on calibration batches


@dataclass
class Importance:
    """Importance statistics of every teacher layer, float64 on the CPU (L_t layers, H_t heads, I MLP, d hidden)."""

    block: Tensor
    """[L_t] mean over tokens of 1 − cos(block input, block output)."""
    heads: Tensor
    """[L_t, H_t] mean over samples of each head's share of the layer's attention output norm."""
    mlp: Tensor
    """[L_t, I] mean |activation| of each MLP intermediate channel (input of the down projection)."""
    hidden: Tensor
    """[L_t + 1, d] mean |output| of each hidden channel, summed over a layer's norms; row L_t: the final norm."""
    samples: int
    tokens: int


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer blocks of a LLaMA-like or GPT-2 causal LM."""
    return model.transformer.h if model_family(model.config) == "gpt2" else model.model.layers


def _final_norm(model: PreTrainedModel) -> nn.Module:
    return model.transformer.ln_f if model_family(model.config) == "gpt2" else model.model.norm


def _block_norms(layer: nn.Module) -> list[nn.Module]:
    """The norms of a block that see the model width (LLaMA input/post-attention norms, GPT-2 ln_1/ln_2)."""
    return [child for child in layer.children() if "norm" in type(child).__name__.lower()]


def _output_maps(attention: nn.Module, num_heads: int, head_dim: int) -> Tensor:
    """Each head's slice of the output projection [H, dh, d] fp32: head h writes x_h @ W[h] to the model."""
    # LLaMA o_proj is an nn.Linear [d, H·dh], GPT-2 c_proj a Conv1D [H·dh, d].
    weight = attention.o_proj.weight.T if hasattr(attention, "o_proj") else attention.c_proj.weight
    return weight.float().reshape(num_heads, head_dim, -1)


def _mlp_output_projection(layer: nn.Module) -> nn.Module:
    return layer.mlp.c_proj if hasattr(layer.mlp, "c_proj") else layer.mlp.down_proj


def head_output_norms(head_outputs: Tensor, output_maps: Tensor) -> Tensor:
    """‖A_h X_h‖_F per sample and head → [B, H] fp32, from the heads' attention outputs A_h V_h [B, T, H, dh] (the
    output projection's input) and their output maps W_O^h [H, dh, d]: ‖(A_h V_h) W_O^h‖² = ⟨G_h, W_O^h W_O^hᵀ⟩
    with G_h = (A_h V_h)ᵀ (A_h V_h), so no [B, T, d] product is formed per head. The same quantity as
    `shd.head_importance`, read from a hook instead of captured maps: no T × T map is ever held, so calibration
    costs what a plain forward costs at any context length."""
    values = head_outputs.float()
    gram = torch.einsum("bthk,bthl->bhkl", values, values)
    output_gram = output_maps @ output_maps.transpose(1, 2)
    return (gram * output_gram).sum((-2, -1)).clamp_min(0).sqrt()


@contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def measure_importance(teacher: PreTrainedModel, input_ids: Tensor, batch_size: int) -> Importance:
    """One forward of `teacher` over `input_ids` [N, T] (packed, no padding) in batches, measuring `Importance`.

    Hooks read each block's input and output, each attention's output-projection input (the heads' A_h V_h side by
    side), each MLP's down-projection input and each norm's output; nothing of size T × T is held.
    """
    dims = attention_dims(teacher.config)
    layers = decoder_layers(teacher)
    attention = find_attention_modules(teacher)
    device = next(teacher.parameters()).device
    num_layers = len(layers)
    width = _mlp_output_projection(layers[0])
    intermediate = width.weight.shape[0] if model_family(teacher.config) == "gpt2" else width.weight.shape[1]
    block = torch.zeros(num_layers, dtype=torch.float64, device=device)
    heads = torch.zeros(num_layers, dims.num_heads, dtype=torch.float64, device=device)
    mlp = torch.zeros(num_layers, intermediate, dtype=torch.float64, device=device)
    hidden = torch.zeros(num_layers + 1, dims.d_model, dtype=torch.float64, device=device)
    inputs: dict[int, Tensor] = {}
    output_maps = {index: _output_maps(attention[index], dims.num_heads, dims.head_dim) for index in range(num_layers)}

    def block_input(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def block_output(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            cosine = nn.functional.cosine_similarity(inputs.pop(index).float(), out.float(), dim=-1)
            block[index] += (1 - cosine).sum(dtype=torch.float64)

        return hook

    def head_share(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            outputs = args[0]
            norms = head_output_norms(
                outputs.reshape(*outputs.shape[:2], dims.num_heads, dims.head_dim), output_maps[index]
            )
            total = norms.sum(-1, keepdim=True)
            shares = torch.where(total > 0, norms / torch.where(total > 0, total, 1.0), 1 / dims.num_heads)
            heads[index] += shares.sum(0, dtype=torch.float64)

        return hook

    def channel_sum(target: Tensor, row: int, read_input: bool) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any = None) -> None:
            values = args[0] if read_input else output
            target[row] += values.float().abs().sum((0, 1), dtype=torch.float64)

        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(block_input(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(block_output(index), with_kwargs=True))
        module = attention[index]
        projection = module.o_proj if hasattr(module, "o_proj") else module.c_proj
        handles.append(projection.register_forward_pre_hook(head_share(index)))
        handles.append(_mlp_output_projection(layer).register_forward_pre_hook(channel_sum(mlp, index, True)))
        for norm in _block_norms(layer):
            handles.append(norm.register_forward_hook(channel_sum(hidden, index, False)))
    handles.append(_final_norm(teacher).register_forward_hook(channel_sum(hidden, num_layers, False)))
    with _hooks(handles):
        for start in range(0, len(input_ids), batch_size):
            batch = input_ids[start : start + batch_size].to(device=device, dtype=torch.long)
            teacher(input_ids=batch, use_cache=False)
    samples, tokens = input_ids.shape[0], input_ids.numel()
    return Importance(
        block=(block / tokens).cpu(),
        heads=(heads / samples).cpu(),
        mlp=(mlp / tokens).cpu(),
        hidden=(hidden / tokens).cpu(),
        samples=samples,
        tokens=tokens,
    )


def select_layers(block_importance: Tensor, num_layers: int) -> list[int]:
    """The `num_layers` teacher layers with the largest block importance, in model order (ties: the earlier)."""
    total = block_importance.numel()
    if not 1 <= num_layers <= total:
        raise CarveError(f"student.num_layers: got {num_layers}, expected 1 … {total} (the teacher's layers)")
    order = sorted(range(total), key=lambda layer: (-block_importance[layer].item(), layer))
    return sorted(order[:num_layers])


def top_channels(importance: Tensor, count: int) -> Tensor:
    """Indices [count] of the largest entries of `importance` [C], in increasing order (ties: the earlier)."""
    order = sorted(range(importance.numel()), key=lambda channel: (-importance[channel].item(), channel))
    return torch.tensor(sorted(order[:count]), dtype=torch.long)


# --------------------------------------------------------------------------------------------------------------------
# The plan: which teacher layers, heads and channels each part of the student takes


@dataclass(frozen=True)
class HeadPlan:
    """How one student layer's heads are made from its teacher layer's heads, as mixing matrices.

    `query` [H_s, H_t]: student q slice j = Σ_t query[j, t] · teacher q slice t; `output` [H_s, H_t] the same for the
    o slices; `kv` [KV_s, KV_t] for the k and v slices.
    """

    query: Tensor
    output: Tensor
    kv: Tensor

    def teacher_heads(self) -> list[list[int]]:
        """The teacher heads each student head takes (for the log)."""
        return [row.nonzero().flatten().tolist() for row in self.query]

    def teacher_kv_heads(self) -> list[list[int]]:
        return [row.nonzero().flatten().tolist() for row in self.kv]


def plan_heads(
    groups: list[list[int]],
    importance: Tensor,
    num_teacher_kv_heads: int,
    num_kv_heads: int,
    method: HeadInit,
    alpha: Tensor | None = None,
) -> HeadPlan:
    """The `HeadPlan` of one layer: `groups` (teacher heads of each student head), head `importance` [H_t],
    `alpha` [H_t] (merge weights; None: uniform) and the KV counts. See the module docstring for the rules."""
    num_student, num_teacher = len(groups), importance.numel()
    if method not in ("prune", "merge"):
        raise CarveError(f"student.carve.heads: got {method!r}, expected 'prune' or 'merge'")
    if num_student % num_kv_heads or num_teacher % num_teacher_kv_heads:
        raise CarveError(
            f"student.num_kv_heads: {num_kv_heads} KV heads for {num_student} heads (teacher {num_teacher_kv_heads} "
            f"for {num_teacher}); expected divisors of the head counts"
        )
    weights = torch.ones(num_teacher, dtype=torch.float64) if alpha is None else alpha.double()
    query = torch.zeros(num_student, num_teacher, dtype=torch.float64)
    for student_head, group in enumerate(groups):
        if method == "prune":
            kept = max(group, key=lambda head: (importance[head].item(), -head))
            query[student_head, kept] = 1.0
        else:
            group_weights = weights[group]
            total = group_weights.sum()
            query[student_head, group] = group_weights / total if total > 0 else 1.0 / len(group)
    used = (query > 0).double()
    output = used / used.sum(0, keepdim=True).clamp_min(1)
    teacher_kv = torch.arange(num_teacher) // (num_teacher // num_teacher_kv_heads)
    per_teacher_kv = torch.zeros(num_student, num_teacher_kv_heads, dtype=torch.float64)
    per_teacher_kv.index_add_(1, teacher_kv, query)
    student_kv = torch.arange(num_student) // (num_student // num_kv_heads)
    kv = torch.zeros(num_kv_heads, num_teacher_kv_heads, dtype=torch.float64)
    kv.index_add_(0, student_kv, per_teacher_kv)
    kv = kv / kv.sum(1, keepdim=True)
    return HeadPlan(query=query, output=output, kv=kv)


@dataclass(frozen=True)
class CarvePlan:
    """Everything the carve copies: per student layer its teacher layer, heads and MLP channels; the hidden channels."""

    layers: list[int]
    heads: list[HeadPlan]
    mlp: list[Tensor]
    """Kept intermediate channels of each student layer, increasing."""
    hidden: Tensor
    """Kept hidden channels, increasing."""

    def describe(self) -> dict[str, Any]:
        """What was kept, as JSON-ready values (logged, and written next to the run)."""
        return {
            "teacher_layers": list(self.layers),
            "heads": [plan.teacher_heads() for plan in self.heads],
            "kv_heads": [plan.teacher_kv_heads() for plan in self.heads],
            "mlp_channels": [int(channels.numel()) for channels in self.mlp],
            "hidden_channels": int(self.hidden.numel()),
        }


def plan_carve(
    teacher_config: PretrainedConfig,
    student_config: PretrainedConfig,
    layers: list[int],
    importance: Importance,
    head_init: HeadInit,
    groups: Mapping[int, list[list[int]]],
    alphas: Mapping[int, Tensor] | None = None,
) -> CarvePlan:
    """The `CarvePlan` of `student_config` (a `models.make_student_config` of the teacher with its head dim) whose
    layer j copies teacher layer `layers[j]`; `groups[layer]` the teacher heads of each student head (the grouping
    its attention targets use, e.g. `shd.squeeze_groups`); `alphas` the merge weights [H_t] per teacher layer (a
    missing layer merges uniformly)."""
    teacher, student = attention_dims(teacher_config), attention_dims(student_config)
    if student.head_dim != teacher.head_dim:
        raise CarveError(f"student head dim {student.head_dim} differs from the teacher's {teacher.head_dim}")
    if len(layers) != student.num_layers:
        raise CarveError(f"{len(layers)} teacher layers {layers} for a student of {student.num_layers} layers")
    intermediate = _intermediate_size(student_config)
    if student.d_model > teacher.d_model or intermediate > importance.mlp.shape[1]:
        raise CarveError(
            f"student.hidden_size {student.d_model} / intermediate_size {intermediate}: a carved student keeps at most "
            f"the teacher's {teacher.d_model} / {importance.mlp.shape[1]} channels"
        )
    heads, mlp = [], []
    for layer in layers:
        alpha = None if alphas is None else alphas.get(layer)
        heads.append(
            plan_heads(
                groups[layer], importance.heads[layer], teacher.num_kv_heads, student.num_kv_heads, head_init, alpha
            )
        )
        mlp.append(top_channels(importance.mlp[layer], intermediate))
    hidden_importance = importance.hidden[sorted(set(layers))].sum(0) + importance.hidden[-1]
    return CarvePlan(list(layers), heads, mlp, top_channels(hidden_importance, student.d_model))


def _intermediate_size(config: PretrainedConfig) -> int:
    if model_family(config) == "gpt2":
        return config.n_inner if config.n_inner is not None else 4 * config.hidden_size
    return config.intermediate_size


# --------------------------------------------------------------------------------------------------------------------
# Weights


def _mix(weight: Tensor, mixing: Tensor, dim: int, head_dim: int) -> Tensor:
    """Mix the head blocks of `weight` along `dim` (H_t blocks of `head_dim`) with `mixing` [H_s, H_t]."""
    moved = weight.float().movedim(dim, 0)
    blocks = moved.reshape(mixing.shape[1], head_dim, *moved.shape[1:])
    mixed = torch.einsum("st,t...->s...", mixing.to(blocks), blocks)
    return mixed.reshape(-1, *moved.shape[1:]).movedim(0, dim)


def _take(weight: Tensor, index: Tensor, dim: int) -> Tensor:
    return weight.float().index_select(dim, index.to(weight.device))


@dataclass(frozen=True)
class _LayerRoles:
    """How each parameter of one block is carved, by its name inside the block."""

    plan: HeadPlan
    mlp: Tensor
    hidden: Tensor
    head_dim: int

    def llama(self, name: str, weight: Tensor) -> Tensor | None:
        plan, dh, hidden = self.plan, self.head_dim, self.hidden
        columns_hidden = weight.dim() == 2
        if name.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
            mixing = plan.query if name.startswith("self_attn.q_proj.") else plan.kv
            mixed = _mix(weight, mixing, 0, dh)
            return _take(mixed, hidden, 1) if columns_hidden else mixed
        if name == "self_attn.o_proj.weight":
            return _take(_mix(weight, plan.output, 1, dh), hidden, 0)
        if name == "self_attn.o_proj.bias" or name.startswith("mlp.down_proj."):
            kept = _take(weight, hidden, 0)
            return _take(kept, self.mlp, 1) if columns_hidden else kept
        if name.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            kept = _take(weight, self.mlp, 0)
            return _take(kept, hidden, 1) if columns_hidden else kept
        if name.startswith(("self_attn.q_norm.", "self_attn.k_norm.")):
            return weight.float()
        if "norm" in name.split(".")[0]:
            return _take(weight, hidden, 0)
        return None

    def gpt2(self, name: str, weight: Tensor) -> Tensor | None:
        plan, dh, hidden = self.plan, self.head_dim, self.hidden
        if name.startswith("attn.c_attn."):
            rows_hidden = weight.dim() == 2
            parts = weight.float().chunk(3, dim=-1)
            mixed = [
                _mix(part, mixing, -1, dh) for part, mixing in zip(parts, (plan.query, plan.kv, plan.kv), strict=True)
            ]
            joined = torch.cat(mixed, dim=-1)
            return _take(joined, hidden, 0) if rows_hidden else joined
        if name == "attn.c_proj.weight":
            return _take(_mix(weight, plan.output, 0, dh), hidden, 1)
        if name == "mlp.c_fc.weight":
            return _take(_take(weight, hidden, 0), self.mlp, 1)
        if name == "mlp.c_fc.bias":
            return _take(weight, self.mlp, 0)
        if name == "mlp.c_proj.weight":
            return _take(_take(weight, self.mlp, 0), hidden, 1)
        if name in ("attn.c_proj.bias", "mlp.c_proj.bias") or name.startswith(("ln_1.", "ln_2.")):
            return _take(weight, hidden, 0)
        return None


_LAYER_KEY = re.compile(r"^(model\.layers|transformer\.h)\.(\d+)\.(.+)$")


def carve_state_dict(
    teacher_state: dict[str, Tensor], student_keys: list[str], family: str, plan: CarvePlan, head_dim: int
) -> dict[str, Tensor]:
    """The student's weights (fp32) from the teacher's `state_dict`: every key of `student_keys` carved by `plan`.

    A student parameter this module does not know how to carve is an error naming it (rather than a silently
    random weight).
    """
    carved: dict[str, Tensor] = {}
    hidden = plan.hidden
    for key in student_keys:
        match = _LAYER_KEY.match(key)
        if match:
            prefix, index, name = match.group(1), int(match.group(2)), match.group(3)
            roles = _LayerRoles(plan.heads[index], plan.mlp[index], hidden, head_dim)
            source = teacher_state[f"{prefix}.{plan.layers[index]}.{name}"]
            value = roles.gpt2(name, source) if family == "gpt2" else roles.llama(name, source)
        elif key in ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight", "transformer.wpe.weight"):
            value = _take(teacher_state[key], hidden, 1)
        elif key.startswith(("model.norm.", "transformer.ln_f.")):
            value = _take(teacher_state[key], hidden, 0)
        else:
            value = teacher_state[key].float() if key == "lm_head.bias" else None
        if value is None:
            raise CarveError(f"cannot carve the student parameter {key!r} ({family} family): no rule for it")
        carved[key] = value.cpu()
    return carved


def carve_student(
    teacher: PreTrainedModel, student_config: PretrainedConfig, plan: CarvePlan, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """The student of `student_config` with the weights `plan` carves from `teacher`, with capture attention, in
    train mode."""
    family = model_family(teacher.config)
    moved = plan.layers != list(range(len(plan.layers)))
    if family == "gpt2" and moved and getattr(teacher.config, "scale_attn_by_inverse_layer_idx", False):
        raise CarveError(
            f"teacher config scale_attn_by_inverse_layer_idx=true: the attention scale of a layer depends on its "
            f"index, so teacher layers {plan.layers} copied to student layers 0…{len(plan.layers) - 1} would compute "
            "another function; carve with the layers in place or use another student.init"
        )
    student = AutoModelForCausalLM.from_config(student_config, attn_implementation=CAPTURE_ATTENTION, dtype=dtype)
    keys = list(student.state_dict().keys())
    carved = carve_state_dict(teacher.state_dict(), keys, family, plan, attention_dims(teacher.config).head_dim)
    student.load_state_dict(carved, strict=True)
    return student.train()


# --------------------------------------------------------------------------------------------------------------------
# Linear fill of the dropped layers (ReplaceMe-style, training-free)


@dataclass(frozen=True)
class SegmentFill:
    """The linear map fitted into one student layer that stands for several teacher layers."""

    student_layer: int
    teacher_layers: tuple[int, int]
    """First and last teacher layer the student layer stands for (its own and the dropped ones after it)."""
    error_before: float
    """‖block output − teacher hidden state‖ / ‖teacher hidden state‖ on the calibration batches, before the fill."""
    error_after: float

    def describe(self) -> dict[str, Any]:
        return {
            "student_layer": self.student_layer,
            "teacher_layers": list(self.teacher_layers),
            "relative_error": [round(self.error_before, 6), round(self.error_after, 6)],
        }


def segment_ends(layers: list[int], num_teacher_layers: int) -> list[int]:
    """For each kept teacher layer, the teacher layer where its segment ends (exclusive): the next kept layer, the
    teacher's depth for the last one. Kept layers must increase: a segment is a run of consecutive teacher layers."""
    if any(later <= earlier for earlier, later in itertools.pairwise(layers)):
        raise CarveError(
            f"student.carve.fill: linear replaces the teacher layers between kept ones, so the kept teacher layers "
            f"must increase; got {layers}"
        )
    return [*layers[1:], num_teacher_layers]


def ridge_map(gram: Tensor, cross: Tensor, ridge: float) -> Tensor:
    """argmin_T ‖M T − D‖² + ρ̄ ‖T − I‖² = (MᵀM + ρ̄ I)⁻¹ (MᵀD + ρ̄ I), from `gram` MᵀM and `cross` MᵀD (float64),
    with ρ̄ = `ridge` · tr(MᵀM) / d: the shrinkage is toward the identity (no change) and scale-free."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    strength = ridge * gram.diagonal().mean()
    return torch.linalg.solve(gram + strength * eye, cross + strength * eye)


def _apply_output_map(projection: nn.Module, transform: Tensor) -> None:
    """Make the MLP output projection write y T instead of y (LLaMA nn.Linear [d, I], GPT-2 Conv1D [I, d])."""
    weight = projection.weight
    transform = transform.to(device=weight.device)
    if isinstance(projection, nn.Linear):
        weight.copy_((transform.T @ weight.double()).to(weight.dtype))
    else:
        weight.copy_((weight.double() @ transform).to(weight.dtype))
    if getattr(projection, "bias", None) is not None:
        projection.bias.copy_((projection.bias.double() @ transform).to(projection.bias.dtype))


@torch.no_grad()
def fill_dropped_layers(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    plan: CarvePlan,
    input_ids: Tensor,
    batch_size: int,
    ridge: float,
) -> list[SegmentFill]:
    """Fit, in place, each carved layer that stands for dropped teacher layers so that its output approximates the
    teacher's hidden state where its segment ends (ReplaceMe, Shopkhoev et al. 2025: a linear map estimated on
    calibration data replaces the pruned blocks, fused into the preceding MLP's output projection).

    Student layer j copies teacher layer m(j); the teacher layers after it up to the next kept one are gone. With
    M its MLP output, R the rest of its output (residual + attention) and Y the teacher's hidden state after its last
    dropped layer (the kept hidden channels), T = `ridge_map` of ‖M T + R − Y‖², then W_out ← W_out T. Layers are
    fitted in order on the student's own activations, so each map sees what the earlier fills made. A layer whose
    segment is itself alone is left as carved (a carve that keeps every layer stays exact).
    """
    teacher_layers, student_layers = decoder_layers(teacher), decoder_layers(student)
    ends = segment_ends(plan.layers, len(teacher_layers))
    fitted = [j for j, (start, end) in enumerate(zip(plan.layers, ends, strict=True)) if end - start > 1]
    if not fitted:
        return []
    teacher_device = next(teacher.parameters()).device
    student_device = next(student.parameters()).device
    was_training = student.training
    student.eval().to(teacher_device)
    hidden = plan.hidden.to(teacher_device)
    batches = [
        input_ids[start : start + batch_size].to(device=teacher_device, dtype=torch.long)
        for start in range(0, len(input_ids), batch_size)
    ]
    captured: dict[str, Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    # The teacher's states at the segment ends, kept in fp32 (exact for a bf16 teacher, half of fp64's memory).
    targets: dict[int, list[Tensor]] = {j: [] for j in fitted}
    handles = [teacher_layers[ends[j] - 1].register_forward_hook(keep(f"teacher{j}")) for j in fitted]
    with _hooks(handles):
        for batch in batches:
            teacher(input_ids=batch, use_cache=False)
            for j in fitted:
                targets[j].append(captured.pop(f"teacher{j}").index_select(-1, hidden).float())
    fills = []
    for j in fitted:
        projection = _mlp_output_projection(student_layers[j])
        handles = [
            projection.register_forward_hook(keep("mlp")),
            student_layers[j].register_forward_hook(keep("block")),
        ]
        width = hidden.numel()
        gram = torch.zeros(width, width, dtype=torch.float64, device=teacher_device)
        cross = torch.zeros_like(gram)
        sums = torch.zeros(3, dtype=torch.float64, device=teacher_device)  # ‖D‖², ‖Y‖², ‖M − D‖² (the carve's error)
        with _hooks(handles):
            for batch, stored in zip(batches, targets[j], strict=True):
                student(input_ids=batch, use_cache=False)
                mlp = captured.pop("mlp").double().reshape(-1, width)
                rest = captured.pop("block").double().reshape(-1, width) - mlp
                target = stored.double().reshape(-1, width)
                wanted = target - rest
                gram += mlp.T @ mlp
                cross += mlp.T @ wanted
                sums += torch.stack([wanted.square().sum(), target.square().sum(), (mlp - wanted).square().sum()])
        transform = ridge_map(gram, cross, ridge)
        # ‖M T − D‖² = tr(Tᵀ G T) − 2 tr(Tᵀ C) + ‖D‖², with G = MᵀM, C = MᵀD.
        residual = (transform * (gram @ transform)).sum() - 2 * (transform * cross).sum() + sums[0]
        scale = sums[1].sqrt()
        before = (sums[2].sqrt() / scale).item()
        after = (residual.clamp_min(0).sqrt() / scale).item()
        _apply_output_map(projection, transform)
        fills.append(SegmentFill(j, (plan.layers[j], ends[j] - 1), before, after))
    student.to(student_device)
    student.train(was_training)
    return fills
