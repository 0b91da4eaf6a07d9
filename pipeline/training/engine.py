"""The DeepSpeed side of a run: the student wrapped in an engine with the config's LR schedule, released when the
run ends, and a checkpoint loaded into it."""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import deepspeed
import torch

from pipeline.config import Config
from pipeline.infra import dist
from pipeline.students import build_student_model
from pipeline.training.checkpoints import ResumePoint, TrainState, restore_rng
from pipeline.training.schedule import make_scheduler
from pipeline.training.trainer import TrainError

logger = logging.getLogger(__name__)


@contextmanager
def released(engine: Any) -> Iterator[Any]:
    """Destroy `engine` when the run ends, however it ends. DeepSpeed's hooks (the ZeRO optimizer's backward hooks
    refer back to the engine) keep an engine, its model and its optimizer state alive after the last reference to
    it is gone, so without this every run in one process (`distill run`'s variants, the quality study, notebooks)
    would keep all earlier runs' weights and Adam state in memory."""
    try:
        yield engine
    finally:
        engine.destroy()


def build_engine(
    config: Config, teacher_config: Any, ds_config: dict[str, Any], *, resuming: bool, targets: Any
) -> Any:
    """The student (same seed on every rank; scratch, pretrained or carved from the teacher, with LoRA adapters where
    configured) wrapped by DeepSpeed with the config's LR schedule. `resuming`: only the student's structure is built
    (the checkpoint's weights replace it, so no carve runs); `targets` (the run's `TargetSource`) feed a carve.

    The student is built whole on every rank and partitioned by `deepspeed.initialize` (ZeRO-3 included): students
    are small next to their teachers. A student too large for one device would need `deepspeed.zero.Init` here.
    Only parameters that require grad (the adapters alone under LoRA) reach the optimizer.
    """
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    student = build_student_model(config, teacher_config, structure_only=resuming, targets=targets)
    student.config.use_cache = False
    if config.train.gradient_checkpointing:
        # Activation checkpointing (transformers' current name for it); the loop runs backward inside the capture.
        student.activation_checkpointing_enable({"use_reentrant": False})
    engine, _, _, _ = deepspeed.initialize(
        model=student,
        model_parameters=[param for param in student.parameters() if param.requires_grad],
        config=ds_config,
        lr_scheduler=partial(make_scheduler, config=config),
    )
    return engine


def load_resume_point(engine: Any, resume: ResumePoint, fresh: TrainState) -> TrainState:
    """Load `resume` into `engine` and restore this rank's RNG; the state continues with `fresh`'s layout."""
    load_path, client_state = engine.load_checkpoint(str(resume.save_dir), tag=resume.load_tag)
    if load_path is None:
        raise TrainError(f"{resume.save_dir / resume.load_tag}: DeepSpeed found no checkpoint to load")
    saved = TrainState(**client_state["trainer"])
    restore_rng(client_state.get("rng_states", []), dist.rank())
    logger.info(
        "resumed %s: step %d, sample position %d (saved on %d ranks, now %d)",
        resume.save_dir / resume.load_tag,
        saved.step,
        saved.position,
        saved.world_size,
        fresh.world_size,
    )
    return dataclasses.replace(fresh, step=saved.step, position=saved.position, mlflow_run_id=saved.mlflow_run_id)
