"""Per-rank parameter + optimizer-state memory of the real DeepSpeed engine at 1 and 2 ranks, ZeRO-3 (and ZeRO-2).

For each ZeRO stage and world size this script starts the DeepSpeed launcher on itself (CPU accelerator, gloo, one
thread per rank). Every rank builds the engine exactly as `distill train` does for a scratch student of the shape
asked for (`engine.build_engine` with the JSON of `deepspeed_config.deepspeed_config`, the stage's preset from
`configs/deepspeed/`, fp32), runs one optimizer step on a random batch (AdamW creates its moments at the first step),
then sums the bytes of the tensors the engine actually holds — nothing is computed from parameter counts:

  parameters       each module parameter's `data` and, under ZeRO-3, its partition `param.ds_tensor`, plus the flat
                   buffers they live in (`fp16_partitioned_groups_flat` for ZeRO-3, `bit16_groups_flat` for ZeRO-1/2)
  fp32 master      the optimizer's fp32 partitions (`fp32_partitioned_groups_flat` for ZeRO-3,
                   `single_partition_of_fp32_groups` for ZeRO-1/2). In fp32 training ZeRO-3 means to alias it to
                   the parameter partition, but DeepSpeed 0.19.8 tests `tensor.device == "cpu"` (a torch.device
                   against a string: False) and so keeps a copy on the CPU; an alias would be counted once
  AdamW moments    every tensor in the wrapped torch optimizer's `state`
  other (info)     every further tensor reachable through lists, tuples and dicts of the ZeRO optimizer's attributes,
                   and the `.grad` of everything above: gradient partitions, reduction buckets

Tensors are counted by their underlying storage (views of one flat buffer count once, each storage in the first
category that reaches it, in the order above). Process RSS (now and peak, VmHWM) is printed as a coarser second
figure, with the RSS before the engine was built, so that the imports' share is visible.

Prints per-rank bytes at 1 and 2 ranks and the ratio 2 ranks ÷ 1 rank of (parameters + fp32 master + moments), the
largest rank at 2 against the one rank (issue target for ZeRO-3 ≤ 0.55).

    .venv/bin/python benchmarks/zero3_memory.py                          # 8 × 768 student (~88M), ZeRO-3 and -2
    .venv/bin/python benchmarks/zero3_memory.py --stages 3 --layers 4 --hidden 384 --heads 3 --kv-heads 1 \\
        --intermediate 1024                                              # the demo student, ZeRO-3 only
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("parameters", "fp32 master", "AdamW moments", "other (info)")
HELD = CATEGORIES[:3]
"""What the ratio is taken over: parameters and optimizer state."""
PARAM_FLATS = ("fp16_partitioned_groups_flat", "bit16_groups_flat")
MASTER_FLATS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups")


def proc_status_kib(field: str) -> int:
    """A `VmRSS`-style field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


class StorageLedger:
    """Bytes per category, each underlying storage counted once (in the first category that adds it)."""

    def __init__(self) -> None:
        self.owner: dict[int, str] = {}
        self.bytes = dict.fromkeys(CATEGORIES, 0)

    def add(self, category: str, tensor: Any) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.owner:
            return
        self.owner[storage.data_ptr()] = category
        self.bytes[category] += storage.nbytes()

    def add_tree(self, category: str, value: Any, depth: int = 4) -> None:
        """Every tensor (and its `.grad`) in nested lists, tuples and dicts of `value`."""
        import torch

        if isinstance(value, torch.Tensor):
            self.add(category, value)
            if value.grad is not None:
                self.add(category, value.grad)
        elif depth > 0 and isinstance(value, list | tuple):
            for item in value:
                self.add_tree(category, item, depth - 1)
        elif depth > 0 and isinstance(value, dict):
            for item in value.values():
                self.add_tree(category, item, depth - 1)


