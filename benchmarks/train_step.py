"""What a distillation training step costs, measured side by side with the trainer's own code.

Three figures, each a ratio of two things measured in the same run:

(a) loss overhead: the step time of CE + KD + SHD on cached targets ÷ the step time of CE only (issue target
    ≤ 1.25). Both are `Trainer.train_step` on one DeepSpeed engine (the config's ZeRO stage, fp32, one process,
    gloo world of one) holding the demo student, over the same batches read beforehand from a real cache, so that
    only the loss differs: CE only is `distill.w_kd = distill.w_attn = 0`, which the trainer runs without attention
    capture (but still through the fused CE + top-k KD kernel, whose KD term it weights by 0). A third line, a plain
    `cross_entropy` step on the same engine and batches, shows what the fused kernel costs over pure CE (info).
(b) cached ÷ online: `Trainer.train_step` fed by the real cache (`TargetStream` through a DataLoader, checksums on,
    the read made inside the step: prefetch off, so its whole cost is counted) ÷ the same step fed by
    `OnlineTargets` (the live teacher: forward with capture + `compute_targets` + `reader.training_batch`, as
    `distill train train.mode=online` does), both with the CE + KD + SHD loss (issue target ≤ 0.5).
(c) loader wait share: the real `pipeline.train.train` on the cache (prefetch on, checksums on, the demo's
    `num_workers`), a few steps; the trainer logs `train/loader_wait_frac` per step in `metrics.jsonl`, and this
    script measures the same thing from outside (time in `next()` of the iterator `training_batches` returned ÷ the
    time of each `Trainer.train_step` call) to cross-check it (issue target < 5 %).

The cache is built first, with the real teacher, into a temporary directory: the demo's matched teacher layers
(the uniform map of the student's layers), the student's head count, SHD squeeze, dense fp16 triangles, top-k from
the config, the first `--cache-samples` packed training samples. The teacher runs in the config's `teacher.dtype`
(the demo's: float32; on this machine's CPU `auto` would pick bf16, which measured no faster for the SmolLM2
forward); the student always trains in fp32.

Variants alternate within each repeat so that noise from a shared machine hits both alike; medians are printed,
with the median of the same-repeat ratios beside the ratio of medians.

    .venv/bin/python benchmarks/train_step.py                    # demo student, SmolLM2 teacher, batch 8 × 256
    .venv/bin/python benchmarks/train_step.py --parts a --repeats 3 --batch 2 --seq-len 64   # a quick look
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

from pipeline import train as train_module
from pipeline.attention import attention_dims
from pipeline.checkpoints import TrainState
from pipeline.config import Config, load_config
from pipeline.data import load_prepared
from pipeline.deepspeed_config import deepspeed_config
from pipeline.kd import cross_entropy
from pipeline.models import load_teacher
from pipeline.online import OnlineTargets
from pipeline.runtime import configure_logging, resolve_dtype
from pipeline.targets.fingerprint import cache_fingerprint, cached_layers, student_layers
from pipeline.targets.reader import TargetStream
from pipeline.targets.writer import TargetSettings, weights_sha256, write_cache_split
from pipeline.train import LossPlan, Trainer, build_engine, init_distributed, launcher_environment


class TruncatedRows:
    """Packed rows with `input_ids` cut to the first `seq_len` tokens (for `--seq-len` below the data's)."""

    def __init__(self, rows: Any, seq_len: int) -> None:
        self.rows = rows
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> dict[str, Any]:
        chunk = self.rows[index]
        return {**chunk, "input_ids": torch.as_tensor(chunk["input_ids"])[..., : self.seq_len]}


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


def make_trainer(config: Config, engine: Any, plan: LossPlan, batches: Iterator[dict[str, Any]]) -> Trainer:
    """A `Trainer` of `engine` for calling `train_step` directly (no tracker, no evaluator)."""
    state = TrainState(world_size=1, zero_stage=engine.zero_optimization_stage())
    return Trainer(config, engine, plan, batches, state, tracker=None, evaluator=None)


def alternate(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """One warm-up call of each variant, then `repeats` rounds calling each once in turn; seconds per call."""
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


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


def part_a(config: Config, engine: Any, plan: LossPlan, batches: list[dict[str, Any]], repeats: int) -> None:
    ce_plan = dataclasses.replace(plan, weights=(plan.weights[0], 0.0, 0.0))
    full = make_trainer(config, engine, plan, itertools.cycle(batches))
    ce_only = make_trainer(config, engine, ce_plan, itertools.cycle(batches))
    plain_batches = itertools.cycle(batches)

    def plain_ce_step() -> None:
        batch = next(plain_batches)
        engine.train()
        logits = engine(input_ids=batch["input_ids"], use_cache=False).logits
        engine.backward(cross_entropy(logits, batch["labels"]))
        engine.step()

    names = {
        "ce": "CE only (trainer, w_kd = w_attn = 0, no capture)",
        "full": f"CE + KD + SHD (trainer, {len(plan.student_layers)} layers captured)",
        "plain": "plain CE (cross_entropy only, no KD kernel; info)",
    }
    times = alternate(
        {names["ce"]: ce_only.train_step, names["full"]: full.train_step, names["plain"]: plain_ce_step}, repeats
    )
    print(f"(a) step time on cached targets ({len(batches)} batches read beforehand, cycled), median of {repeats}:")
    for name, values in times.items():
        print(time_line(name, values))
    print(ratio_line("    (CE + KD + SHD) ÷ CE only", times, names["full"], names["ce"], "≤ 1.25"))
    print(ratio_line("    CE only (trainer) ÷ plain CE (info)", times, names["ce"], names["plain"], "-"))


def part_b(
    config: Config,
    engine: Any,
    plan: LossPlan,
    online_batches: Iterator[dict[str, Any]],
    cached_batches: Iterator[dict[str, Any]],
    repeats: int,
) -> None:
    online_source, cached_source = TimedIterator(online_batches), TimedIterator(cached_batches)
    online = make_trainer(config, engine, plan, online_source)
    cached = make_trainer(config, engine, plan, cached_source)
    names = {
        "cached": "cached: TargetStream read (in the step) + trainer step",
        "online": "online: teacher forward + compute_targets + trainer step",
    }
    times = alternate({names["cached"]: cached.train_step, names["online"]: online.train_step}, repeats)
    print(f"(b) cached vs online step time, CE + KD + SHD, median of {repeats}:")
    for name, source in ((names["cached"], cached_source), (names["online"], online_source)):
        waits = source.waits[1:]  # the warm-up call's batch is not timed
        print(time_line(name, times[name], f"; of which the batch {statistics.median(waits) * 1000:.0f} ms"))
    print(ratio_line("    cached ÷ online", times, names["cached"], names["online"], "≤ 0.5"))


def part_c(config: Config, steps: int, workdir: Path) -> None:
    """The real `train()` on the cache; the wait share from its metrics.jsonl and from timing it from outside."""
    output_dir = workdir / "runs-c"
    config = dataclasses.replace(
        config,
        train=dataclasses.replace(
            config.train, output_dir=str(output_dir), max_steps=steps, save_every=0, eval_every=0, log_every=1
        ),
    )
    sources: list[TimedIterator] = []
    step_times: list[float] = []
    original_batches, original_step = train_module.training_batches, Trainer.train_step

    def timed_batches(*args: Any, **kwargs: Any) -> TimedIterator:
        sources.append(TimedIterator(original_batches(*args, **kwargs)))
        return sources[-1]

    def timed_step(self: Trainer) -> Any:
        start = time.perf_counter()
        try:
            return original_step(self)
        finally:
            step_times.append(time.perf_counter() - start)

    train_module.training_batches, Trainer.train_step = timed_batches, timed_step
    start = time.perf_counter()
    try:
        train_module.train(config)
    finally:
        train_module.training_batches, Trainer.train_step = original_batches, original_step
    total = time.perf_counter() - start
    (source,) = sources
    records = [json.loads(line) for line in (output_dir / train_module.METRICS_LOG).read_text().splitlines()]
    logged = [record for record in records if "train/loader_wait_frac" in record]
    logged_frac = [record["train/loader_wait_frac"] for record in logged]
    own_frac = [wait / step for wait, step in zip(source.waits, step_times, strict=True)]
    steady = slice(1, None)  # step 1 also opens and checksums the first shard and waits for the first read
    print(
        f"(c) loader wait share, real `train()` on the cache: {steps} steps, num_workers {config.train.num_workers}, "
        f"prefetch on, checksums on (whole run {total:.1f} s incl. engine set-up, final checkpoint and export):"
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
    parser.add_argument("--config", default="configs/demo.yaml", help="config giving student, teacher, data, cache")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch size (default 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the data's, 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each variant in (a), (b) (default 5)")
    parser.add_argument("--cache-samples", type=int, default=64, help="samples cached for the run (default 64)")
    parser.add_argument("--shard-size", type=int, default=32, help="samples per cache shard (default 32)")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled in (a) (default 4)")
    parser.add_argument("--train-steps", type=int, default=10, help="steps of the real run in (c) (default 10)")
    parser.add_argument(
        "--teacher-dtype", choices=("auto", "float32", "bfloat16"), default=None, help="default: the config's"
    )
    parser.add_argument("--parts", nargs="+", choices=("a", "b", "c"), default=["a", "b", "c"], help="figures")
    parser.add_argument("--workdir", default=None, help="where the temporary cache goes (default: system tmp)")
    args = parser.parse_args()

    configure_logging("WARNING")
    began = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="train-step-", dir=args.workdir))
    base = load_config(args.config)
    splits, meta = load_prepared(Path(base.data.output_dir))
    seq_len = args.seq_len or meta["seq_len"]
    if seq_len > meta["seq_len"]:
        parser.error(f"--seq-len {seq_len}: the prepared data has {meta['seq_len']} tokens per sample")
    config = load_config(
        args.config,
        [
            f"train.micro_batch_size={args.batch}",
            "train.precision=fp32",
            "train.resume=never",
            f"cache.head_counts=[{base.student.num_heads}]",
            f"cache.output_dir={workdir / 'targets'}",
            f"cache.shard_size={args.shard_size}",
            f"cache.max_samples={args.cache_samples}",
            f"train.output_dir={workdir / 'runs'}",
            "mlflow.enabled=false",
        ],
    )
    try:
        with launcher_environment():
            init_distributed()
            run(args, config, splits, meta, seq_len, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"whole benchmark {time.perf_counter() - began:.0f} s")


def run(args: argparse.Namespace, config: Config, splits: Any, meta: dict, seq_len: int, workdir: Path) -> None:
    """Build the cache, then measure the parts asked for."""
    torch.manual_seed(0)
    batch = args.batch
    teacher_dir = Path(config.teacher.path)
    teacher_dtype = resolve_dtype(args.teacher_dtype or config.teacher.dtype, torch.device("cpu"))
    teacher = load_teacher(teacher_dir, dtype=teacher_dtype)
    dtype_name = str(teacher_dtype).removeprefix("torch.")
    dims = attention_dims(teacher.config)
    layers = cached_layers(config, dims.num_layers)
    heads = config.student.num_heads
    rows = splits["train"].select(range(args.cache_samples)).with_format("torch", columns=["sample_id", "input_ids"])
    if seq_len < meta["seq_len"]:
        rows = TruncatedRows(rows, seq_len)
    fingerprint = cache_fingerprint(
        config, meta, "train", weights_sha256(teacher_dir), dims, teacher.config.vocab_size, layers
    )
    fingerprint["seq_len"] = seq_len
    cache_dir = Path(config.cache.output_dir) / "train"
    settings = TargetSettings(
        layers=tuple(layers),
        head_counts=(heads,),
        squeeze=config.distill.squeeze,
        encoding=config.cache.encoding,
        attn_top_m=config.cache.attn_top_m,
        top_k=config.distill.top_k,
        dtype=getattr(torch, config.cache.dtype),
    )
    start = time.perf_counter()
    write_cache_split(
        teacher, rows, cache_dir, settings, fingerprint, shard_size=args.shard_size, batch_size=config.cache.batch_size
    )
    cache_seconds = time.perf_counter() - start
    cache_bytes = sum(path.stat().st_size for path in cache_dir.glob("*.safetensors"))

    engine = build_engine(config, teacher.config, deepspeed_config(config, torch.float32))
    plan = LossPlan.from_config(config, student_layers(config, dims.num_layers), config.cache.encoding, seq_len)
    student_params = sum(param.numel() for param in engine.module.parameters())
    teacher_params = sum(param.numel() for param in teacher.parameters())
    print(
        f"student {config.student.num_layers} layers × {config.student.hidden_size} hidden, "
        f"{heads} heads / {config.student.num_kv_heads} KV, intermediate {config.student.intermediate_size}, vocab "
        f"{teacher.config.vocab_size} ({student_params / 1e6:.1f}M parameters, fp32); DeepSpeed engine in one "
        f"process (ZeRO-{engine.zero_optimization_stage()}, torch AdamW, gloo world of one); batch {batch} × T "
        f"{seq_len}; {torch.get_num_threads()} threads"
    )
    print(
        f"teacher {teacher_dir} ({dims.num_layers} layers, {dims.num_heads} heads / {dims.num_kv_heads} KV, "
        f"{teacher_params / 1e6:.1f}M parameters = {teacher_params / student_params:.1f}× the student, "
        f"{dtype_name}); matched teacher layers {plan.teacher_layers}; cache: {args.cache_samples} samples "
        f"in {len(list(cache_dir.glob('*.safetensors')))} shards, {cache_bytes / 2**20:.0f} MiB, dense "
        f"{config.cache.dtype}, top-k {config.distill.top_k}, written in {cache_seconds:.1f} s"
    )

    def cached_stream(prefetch: bool) -> Iterator[dict[str, Any]]:
        stream = TargetStream(
            directory=cache_dir, layers=layers, heads=heads, batch_size=batch, seed=config.train.seed, prefetch=prefetch
        )
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0))

    if "a" in args.parts:
        start = time.perf_counter()
        part_a(config, engine, plan, list(itertools.islice(cached_stream(False), args.batches)), args.repeats)
        print(f"    ((a) took {time.perf_counter() - start:.0f} s)")
    if "b" in args.parts:
        start = time.perf_counter()
        online = OnlineTargets(
            teacher,
            rows,
            dataclasses.replace(settings, dtype=torch.float32),  # as `training_batches` builds it: nothing stored
            heads=heads,
            batch_size=batch,
            shard_size=args.shard_size,
            seed=config.train.seed,
        )
        part_b(config, engine, plan, iter(online), cached_stream(False), args.repeats)
        print(f"    ((b) took {time.perf_counter() - start:.0f} s)")
    del engine, teacher
    gc.collect()
    if "c" in args.parts:
        if seq_len != meta["seq_len"]:
            print(f"(c) skipped: the trainer needs the data's seq_len {meta['seq_len']}, not --seq-len {seq_len}")
            return
        part_c(config, args.train_steps, workdir)


if __name__ == "__main__":
    main()
