"""What `distill cache` costs per token compared with a bare teacher forward, measured side by side, and where the
cache stage's time goes.

The baseline is the teacher loaded with `attn_implementation="sdpa"` running a plain forward (logits included) under
`no_grad` over the same batches. The cache stage is what `distill cache` does for one shard: the teacher loaded as
the stage loads it (`CAPTURE_ATTENTION`, SDPA on every layer), `write_cache_split` over a row set that fills exactly
one shard into a fresh temporary directory. What is cached comes from `--config` as `distill cache` reads it
(`open_run` + `cache_settings`), with the overrides `DEFAULT_OVERRIDES` (SHD maps of the student's own matched
layers, dense fp16, tail sums at τ = 1) and then the command line's, e.g. `cache.encoding=topk cache.attn_top_m=16
cache.attn_row_fraction=0.25 cache.attn_value_bits=8 cache.logit_value_bits=8` for a compact cache. What the kinds
choose once per cache (`prepare_kinds`: the selective heads) is chosen once, outside the timed runs. The variants
alternate within each repeat so that machine noise hits both alike; medians are printed, with the median of the
ratios taken within each repeat and the ratio of the fastest runs (the least disturbed on a shared machine) beside
them. `cache_compute.py` measures the per-batch work alone at long context.

Where the cache-stage time goes is measured in the same runs by routing the calls of the stage's path through timers
(module globals and methods, `TIMED_CALLS`), shown as a tree of inclusive times (a call inside another timed call is
shown under it; "(rest)" is the parent's time outside its timed children): per batch `compute_targets` — the
teacher's SDPA forward with capture (`compute.teacher_passes`), the logits (`logits.logit_targets`: top-k, 8-bit
codes, bit packing; the output layer is in its rest), the stored rows, then every cached layer
(`compute._layer_targets`, also per layer): the statistics pass (`LayerPass.statistics`: attention rows, group
circuits and statistics), each kind's `solve` (SHD's α), and the emit pass over the stored rows (attention rows,
each kind's `rows`, the encoding's writer `add` with its top-m — under the top-m encoding the block's scores and
`topk_maps` instead — and `tensors` with its 8-bit codes and bit packing);
then the shard's schema and value checks (`checks.shard_problem`), serialisation, sha256, write + fsync, manifest
and α statistics. "other" at the top is the rest of `write_cache_split` (concatenating the batches, reading the
rows).

    .venv/bin/python benchmarks/cache_throughput.py                     # SmolLM2 teacher, batch 8 × 256, fp32
    .venv/bin/python benchmarks/cache_throughput.py --dtype bfloat16    # the teacher in bf16
    .venv/bin/python benchmarks/cache_throughput.py cache.encoding=topk cache.attn_top_m=16 \\
        cache.attn_row_fraction=0.25 cache.attn_value_bits=8 cache.logit_value_bits=8   # a compact cache
    .venv/bin/python benchmarks/cache_throughput.py --batches 1 --repeats 1 --batch 2   # a quick look
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipeline.config import load_config
from pipeline.models.loading import load_teacher
from pipeline.ops.shd import Circuits
from pipeline.stages.cache import cache_settings
from pipeline.stages.context import open_run
from pipeline.targets import checks, compute, encoding, kinds, logits, writer
from pipeline.targets.compute import prepare_kinds
from pipeline.targets.encoding import ENCODINGS, EncodeOptions
from pipeline.targets.fingerprint import cache_fingerprint, weights_sha256
from pipeline.targets.kinds import base
from pipeline.targets.kinds.base import LayerPass, TargetSettings
from pipeline.targets.writer import write_cache_split

DEFAULT_OVERRIDES = (
    "cache.attn_targets=[shd]",
    "cache.layers=[]",
    "cache.encoding=dense",
    "cache.dtype=float16",
    "cache.temperatures=[1.0]",
)
"""Applied before the command line's: what the earlier profiles measured (SHD maps of the student's matched layers)."""
BASELINE = "SDPA forward (baseline)"
CACHE = "cache stage"
ATTENTION = "attention rows (LayerPass.attention)"
PACKING = "bit packing (codecs.pack_bits)"
LAYERS = "cached layers (compute._layer_targets)"


class TimedCall(NamedTuple):
    """A call on the cache stage's path: the object it is looked up on (a module for a global, a class or an
    instance for a method), its attribute name, and the line it is shown as."""

    owner: Any
    attribute: str
    label: str


def timed_calls(settings: TargetSettings) -> tuple[TimedCall, ...]:
    """Every call timed inside `write_cache_split` for `settings`: the modules' globals as their callers look them up,
    the layer pass's and the cached kinds' methods, and each encoding's writer's methods."""
    probe = EncodeOptions(1, torch.float16, (1.0,), 16, 1)
    writers = {name: type(item.writer("probe", probe)) for name, item in ENCODINGS.items()}
    cached_kinds = [kinds.get(name) for name in settings.kinds]
    return (
        TimedCall(writer, "compute_targets", "compute_targets (per batch)"),
        TimedCall(compute, "teacher_passes", "teacher SDPA forward + capture (compute.teacher_passes)"),
        TimedCall(compute, "logit_targets", "logits (logits.logit_targets)"),
        TimedCall(logits, "topk_targets", "top-k with tail sums (ops.kd.topk_targets)"),
        TimedCall(logits, "quantize_logs", "8-bit codes (codecs.quantize_logs)"),
        TimedCall(logits, "pack_bits", PACKING),
        TimedCall(compute, "stored_rows", "stored rows (rows.stored_rows)"),
        TimedCall(compute, "pack_bits", "stored rows' bit packing (codecs.pack_bits)"),
        TimedCall(compute, "_layer_targets", LAYERS),
        TimedCall(LayerPass, "statistics", "statistics pass (LayerPass.statistics)"),
        TimedCall(LayerPass, "attention", ATTENTION),
        TimedCall(Circuits, "group", "group circuits (Circuits.group)"),
        TimedCall(base, "accumulate_group_stats", "group statistics (shd.accumulate_group_stats)"),
        *(TimedCall(kind, "solve", f"{kind.name}: solve (from the statistics)") for kind in cached_kinds),
        *(TimedCall(kind, "rows", f"{kind.name}: rows") for kind in cached_kinds),
        *(TimedCall(cls, "add", f"{name} writer: add") for name, cls in writers.items()),
        *(TimedCall(cls, "tensors", f"{name} writer: tensors") for name, cls in writers.items()),
        TimedCall(compute, "attention_scores", "attention scores (attention_rows.attention_scores)"),
        TimedCall(compute, "topk_maps", "top-m from the scores (ops.topk_maps)"),
        TimedCall(writers["topk"], "add_top", "topk writer: add_top"),
        TimedCall(encoding, "topk_rows", "top-m (encoding.topk_rows)"),
        TimedCall(encoding, "quantize_log_probs", "8-bit codes (codecs.quantize_log_probs)"),
        TimedCall(encoding, "pack_bits", PACKING),
        TimedCall(writer, "_check_schema", "schema check (layout.expected_tensors)"),
        TimedCall(checks, "shard_problem", "value checks of the shard (checks.shard_problem)"),
        TimedCall(writer, "shard_bytes", "serialise shard (layout.shard_bytes)"),
        TimedCall(writer, "sha256_bytes", "sha256 of the shard"),
        TimedCall(writer, "atomic_write_bytes", "write + fsync + rename"),
        TimedCall(writer, "write_manifest", "manifest writes"),
        TimedCall(writer, "_alpha_statistics", "α statistics (re-reads the shard)"),
    )


class CallProfile:
    """Inclusive seconds of every timed call, keyed by the path of timed calls it ran inside, accumulated while
    `active()` is entered; and the seconds of each cached layer."""

    def __init__(self, calls: tuple[TimedCall, ...]) -> None:
        self.calls = calls
        self.seconds: dict[tuple[str, ...], float] = defaultdict(float)
        self.per_layer: dict[int, float] = defaultdict(float)
        self._stack: list[str] = []

    def _wrap(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append(label)
            path = tuple(self._stack)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                self.seconds[path] += seconds
                if label == LAYERS:  # `_layer_targets(layer, ...)`
                    self.per_layer[args[0]] += seconds
                self._stack.pop()

        return timed

    @contextmanager
    def active(self) -> Iterator[None]:
        """Route the timed calls through timers; restore them after."""
        self.seconds, self.per_layer, self._stack = defaultdict(float), defaultdict(float), []
        originals = [
            (call, getattr(call.owner, call.attribute), call.attribute in vars(call.owner)) for call in self.calls
        ]
        for call, function, _ in originals:
            setattr(call.owner, call.attribute, self._wrap(call.label, function))
        try:
            yield
        finally:
            for call, function, own in reversed(originals):
                if own:
                    setattr(call.owner, call.attribute, function)
                else:  # a method of the instance's class: drop the instance's timed copy
                    delattr(call.owner, call.attribute)


def profile_line(depth: int, label: str, seconds: float, total: float) -> str:
    """One line of the profile: `label` indented by its depth (0: top level), its seconds and share of `total`."""
    indent = "  " * depth
    return f"  {indent}{label:{62 - len(indent)}s} {seconds:8.3f} s  {100 * seconds / total:5.1f} %"


def print_tree(runs: list[dict[tuple[str, ...], float]], total: float, calls: tuple[TimedCall, ...]) -> None:
    """The median seconds of every call path over `runs`, children under their parent in the order of `calls`, with
    each parent's time outside its timed children as "(rest)"."""
    order = {call.label: index for index, call in reversed(list(enumerate(calls)))}
    paths = sorted(dict.fromkeys(path for run in runs for path in run), key=lambda path: [order[p] for p in path])

    def show(parent: tuple[str, ...]) -> None:
        children = [path for path in paths if len(path) == len(parent) + 1 and path[:-1] == parent]
        for path in children:
            seconds = statistics.median(run.get(path, 0.0) for run in runs)
            print(profile_line(len(parent), path[-1], seconds, total))
            show(path)
        if parent and children:
            rest = statistics.median(
                run.get(parent, 0.0) - sum(run.get(path, 0.0) for path in children) for run in runs
            )
            print(profile_line(len(parent), "(rest)", rest, total))

    show(())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides, applied after DEFAULT_OVERRIDES")
    parser.add_argument("--teacher", default="work/demo/teacher", help="teacher directory (default the demo's)")
    parser.add_argument(
        "--data", default="work/shakespeare/data", help="`distill prepare` output (default the text setting's)"
    )
    parser.add_argument(
        "--config", default="configs/shakespeare.yaml", help="config giving the student and cache settings"
    )
    parser.add_argument("--batch", type=int, default=8, help="teacher batch size (default 8, the demo's)")
    parser.add_argument("--batches", type=int, default=2, help="batches per timed run = one shard (default 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="teacher dtype")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of each variant (default 7)")
    parser.add_argument("--workdir", default=None, help="where temporary caches are written (default: system tmp)")
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    overrides = [f"teacher.path={args.teacher}", f"data.output_dir={args.data}", *DEFAULT_OVERRIDES, *args.overrides]
    context = open_run(load_config(args.config, overrides))
    config, dims = context.config, context.dims
    num_rows = args.batch * args.batches
    rows = context.splits["train"].select(range(num_rows)).with_format("torch", columns=context.sample_columns)
    input_ids = torch.as_tensor(rows[0:num_rows]["input_ids"], dtype=torch.long)
    batches = list(input_ids.split(args.batch))
    seq_len = input_ids.shape[1]
    tokens = input_ids.numel()

    teacher_dir = context.teacher_dir
    sdpa_teacher = load_teacher(teacher_dir, dtype=dtype, attn_implementation="sdpa")
    cache_teacher = load_teacher(teacher_dir, dtype=dtype)
    # Once per cache, as `distill cache` does before its first shard: not part of the per-shard cost.
    settings, records = prepare_kinds(
        cache_teacher, context.splits["train"], cache_settings(context), config.cache.batch_size
    )
    fingerprint = cache_fingerprint(
        settings,
        context.provenance("train"),
        teacher_num_heads=dims.num_heads,
        vocab_size=context.teacher_config.vocab_size,
        dtype=config.cache.dtype,
    )
    start = time.perf_counter()
    weights_sha256(teacher_dir)  # done once per job by `open_run`, timed here again for the line below
    sha_seconds = time.perf_counter() - start

    workdir = Path(tempfile.mkdtemp(prefix="cache-throughput-", dir=args.workdir))
    profile = CallProfile(timed_calls(settings))
    breakdowns: list[dict[tuple[str, ...], float]] = []
    per_layer: list[dict[int, float]] = []
    totals: list[float] = []

    @torch.no_grad()
    def sdpa_forward() -> None:
        for batch in batches:
            sdpa_teacher(input_ids=batch, use_cache=False)

    def cache_stage() -> None:
        directory = Path(tempfile.mkdtemp(dir=workdir)) / "train"
        with profile.active():
            start = time.perf_counter()
            write_cache_split(
                cache_teacher,
                rows,
                directory,
                settings,
                fingerprint,
                shard_size=num_rows,
                batch_size=args.batch,
                records=records,
            )
            totals.append(time.perf_counter() - start)
        breakdowns.append(dict(profile.seconds))
        per_layer.append(dict(profile.per_layer))
        shutil.rmtree(directory.parent)

    variants: dict[str, Callable[[], None]] = {BASELINE: sdpa_forward, CACHE: cache_stage}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for run in variants.values():  # warm-up: allocator, kernels, page cache
            run()
        breakdowns.clear()
        per_layer.clear()
        totals.clear()
        for _ in range(args.repeats):
            for name, run in variants.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                run()
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    medians = {name: statistics.median(values) for name, values in times.items()}
    compact = (
        f", m {settings.attn_top_m}, row fraction {settings.row_fraction:g}, attention values "
        f"{settings.attn_value_bits}-bit"
        if settings.encoding == "topk"
        else ""
    )
    print(
        f"teacher {teacher_dir} ({dims.num_layers} layers, {dims.num_heads} heads on {dims.num_kv_heads} KV heads, "
        f"vocab {cache_teacher.config.vocab_size}), {args.dtype}; {args.batches} batches of {args.batch} × T "
        f"{seq_len} = {tokens} tokens per run (one shard); cached layers {list(settings.layers)}, kinds "
        f"{list(settings.kinds)}, head counts {list(settings.head_counts)}, {settings.encoding} "
        f"{config.cache.dtype}{compact}, top-k {settings.top_k} (logits {settings.logit_value_bits}-bit); "
        f"{torch.get_num_threads()} threads; median of {args.repeats}"
    )
    for name, value in medians.items():
        print(
            f"  {name:24s} {value:7.2f} s  {tokens / value:8.1f} tokens/s  (min {min(times[name]):.2f} s, "
            f"max {max(times[name]):.2f} s; process CPU {statistics.median(cpu_times[name]):.2f} s)"
        )
    paired = [base_s / cache_s for base_s, cache_s in zip(times[BASELINE], times[CACHE], strict=True)]
    print(
        f"cache tokens/s ÷ SDPA forward tokens/s: {medians[BASELINE] / medians[CACHE]:.3f} (medians)  "
        f"{statistics.median(paired):.3f} (median of the {len(paired)} same-repeat ratios)  "
        f"{min(times[BASELINE]) / min(times[CACHE]):.3f} (fastest runs)"
    )
    print(f"(one-off per job, not in the runs above: weights_sha256 of the teacher {sha_seconds:.2f} s)")

    total = statistics.median(totals)
    print(f"where the time goes, {CACHE} (median over {len(totals)} runs; write_cache_split {total:.2f} s):")
    print_tree(breakdowns, total, profile.calls)
    top = [path for path in dict.fromkeys(path for run in breakdowns for path in run) if len(path) == 1]
    other = statistics.median(
        run_total - sum(run.get(path, 0.0) for path in top) for run_total, run in zip(totals, breakdowns, strict=True)
    )
    print(profile_line(0, "other (concatenating the batches, reading the rows)", other, total))
    layer_text = ", ".join(
        f"L{layer} {statistics.median(run.get(layer, 0.0) for run in per_layer):.3f} s" for layer in settings.layers
    )
    print(f"per cached layer (compute._layer_targets, median): {layer_text}")


if __name__ == "__main__":
    main()
