"""Importance of the teacher's layers, heads and channels, measured once on calibration batches: what a carve keeps
(`students.carve`) is decided from it. One teacher forward with hooks (`measure_importance`), no T × T maps held:

- block: 1 − cos(block input, block output) averaged over tokens (ShortGPT / Minitron);
- heads: each head's share ‖A_h X_h‖_F / Σ_h' ‖A_h' X_h'‖_F of the layer's attention output;
- MLP: the mean |activation| of each intermediate channel (the down projection's input);
- hidden: the mean |output| of each hidden channel of the layers' norms and the final norm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from pipeline.models.capture import attention_dims, find_attention_modules, model_family
from pipeline.students.blocks import attached_hooks, block_norms, decoder_layers, final_norm, mlp_output_projection


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


def _output_maps(attention: nn.Module, num_heads: int, head_dim: int) -> Tensor:
    """Each head's slice of the output projection [H, dh, d] fp32: head h writes x_h @ W[h] to the model."""
    # LLaMA o_proj is an nn.Linear [d, H·dh], GPT-2 c_proj a Conv1D [H·dh, d].
    weight = attention.o_proj.weight.T if hasattr(attention, "o_proj") else attention.c_proj.weight
    return weight.float().reshape(num_heads, head_dim, -1)


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
    width = mlp_output_projection(layers[0])
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
        handles.append(mlp_output_projection(layer).register_forward_pre_hook(channel_sum(mlp, index, True)))
        for norm in block_norms(layer):
            handles.append(norm.register_forward_hook(channel_sum(hidden, index, False)))
    handles.append(final_norm(teacher).register_forward_hook(channel_sum(hidden, num_layers, False)))
    with attached_hooks(handles):
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
