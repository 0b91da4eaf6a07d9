"""LoRA students with the `peft` library: wrap a built (or carved) student so that only its adapters train, and turn
the trained adapters back into plain HF weights for the export.

The wrapper keeps the student's modules (attention modules keep their `layer_idx` and projections, now PEFT LoRA
layers), so `AttentionCapture` finds them through it, and the base model keeps its `attn_implementation`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from pipeline.config import LoraSection
from pipeline.errors import PipelineError
from pipeline.models.capture import CAPTURE_ATTENTION, model_family

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
"""Where the export puts the PEFT adapter, inside the exported student directory."""
ADAPTER_BASE_DIR = "base"
"""The frozen base weights the adapter applies to, inside `ADAPTER_DIR`, when no pretrained directory holds them."""


class LoraError(PipelineError):
    """The LoRA section cannot be applied to the student; the message names the key."""


def lora_alpha(section: LoraSection) -> float:
    """`student.lora.alpha`, `null` meaning 2 × r."""
    return section.alpha if section.alpha is not None else 2.0 * section.r


def apply_lora(model: PreTrainedModel, section: LoraSection) -> nn.Module:
    """`model` wrapped with LoRA adapters per `section` (a `peft` `PeftModelForCausalLM`); `model` itself when
    `section.r` is 0. Every base parameter is frozen (requires_grad False); the adapters start as a zero update, so
    the wrapped model computes what `model` did."""
    if section.r == 0:
        return model
    # here, not at the top: PEFT is imported only for LoRA students
    from peft import LoraConfig, get_peft_model

    targets = section.target_modules
    settings = LoraConfig(
        r=section.r,
        lora_alpha=lora_alpha(section),
        lora_dropout=section.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        fan_in_fan_out=model_family(model.config) == "gpt2",  # GPT-2's projections are Conv1D (in × out)
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        wrapped = get_peft_model(model, settings)
    except ValueError as error:
        raise LoraError(f"student.lora.target_modules: got {targets!r}, which peft cannot apply: {error}") from None
    trainable = sum(param.numel() for param in wrapped.parameters() if param.requires_grad)
    total = sum(param.numel() for param in wrapped.parameters())
    logger.info(
        "LoRA r=%d alpha=%g on %s: %d trainable of %d parameters (%.2f%%)",
        section.r,
        lora_alpha(section),
        targets,
        trainable,
        total,
        100 * trainable / total,
    )
    return wrapped


def is_lora(module: nn.Module) -> bool:
    """Whether `module` is a PEFT-wrapped student."""
    # here, not at the top: PEFT is imported only for LoRA students
    from peft import PeftModel

    return isinstance(module, PeftModel)


def _fresh_copy(module: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """A CPU PEFT model with `module`'s structure and the weights of `state_dict` (a full `module.state_dict()`, e.g.
    gathered from ZeRO-3 partitions), so merging never touches the training model."""
    # here, not at the top: PEFT is imported only for LoRA students
    from peft import get_peft_model

    base = module.get_base_model()
    dtype = next(iter(state_dict.values())).dtype
    fresh = AutoModelForCausalLM.from_config(base.config, attn_implementation=CAPTURE_ATTENTION, dtype=dtype)
    settings = copy.deepcopy(module.peft_config["default"])
    settings.base_model_name_or_path = None
    wrapped = get_peft_model(fresh, settings)
    wrapped.load_state_dict(state_dict, strict=True)
    return wrapped


def merged_model(module: nn.Module, state_dict: dict[str, Tensor]) -> PreTrainedModel:
    """A plain HF model (CPU) whose weights are `state_dict`'s base weights with the adapters merged in by PEFT's
    `merge_and_unload`; `module` (the PEFT-wrapped training model) is left untouched."""
    return _fresh_copy(module, state_dict).merge_and_unload()


def save_adapter(module: nn.Module, state_dict: dict[str, Tensor], directory: Path, published_at: Path) -> None:
    """Write the adapter in PEFT format into `directory` (which the caller publishes as `published_at`): its
    `base_model_name_or_path` names the pretrained student directory it was trained on, or else `base/` inside it,
    where the frozen base weights are written (a carved or scratch base exists nowhere else)."""
    original = module.peft_config["default"].base_model_name_or_path
    copied = _fresh_copy(module, state_dict)
    if original is not None and (Path(original) / "config.json").is_file():
        base_path = Path(original).resolve()
    else:
        base_path = published_at.resolve() / ADAPTER_BASE_DIR
        _fresh_copy(module, state_dict).unload().save_pretrained(directory / ADAPTER_BASE_DIR, safe_serialization=True)
    copied.peft_config["default"].base_model_name_or_path = str(base_path)
    copied.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
