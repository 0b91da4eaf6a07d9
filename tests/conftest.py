"""Shared fixtures: tiny random teachers written once per test session."""

from pathlib import Path

import pytest

from pipeline.models.loading import write_tiny_teacher


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer LLaMA teacher with GQA (6 query heads on 2 KV heads, head_dim 8) and its tokenizer."""
    return write_tiny_teacher(
        tmp_path_factory.mktemp("tiny_llama"), "llama", num_layers=4, hidden_size=48, num_heads=6, num_kv_heads=2
    )


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer GPT-2 teacher (4 heads, head_dim 16, dropout 0.1 as in real GPT-2) and its tokenizer."""
    return write_tiny_teacher(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2", num_layers=4, hidden_size=64, num_heads=4)
