"""The teacher's statistics on calibration batches (the first `student.carve.calibration_samples` packed train
sequences), measured once per process and inputs: what a carve keeps is decided from them."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import PreTrainedModel

from pipeline.config import Config
from pipeline.data.prepare import calibration_sequences, load_prepared
from pipeline.infra.runtime import default_device
from pipeline.models.loading import load_teacher
from pipeline.students.importance import Importance, measure_importance

logger = logging.getLogger(__name__)

_MEMO: dict[str, tuple[Importance, float]] = {}
"""The last calibration statistics of this process and the seconds they took (stage drivers resolve, then train
carves: one teacher pass)."""


def calibration_ids(config: Config, count: int | None = None) -> Tensor:
    """The first `count` (default `student.carve.calibration_samples`) train sequences [N, T] int64, chat data's
    real tokens packed without padding (`data.prepare.calibration_sequences`); fewer when the split is smaller, with
    a warning."""
    splits, _ = load_prepared(Path(config.data.output_dir))
    wanted = config.student.carve.calibration_samples if count is None else count
    ids = calibration_sequences(splits["train"], wanted)
    if len(ids) < wanted:
        logger.warning("calibration: %d samples wanted, but the train split gives %d sequences", wanted, len(ids))
    return ids


def calibration_key(config: Config) -> dict[str, Any]:
    """What calibration statistics depend on: the teacher (path and its files' sizes and times), the data, the
    number of samples."""
    teacher_dir = Path(config.teacher.path).resolve()
    files = sorted((path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in teacher_dir.iterdir())
    _, meta = load_prepared(Path(config.data.output_dir))
    return {
        "teacher_path": str(teacher_dir),
        "teacher_files_sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest(),
        "data_fingerprint": meta["fingerprint"],
        "calibration_samples": config.student.carve.calibration_samples,
    }


def teacher_importance(config: Config, teacher: PreTrainedModel | None = None) -> tuple[Importance, float]:
    """(`Importance` of the teacher on the calibration batches, seconds the measurement took), measured once
    per process and inputs; loads the teacher unless given (in its checkpoint's dtype, like the carve: copying
    weights from a teacher cast to `teacher.dtype` would round the student's fp32 weights)."""
    key = json.dumps(calibration_key(config), sort_keys=True)
    if key in _MEMO:
        return _MEMO[key]
    started = time.perf_counter()
    if teacher is None:
        teacher = load_teacher(config.teacher.path, device=default_device())
    ids = calibration_ids(config)
    importance = measure_importance(teacher, ids, config.cache.batch_size)
    seconds = time.perf_counter() - started
    logger.info(
        "calibration: importance of %d teacher layers on %d × %d tokens in %.1f s",
        importance.block.numel(),
        ids.shape[0],
        ids.shape[1],
        seconds,
    )
    _MEMO.clear()
    _MEMO[key] = importance, seconds
    return importance, seconds
