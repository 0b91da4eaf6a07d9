"""`student.init: scratch`: random weights in the `student` section's shape (4 layers × 384, 3 heads where unset)."""

from __future__ import annotations

from typing import Any

from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import PretrainedConfig

from pipeline.config import SCRATCH_STUDENT, Config, ConfigError
from pipeline.models.capture import CAPTURE_ATTENTION, model_family
from pipeline.models.loading import build_student, make_student_config
from pipeline.students.base import SHAPE_KEYS, StudentInit, filled


def student_config_from_shape(
    config: Config, teacher_config: PretrainedConfig, head_dim: int | None = None
) -> PretrainedConfig:
    """The teacher's config with the resolved student's shape (`models.make_student_config`), errors naming the
    shape."""
    student = config.student
    try:
        return make_student_config(
            teacher_config,
            num_layers=student.num_layers,
            hidden_size=student.hidden_size,
            num_heads=student.num_heads,
            num_kv_heads=student.num_kv_heads,
            intermediate_size=student.intermediate_size,
            head_dim=head_dim,
        )
    except (ValueError, StrictDataclassError) as error:
        shape = ", ".join(f"{key} {getattr(student, key)}" for key in SHAPE_KEYS)
        raise ConfigError(f"student: the shape ({shape}) cannot be built: {error}") from None


class ScratchStudent(StudentInit):
    name = "scratch"

    def shape(self, config: Config, teacher_config: PretrainedConfig) -> dict[str, int]:
        """Unset keys: 4 layers, width 384, 3 heads, KV = heads, MLP per `make_student_config`."""
        student = config.student
        shape = filled(student, SCRATCH_STUDENT)
        shape["num_kv_heads"] = student.num_kv_heads or shape["num_heads"]
        if student.intermediate_size is not None:
            shape["intermediate_size"] = student.intermediate_size
        elif model_family(teacher_config) == "gpt2":
            shape["intermediate_size"] = 4 * shape["hidden_size"]
        else:
            ratio = teacher_config.intermediate_size * shape["hidden_size"] / teacher_config.hidden_size
            shape["intermediate_size"] = round(ratio)
        return shape

    def check_shape(self, shape: dict[str, int], teacher_config: PretrainedConfig) -> None:
        super().check_shape(shape, teacher_config)
        if model_family(teacher_config) == "llama" and (shape["hidden_size"] // shape["num_heads"]) % 2:
            raise ConfigError(
                f"student.hidden_size: got {shape['hidden_size']}, expected an even head dim hidden_size // "
                f"num_heads (here {shape['hidden_size'] // shape['num_heads']}) for rotary embeddings"
            )

    def hf_config(self, config: Config, teacher_config: PretrainedConfig) -> PretrainedConfig:
        return student_config_from_shape(config, teacher_config)

    def build(
        self, config: Config, teacher_config: PretrainedConfig, hf_config: PretrainedConfig, targets: Any, seed: int
    ) -> nn.Module:
        student = config.student
        return build_student(
            teacher_config,
            num_layers=student.num_layers,
            hidden_size=student.hidden_size,
            num_heads=student.num_heads,
            num_kv_heads=student.num_kv_heads,
            intermediate_size=student.intermediate_size,
            attn_implementation=CAPTURE_ATTENTION,
            seed=seed,
        )
