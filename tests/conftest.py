"""Shared fixtures: tiny random teachers written once per test session."""

import shutil
from pathlib import Path

import pytest

from pipeline.models.loading import write_tiny_teacher
from pipeline.ops import native


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


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('a system message must come first') }}"
    "{% endif %}"
    "{{ '<s>' + message['role'] + '\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)
"""A ChatML-like template over the tiny tokenizer's specials: `<s>role\\ncontent</s>\\n` per turn; it refuses a
system message after the first turn, as real templates refuse what they cannot render."""


@pytest.fixture(scope="session")
def tiny_chat_teacher_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA teacher with `TINY_CHAT_TEMPLATE` as its chat template (chat_template.jinja, as
    `save_pretrained` writes one)."""
    directory = tmp_path_factory.mktemp("tiny_chat") / "teacher"
    shutil.copytree(tiny_llama_dir, directory)
    (directory / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE)
    return directory


@pytest.fixture(params=["native", "torch"])
def top_rows_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each top-k / top-m test once through the native CPU kernel (`pipeline.ops.native`) and once through the torch
    form it stands in for (the path of a machine without a C compiler, and of every GPU)."""
    if request.param == "native" and native.library() is None:
        pytest.skip("no C compiler: the torch form is what runs")
    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    return request.param
