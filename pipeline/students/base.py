"""What a student init kind is (`student.init`): a component that resolves the student's shape and builds it.

Three kinds, one module each: `scratch` (random weights), a pretrained HF directory, and `teacher` (carved out of the
teacher). LoRA is not a kind but a wrapper applied to whichever student a kind built (`pipeline.students.lora`).
`init_kind(student.init)` finds the kind; nothing else branches on the init.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from pipeline.config import Config, ConfigError, StudentConfig
from pipeline.models.capture import attention_dims, model_family

SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")


class StudentInit(ABC):
    """Where a student's weights start."""

    name: str

    @abstractmethod
    def shape(self, config: Config, teacher_config: PretrainedConfig) -> dict[str, int]:
        """Every `SHAPE_KEYS` value of the student (unset keys filled, set ones checked), building no model."""

    @abstractmethod
    def hf_config(self, config: Config, teacher_config: PretrainedConfig) -> PretrainedConfig:
        """The student's HF config for a resolved `config` (every dropout 0: distillation is deterministic)."""

    @abstractmethod
    def build(
        self, config: Config, teacher_config: PretrainedConfig, hf_config: PretrainedConfig, targets: Any, seed: int
    ) -> nn.Module:
        """The student with its starting weights (fp32, capture attention). `targets`: the run's `TargetSource`
        (what a carve reads: the α statistics, the selective heads), or None."""

    def check_shape(self, shape: dict[str, int], teacher_config: PretrainedConfig) -> None:
        """Refuse a resolved shape this kind cannot build, naming the key (the width must split into the heads)."""
        if shape["hidden_size"] % shape["num_heads"]:
            raise ConfigError(
                f"student.hidden_size: got {shape['hidden_size']}, expected a multiple of student.num_heads "
                f"({shape['num_heads']})"
            )

    def resolve(self, config: Config) -> Config:
        """What else a resolved config fixes for this kind (a carve by importance: its layer map)."""
        return config


def shape_of(hf_config: PretrainedConfig) -> dict[str, int]:
    """The student shape keys of an HF config (GPT-2's unset n_inner is 4 × width)."""
    dims = attention_dims(hf_config)
    if model_family(hf_config) == "gpt2":
        intermediate = hf_config.n_inner if hf_config.n_inner is not None else 4 * hf_config.hidden_size
    else:
        intermediate = hf_config.intermediate_size
    return {
        "num_layers": dims.num_layers,
        "hidden_size": dims.d_model,
        "num_heads": dims.num_heads,
        "num_kv_heads": dims.num_kv_heads,
        "intermediate_size": intermediate,
    }


def filled(student: StudentConfig, defaults: dict[str, int]) -> dict[str, int]:
    """`defaults` with the keys the student section sets."""
    return {key: getattr(student, key) if getattr(student, key) is not None else defaults[key] for key in defaults}
