"""Where the parts of a LLaMA-like or GPT-2 block are (the blocks, their norms, the MLP's output projection), and
hooks that are removed whatever happens: the importance measurement and the linear fill both read a model through
forward hooks on these parts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from pipeline.models.capture import model_family


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer blocks of a LLaMA-like or GPT-2 causal LM."""
    return model.transformer.h if model_family(model.config) == "gpt2" else model.model.layers


def final_norm(model: PreTrainedModel) -> nn.Module:
    return model.transformer.ln_f if model_family(model.config) == "gpt2" else model.model.norm


def block_norms(layer: nn.Module) -> list[nn.Module]:
    """The norms of a block that see the model width (LLaMA input/post-attention norms, GPT-2 ln_1/ln_2)."""
    return [child for child in layer.children() if "norm" in type(child).__name__.lower()]


def mlp_output_projection(layer: nn.Module) -> nn.Module:
    return layer.mlp.c_proj if hasattr(layer.mlp, "c_proj") else layer.mlp.down_proj


@contextmanager
def attached_hooks(handles: list[Any]) -> Iterator[None]:
    """Run the with-block with the hooks of `handles` attached; remove them on exit, also on an error."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
