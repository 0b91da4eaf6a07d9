"""Attention capture against manual recomputation from the layer weights and against eager attention."""

import math
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, BatchEncoding, BertConfig, PreTrainedModel

import pipeline.models.capture as attention
from pipeline.models.capture import (
    CAPTURE_ATTENTION,
    AttentionCapture,
    attention_dims,
    find_attention_modules,
)
from pipeline.models.loading import build_student, load_teacher, load_tokenizer
from pipeline.ops.map_losses import student_maps

TEXTS = ["The quick brown fox jumps over the lazy dog.", "A spider has eight legs."]
FAMILIES = ["tiny_llama_dir", "tiny_gpt2_dir"]


def _batch(directory: Path, padding_side: Literal["left", "right"]) -> BatchEncoding:
    """Two texts of different lengths, so one row is padded."""
    tokenizer = load_tokenizer(directory)
    tokenizer.padding_side = padding_side
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()
    return batch


def _attention_inputs(model: nn.Module, layers: list[int]) -> tuple[dict[int, Tensor], list[Any]]:
    """Hooks that store each selected attention module's input hidden states ``[B, T, D]``."""
    inputs: dict[int, Tensor] = {}
    modules = find_attention_modules(model)
    handles = []
    for layer in layers:

        def hook(module: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
            inputs[layer] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        handles.append(modules[layer].register_forward_pre_hook(hook, with_kwargs=True))
    return inputs, handles


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _masked_softmax(scores: Tensor, attention_mask: Tensor) -> Tensor:
    """Causal + padding-key masked softmax of ``[B, H, T, T]`` scores, eager-style (finfo.min)."""
    length = scores.shape[-1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & attention_mask.bool()[:, None, None]
    return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)


def _manual_attention(model: PreTrainedModel, layer: int, hidden: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
    """Maps, circuits and q/k/v of one layer recomputed from its weights, per head, without the capture code."""
    module = find_attention_modules(model)[layer]
    batch, length, d_model = hidden.shape
    dims = attention_dims(model.config)
    head_dim = dims.head_dim

    def split_heads(states: Tensor) -> Tensor:
        return states.view(batch, length, -1, head_dim).transpose(1, 2)

    if model.config.model_type == "gpt2":
        fused = hidden @ module.c_attn.weight + module.c_attn.bias
        query, key, value = (split_heads(part) for part in fused.split(d_model, dim=-1))
        scale = head_dim**-0.5
        if model.config.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1
        output_slices = [module.c_proj.weight[h * head_dim : (h + 1) * head_dim, :] for h in range(dims.num_heads)]
    else:
        query = split_heads(hidden @ module.q_proj.weight.T)
        key = split_heads(hidden @ module.k_proj.weight.T)
        value = split_heads(hidden @ module.v_proj.weight.T)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(length)[None])
        cos, sin = cos[:, None], sin[:, None]
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        groups = dims.num_heads // dims.num_kv_heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scale = 1 / math.sqrt(head_dim)
        output_slices = [module.o_proj.weight[:, h * head_dim : (h + 1) * head_dim].T for h in range(dims.num_heads)]
    maps = _masked_softmax(query @ key.transpose(-1, -2) * scale, attention_mask)
    circuits = torch.stack([value[:, h] @ output_slices[h] for h in range(dims.num_heads)], dim=1)
    return {"maps": maps, "circuits": circuits, "query": query, "key": key, "value": value}


@pytest.mark.parametrize("fixture", FAMILIES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_capture_matches_manual_recomputation(
    fixture: str, padding_side: Literal["left", "right"], request: pytest.FixtureRequest
) -> None:
    directory: Path = request.getfixturevalue(fixture)
    teacher = load_teacher(directory)
    batch = _batch(directory, padding_side)
    layers = [1, 3]
    inputs, handles = _attention_inputs(teacher, layers)
    with torch.no_grad(), AttentionCapture(teacher, layers, circuits=True, qkv=True) as capture:
        teacher(**batch)
    for handle in handles:
        handle.remove()
    dims = attention_dims(teacher.config)
    batch_size, length = batch.input_ids.shape
    for layer in layers:
        expected = _manual_attention(teacher, layer, inputs[layer], batch.attention_mask)
        maps = capture.maps[layer]
        assert maps.shape == (batch_size, dims.num_heads, length, length) and maps.dtype == torch.float32
        circuits = capture.circuits[layer]
        assert circuits.values.shape == (batch_size, dims.num_kv_heads, length, dims.head_dim)
        assert circuits.output.shape == (dims.num_heads, dims.head_dim, dims.d_model)
        assert circuits.dense().shape == (batch_size, dims.num_heads, length, dims.d_model)
        assert maps.max(-1).values.mean() > 0.3, "maps near uniform: the comparison would not detect errors"
        torch.testing.assert_close(maps, expected["maps"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(circuits.dense(), expected["circuits"], rtol=1e-5, atol=1e-5)
        for name, captured in zip(("query", "key", "value"), capture.qkv[layer], strict=True):
            assert captured.shape == (batch_size, dims.num_heads, length, dims.head_dim)
            torch.testing.assert_close(captured, expected[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", FAMILIES)
def test_capture_equals_eager_attention(fixture: str, request: pytest.FixtureRequest) -> None:
    directory: Path = request.getfixturevalue(fixture)
    captured_model = load_teacher(directory)
    eager_model = load_teacher(directory, attn_implementation="eager")
    # Right padding: no query row is fully masked, so every row is defined the same way by SDPA and eager.
    batch = _batch(directory, "right")
    eager = eager_model(**batch, output_attentions=True)
    with AttentionCapture(captured_model, [0, 2]) as capture:
        logits = captured_model(**batch).logits
    torch.testing.assert_close(logits, eager.logits, rtol=1e-5, atol=1e-5)
    for layer in (0, 2):
        torch.testing.assert_close(capture.maps[layer], eager.attentions[layer], rtol=1e-6, atol=1e-6)


def test_gpt2_layer_index_scaling_is_honoured(tiny_gpt2_dir: Path) -> None:
    teacher = load_teacher(tiny_gpt2_dir)
    values = {**teacher.config.to_dict(), "scale_attn_by_inverse_layer_idx": True}
    models = {}
    for implementation in (CAPTURE_ATTENTION, "eager"):
        # A fresh config per model: from_config sets the implementation on the config object it is given.
        config = type(teacher.config).from_dict(values)
        models[implementation] = AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()
        models[implementation].load_state_dict(teacher.state_dict())
    input_ids = torch.arange(5, 25)[None]
    eager = models["eager"](input_ids=input_ids, output_attentions=True)
    with AttentionCapture(models[CAPTURE_ATTENTION], [3]) as scaled, AttentionCapture(teacher, [3]) as unscaled:
        logits = models[CAPTURE_ATTENTION](input_ids=input_ids).logits
        teacher(input_ids=input_ids)
    torch.testing.assert_close(scaled.maps[3], eager.attentions[3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, eager.logits, rtol=1e-5, atol=1e-5)
    assert (scaled.maps[3] - unscaled.maps[3]).abs().max() > 1e-2


def test_only_requested_layers_inside_with_are_recorded(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = load_teacher(tiny_llama_dir)
    sdpa_calls: list[int] = []
    delegate = attention.sdpa_attention_forward

    def counting_sdpa(module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        sdpa_calls.append(module.layer_idx)
        return delegate(module, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", counting_sdpa)
    input_ids = torch.arange(3, 19)[None]
    with torch.no_grad(), AttentionCapture(teacher, [2]) as capture:
        teacher(input_ids=input_ids)
    assert sdpa_calls == [0, 1, 3]
    assert set(capture.maps) == {2}
    assert capture.circuits == {} and capture.qkv == {} and capture.inputs == {}
    recorded = capture.maps[2]
    sdpa_calls.clear()
    with torch.no_grad():
        teacher(input_ids=input_ids)
    assert sdpa_calls == [0, 1, 2, 3]
    assert capture.maps[2] is recorded and set(capture.maps) == {2}


@pytest.mark.parametrize("fixture", FAMILIES)
def test_score_inputs_keep_sdpa_and_give_the_eager_maps(fixture: str, request: pytest.FixtureRequest) -> None:
    """A non-eager capture runs SDPA (same logits), records post-RoPE q/k per KV head with their graph, and the maps
    recomputed from them equal the eager capture's maps (GPT-2 with inverse-layer-index scaling included)."""
    directory: Path = request.getfixturevalue(fixture)
    model = load_teacher(directory)
    values = {**model.config.to_dict(), "scale_attn_by_inverse_layer_idx": True} if fixture == "tiny_gpt2_dir" else None
    if values is not None:
        scaled = AutoModelForCausalLM.from_config(
            type(model.config).from_dict(values), attn_implementation=CAPTURE_ATTENTION
        )
        scaled.load_state_dict(model.state_dict())
        model = scaled.eval()
    input_ids = torch.arange(5, 25)[None]
    with torch.no_grad(), AttentionCapture(model, [1, 3]) as eager:
        eager_logits = model(input_ids=input_ids).logits
    model.requires_grad_(True)
    with AttentionCapture(model, [1, 3], eager=False) as capture:
        logits = model(input_ids=input_ids).logits
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    assert capture.maps == {} and set(capture.inputs) == {1, 3}
    dims = attention_dims(model.config)
    for layer in (1, 3):
        inputs = capture.inputs[layer]
        assert inputs.key.shape == (1, dims.num_kv_heads, 20, dims.head_dim) and inputs.query.requires_grad
        maps = student_maps(inputs.query.detach(), inputs.key.detach(), inputs.scale)
        torch.testing.assert_close(maps, eager.maps[layer], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="eager captures only"):
        AttentionCapture(model, [1], eager=False, circuits=True)


@pytest.mark.parametrize("fixture", FAMILIES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batches_give_masked_stochastic_rows(
    fixture: str, padding_side: Literal["left", "right"], request: pytest.FixtureRequest
) -> None:
    directory: Path = request.getfixturevalue(fixture)
    teacher = load_teacher(directory)
    batch = _batch(directory, padding_side)
    layers = list(range(attention_dims(teacher.config).num_layers))
    with torch.no_grad(), AttentionCapture(teacher, layers, circuits=True) as capture:
        logits = teacher(**batch).logits
    assert torch.isfinite(logits).all()
    valid = batch.attention_mask.bool()
    positions = torch.arange(valid.shape[1])
    for layer in layers:
        maps = capture.maps[layer]
        assert torch.isfinite(maps).all() and torch.isfinite(capture.circuits[layer].dense()).all()
        for b in range(maps.shape[0]):
            rows = maps[b][:, valid[b]]  # [H, real rows, T]
            future = positions[None, :] > positions[valid[b]][:, None]  # [real rows, T]
            torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:2]), rtol=0, atol=1e-6)
            assert (rows[:, :, ~valid[b]] == 0).all(), "a real query row attends to a padding key"
            assert (rows[:, future] == 0).all(), "a real query row attends to a future token"


def test_bf16_teacher_captures_fp32_maps(tiny_llama_dir: Path) -> None:
    teacher = load_teacher(tiny_llama_dir, dtype=torch.bfloat16)
    with torch.no_grad(), AttentionCapture(teacher, [0], circuits=True) as capture:
        logits = teacher(input_ids=torch.arange(3, 19)[None]).logits
    assert logits.dtype == torch.bfloat16
    circuits = capture.circuits[0]
    assert capture.maps[0].dtype == circuits.values.dtype == circuits.output.dtype == torch.float32
    torch.testing.assert_close(capture.maps[0].sum(-1), torch.ones(1, 6, 16), rtol=0, atol=1e-5)


class _Wrapper(nn.Module):
    """Stands in for a DeepSpeed engine: the model is a submodule, not the object captured."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, **batch: Tensor) -> Any:
        return self.module(**batch)


def test_gradients_flow_through_captured_student_maps(tiny_llama_dir: Path) -> None:
    teacher = load_teacher(tiny_llama_dir)
    student = build_student(teacher.config, num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2, seed=0)
    wrapped = _Wrapper(student)
    batch = _batch(tiny_llama_dir, "right")
    with AttentionCapture(wrapped, [1], qkv=True) as capture:
        wrapped(**batch)
    # A plain sum of a row-stochastic map is constant; weight it so the loss depends on the map.
    weights = torch.rand(capture.maps[1].shape, generator=torch.Generator().manual_seed(0))
    (capture.maps[1] * weights).sum().backward()
    layers = student.model.layers
    assert layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layers[2].self_attn.q_proj.weight.grad is None
    assert capture.qkv[1].query.requires_grad


def test_activation_checkpointing_gives_the_same_gradients(tiny_llama_dir: Path) -> None:
    config = load_teacher(tiny_llama_dir).config
    batch = _batch(tiny_llama_dir, "right")
    gradients = []
    for checkpointing in (False, True):
        student = build_student(config, num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2, seed=0)
        if checkpointing:
            student.activation_checkpointing_enable({"use_reentrant": False})
        with AttentionCapture(student, [1]) as capture:
            logits = student(**batch).logits
            weights = torch.rand(capture.maps[1].shape, generator=torch.Generator().manual_seed(0))
            ((capture.maps[1] * weights).sum() + logits.mean()).backward()
        gradients.append(student.model.layers[1].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(gradients[1], gradients[0])


def test_capture_rejects_misuse(tiny_llama_dir: Path) -> None:
    eager = load_teacher(tiny_llama_dir, attn_implementation="eager")
    with pytest.raises(ValueError, match=CAPTURE_ATTENTION), AttentionCapture(eager, [0]):
        pass
    teacher = load_teacher(tiny_llama_dir)
    with pytest.raises(ValueError, match=r"\[7\]"), AttentionCapture(teacher, [0, 7]):
        pass
    with (
        AttentionCapture(teacher, [1]),
        pytest.raises(RuntimeError, match="another AttentionCapture"),
        AttentionCapture(teacher, [1]),
    ):
        pass


def test_attention_dims(tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    llama = attention_dims(load_teacher(tiny_llama_dir).config)
    gpt2 = attention_dims(load_teacher(tiny_gpt2_dir).config)
    assert (llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.d_model) == (4, 6, 2, 8, 48)
    assert (gpt2.num_layers, gpt2.num_heads, gpt2.num_kv_heads, gpt2.head_dim, gpt2.d_model) == (4, 4, 4, 16, 64)
    with pytest.raises(ValueError, match="bert"):
        attention_dims(BertConfig())
