"""Shapes of well-known teachers, without their weights: what `distill cache --plan --template` prices a cache for,
and what benchmarks build random teachers of (a few layers of an 8B shape fit a CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def llama3_8b(num_layers: int = 32) -> PretrainedConfig:
    """Meta-Llama-3-8B: 32 layers, 32 heads of 128, 8 KV heads, width 4096, vocabulary 128256, 8192 positions."""
    from transformers import LlamaConfig  # here: the CLI lists the templates without importing transformers

    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )


def smollm2_135m(num_layers: int = 30) -> PretrainedConfig:
    """SmolLM2-135M: 30 layers, 9 heads of 64, 3 KV heads, width 576, vocabulary 49152, 8192 positions."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=num_layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )


TEACHER_TEMPLATES: dict[str, Callable[..., PretrainedConfig]] = {
    "llama3-8b": llama3_8b,
    "smollm2-135m": smollm2_135m,
}
"""`--template` name → the teacher config of that shape (`num_layers` may shorten it)."""
