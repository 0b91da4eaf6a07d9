"""What `distill cache` costs per token compared with a bare teacher forward, measured side by side.

The baseline is the teacher loaded with `attn_implementation="eager"` running a plain forward under `no_grad` over
the same batches. The cache stage is what `distill cache` does for one shard: the teacher loaded as the stage loads
it (`CAPTURE_ATTENTION`: eager on the captured layers, SDPA elsewhere), `write_cache_split` over a row set that fills
exactly one shard (teacher forward with capture, sparse logits, squeeze with SHD's α, dense fp16 triangles, shard
serialisation, sha256, atomic write, manifest and α statistics) into a fresh temporary directory. The demo's settings:
cached layers = the uniform map of a 4-layer student over the teacher's layers, top-k 64, head counts [3] and, as a
second line, [3, 2]. A SDPA forward of the stage's teacher with no capture runs beside them, to tell the cost of the
capture apart from the attention kernel. Variants alternate within each repeat so that machine noise hits all alike;
medians are printed, with the median of the ratios taken within each repeat and the ratio of the fastest runs (the
least disturbed on a shared machine) beside them (issue target: cache tokens/s ÷ eager tokens/s ≥ 0.85).

Where the cache-stage time goes is measured in the same runs by timing the writer's own calls (teacher forward
including capture, logit top-k with tail sums, squeeze + α, map encoding (triangle packing and fp16 cast), the
shard's value checks, serialisation, sha256, write + fsync, manifest, α statistics); "other" is the rest of
`write_cache_split` (casts of the logits to the on-disk dtypes, copies to the CPU, concatenation of the batches,
reading the rows, the schema check).

    .venv/bin/python benchmarks/cache_throughput.py                     # SmolLM2 teacher, batch 8 × 256, fp32
    .venv/bin/python benchmarks/cache_throughput.py --dtype bfloat16    # the teacher in bf16 (demo's `auto` here)
    .venv/bin/python benchmarks/cache_throughput.py --batches 1 --repeats 2 --batch 2   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import load_config
from pipeline.models.loading import load_teacher
from pipeline.ops import shd
from pipeline.ops.matching import layer_map
from pipeline.stages.cache import cache_settings
from pipeline.stages.context import open_run
from pipeline.targets import logits, writer
from pipeline.targets.encoding import ENCODINGS
from pipeline.targets.fingerprint import cache_fingerprint, weights_sha256
from pipeline.targets.kinds import squeezed
from pipeline.targets.writer import write_cache_split

HEAD_COUNT_VARIANTS = ((3,), (3, 2))
TIMED_CALLS: tuple[tuple[Any, str, str], ...] = (
    (logits, "topk_targets", "logit top-k (block maxima, top-k, exp sums)"),
    (squeezed, "squeeze_heads", "squeeze + SHD α"),
    *((encoding, "encode", "encode maps (pack triangle, cast to fp16)") for encoding in ENCODINGS.values()),
    (writer, "_check_values", "value checks of the shard (checks.shard_problem)"),
    (writer, "shard_bytes", "serialise shard (safetensors)"),
    (writer, "sha256_bytes", "sha256 of the shard"),
    (writer, "atomic_write_bytes", "write + fsync + rename"),
    (writer, "write_manifest", "manifest writes"),
    (writer, "_alpha_statistics", "α statistics (re-reads shard)"),
)
"""(owner, attribute, label) of every call timed inside `write_cache_split`: the names its modules look up when
they call (module globals), and the encodings' `encode` (per instance)."""
LABELS = tuple(dict.fromkeys(label for _, _, label in TIMED_CALLS))
FORWARD_PART = "teacher forward + capture (4 eager layers, values)"
ALPHA_PART = "  of which SHD α solve (shd.group_alphas)"