def measure_engine(engine: Any) -> dict[str, int]:
    """Bytes per category of what `engine` holds (see the module docstring)."""
    ledger = StorageLedger()
    for param in engine.module.parameters():
        ledger.add("parameters", param.data)
        ledger.add("parameters", getattr(param, "ds_tensor", None))
    zero = engine.optimizer
    for name in PARAM_FLATS:
        ledger.add_tree("parameters", getattr(zero, name, None))
    for name in MASTER_FLATS:
        for tensor in getattr(zero, name, None) or []:
            ledger.add("fp32 master", tensor)
    inner = getattr(zero, "optimizer", zero)
    for state in inner.state.values():
        ledger.add_tree("AdamW moments", state)
    for name in (*MASTER_FLATS, *PARAM_FLATS):
        ledger.add_tree("other (info)", getattr(zero, name, None))
    for param in engine.module.parameters():
        if param.grad is not None:
            ledger.add("other (info)", param.grad)
    for value in vars(zero).values():
        ledger.add_tree("other (info)", value)
    return ledger.bytes


def worker(args: argparse.Namespace) -> None:
    """Under the launcher: build the engine, step once, write this rank's figures to `args.out`/rank<R>.json."""
    rss_start = proc_status_kib("VmRSS") * 1024
    import torch
    from transformers import AutoConfig

    from pipeline.config import load_config
    from pipeline.infra.dist import init_distributed
    from pipeline.infra.runtime import configure_logging
    from pipeline.students import resolve
    from pipeline.training.deepspeed_config import deepspeed_config
    from pipeline.training.engine import build_engine

    configure_logging("WARNING")
    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = resolve(
        load_config(
            args.config,
            [
                "student.init=scratch",  # random weights of the asked shape: memory depends on shapes only
                f"student.num_layers={args.layers}",
                f"student.hidden_size={args.hidden}",
                f"student.num_heads={args.heads}",
                f"student.num_kv_heads={args.kv_heads}",
                f"student.intermediate_size={args.intermediate}",
                f"deepspeed.preset=configs/deepspeed/zero{args.stage}.json",
                f"deepspeed.zero_stage={args.stage}",
                "train.precision=fp32",
                "train.micro_batch_size=1",
            ],
        )
    )
    teacher_config = AutoConfig.from_pretrained(config.teacher.path, local_files_only=True)
    rss_before = proc_status_kib("VmRSS") * 1024
    start = time.perf_counter()
    engine = build_engine(config, teacher_config, deepspeed_config(config, torch.float32), resuming=False, targets=None)
    build_seconds = time.perf_counter() - start
    rss_built = proc_status_kib("VmRSS") * 1024
    generator = torch.Generator().manual_seed(rank)
    input_ids = torch.randint(teacher_config.vocab_size, (1, args.seq_len), generator=generator)
    start = time.perf_counter()
    loss = engine(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    engine.backward(loss)
    engine.step()
    step_seconds = time.perf_counter() - start
    figures = {
        "rank": rank,
        "world": world,
        "stage": engine.zero_optimization_stage(),
        "model_parameters": sum(
            param.ds_numel if hasattr(param, "ds_numel") else param.numel() for param in engine.module.parameters()
        ),
        "bytes": measure_engine(engine),
        "rss_start": rss_start,
        "rss_before_engine": rss_before,
        "rss_after_build": rss_built,
        "rss_after_step": proc_status_kib("VmRSS") * 1024,
        "rss_peak": proc_status_kib("VmHWM") * 1024,
        "build_seconds": build_seconds,
        "step_seconds": step_seconds,
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(figures))
    torch.distributed.barrier()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(args: argparse.Namespace, stage: int, world: int, out: Path) -> tuple[list[dict[str, Any]], float]:
    """Run the workers of one (stage, world size) under the DeepSpeed launcher; their figures and the wall time."""
    out.mkdir(parents=True)
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    shape = ["--layers", args.layers, "--hidden", args.hidden, "--heads", args.heads, "--kv-heads", args.kv_heads]
    command = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(world),
        "--master_port",
        str(free_port()),
        __file__,
        "--worker",
        "--stage",
        str(stage),
        "--out",
        str(out),
        "--config",
        args.config,
        "--seq-len",
        str(args.seq_len),
        "--intermediate",
        str(args.intermediate),
        *map(str, shape),
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(
            f"launcher (ZeRO-{stage}, {world} ranks) exited {result.returncode}:\n{result.stdout[-6000:]}"
            f"\n{result.stderr[-6000:]}"
        )
    return [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(world)], seconds


def mib(value: float) -> str:
    return f"{value / 2**20:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", default="configs/shakespeare.yaml", help="config giving teacher (vocabulary) and train"
    )
    parser.add_argument("--layers", type=int, default=8, help="student layers (default 8; the demo's is 4)")
    parser.add_argument("--hidden", type=int, default=768, help="student width (default 768; demo 384)")
    parser.add_argument("--heads", type=int, default=12, help="student heads (default 12; demo 3)")
    parser.add_argument("--kv-heads", type=int, default=4, help="student KV heads (default 4; demo 1)")
    parser.add_argument("--intermediate", type=int, default=2048, help="student MLP width (default 2048; demo 1024)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens of the one training step (default 64)")
    parser.add_argument("--stages", type=int, nargs="+", default=[3, 2], choices=(1, 2, 3), help="ZeRO stages")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per launch (default 600)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    began = time.perf_counter()
    results: dict[tuple[int, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="zero-memory-") as workdir:
        for stage in args.stages:
            for world in (1, 2):
                ranks, seconds = launch(args, stage, world, Path(workdir, f"zero{stage}-world{world}"))
                results[stage, world] = ranks
                print(f"launched ZeRO-{stage} on {world} rank(s): {seconds:.0f} s", flush=True)
    first = next(iter(results.values()))[0]
    print(
        f"student {args.layers} layers × {args.hidden} hidden, {args.heads} heads / {args.kv_heads} KV, "
        f"intermediate {args.intermediate} ({first['model_parameters'] / 1e6:.1f}M parameters), fp32, torch AdamW; "
        f"real engine (build_engine) per rank under the DeepSpeed launcher, CPU/gloo, OMP_NUM_THREADS=1; "
        f"one optimizer step on 1 × {args.seq_len} tokens before measuring; MiB per rank"
    )
    header = f"  {'':16s}" + "".join(f"{name:>18s}" for name in (*CATEGORIES, "params+optimizer"))
    header += f"{'RSS before':>12s}{'RSS now':>10s}{'RSS peak':>10s}"
    for stage in args.stages:
        print(f"ZeRO-{stage}:")
        print(header)
        for world in (1, 2):
            for figures in results[stage, world]:
                held = sum(figures["bytes"][name] for name in HELD)
                cells = "".join(f"{mib(figures['bytes'][name]):>18s}" for name in CATEGORIES) + f"{mib(held):>18s}"
                rss = (
                    f"{mib(figures['rss_before_engine']):>12s}{mib(figures['rss_after_step']):>10s}"
                    f"{mib(figures['rss_peak']):>10s}"
                )
                label = f"{world} rank(s), rank {figures['rank']}"
                print(f"  {label:16s}{cells}{rss}")
        one = results[stage, 1][0]
        two = max(results[stage, 2], key=lambda figures: sum(figures["bytes"][name] for name in HELD))
        held_one = sum(one["bytes"][name] for name in HELD)
        held_two = sum(two["bytes"][name] for name in HELD)
        target = "   target ≤ 0.55" if stage == 3 else ""
        optimizer_one = one["bytes"]["fp32 master"] + one["bytes"]["AdamW moments"]
        optimizer_two = two["bytes"]["fp32 master"] + two["bytes"]["AdamW moments"]
        print(
            f"  ratio 2 ranks ÷ 1 rank (largest rank): parameters + optimizer state {held_two / held_one:.3f}{target}; "
            f"parameters {two['bytes']['parameters'] / one['bytes']['parameters']:.3f}, "
            f"fp32 master + moments {optimizer_two / optimizer_one:.3f}"
        )
        rss_two = max(figures["rss_after_step"] for figures in results[stage, 2])
        growth_two = max(figures["rss_after_step"] - figures["rss_before_engine"] for figures in results[stage, 2])
        peak_two = max(figures["rss_peak"] for figures in results[stage, 2])
        print(
            f"  RSS ratio (coarse): after the step {rss_two / one['rss_after_step']:.3f}; growth from before the "
            f"engine to after the step {growth_two / (one['rss_after_step'] - one['rss_before_engine']):.3f}; "
            f"peak {peak_two / one['rss_peak']:.3f}"
        )
    print(f"whole benchmark {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
