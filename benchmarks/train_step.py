"""What a distillation training step costs, measured side by side with the trainer's own code.

Three figures, each a ratio of two things measured in the same run:

(a) loss overhead, at every `--seq-lens` T (batch = --batch-tokens ÷ T): the step time and the peak memory of
    CE + KD + attention on cached targets ÷ those of CE only (issue targets at T = 2048: ≤ 1.25× time, ≤ 1.2×
    peak memory). Both are `Trainer.train_step` on one DeepSpeed engine (the config's ZeRO stage, fp32, one
    process, gloo world of one) holding the demo student, over the same batches read beforehand from a real cache
    of that T, so that only the loss differs: CE + KD + attention is the config's objective (`build_objective`: the
    attention term recomputes the student's scores from the captured q, k in row blocks), CE only is every other
    term's weight 0 (`distill.kd.weight`, `distill.attn.weight`, `distill.rel.weight`), which the trainer runs
    without attention capture (but still through the fused CE + top-k KD kernel, whose KD term it weights by 0) on
    batches without target maps. A third
    line, a plain `cross_entropy` step on the same engine and batches, shows what the fused kernel costs over pure
    CE (info). Peak memory: one fresh process per (T, variant) builds the engine as `distill train` does, reads its
    batch from the same cache, runs one warm-up step and measures the next (`_common.PeakMemory`: the resident-set
    high-water mark reset right before the step on the CPU, `torch.cuda.max_memory_allocated` on CUDA). "peak" is
    what the process holds at the step's peak above what it held before the engine existed (model, gradients,
    optimizer state, batch, activations); "step" is the step's transient memory above what was resident before it.
(b) cached ÷ online, at the data's T: `Trainer.train_step` fed by the real cache (`TargetStream` through a DataLoader,
    checksums on, the read made inside the step: prefetch off, so its whole cost is counted) ÷ the same step fed by
    `LiveTargets` (`RunContext.live_source`: the live teacher's forward with capture + `compute_targets` +
    `stream.training_batch`, as `distill train train.mode=online` does), both with the CE + KD + attention objective
    (issue target ≤ 0.5).
(c) loader wait share: the real `distill train` (`stages.train.train_stage`) on the cache (prefetch on, checksums on,
    the config's `num_workers`), a few steps; the trainer logs `train/loader_wait_frac` per step in `metrics.jsonl`,
    and this script measures the same thing from outside (time in `next()` of the iterator the cache's
    `CachedTargets.batches` returned ÷ the time of each `Trainer.train_step` call) to cross-check it (issue target
    < 5 %).

The caches are built first, with the real teacher, into a temporary directory, as `distill cache` builds them
(`stages.cache.cache_settings`, `prepare_kinds`, `write_cache_split`) for exactly what the run needs: the target
kinds of its terms at its matched teacher layers for the student's head count, `--encoding` (dense fp16 triangles by
default, or top-m rows), top-k from the config. At the data's T they hold the first `--cache-samples` packed training
samples (what `distill cache` would cache); at another T, `--batches` batches of samples made of consecutive packed
samples (contiguous text), concatenated and cut to T. The teacher runs in the config's `teacher.dtype` (the demo's:
float32); the student always trains in fp32.

Variants alternate within each repeat (`_common.time_alternately`) so that noise from a shared machine hits both
alike; medians are printed, with the median of the same-repeat ratios beside the ratio of medians.

    .venv/bin/python benchmarks/train_step.py                   # demo student, SmolLM2 teacher, T 256/1024/2048
    .venv/bin/python benchmarks/train_step.py --encoding topk   # top-m attention targets
    .venv/bin/python benchmarks/train_step.py --parts a --seq-lens 64 --batch-tokens 128 --repeats 2 --batches 1
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from _common import (  # benchmarks/ is on sys.path when run as a script
    PeakMemory,
    contiguous_window_rows,
    measure_in_child,
    megabytes,
    report_memory,
    time_alternately,
)
from torch import nn

from pipeline.config import Config, load_config
from pipeline.data.prepare import load_prepared
from pipeline.infra.dist import init_distributed, launcher_environment
from pipeline.infra.runtime import configure_logging, resolve_dtype
from pipeline.models.loading import load_teacher
from pipeline.objective.loss import Objective, build_objective
from pipeline.objective.terms import specs
from pipeline.objective.terms.ce import CrossEntropy
from pipeline.ops.kd import cross_entropy
from pipeline.stages.cache import cache_settings
from pipeline.stages.context import RunContext, open_run
from pipeline.stages.train import train_stage
from pipeline.targets.compute import prepare_kinds
from pipeline.targets.fingerprint import cache_fingerprint
from pipeline.targets.kinds.base import TargetSettings
from pipeline.targets.needs import TargetNeeds
from pipeline.targets.source import CachedTargets
from pipeline.targets.stream import TargetStream
from pipeline.targets.writer import write_cache_split
from pipeline.training.checkpoints import TrainState
from pipeline.training.deepspeed_config import deepspeed_config
from pipeline.training.engine import build_engine
from pipeline.training.trainer import METRICS_LOG, Trainer

NAMES = {
    "ce": "CE only (trainer, every other term weighted 0, no capture)",
    "full": "CE + KD + attention (trainer, config's objective)",
    "plain": "plain CE (cross_entropy only, no KD kernel; info)",
}
MEMORY_VARIANTS = ("ce", "full")


class TimedIterator:
    """An iterator that adds the seconds each `next()` blocks to `waits`."""

    def __init__(self, items: Iterator[Any]) -> None:
        self.items = items
        self.waits: list[float] = []

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self.items)
        finally:
            self.waits.append(time.perf_counter() - start)


def benchmark_context(args: argparse.Namespace, workdir: Path, batch: int) -> RunContext:
    """The run the benchmark trains, opened as `distill train` opens it (`open_run`: the student resolved): `--config`
    with a temporary cache and run directory, fp32, no MLflow, and a cache of exactly what the run needs (its target
    kinds, matched layers and head count: `cache.attn_targets`, `cache.layers`, `cache.head_counts` empty)."""
    return open_run(
        load_config(
            args.config,
            [
                f"train.micro_batch_size={batch}",
                "train.precision=fp32",
                "train.resume=never",
                "cache.head_counts=[]",
                "cache.layers=[]",
                "cache.attn_targets=[]",
                f"cache.encoding={args.encoding}",
                f"cache.output_dir={workdir / 'targets'}",
                f"cache.shard_size={args.shard_size}",
                f"cache.max_samples={args.cache_samples}",
                f"train.output_dir={workdir / 'runs'}",
                "mlflow.enabled=false",
            ],
        )
    )


def ce_only_objective(config: Config, teacher_layers: list[int]) -> Objective:
    """The trainer's objective with every term but the task CE weighted 0: CE (and the fused KD pass, weighted 0)."""
    off = {
        spec.name: dataclasses.replace(getattr(config.distill, spec.name), weight=0.0)
        for spec in specs()
        if spec.name != CrossEntropy.name
    }
    return build_objective(
        dataclasses.replace(config, distill=dataclasses.replace(config.distill, **off)), teacher_layers
    )


