"""Where the student starts (`student.init`): its resolved shape, and the built model.

The init kinds are components (`base.StudentInit`): `scratch`, a pretrained directory, `teacher` (carved); each
resolves its shape and builds its student, and LoRA wraps whichever student was built. Two calls:

- `resolve(config)`: stage drivers, before anything reads `config.student.*` or the layer map. Fills every unset
  shape key from the init kind (no model built) and lets the kind fix what else it decides (a carve by importance:
  the explicit layer map). Idempotent.
- `build_student_model(config, teacher_config, …)`: the trainer (and, with `structure_only`, a resume or an
  evaluation from a checkpoint: the same modules without calibration or teacher weights).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from pipeline.config import Config, ConfigError
from pipeline.config.validation import validate_for_teacher
from pipeline.models.capture import CAPTURE_ATTENTION, attention_dims, model_family
from pipeline.models.loading import load_teacher_config
from pipeline.ops.matching import layer_map
from pipeline.students.base import SHAPE_KEYS, StudentInit
from pipeline.students.carved import CarvedStudent
from pipeline.students.lora import apply_lora
from pipeline.students.pretrained import PretrainedStudent
from pipeline.students.scratch import ScratchStudent

logger = logging.getLogger(__name__)


def init_kind(init: str) -> StudentInit:
    """The init kind of `student.init`: `scratch`, `teacher`, or any other value a pretrained directory."""
    if init == ScratchStudent.name:
        return ScratchStudent()
    if init == CarvedStudent.name:
        return CarvedStudent()
    return PretrainedStudent(init)


def resolve_student(config: Config, teacher_config: PretrainedConfig) -> Config:
    """`config` with every student shape key filled from `student.init` (see `StudentConfig`), checked on the
    resolved values with errors naming the key; deterministic, builds no model. Idempotent."""
    kind = init_kind(config.student.init)
    shape = kind.shape(config, teacher_config)
    kind.check_shape(shape, teacher_config)
    if shape["num_heads"] % shape["num_kv_heads"]:
        raise ConfigError(
            f"student.num_kv_heads: got {shape['num_kv_heads']}, expected a divisor of student.num_heads "
            f"({shape['num_heads']})"
        )
    if model_family(teacher_config) == "gpt2" and shape["num_kv_heads"] != shape["num_heads"]:
        raise ConfigError(
            f"student.num_kv_heads: got {shape['num_kv_heads']}, expected student.num_heads ({shape['num_heads']}): "
            "GPT-2 has no grouped-query attention"
        )
    resolved = dataclasses.replace(config, student=dataclasses.replace(config.student, **shape))
    dims = attention_dims(teacher_config)
    validate_for_teacher(resolved, vocab_size=teacher_config.vocab_size, num_heads=dims.num_heads)
    kind.hf_config(resolved, teacher_config)
    importance_carve = isinstance(kind, CarvedStudent) and config.student.carve.layers == "importance"
    if not importance_carve:
        try:
            layer_map(shape["num_layers"], dims.num_layers, config.distill.layer_map)
        except ValueError as error:
            raise ConfigError(f"distill.layer_map: {error}") from None
    return resolved


def resolve(config: Config) -> Config:
    """What a stage driver calls first: the resolved student shape (`resolve_student`) and what its init kind fixes
    beyond it (`StudentInit.resolve`). Idempotent."""
    resolved = resolve_student(config, load_teacher_config(config.teacher.path))
    return init_kind(resolved.student.init).resolve(resolved)


def student_hf_config(config: Config, teacher_config: PretrainedConfig) -> PretrainedConfig:
    """The HF config of the resolved student (its init kind's)."""
    missing = [key for key in SHAPE_KEYS if getattr(config.student, key) is None]
    if missing:
        raise ValueError(f"student.{missing[0]} is unresolved; call students.resolve(config) first")
    return init_kind(config.student.init).hf_config(config, teacher_config)


def build_student_model(
    config: Config,
    teacher_config: PretrainedConfig,
    *,
    structure_only: bool = False,
    targets: Any = None,
    seed: int | None = None,
) -> nn.Module:
    """The student of a resolved `config` (see `resolve`), fp32, capture attention, train mode, with LoRA adapters
    when `student.lora.r` > 0 (then a PEFT model whose only trainable parameters are the adapters).

    Its init kind builds it (`scratch`: random weights from `seed`, default `train.seed`; a pretrained directory: its
    weights; `teacher`: carved, reading the α statistics and selective heads of `targets`, the run's
    `TargetSource`). `structure_only`: the same modules with random weights and no calibration, for a caller about
    to load a checkpoint's weights (a scratch student is built as usual: that is as cheap).
    """
    kind = init_kind(config.student.init)
    hf_config = student_hf_config(config, teacher_config)
    seed = config.train.seed if seed is None else seed
    if structure_only and not isinstance(kind, ScratchStudent):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(
                hf_config, attn_implementation=CAPTURE_ATTENTION, dtype=torch.float32
            )
    else:
        model = kind.build(config, teacher_config, hf_config, targets, seed)
    model.train()
    if config.student.lora.r > 0 and isinstance(kind, ScratchStudent):
        logger.warning(
            "student.lora.r = %d with student.init: scratch trains adapters on a random base", config.student.lora.r
        )
    return apply_lora(model, config.student.lora)
