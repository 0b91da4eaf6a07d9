"""`student.init: <directory>`: a pretrained student of the teacher's family, vocabulary and tokenizer, any shape."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PretrainedConfig

from pipeline.config import Config, ConfigError
from pipeline.data import DataError
from pipeline.data.prepare import TOKENIZER_FILES, tokenizer_fingerprint
from pipeline.models.capture import CAPTURE_ATTENTION, model_family
from pipeline.models.loading import load_pretrained, read_model_config
from pipeline.students.base import StudentInit, shape_of

logger = logging.getLogger(__name__)


INIT_HINT = (
    "student.init must be 'scratch', 'teacher' or a directory written by save_pretrained (config.json, weights and "
    "the teacher's tokenizer)"
)


def _pretrained_config(directory: Path) -> PretrainedConfig:
    if not directory.is_dir():
        raise ConfigError(f"student.init: {str(directory)!r} is neither 'scratch', 'teacher' nor an existing directory")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"student.init: {str(directory)!r} holds no config.json; expected a pretrained HF model")
    return read_model_config(directory, INIT_HINT)


def tokenizing_state(directory: Path) -> dict[str, Any]:
    """What decides how `directory`'s tokenizer turns text into ids and back: its whole pipeline (vocabulary, merges,
    normaliser, pre-tokenizer, post-processor, decoder, added tokens), its special tokens and its chat template — not
    the loader settings `save_pretrained` writes into tokenizer_config.json (`is_local`, `local_files_only`, the path
    it was loaded from), which made byte-identical tokenizers look different."""
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return {
        "pipeline": json.loads(backend.to_str()) if backend is not None else tokenizer.get_vocab(),
        "special tokens": {name: str(token) for name, token in tokenizer.special_tokens_map.items()},
        "added tokens": {index: str(token) for index, token in tokenizer.added_tokens_decoder.items()},
        "chat template": tokenizer.chat_template,
    }


def check_same_tokenizer(directory: Path, teacher_dir: Path) -> None:
    """Refuse a pretrained student whose tokenizer does not tokenise as the teacher's: identical files
    (`data.tokenizer_fingerprint`) pass at once; otherwise the two tokenizers' `tokenizing_state` must agree."""
    try:
        found = tokenizer_fingerprint(directory)
    except DataError:
        raise ConfigError(
            f"student.init: {str(directory)!r} holds none of the tokenizer files ({', '.join(TOKENIZER_FILES)}), so "
            "its tokenizer cannot be compared with the teacher's; save the tokenizer with the model"
        ) from None
    if found == tokenizer_fingerprint(teacher_dir):
        return
    student_state, teacher_state = tokenizing_state(directory), tokenizing_state(teacher_dir)
    differing = [part for part in teacher_state if student_state[part] != teacher_state[part]]
    if not differing:
        logger.info("student.init: %s's tokenizer files differ from the teacher's only in loader settings", directory)
        return
    raise ConfigError(
        f"student.init: {str(directory)!r} tokenises differently from the teacher {str(teacher_dir)!r} (its "
        f"{', '.join(differing)} differ); a pretrained student must share the teacher's tokenizer"
    )


class PretrainedStudent(StudentInit):
    name = "pretrained"

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def shape(self, config: Config, teacher_config: PretrainedConfig) -> dict[str, int]:
        """The directory's own shape; every set key must agree with it."""
        directory, student = self.directory, config.student
        hf_config = _pretrained_config(directory)
        try:
            family = model_family(hf_config)
        except ValueError as error:
            raise ConfigError(f"student.init: {str(directory)!r}: {error}") from None
        if family != model_family(teacher_config):
            raise ConfigError(
                f"student.init: {str(directory)!r} is a {family} model ({hf_config.model_type}), the teacher a "
                f"{model_family(teacher_config)} model ({teacher_config.model_type}); expected the teacher's family"
            )
        if hf_config.vocab_size != teacher_config.vocab_size:
            raise ConfigError(
                f"student.init: {str(directory)!r} has vocab_size {hf_config.vocab_size}, the teacher "
                f"{teacher_config.vocab_size}; expected the teacher's vocabulary"
            )
        check_same_tokenizer(directory, Path(config.teacher.path))
        shape = shape_of(hf_config)
        for key, value in shape.items():
            configured = getattr(student, key)
            if configured is not None and configured != value:
                raise ConfigError(
                    f"student.{key}: got {configured}, but the pretrained student {str(directory)!r} has {value}; "
                    f"leave student.{key} unset (null) or set it to {value}"
                )
        return shape

    def check_shape(self, shape: dict[str, int], teacher_config: PretrainedConfig) -> None:
        """A pretrained model's shape is what it is (a LLaMA head dim need not split its width)."""

    def hf_config(self, config: Config, teacher_config: PretrainedConfig) -> PretrainedConfig:
        hf_config = _pretrained_config(self.directory)
        for key, value in hf_config.to_dict().items():
            if (key.endswith("dropout") or key.endswith("_pdrop")) and isinstance(value, float):
                setattr(hf_config, key, 0.0)
        return hf_config

    def build(
        self, config: Config, teacher_config: PretrainedConfig, hf_config: PretrainedConfig, targets: Any, seed: int
    ) -> nn.Module:
        model = load_pretrained(
            self.directory,
            "student.init",
            INIT_HINT,
            config=hf_config,
            attn_implementation=CAPTURE_ATTENTION,
            dtype=torch.float32,
        )
        logger.info("student: pretrained weights from %s", self.directory)
        return model