def make_trainer(
    config: Config, engine: Any, objective: Objective, batches: Iterator[dict[str, Any]], teacher_layers: list[int]
) -> Trainer:
    """A `Trainer` of `engine` for calling `train_step` directly (no tracker, no evaluator)."""
    state = TrainState(world_size=1, zero_stage=engine.zero_optimization_stage())
    return Trainer(config, engine, objective, batches, state, None, None, teacher_layers)


def new_engine(context: RunContext) -> Any:
    """The engine `distill train` builds for a fresh run on the train cache of the run's T (fp32; a carve reads the
    cache's α statistics and selective heads)."""
    config = context.config
    ds_config = deepspeed_config(config, torch.float32)
    return build_engine(config, context.teacher_config, ds_config, resuming=False, targets=context.cached("train"))


def cache_directory(workdir: Path, seq_len: int, base_len: int) -> Path:
    """Where the cache of context length `seq_len` goes: the config's cache directory at the data's T."""
    if seq_len == base_len:
        return workdir / "targets" / "train"
    return workdir / f"targets-T{seq_len}" / "train"


def read_batches(directory: Path, needs: TargetNeeds, batch: int, count: int, seed: int) -> list[dict[str, Any]]:
    """The first `count` batches of a cache as the trainer's DataLoader serves them, with what `needs` name."""
    stream = TargetStream(directory=directory, needs=needs, batch_size=batch, seed=seed, prefetch=False)
    return list(itertools.islice(iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)), count))


