"""`distill teacher import`: make `teacher.path` a plain HF directory of the configured teacher."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import Config
from pipeline.infra.atomic import staged_directory
from pipeline.infra.locks import output_lock
from pipeline.models.loading import TeacherConfigError, write_tiny_teacher
from pipeline.models.teacher_import import import_teacher

logger = logging.getLogger(__name__)

TINY_TEACHERS = {"tiny-random-llama": "llama", "tiny-random-gpt2": "gpt2"}
"""Teacher sources generated on the spot: 4 layers, 6 heads (LLaMA: 2 KV heads), width 96, for tests and CI."""


def teacher_stage(config: Config, *, overwrite: bool = False) -> Path:
    """`distill teacher import`: make `teacher.path` a plain HF directory of the configured teacher; a directory
    holding another teacher is replaced only with `overwrite`, one that holds no teacher never. Holds the lock of
    `teacher.path` while it writes: one writing job per directory."""
    with output_lock(config.teacher.path, "teacher.path", "distill teacher import"):
        return _import(config, overwrite)


def _import(config: Config, overwrite: bool) -> Path:
    output = Path(config.teacher.path)
    family = TINY_TEACHERS.get(config.teacher.source)
    if family is None:
        return import_teacher(config.teacher.source, output, overwrite=overwrite)
    if (output / "config.json").is_file():
        found = _model_type(output / "config.json")
        if found == family:
            logger.info("%s: tiny %s teacher already there", output, family)
            return output
        if not overwrite:
            raise TeacherConfigError(
                f"teacher.path {str(output)!r} holds a {found!r} teacher, teacher.source is "
                f"{config.teacher.source!r} ({family}); pass --overwrite to replace it, or choose another teacher.path"
            )
    elif output.is_dir() and any(output.iterdir()):
        raise TeacherConfigError(
            f"teacher.path {str(output)!r} is not empty and holds no config.json: it is no teacher; remove it or "
            "choose another teacher.path"
        )

    with staged_directory(output) as staging:
        write_tiny_teacher(
            staging, family, num_layers=4, hidden_size=96, num_heads=6, num_kv_heads=2 if family == "llama" else 6
        )
    logger.info("%s: wrote a tiny random %s teacher", output, family)
    return output


def _model_type(config_file: Path) -> str | None:
    """`model_type` of an HF config.json, None where it is unreadable."""
    try:
        values = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    return values.get("model_type") if isinstance(values, dict) else None
