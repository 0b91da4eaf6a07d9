"""The one place that knows about ranks: process-group set-up and the few collectives the stage drivers need.

Stages run as one process, or one process per rank under the DeepSpeed launcher (which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT). The math modules never import this.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch.distributed as torch_dist

logger = logging.getLogger(__name__)


def rank() -> int:
    """Global rank of this process (0 without a launcher)."""
    return torch_dist.get_rank() if torch_dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes in the job (1 without a launcher)."""
    return torch_dist.get_world_size() if torch_dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 writes manifests, talks to MLflow and prints summaries."""
    return rank() == 0


def init_cpu_group() -> None:
    """Join the launcher's process group over gloo when there is more than one process.

    The cache stage only needs a barrier and an object gather, which gloo does on any machine, GPU or not.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="gloo")
        logger.info("joined process group: rank %d of %d", rank(), world_size())


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if torch_dist.is_initialized():
        torch_dist.barrier()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not torch_dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(gathered, value)
    return gathered


def shutdown() -> None:
    """Leave the process group cleanly so the launcher sees every rank exit."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
