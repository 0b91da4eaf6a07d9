"""Checkpoints of `distill train`: where they live, what they hold, how a run resumes, and the final export.

A checkpoint is `train.output_dir/checkpoints/<tag>` (DeepSpeed's `latest` file names the newest): DeepSpeed's files
plus `trainer_state.json` (step, global sample position, world size, ZeRO stage, precision, student shape, MLflow
run id); DeepSpeed's client state holds the same and every rank's RNG state.

DeepSpeed 0.19 restores ZeRO-partitioned optimizer state (ZeRO ≥ 1, and bf16 whose optimizer is partitioned too)
only at the world size it was saved with ("Automatic adjustment of ZeRO's optimizer state partitioning with a new
world size is not currently supported"). Across world sizes or ZeRO stages the checkpoint is converted once with
DeepSpeed's `ds_to_universal` into `<tag>_universal` and loaded with `checkpoint.load_universal`. Unpartitioned fp32
state (ZeRO 0) loads at any world size as is. Either way the run continues from the saved global sample position.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline import dist
from pipeline.config import Config
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STUDENT = "student"
TRAINER_STATE = "trainer_state.json"
UNIVERSAL_SUFFIX = "_universal"


class CheckpointError(PipelineError):
    """A checkpoint cannot be found, read or continued as configured; the message names the path and the field."""


@dataclass
class TrainState:
    """What a resumed run needs beyond DeepSpeed's own state."""

    step: int = 0
    """Optimizer steps done."""
    position: int = 0
    """Global sample position: samples consumed so far, over all ranks (the next step starts here)."""
    world_size: int = 1
    zero_stage: int = 0
    bf16: bool = False
    mlflow_run_id: str | None = None
    student: dict[str, Any] = field(default_factory=dict)
    """The `student` config section the weights were trained with."""


@dataclass
class ResumePoint:
    """A checkpoint to continue from."""

    save_dir: Path
    tag: str
    state: TrainState
    universal: bool = False
    """Load the universal conversion (`<tag>_universal`): the optimizer state is re-partitioned."""

    @property
    def load_tag(self) -> str:
        return self.tag + UNIVERSAL_SUFFIX if self.universal else self.tag


def checkpoint_tag(step: int) -> str:
    """`step-00000010` …"""
    return f"step-{step:08d}"


def find_checkpoint(config: Config) -> tuple[Path, str] | None:
    """(save dir, tag) to resume from per `train.resume`, or None to start fresh."""
    resume = config.train.resume
    if resume == "never":
        return None
    save_dir = Path(config.train.output_dir) / CHECKPOINTS if resume == "auto" else Path(resume)
    latest = save_dir / "latest"
    if latest.is_file():
        return save_dir, latest.read_text().strip()
    if resume == "auto":
        return None
    if (save_dir / TRAINER_STATE).is_file():
        return save_dir.parent, save_dir.name
    raise CheckpointError(
        f"train.resume: {resume!r} is neither a checkpoint directory (with {TRAINER_STATE}) nor a directory of "
        "checkpoints (with a 'latest' file)"
    )


