"""LoRA students (peft): only adapters train, attention capture works through the wrapper, and the export merges the
adapters into a plain HF directory (plus the PEFT adapter with its base) that computes what the adapted model did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pipeline.config import LoraSection
from pipeline.models.capture import CAPTURE_ATTENTION, AttentionCapture
from pipeline.models.loading import build_student, load_teacher
from pipeline.students.lora import ADAPTER_BASE_DIR, ADAPTER_DIR, LoraError, apply_lora, is_lora
from pipeline.training.export import export_student

SHAPES = {
    "tiny_llama_dir": {"num_layers": 2, "hidden_size": 24, "num_heads": 3, "num_kv_heads": 1},
    "tiny_gpt2_dir": {"num_layers": 2, "hidden_size": 32, "num_heads": 2},
}


def student_with_lora(fixture: str, request: pytest.FixtureRequest, **section: object) -> torch.nn.Module:
    teacher_dir = request.getfixturevalue(fixture)
    base = build_student(load_teacher(teacher_dir).config, seed=0, **SHAPES[fixture])
    return apply_lora(base, LoraSection(**{"r": 4, **section}))


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 380, (3, 16), generator=torch.Generator().manual_seed(seed))


def train_one_step(model: torch.nn.Module) -> None:
    """One AdamW step over ALL parameters (frozen ones included: freezing, not the optimizer, must protect them)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    batch = ids()
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_only_adapter_parameters_change_over_a_step(fixture: str, request: pytest.FixtureRequest) -> None:
    model = student_with_lora(fixture, request)
    assert is_lora(model)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    train_one_step(model)
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert changed <= trainable
    assert any("lora_B" in name for name in changed)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_attention_capture_finds_the_attention_through_the_wrapper(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    model = student_with_lora(fixture, request)
    assert model.get_base_model().config._attn_implementation == CAPTURE_ATTENTION
    with AttentionCapture(model, [0, 1]) as capture:
        model(input_ids=ids())
    assert sorted(capture.maps) == [0, 1]
    assert capture.maps[1].requires_grad
    torch.testing.assert_close(capture.maps[1].sum(-1), torch.ones_like(capture.maps[1][..., 0]))


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_merged_export_loads_with_plain_transformers_and_matches(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model = student_with_lora(fixture, request, dropout=0.1)
    train_one_step(model)
    model.eval()
    batch = ids(seed=1)
    with torch.no_grad():
        adapted = model(input_ids=batch).logits
        base = model.get_base_model()
        with model.disable_adapter():
            unadapted = model(input_ids=batch).logits
    assert not torch.allclose(adapted, unadapted)  # the adapters do something, so the comparison below can fail
    directory = export_student(model, 0, request.getfixturevalue(fixture), tmp_path / "student")

    exported = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    assert not any("lora" in name for name, _ in exported.named_parameters())
    assert json.loads((directory / "config.json").read_text())["model_type"] == base.config.model_type
    torch.testing.assert_close(exported(input_ids=batch).logits, adapted, rtol=1e-5, atol=1e-5)

    adapter = directory / ADAPTER_DIR
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str((directory / ADAPTER_DIR / ADAPTER_BASE_DIR).resolve())
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapter / ADAPTER_BASE_DIR), adapter)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=batch).logits, adapted, rtol=1e-5, atol=1e-5)
        with reloaded.disable_adapter():
            torch.testing.assert_close(reloaded(input_ids=batch).logits, unadapted, rtol=1e-5, atol=1e-5)


def test_adapter_of_a_pretrained_student_names_its_directory(tiny_llama_dir: Path, tmp_path: Path) -> None:
    pretrained = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, attn_implementation=CAPTURE_ATTENTION, local_files_only=True
    )
    model = apply_lora(pretrained, LoraSection(r=2, target_modules=["q_proj", "v_proj"]))
    assert {name.split(".")[-2] for name, p in model.named_parameters() if p.requires_grad} == {"default"}
    targets = {name.split(".")[-4] for name, p in model.named_parameters() if p.requires_grad}
    assert targets == {"q_proj", "v_proj"}
    directory = export_student(model, 0, tiny_llama_dir, tmp_path / "student")
    settings = json.loads((directory / ADAPTER_DIR / "adapter_config.json").read_text())
    assert Path(settings["base_model_name_or_path"]) == tiny_llama_dir.resolve()
    assert not (directory / ADAPTER_DIR / ADAPTER_BASE_DIR).exists()


def test_unknown_target_modules_name_the_key(tiny_llama_dir: Path) -> None:
    base = build_student(load_teacher(tiny_llama_dir).config, **SHAPES["tiny_llama_dir"])
    with pytest.raises(LoraError, match=r"student\.lora\.target_modules: got \['c_attn'\]"):
        apply_lora(base, LoraSection(r=2, target_modules=["c_attn"]))
    assert apply_lora(base, LoraSection(r=0)) is base
