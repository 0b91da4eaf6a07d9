"""The one place that knows about ranks: process-group set-up and the few collectives the stage drivers need.

Stages run as one process, or one process per rank under the DeepSpeed launcher (which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT). The math modules never import this.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch
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


def init_distributed() -> None:
    """Join the job's process group through DeepSpeed: nccl on GPUs, gloo on CPUs.

    A gloo group left by an earlier stage of `distill run` is replaced when GPUs want nccl.
    """
    # here, not at the top: DeepSpeed takes seconds to import; single-process paths never need it
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch_dist.is_initialized() and torch_dist.get_backend() != backend:
        shutdown()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


@contextlib.contextmanager
def launcher_environment() -> Iterator[None]:
    """Outside a launcher, provide the variables DeepSpeed expects for a world of one (restored afterwards)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        yield
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {key: os.environ.get(key) for key in defaults}
    os.environ.update(defaults)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reduce_device() -> torch.device:
    """Where collective tensors must live: the GPU for nccl, the CPU for gloo."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`values` reduced over every rank (a copy; unchanged in a single process). `op`: "sum" or "max"."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return values.detach().clone()
    reduced = values.detach().to(_reduce_device(), copy=True)
    torch_dist.all_reduce(reduced, op=torch_dist.ReduceOp.SUM if op == "sum" else torch_dist.ReduceOp.MAX)
    return reduced.to(values.device)


def term_means(local_sums: torch.Tensor, global_counts: torch.Tensor) -> torch.Tensor:
    """The one reduction of loss terms: every rank's per-term sums (of all its micro-batches) added up and divided
    once by the global unit counts → [n_terms] float64 global means, the same on every rank. `global_counts` are
    already summed over ranks (the trainer needs them before its first backward)."""
    return all_reduce(local_sums.detach().double().cpu()) / global_counts.double().cpu().clamp_min(1)


def broadcast_value(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return value
    holder = [value]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


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
    """Leave the process group cleanly so the launcher sees every rank exit. Through DeepSpeed when it holds the
    group: it then forgets the groups it derived and cached, so a later stage in the same process (tests,
    notebooks, `distill run`) can join a fresh group instead of tripping over a destroyed one."""
    if not torch_dist.is_initialized():
        return
    # here, not at the top: DeepSpeed takes seconds to import; single-process paths never need it
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    else:
        torch_dist.destroy_process_group()