def write_cache(
    context: RunContext,
    teacher: nn.Module,
    targets: tuple[TargetSettings, dict[str, Any]],
    rows: Any,
    directory: Path,
    seq_len: int,
    args: argparse.Namespace,
) -> float:
    """Cache `rows` (T = `seq_len`) into `directory` with `targets` (what `distill cache` caches for the run:
    `cache_settings` with the kinds' choices, `prepare_kinds`); returns the seconds it took."""
    settings, records = targets
    config = context.config
    fingerprint = cache_fingerprint(
        settings,
        {**context.provenance("train"), "seq_len": seq_len},
        teacher_num_heads=context.dims.num_heads,
        vocab_size=context.teacher_config.vocab_size,
        dtype=config.cache.dtype,
    )
    batch = max(1, config.cache.batch_size * context.meta["seq_len"] // seq_len)
    start = time.perf_counter()
    write_cache_split(
        teacher,
        rows,
        directory,
        settings,
        fingerprint,
        shard_size=args.shard_size,
        batch_size=batch,
        records=records,
    )
    return time.perf_counter() - start


def ratio_line(label: str, times: dict[str, list[float]], numerator: str, denominator: str, target: str) -> str:
    top, bottom = times[numerator], times[denominator]
    paired = [n / d for n, d in zip(top, bottom, strict=True)]
    return (
        f"{label} = {statistics.median(top) / statistics.median(bottom):.3f} (medians)  "
        f"{statistics.median(paired):.3f} (median of the {len(paired)} same-repeat ratios)  "
        f"{min(top) / min(bottom):.3f} (fastest runs)   target {target}"
    )


def time_line(name: str, values: list[float], extra: str = "") -> str:
    return (
        f"  {name:58s} {statistics.median(values) * 1000:8.0f} ms  (min {min(values) * 1000:.0f}, "
        f"max {max(values) * 1000:.0f}){extra}"
    )


def batch_for(args: argparse.Namespace, seq_len: int) -> int:
    return max(1, args.batch_tokens // seq_len)


def step_variants(
    config: Config, engine: Any, batches: list[dict[str, Any]], teacher_layers: list[int]
) -> dict[str, Callable[[], Any]]:
    """The (a) variants on `engine`, each cycling over `batches` (CE only and plain CE without their target maps)."""
    full = build_objective(config, teacher_layers)
    bare = [{**batch, "maps": {}} for batch in batches]
    plain_batches = itertools.cycle(bare)

    def plain_ce_step() -> None:
        batch = next(plain_batches)
        engine.train()
        logits = engine(input_ids=batch["input_ids"], use_cache=False).logits
        engine.backward(cross_entropy(logits, batch["labels"]))
        engine.step()

    return {
        "ce": make_trainer(
            config, engine, ce_only_objective(config, teacher_layers), itertools.cycle(bare), teacher_layers
        ).train_step,
        "full": make_trainer(config, engine, full, itertools.cycle(batches), teacher_layers).train_step,
        "plain": plain_ce_step,
    }


def part_a_time(
    args: argparse.Namespace, config: Config, engine: Any, base_len: int, workdir: Path, teacher_layers: list[int]
) -> dict[int, dict[str, list[float]]]:
    """T → variant → seconds per repeat, alternating on the one engine."""
    full = build_objective(config, teacher_layers)
    times = {}
    for seq_len in args.seq_lens:
        directory = cache_directory(workdir, seq_len, base_len)
        batches = read_batches(directory, full.needs(), batch_for(args, seq_len), args.batches, config.train.seed)
        variants = step_variants(config, engine, batches, teacher_layers)
        timed = time_alternately(variants, args.repeats, engine.device)
        times[seq_len] = timed
        print(f"(a) T {seq_len}: timed ({len(batches)} batches cycled)", flush=True)
    return times


def part_a_memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: the engine as `distill train` builds it, one warm-up step and one measured step."""
    seq_len, variant = args.memory_of.split(":")
    seq_len = int(seq_len)
    workdir = Path(args.memory_workdir)
    with launcher_environment():
        init_distributed()
        batch = batch_for(args, seq_len)
        context = benchmark_context(args, workdir, batch)
        config, teacher_layers = context.config, context.teacher_layers
        objective = (
            build_objective(config, teacher_layers) if variant == "full" else ce_only_objective(config, teacher_layers)
        )
        directory = cache_directory(workdir, seq_len, context.meta["seq_len"])
        meter = PeakMemory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        meter.start()
        engine = new_engine(context)
        batches = read_batches(directory, objective.needs(), batch, 1, config.train.seed)
        trainer = make_trainer(config, engine, objective, itertools.cycle(batches), teacher_layers)
        trainer.train_step()
        meter.reset()
        trainer.train_step()
        report_memory(meter.figures())


def part_a_memory(args: argparse.Namespace, workdir: Path) -> dict[tuple[int, str], dict[str, int]]:
    """(T, variant) → figures of a fresh child process each, one at a time."""
    figures = {}
    for seq_len in args.seq_lens:
        for variant in MEMORY_VARIANTS:
            cell = f"{seq_len}:{variant}"
            figures[seq_len, variant] = measure_in_child(
                __file__, cell, args.child_timeout, "--memory-workdir", str(workdir)
            )
            print(f"(a) T {seq_len}: memory of {variant} measured", flush=True)
    return figures


def print_part_a(
    args: argparse.Namespace,
    times: dict[int, dict[str, list[float]]] | None,
    memory: dict[tuple[int, str], dict[str, int]] | None,
) -> None:
    print(
        f"(a) trainer step, CE + KD + attention (full) ÷ CE only, about {args.batch_tokens} tokens a batch, "
        f"{args.encoding} attention targets"
        + (f"; time: median of {args.repeats}" if times is not None else "")
        + ("; memory: one fresh process per cell" if memory is not None else "")
    )
    print(
        f"  {'T':>6s} {'batch':>5s} | {'CE ms':>9s} {'full ms':>9s} {'ratio':>6s} | {'CE MB':>9s} {'full MB':>9s} "
        f"{'ratio':>6s}"
    )

    def peak(seq_len: int, variant: str, over: str = "baseline") -> int:
        figures = memory[seq_len, variant]
        return figures["peak"] - figures[over]

    for seq_len in args.seq_lens:
        cells = [f"  {seq_len:6d} {batch_for(args, seq_len):5d}"]
        if times is not None:
            ce_ms, full_ms = (statistics.median(times[seq_len][variant]) * 1000 for variant in ("ce", "full"))
            cells.append(f"{ce_ms:9.1f} {full_ms:9.1f} {full_ms / ce_ms:6.3f}")
        else:
            cells.append(f"{'-':>9s} {'-':>9s} {'-':>6s}")
        if memory is not None:
            ce_mb, full_mb = peak(seq_len, "ce"), peak(seq_len, "full")
            cells.append(f"{megabytes(ce_mb)} {megabytes(full_mb)} {full_mb / ce_mb:6.3f}")
        print(" | ".join(cells))
    print("  targets at T = 2048: time ratio ≤ 1.25, peak memory ratio ≤ 1.2")
    if times is not None:
        for seq_len in args.seq_lens:
            print(f"  T {seq_len}:")
            for variant, name in NAMES.items():
                print(time_line(name, times[seq_len][variant]))
            print(ratio_line("    full ÷ CE only", times[seq_len], "full", "ce", "≤ 1.25"))
            print(ratio_line("    CE only (trainer) ÷ plain CE (info)", times[seq_len], "ce", "plain", "-"))
    if memory is not None:
        print("  memory, MB (peak: above the process before the engine; step: above the RSS just before the step):")
        for seq_len in args.seq_lens:
            parts = [
                f"{NAMES[variant].split(' (')[0]} peak {megabytes(peak(seq_len, variant)).strip()} "
                f"step {megabytes(peak(seq_len, variant, 'before')).strip()}"
                for variant in MEMORY_VARIANTS
            ]
            ratio = peak(seq_len, "full", "before") / peak(seq_len, "ce", "before")
            print(f"  T {seq_len:5d}: {'; '.join(parts)}; step full ÷ CE {ratio:.3f}")


def part_b(
    args: argparse.Namespace,
    config: Config,
    engine: Any,
    online_batches: Iterator[dict[str, Any]],
    cached_batches: Iterator[dict[str, Any]],
    teacher_layers: list[int],
) -> None:
    objective = build_objective(config, teacher_layers)
    online_source, cached_source = TimedIterator(online_batches), TimedIterator(cached_batches)
    online = make_trainer(config, engine, objective, online_source, teacher_layers)
    cached = make_trainer(config, engine, objective, cached_source, teacher_layers)
    names = {
        "cached": "cached: TargetStream read (in the step) + trainer step",
        "online": "online: teacher forward + compute_targets + trainer step",
    }
    times = time_alternately(
        {names["cached"]: cached.train_step, names["online"]: online.train_step}, args.repeats, engine.device
    )
    print(f"(b) cached vs online step time, CE + KD + attention, median of {args.repeats}:")
    for name, source in ((names["cached"], cached_source), (names["online"], online_source)):
        waits = source.waits[1:]  # the warm-up call's batch is not timed
        print(time_line(name, times[name], f"; of which the batch {statistics.median(waits) * 1000:.0f} ms"))
    print(ratio_line("    cached ÷ online", times, names["cached"], names["online"], "≤ 0.5"))


def part_c(config: Config, steps: int, workdir: Path) -> None:
    """The real `distill train` (`train_stage`) on the cache; the wait share from its metrics.jsonl and from timing
    it from outside."""
    output_dir = workdir / "runs-c"
    config = dataclasses.replace(
        config,
        train=dataclasses.replace(
            config.train, output_dir=str(output_dir), max_steps=steps, save_every=0, eval_every=0, log_every=1
        ),
    )
    sources: list[TimedIterator] = []
    step_times: list[float] = []
    original_batches, original_step = CachedTargets.batches, Trainer.train_step

    def timed_batches(self: CachedTargets, **kwargs: Any) -> TimedIterator:
        sources.append(TimedIterator(original_batches(self, **kwargs)))
        return sources[-1]

    def timed_step(self: Trainer) -> Any:
        start = time.perf_counter()
        try:
            return original_step(self)
        finally:
            step_times.append(time.perf_counter() - start)

    CachedTargets.batches, Trainer.train_step = timed_batches, timed_step
    start = time.perf_counter()
    try:
        train_stage(config)
    finally:
        CachedTargets.batches, Trainer.train_step = original_batches, original_step
    total = time.perf_counter() - start
    (source,) = sources
    records = [json.loads(line) for line in (output_dir / METRICS_LOG).read_text().splitlines()]
    logged = [record for record in records if "train/loader_wait_frac" in record]
    logged_frac = [record["train/loader_wait_frac"] for record in logged]
    own_frac = [wait / step for wait, step in zip(source.waits, step_times, strict=True)]
    steady = slice(1, None)  # step 1 also opens and checksums the first shard and waits for the first read
    print(
        f"(c) loader wait share, real `distill train` on the cache: {steps} steps, num_workers "
        f"{config.train.num_workers}, prefetch on, checksums on (whole run {total:.1f} s incl. engine set-up, final "
        "checkpoint and export):"
    )
    print(
        f"  step 1: logged {100 * logged_frac[0]:.2f} %, measured {100 * own_frac[0]:.2f} % "
        f"(wait {source.waits[0] * 1000:.0f} ms of {step_times[0] * 1000:.0f} ms)"
    )
    logged_step = [record["train/step_time_s"] for record in logged]
    print(
        f"  steps 2..{steps}: {int(logged[0]['train/tokens'])} tokens per step; median step "
        f"{statistics.median(step_times[steady]) * 1000:.0f} ms (logged train/step_time_s "
        f"{statistics.median(logged_step[steady]) * 1000:.0f} ms), median wait "
        f"{statistics.median(source.waits[steady]) * 1000:.1f} ms (max {max(source.waits[steady]) * 1000:.1f} ms)"
    )
    print(
        f"  loader wait ÷ step time, steps 2..{steps}: logged train/loader_wait_frac median "
        f"{100 * statistics.median(logged_frac[steady]):.2f} % (max {100 * max(logged_frac[steady]):.2f} %); "
        f"measured here median {100 * statistics.median(own_frac[steady]):.2f} % "
        f"(Σ wait ÷ Σ step {100 * sum(source.waits[steady]) / sum(step_times[steady]):.2f} %)   target < 5 %"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", default="configs/shakespeare.yaml", help="config giving student, teacher, data, cache"
    )
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 2048], help="context lengths T of (a)")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="tokens per micro-batch: batch = this ÷ T")
    parser.add_argument("--encoding", choices=("dense", "topk"), default="dense", help="attention target encoding")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each variant in (a), (b) (default 5)")
    parser.add_argument("--cache-samples", type=int, default=64, help="samples cached at the data's T (default 64)")
    parser.add_argument("--shard-size", type=int, default=32, help="samples per cache shard (default 32)")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled in (a) (default 4)")
    parser.add_argument("--train-steps", type=int, default=10, help="steps of the real run in (c) (default 10)")
    parser.add_argument(
        "--teacher-dtype", choices=("auto", "float32", "bfloat16"), default=None, help="default: the config's"
    )
    parser.add_argument("--parts", nargs="+", choices=("a", "b", "c"), default=["a", "b", "c"], help="figures")
    parser.add_argument("--measure", nargs="+", choices=("time", "memory"), default=["time", "memory"], help="(a)")
    parser.add_argument("--child-timeout", type=float, default=900, help="seconds per memory child (default 900)")
    parser.add_argument("--workdir", default=None, help="where the temporary caches go (default: system tmp)")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    configure_logging("WARNING")
    if args.memory_of is not None:
        part_a_memory_child(args)
        return
    began = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="train-step-", dir=args.workdir))
    try:
        with launcher_environment():
            init_distributed()
            run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"whole benchmark {time.perf_counter() - began:.0f} s")


def run(args: argparse.Namespace, workdir: Path) -> None:
    """Build the caches, then measure the parts asked for."""
    torch.manual_seed(0)
    _, meta = load_prepared(Path(load_config(args.config).data.output_dir))
    base_len = meta["seq_len"]
    context = benchmark_context(args, workdir, batch_for(args, base_len))
    config, dims, splits, teacher_layers = context.config, context.dims, context.splits, context.teacher_layers
    teacher_dtype = resolve_dtype(args.teacher_dtype or config.teacher.dtype, torch.device("cpu"))
    teacher = load_teacher(context.teacher_dir, dtype=teacher_dtype)
    targets = prepare_kinds(teacher, splits["train"], cache_settings(context))
    settings = targets[0]

    rows = splits["train"].select(range(args.cache_samples)).with_format("torch", columns=["sample_id", "input_ids"])
    base_directory = cache_directory(workdir, base_len, base_len)
    cache_seconds = {base_len: write_cache(context, teacher, targets, rows, base_directory, base_len, args)}
    if "a" in args.parts:
        for seq_len in args.seq_lens:
            if seq_len in cache_seconds:
                continue
            count = args.batches * batch_for(args, seq_len)
            windows = contiguous_window_rows(splits["train"], base_len, [seq_len], count)[seq_len]
            directory = cache_directory(workdir, seq_len, base_len)
            cache_seconds[seq_len] = write_cache(context, teacher, targets, windows, directory, seq_len, args)

    engine = new_engine(context)
    student_params = sum(param.numel() for param in engine.module.parameters())
    teacher_params = sum(param.numel() for param in teacher.parameters())
    print(
        f"student {config.student.num_layers} layers × {config.student.hidden_size} hidden, "
        f"{config.student.num_heads} heads / {config.student.num_kv_heads} KV, intermediate "
        f"{config.student.intermediate_size}, vocab {teacher.config.vocab_size} ({student_params / 1e6:.1f}M "
        f"parameters, fp32); DeepSpeed engine in one process (ZeRO-{engine.zero_optimization_stage()}, torch AdamW, "
        f"gloo world of one); {torch.get_num_threads()} threads; objective "
        f"{', '.join(f'{term.name} (w {term.weight:g})' for term in build_objective(config, teacher_layers).terms)}"
    )
    print(
        f"teacher {context.teacher_dir} ({dims.num_layers} layers, {dims.num_heads} heads / {dims.num_kv_heads} KV, "
        f"{teacher_params / 1e6:.1f}M parameters = {teacher_params / student_params:.1f}× the student, "
        f"{str(teacher_dtype).removeprefix('torch.')}); matched teacher layers {teacher_layers}; caches "
        f"({settings.encoding} {config.cache.dtype}, kinds {list(settings.kinds)}, layers {list(settings.layers)}, "
        f"top-k {settings.top_k}) written in "
        + ", ".join(f"{seconds:.1f} s (T {seq_len})" for seq_len, seconds in cache_seconds.items())
    )

    if "a" in args.parts:
        times, memory = None, None
        if "time" in args.measure:
            start = time.perf_counter()
            times = part_a_time(args, config, engine, base_len, workdir, teacher_layers)
            print(f"    ((a) timing took {time.perf_counter() - start:.0f} s)")
        if "memory" in args.measure:
            start = time.perf_counter()
            memory = part_a_memory(args, workdir)
            print(f"    ((a) memory took {time.perf_counter() - start:.0f} s)")
        print_part_a(args, times, memory)
    if "b" in args.parts:
        start = time.perf_counter()
        needs = build_objective(config, teacher_layers).needs()
        train = config.train
        # The live teacher as `train.mode=online` runs it, and the cache as training reads it (prefetch off: the
        # read is counted inside the step), in the same global order.
        online = context.live_source(teacher, needs).batches(
            batch_size=train.micro_batch_size, seed=train.seed, start_position=0, rank=0, world_size=1
        )
        stream = context.cached("train", needs).stream(
            batch_size=train.micro_batch_size, seed=train.seed, prefetch=False
        )
        cached = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0))
        part_b(args, config, engine, online, cached, teacher_layers)
        print(f"    ((b) took {time.perf_counter() - start:.0f} s)")
    del engine, teacher
    gc.collect()
    if "c" in args.parts:
        part_c(config, args.train_steps, workdir)


if __name__ == "__main__":
    main()
