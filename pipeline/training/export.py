"""The final export of `distill train`: the trained student as a plain HF directory (safetensors, config, the
teacher's tokenizer files), a LoRA student with its adapters merged into the weights and the adapter itself beside
it. Checkpoints, which a run resumes from, are `training.checkpoints`. The export is a valid `student.init`."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from torch import Tensor, nn

from pipeline.data.prepare import TOKENIZER_FILES
from pipeline.infra import dist
from pipeline.infra.atomic import staged_directory
from pipeline.students.lora import ADAPTER_DIR, is_lora, merged_model, save_adapter

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
"""Where transformers 5 keeps a tokenizer's chat template, beside `TOKENIZER_FILES`."""


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
    """Write the student as a plain HF directory (safetensors, config, the teacher's tokenizer files); call on every
    rank.

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
            copy_tokenizer(teacher_dir, staging)
        logger.info("exported the student to %s", directory)
    dist.barrier()
    return directory


def copy_tokenizer(teacher_dir: Path, directory: Path) -> list[str]:
    """Copy the teacher's tokenizer files into `directory` byte for byte; returns their names.

    Not a load and re-save through transformers: that writes its loader arguments (`is_local`, `local_files_only`)
    into tokenizer_config.json, so the copy's `tokenizer_fingerprint` would differ from the teacher's and the export
    would be refused as `student.init`. The same bytes tokenise the same way and fingerprint the same.
    """
    names = [name for name in (*TOKENIZER_FILES, *CHAT_TEMPLATE_FILES) if (Path(teacher_dir) / name).is_file()]
    for name in names:
        shutil.copyfile(Path(teacher_dir) / name, Path(directory) / name)
    return names
