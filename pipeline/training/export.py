"""The final export of `distill train`: the trained student as a plain HF directory (safetensors, config, the
teacher's tokenizer), a LoRA student with its adapters merged into the weights and the adapter itself beside it.
Checkpoints, which a run resumes from, are `training.checkpoints`."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import Tensor, nn
from transformers import AutoTokenizer

from pipeline.infra import dist
from pipeline.infra.atomic import staged_directory
from pipeline.students.lora import ADAPTER_DIR, is_lora, merged_model, save_adapter

logger = logging.getLogger(__name__)


def gathered_state_dict(module: nn.Module, zero_stage: int) -> dict[str, Tensor] | None:
    """Full CPU state dict of `module` on rank 0 (None elsewhere); under ZeRO-3 gathered from every rank."""
    if zero_stage == 3:
        import deepspeed  # only ZeRO-3 needs it, and it is slow to import

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if not dist.is_main():
                return None
            return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
    if not dist.is_main():
        return None
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}


def export_student(module: nn.Module, zero_stage: int, teacher_dir: Path, directory: Path) -> Path:
    """Write the student as a plain HF directory (safetensors, config, the teacher's tokenizer); call on every rank.

    A LoRA student is written with its adapters merged into the weights (a plain model again), and the adapter
    itself in PEFT format goes to `adapter/` inside the directory (see `lora.save_adapter`). The directory is
    published atomically: a reader sees the previous export or the complete new one.
    """
    state_dict = gathered_state_dict(module, zero_stage)
    if dist.is_main():
        with staged_directory(directory) as staging:
            if is_lora(module):
                merged_model(module, state_dict).save_pretrained(staging, safe_serialization=True)
                save_adapter(module, state_dict, staging / ADAPTER_DIR, directory / ADAPTER_DIR)
            else:
                module.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
            AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True).save_pretrained(staging)
        logger.info("exported the student to %s", directory)
    dist.barrier()
    return directory