class WriterProfile:
    """Seconds spent in each timed part of `write_cache_split`, accumulated while `active()` is entered."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher
        self.seconds: dict[str, float] = defaultdict(float)

    def _wrap(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        return timed

    @contextmanager
    def active(self) -> Iterator[None]:
        """Route the timed calls and the teacher's forward through timers; restore them after."""
        self.seconds = defaultdict(float)
        originals = [(owner, name, getattr(owner, name), name in vars(owner)) for owner, name, _ in TIMED_CALLS]
        original_group_alphas = shd.group_alphas
        forward_start: list[float] = []

        def before_forward(module: nn.Module, args: Any, kwargs: Any) -> None:
            forward_start.append(time.perf_counter())

        def after_forward(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            self.seconds[FORWARD_PART] += time.perf_counter() - forward_start.pop()

        hooks = [
            self.teacher.register_forward_pre_hook(before_forward, with_kwargs=True),
            self.teacher.register_forward_hook(after_forward, with_kwargs=True),
        ]
        for (owner, name, label), (_, _, function, _) in zip(TIMED_CALLS, originals, strict=True):
            setattr(owner, name, self._wrap(label, function))
        # Nested inside squeeze_heads (which looks it up in its module), so it is shown as a share of that line.
        shd.group_alphas = self._wrap(ALPHA_PART, original_group_alphas)
        try:
            yield
        finally:
            shd.group_alphas = original_group_alphas
            for owner, name, function, own in originals:
                if own:
                    setattr(owner, name, function)
                else:  # a method of the instance's class: drop the instance's timed copy
                    delattr(owner, name)
            for hook in hooks:
                hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="work/demo/teacher", help="teacher directory (default the demo's)")
    parser.add_argument("--data", default="work/demo/data", help="`distill prepare` output (default the demo's)")
    parser.add_argument("--config", default="configs/demo.yaml", help="config giving the student and cache settings")
    parser.add_argument("--batch", type=int, default=8, help="teacher batch size (default 8, the demo's)")
    parser.add_argument("--batches", type=int, default=2, help="batches per timed run = one shard (default 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="teacher dtype")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of each variant (default 7)")
    parser.add_argument("--workdir", default=None, help="where temporary caches are written (default: system tmp)")
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    # What `distill cache` would cache for the config's student (its shape, data and teacher): SHD maps, dense fp16.
    overrides = [
        f"teacher.path={args.teacher}",
        f"data.output_dir={args.data}",
        "cache.attn_targets=[shd]",
        "cache.encoding=dense",
        "cache.dtype=float16",
        "cache.temperatures=[1.0]",
    ]
    context = open_run(load_config(args.config, overrides))
    config = context.config
    num_rows = args.batch * args.batches
    rows = context.splits["train"].select(range(num_rows)).with_format("torch", columns=["sample_id", "input_ids"])
    input_ids = torch.as_tensor(rows[0:num_rows]["input_ids"], dtype=torch.long)
    batches = list(input_ids.split(args.batch))
    seq_len = input_ids.shape[1]
    tokens = input_ids.numel()

    teacher_dir = context.teacher_dir
    eager_teacher = load_teacher(teacher_dir, dtype=dtype, attn_implementation="eager")
    cache_teacher = load_teacher(teacher_dir, dtype=dtype)
    dims = context.dims
    layers = layer_map(config.student.num_layers, dims.num_layers, "uniform")
    base_settings = dataclasses.replace(cache_settings(context), layers=tuple(layers))
    start = time.perf_counter()
    weights_sha256(teacher_dir)  # done once per job by `open_run`, timed here again for the line below
    sha_seconds = time.perf_counter() - start

    workdir = Path(tempfile.mkdtemp(prefix="cache-throughput-", dir=args.workdir))
    profile = WriterProfile(cache_teacher)
    breakdowns: dict[str, list[dict[str, float]]] = defaultdict(list)

    @torch.no_grad()
    def eager_forward() -> None:
        for batch in batches:
            eager_teacher(input_ids=batch)

    @torch.no_grad()
    def sdpa_forward() -> None:
        for batch in batches:
            cache_teacher(input_ids=batch)

    def cache_stage(head_counts: tuple[int, ...]) -> Callable[[], None]:
        settings = dataclasses.replace(base_settings, head_counts=head_counts)
        fingerprint = cache_fingerprint(
            settings,
            context.provenance("train"),
            teacher_num_heads=dims.num_heads,
            vocab_size=context.teacher_config.vocab_size,
            dtype=config.cache.dtype,
        )
        name = f"cache stage H{list(head_counts)}"

        def run() -> None:
            directory = Path(tempfile.mkdtemp(dir=workdir)) / "train"
            with profile.active():
                start = time.perf_counter()
                write_cache_split(
                    cache_teacher, rows, directory, settings, fingerprint, shard_size=num_rows, batch_size=args.batch
                )
                total = time.perf_counter() - start
            parts = dict(profile.seconds)
            parts["total"] = total
            breakdowns[name].append(parts)
            shutil.rmtree(directory.parent)

        return run

    variants: dict[str, Callable[[], None]] = {"eager forward (baseline)": eager_forward}
    for head_counts in HEAD_COUNT_VARIANTS:
        variants[f"cache stage H{list(head_counts)}"] = cache_stage(head_counts)
    variants["SDPA forward, no capture (info)"] = sdpa_forward

    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for run in variants.values():  # warm-up: allocator, kernels, page cache
            run()
        breakdowns.clear()
        for _ in range(args.repeats):
            for name, run in variants.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                run()
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    medians = {name: statistics.median(values) for name, values in times.items()}
    baseline = medians["eager forward (baseline)"]
    print(
        f"teacher {teacher_dir} ({dims.num_layers} layers, {dims.num_heads} heads on {dims.num_kv_heads} KV heads, "
        f"vocab {cache_teacher.config.vocab_size}), {args.dtype}; {args.batches} batches of {args.batch} × T "
        f"{seq_len} = {tokens} tokens per run (one shard); cached layers {layers}, squeeze shd, dense fp16, "
        f"top-k {base_settings.top_k}; {torch.get_num_threads()} threads; median of {args.repeats}"
    )
    for name, value in medians.items():
        print(
            f"  {name:34s} {value:7.2f} s  {tokens / value:8.1f} tokens/s  (min {min(times[name]):.2f} s, "
            f"max {max(times[name]):.2f} s; process CPU {statistics.median(cpu_times[name]):.2f} s)"
        )
    baseline_name = "eager forward (baseline)"
    for head_counts in HEAD_COUNT_VARIANTS:
        name = f"cache stage H{list(head_counts)}"
        paired = [eager / cache for eager, cache in zip(times[baseline_name], times[name], strict=True)]
        print(
            f"cache tokens/s ÷ eager tokens/s, H{list(head_counts)}: {baseline / medians[name]:.3f} (medians)  "
            f"{statistics.median(paired):.3f} (median of the {len(paired)} same-repeat ratios)  "
            f"{min(times[baseline_name]) / min(times[name]):.3f} (fastest runs)   target ≥ 0.85"
        )
    print(f"(one-off per job, not in the runs above: weights_sha256 of the teacher {sha_seconds:.2f} s)")

    for name, runs in breakdowns.items():
        total = statistics.median(run["total"] for run in runs)
        print(f"where the time goes, {name} (median over {len(runs)} runs; write_cache_split {total:.2f} s):")
        labels = [FORWARD_PART, *LABELS]
        labels.insert(labels.index("squeeze + SHD α") + 1, ALPHA_PART)
        for label in labels:
            seconds = statistics.median(run.get(label, 0.0) for run in runs)
            print(f"  {label:52s} {seconds:7.3f} s  {100 * seconds / total:5.1f} %")
        other = statistics.median(
            run["total"] - sum(v for k, v in run.items() if k not in ("total", ALPHA_PART)) for run in runs
        )
        print(f"  {'other (dtype casts, .cpu(), concat, row reads)':52s} {other:7.3f} s  {100 * other / total:5.1f} %")


if __name__ == "__main__":
    main()