def read_trainer_state(save_dir: Path, tag: str) -> TrainState:
    path = save_dir / tag / TRAINER_STATE
    try:
        return TrainState(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{path}: cannot read the trainer state of this checkpoint ({error})") from error


def plan_resume(config: Config, world_size: int, stage: int, bf16: bool) -> ResumePoint | None:
    """The checkpoint to continue and how to load it at this world size, ZeRO stage and precision.

    DeepSpeed 0.19 loads ZeRO-partitioned optimizer state (ZeRO ≥ 1, or bf16, whose optimizer is partitioned too)
    only at the world size it was saved with; across world sizes or stages it goes through a universal checkpoint.
    Unpartitioned fp32 state (ZeRO 0) loads at any world size as is.
    """
    found = find_checkpoint(config)
    if found is None:
        return None
    save_dir, tag = found
    state = read_trainer_state(save_dir, tag)
    for key, value in asdict(config.student).items():
        if key in state.student and state.student[key] != value:
            raise CheckpointError(
                f"{save_dir / tag}: trained with student.{key} = {state.student[key]!r}, the config has {value!r}; "
                "resume with the same student, or start a new run (another train.output_dir or train.resume: never)"
            )
    saved_partitioned = state.zero_stage >= 1 or state.bf16
    now_partitioned = stage >= 1 or bf16
    same_layout = (state.world_size, state.zero_stage, state.bf16) == (world_size, stage, bf16)
    if same_layout or not (saved_partitioned or now_partitioned):
        return ResumePoint(save_dir, tag, state)
    if not (saved_partitioned and now_partitioned):
        raise CheckpointError(
            f"{save_dir / tag}: saved with ZeRO stage {state.zero_stage}{' bf16' if state.bf16 else ''} on "
            f"{state.world_size} ranks; continuing with ZeRO stage {stage}{' bf16' if bf16 else ''} on {world_size} "
            "ranks would drop the optimizer state (DeepSpeed converts only between partitioned layouts); keep "
            "deepspeed.zero_stage and train.precision, or start a new run (train.resume: never)"
        )
    return ResumePoint(save_dir, tag, state, universal=True)


def convert_to_universal(save_dir: Path, tag: str) -> None:
    """Run DeepSpeed's `ds_to_universal` on `save_dir/tag` once (rank 0), publishing `<tag>_universal` atomically.

    `--inject_missing_state`: plain (non-Megatron) models carry no universal-checkpoint metadata of their own.
    """
    target = save_dir / (tag + UNIVERSAL_SUFFIX)
    if target.is_dir():
        return
    staging = save_dir / f".{tag}{UNIVERSAL_SUFFIX}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(save_dir / tag),
        "--output_folder",
        str(staging),
        "--inject_missing_state",
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    logger.info("converting %s to a universal checkpoint (world size or ZeRO stage changed)", save_dir / tag)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckpointError(
            f"{save_dir / tag}: DeepSpeed's universal-checkpoint conversion failed:\n{result.stderr[-3000:]}"
        )
    staging.rename(target)
    (save_dir / f"latest{UNIVERSAL_SUFFIX}").write_text(target.name)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, Python)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(states: list[dict[str, Any]], rank: int) -> None:
    """Restore this rank's RNG states (rank 0's when the checkpoint came from fewer ranks)."""
    if not states:
        return
    state = states[rank] if rank < len(states) else states[0]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine: Any, save_dir: Path, state: TrainState, keep: int) -> None:
    """Checkpoint on every rank: DeepSpeed's files plus `trainer_state.json`, then prune to the newest `keep`.

    `trainer_state.json` is written before DeepSpeed writes its files and moves `latest`, so the tag `latest`
    names always has it.
    """
    tag = checkpoint_tag(state.step)
    client_state = {"trainer": asdict(state), "rng_states": dist.gather_objects(rng_state())}
    if dist.is_main():
        (save_dir / tag).mkdir(parents=True, exist_ok=True)
        (save_dir / tag / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2) + "\n")
    dist.barrier()
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state)
    if dist.is_main() and keep > 0:
        tags = sorted(path.name for path in save_dir.glob("step-*") if not path.name.endswith(UNIVERSAL_SUFFIX))
        for old in tags[:-keep]:
            shutil.rmtree(save_dir / old, ignore_errors=True)
            shutil.rmtree(save_dir / (old + UNIVERSAL_SUFFIX), ignore_errors=True)
    dist.barrier()
    logger.info("checkpoint %s (step %d, sample position %d)", save_dir / tag, state.step, state.position)


def gathered_state_dict(module: nn.Module, zero_stage: int) -> dict[str, Tensor] | None:
    """Full CPU state dict of `module` on rank 0 (None elsewhere); under ZeRO-3 gathered from every rank."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if not dist.is_main():
                return None
            return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
    if not dist.is_main():
        return None
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}


def export_student(module: nn.Module, zero_stage: int, teacher_dir: Path, directory: Path) -> Path:
    """Write the student as a plain HF directory (safetensors, config, the teacher's tokenizer); call on every rank.

    The directory is published atomically: a reader sees the previous export or the complete new one.
    """
    from transformers import AutoTokenizer

    from pipeline.atomic import staged_directory

    state_dict = gathered_state_dict(module, zero_stage)
    if dist.is_main():
        with staged_directory(directory) as staging:
            module.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
            AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True).save_pretrained(staging)
        logger.info("exported the student to %s", directory)
    dist.barrier()
    return directory
