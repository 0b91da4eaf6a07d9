"""Loading teachers/tokenizers from local directories, building students, writing tiny teachers."""

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

from pipeline.models.capture import CAPTURE_ATTENTION, attention_dims
from pipeline.models.loading import (
    TINY_CORPUS,
    build_student,
    load_teacher,
    load_tokenizer,
    make_student_config,
    train_tiny_tokenizer,
    write_tiny_teacher,
)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_tiny_teacher_loads_frozen_with_capture_attention(fixture: str, request: pytest.FixtureRequest) -> None:
    directory: Path = request.getfixturevalue(fixture)
    assert (directory / "model.safetensors").is_file()
    tokenizer = load_tokenizer(directory)
    teacher = load_teacher(directory)
    assert teacher.config.vocab_size == len(tokenizer)
    assert teacher.config._attn_implementation == CAPTURE_ATTENTION
    assert not teacher.training
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None
    text = "The farmer walks to the market with 3 apples."
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    batch = tokenizer(["A spider has eight legs.", "Why?"], return_tensors="pt", padding=True)
    logits = teacher(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_tiny_llama_fixture_uses_gqa(tiny_llama_dir: Path) -> None:
    dims = attention_dims(load_teacher(tiny_llama_dir).config)
    assert dims.num_heads > dims.num_kv_heads > 0 and dims.num_heads % dims.num_kv_heads == 0


def test_gpt2_teacher_is_deterministic_despite_dropout_config(tiny_gpt2_dir: Path) -> None:
    teacher = load_teacher(tiny_gpt2_dir)
    assert teacher.config.attn_pdrop > 0  # real GPT-2 configs keep dropout on: eval() is what turns it off
    input_ids = torch.arange(4, 20)[None]
    torch.testing.assert_close(teacher(input_ids=input_ids).logits, teacher(input_ids=input_ids).logits)


def test_write_tiny_teacher_is_deterministic(tmp_path: Path) -> None:
    first = write_tiny_teacher(tmp_path / "a", num_layers=1, hidden_size=32, seed=3)
    second = write_tiny_teacher(tmp_path / "b", num_layers=1, hidden_size=32, seed=3)
    other_seed = write_tiny_teacher(tmp_path / "c", num_layers=1, hidden_size=32, seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other_seed / "model.safetensors").read_bytes()


def test_smollm2_like_teacher(tmp_path: Path) -> None:
    directory = write_tiny_teacher(tmp_path, num_layers=1, hidden_size=72, num_heads=9, num_kv_heads=3)
    teacher = load_teacher(directory, dtype=torch.bfloat16)
    dims = attention_dims(teacher.config)
    assert (dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.d_model) == (9, 3, 8, 72)
    assert teacher.model.embed_tokens.weight.dtype == torch.bfloat16
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight


def test_write_tiny_teacher_rejects_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_kv_heads"):
        write_tiny_teacher(tmp_path, hidden_size=48, num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        write_tiny_teacher(tmp_path, hidden_size=64, num_heads=6)
    with pytest.raises(ValueError, match="num_kv_heads"):
        write_tiny_teacher(tmp_path, "gpt2", num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="vocab_size"):
        write_tiny_teacher(tmp_path, vocab_size=100)


def test_loaders_name_the_path_when_not_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_teacher(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_teacher(tmp_path / "missing")


def test_load_tokenizer_pads_with_eos_when_pad_is_missing(tmp_path: Path) -> None:
    trained = train_tiny_tokenizer(TINY_CORPUS, 300)
    without_pad = PreTrainedTokenizerFast(tokenizer_object=trained.backend_tokenizer, eos_token="</s>")
    without_pad.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token == "</s>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    padded = tokenizer(["one two three", "one"], padding=True).input_ids
    assert len(padded[0]) == len(padded[1])


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "num_layers"), [(2, 1, 2), (3, 3, 1), (6, 2, 3), (12, None, 2)])
def test_llama_student_shapes(tiny_llama_dir: Path, num_heads: int, num_kv_heads: int | None, num_layers: int) -> None:
    teacher = load_teacher(tiny_llama_dir)
    student = build_student(
        teacher.config, num_layers=num_layers, hidden_size=48, num_heads=num_heads, num_kv_heads=num_kv_heads, seed=0
    )
    dims = attention_dims(student.config)
    expected_kv = num_heads if num_kv_heads is None else num_kv_heads
    assert (dims.num_layers, dims.num_heads, dims.num_kv_heads) == (num_layers, num_heads, expected_kv)
    assert dims.head_dim == 48 // num_heads  # not the teacher's head_dim
    attention = student.model.layers[0].self_attn
    assert attention.q_proj.out_features == 48 and attention.k_proj.out_features == expected_kv * dims.head_dim
    assert student.config.vocab_size == teacher.config.vocab_size
    assert student.config.model_type == teacher.config.model_type
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert student.config._attn_implementation == CAPTURE_ATTENTION
    assert student.training and all(parameter.requires_grad for parameter in student.parameters())
    logits = student(input_ids=torch.arange(3, 13)[None]).logits
    assert logits.shape == (1, 10, teacher.config.vocab_size)


def test_llama_student_keeps_mlp_ratio_and_fp32_from_bf16_teacher(tiny_llama_dir: Path) -> None:
    teacher = load_teacher(tiny_llama_dir, dtype=torch.bfloat16)
    student = build_student(teacher.config, num_layers=1, hidden_size=24, num_heads=2, num_kv_heads=None)
    ratio = teacher.config.intermediate_size / teacher.config.hidden_size
    assert student.config.intermediate_size == round(24 * ratio)
    assert all(parameter.dtype == torch.float32 for parameter in student.parameters())
    explicit = build_student(teacher.config, num_layers=1, hidden_size=24, num_heads=2, intermediate_size=40)
    assert explicit.model.layers[0].mlp.up_proj.out_features == 40


def test_gpt2_student_has_no_dropout(tiny_gpt2_dir: Path) -> None:
    teacher = load_teacher(tiny_gpt2_dir)
    student = build_student(teacher.config, num_layers=2, hidden_size=32, num_heads=2, intermediate_size=48, seed=1)
    assert (student.config.n_layer, student.config.n_embd, student.config.n_head, student.config.n_inner) == (
        2,
        32,
        2,
        48,
    )
    assert student.config.attn_pdrop == student.config.resid_pdrop == student.config.embd_pdrop == 0.0
    assert student.lm_head.weight is student.transformer.wte.weight
    assert student.training
    input_ids = torch.arange(3, 15)[None]
    torch.testing.assert_close(student(input_ids=input_ids).logits, student(input_ids=input_ids).logits)


def test_student_seed_is_reproducible_and_leaves_global_rng_alone(tiny_llama_dir: Path) -> None:
    config = load_teacher(tiny_llama_dir).config
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = build_student(config, num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2, seed=7)
    after = torch.rand(3)
    second = build_student(config, num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2, seed=7)
    third = build_student(config, num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2, seed=8)
    torch.testing.assert_close(before, after)
    unseeded = [build_student(config, num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2) for _ in range(2)]
    assert not torch.equal(*(model.model.layers[0].self_attn.q_proj.weight for model in unseeded))
    for name, parameter in first.state_dict().items():
        torch.testing.assert_close(parameter, second.state_dict()[name], rtol=0, atol=0)
    assert not torch.equal(first.model.layers[0].self_attn.q_proj.weight, third.model.layers[0].self_attn.q_proj.weight)


def test_student_shape_errors_name_the_field(tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    llama = load_teacher(tiny_llama_dir).config
    gpt2 = load_teacher(tiny_gpt2_dir).config
    with pytest.raises(ValueError, match="num_heads"):
        make_student_config(llama, num_layers=1, hidden_size=50, num_heads=4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        make_student_config(llama, num_layers=1, hidden_size=48, num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        make_student_config(gpt2, num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="num_layers"):
        make_student_config(gpt2, num_layers=0, hidden_size=32, num_heads=4)
    with pytest.raises(ValueError, match="bert"):
        make_student_config(BertConfig(), num_layers=1, hidden_size=32, num_heads=4)


@pytest.mark.parametrize("config_class", [Qwen2Config, MistralConfig])
def test_llama_like_families_are_supported(config_class: type) -> None:
    teacher_config = config_class(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        tie_word_embeddings=True,
    )
    student = build_student(teacher_config, num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, seed=0)
    assert type(student.config) is config_class
    assert student.config.head_dim == 16
    layer_types = getattr(student.config, "layer_types", None)
    assert layer_types is None or len(layer_types) == 2
    logits = student(input_ids=torch.arange(1, 9)[None]).logits
    assert logits.shape == (1, 8, 300)
