"""Carve a student out of the teacher (Minitron-style structured pruning): keep layers, heads and channels.

Everything the carve decides comes from the teacher's importance on calibration batches (`students.importance`):

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

This module plans the carve (`plan_carve`) and copies the weights (`carve_student`); `students.fill` then optionally
fits a linear map into each kept layer that stands for dropped ones.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from pipeline.errors import PipelineError
from pipeline.models.capture import CAPTURE_ATTENTION, attention_dims, model_family
from pipeline.students.importance import Importance

HeadInit = Literal["prune", "merge"]


class CarveError(PipelineError):
    """The teacher cannot be carved into the configured student; the message names the parameter or key."""


# --------------------------------------------------------------------------------------------------------------------
# The plan: which teacher layers, heads and channels each part of the student takes


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
