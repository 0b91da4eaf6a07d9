"""The cache stage at long context: tokens/s of the stage's per-batch work against a bare SDPA teacher forward of the
same tokens, and the peak resident memory of each, at several context lengths with the same tokens per batch.

Per context length T (batch = `--batch-tokens` ÷ T samples of T tokens):
- `bare`: `teacher(input_ids)` under `no_grad` with SDPA on every layer — the teacher's own forward, logits included;
- `cache`: what `distill cache` does per batch: `compute_targets` (the SDPA forward with capture, the sparse logits
  chunk by chunk, every cached layer's targets in query-row blocks), the shard's value checks
  (`checks.shard_problem`), its serialisation and sha256 — on a CPU with the native top-m kernel where it builds;
- `torch form` (with `--torch-form`): the same step with the kernel off, as a machine without a C compiler runs it.
Times alternate within each repeat (medians printed, ratio = bare s ÷ cache s, issue target ≥ 0.8), in a fresh
process with glibc's default allocator settings (as `distill cache` runs). Peak memory is measured in a fresh process
per T and variant (`_common.PeakMemory`: VmHWM on the CPU, the allocator's peak on
CUDA): `peak` is the whole process (interpreter, teacher, batch, the step), the figure the issue's table reported;
the issue's target is peak(T 8192) ≤ 1.5 × peak(T 1024).

What is cached comes from `--config` and its overrides as `distill cache` reads them (default: the demo's cached
layers and kinds with `cache.head_counts=[3] cache.encoding=topk cache.attn_top_m=16`, the issue's table). The
`selective` heads are chosen once, outside the timed calls, on 16 random 256-token samples (a once-per-cache cost
that does not change the per-batch one).

The teacher: `teacher.path` of the config (the real SmolLM2 teacher; text = contiguous windows of its prepared data),
or with `--template NAME` a random teacher of that shape (`--template-layers N` of its layers; random tokens), so the
script runs on a GPU node without the imported teacher:

    .venv/bin/python benchmarks/cache_compute.py                                    # real teacher, T 256 … 8192
    .venv/bin/python benchmarks/cache_compute.py --lengths 256 1024 --repeats 1     # a quick look
    .venv/bin/python benchmarks/cache_compute.py --measure time                     # throughput only
    .venv/bin/python benchmarks/cache_compute.py --measure time --torch-form        # and without the C kernel
    .venv/bin/python benchmarks/cache_compute.py --device cuda --dtype bfloat16 --template llama3-8b \\
        --template-layers 4 --lengths 2048 4096 8192 --batch-tokens 16384 "cache.layers=[0,1,2,3]" \\
        "cache.head_counts=[8]" cache.attn_row_fraction=0.25 cache.attn_value_bits=8 cache.logit_value_bits=8
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
from pathlib import Path

import torch
from _common import (  # benchmarks/ is on sys.path when run as a script
    PeakMemory,
    contiguous_window_rows,
    measure_in_child,
    megabytes,
    report_memory,
    time_alternately,
)
from datasets import Dataset
from transformers import AutoModelForCausalLM

from pipeline.config import load_config
from pipeline.data.prepare import load_prepared
from pipeline.models.capture import CAPTURE_ATTENTION
from pipeline.models.loading import load_teacher, load_teacher_config
from pipeline.models.templates import TEACHER_TEMPLATES
from pipeline.ops import native
from pipeline.stages.cache import cache_settings, shape_context
from pipeline.targets import checks
from pipeline.targets.compute import compute_targets, prepare_kinds
from pipeline.targets.fingerprint import cache_fingerprint
from pipeline.targets.kinds.base import TargetSettings
from pipeline.targets.layout import shard_bytes

ROOT = Path(__file__).resolve().parents[1]
ISSUE_OVERRIDES = ("cache.head_counts=[3]", "cache.encoding=topk", "cache.attn_top_m=16")
CALIBRATION_SAMPLES, CALIBRATION_LEN = 16, 256


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides (default: the issue's table settings)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "shakespeare.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="teacher precision")
    parser.add_argument("--template", choices=sorted(TEACHER_TEMPLATES), help="a random teacher of this shape")
    parser.add_argument("--template-layers", type=int, help="with --template: keep this many layers")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per batch (batch = this ÷ T)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per variant (default 2)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per measuring child")
    parser.add_argument(
        "--measure", nargs="+", choices=("time", "memory"), default=["time", "memory"], help="what to measure per T"
    )
    parser.add_argument(
        "--torch-form",
        action="store_true",
        help="also time the stage with the native kernel off (SHD_DISTILL_NATIVE=0's torch form), side by side",
    )
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--settings-json", help=argparse.SUPPRESS)
    return parser.parse_args()


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, TargetSettings, dict, Dataset | None]:
    """(the teacher on the device, what is cached, its fingerprint, the prepared train split or None)."""
    overrides = list(args.overrides or ISSUE_OVERRIDES)
    config = load_config(args.config, overrides)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.template:
        shape = TEACHER_TEMPLATES[args.template]()  # what is cached is planned on the whole teacher's shape
        built = TEACHER_TEMPLATES[args.template](*([args.template_layers] if args.template_layers else []))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(built, dtype=dtype, attn_implementation=CAPTURE_ATTENTION)
        teacher = model.to(device).eval()
        train = None
    else:
        shape = load_teacher_config(config.teacher.path)
        teacher = load_teacher(Path(config.teacher.path), dtype=dtype, device=device)
        train = load_prepared(Path(config.data.output_dir))[0]["train"]
    settings = cache_settings(shape_context(config, shape))
    depth = teacher.config.num_hidden_layers
    if any(layer >= depth for layer in settings.layers):  # a shortened template: its first layers stand in
        kept = tuple(layer for layer in settings.layers if layer < depth) or tuple(range(depth))
        settings = dataclasses.replace(settings, layers=kept)
    fingerprint = cache_fingerprint(
        settings,
        {"seq_len": 0},
        teacher_num_heads=shape.num_attention_heads,
        vocab_size=shape.vocab_size,
        dtype=config.cache.dtype,
    )
    return teacher, settings, fingerprint, train


def batch_of(args: argparse.Namespace, seq_len: int, vocab_size: int, train: Dataset | None) -> torch.Tensor:
    """[batch-tokens ÷ T, T] token ids: contiguous windows of the prepared text, or random ids."""
    batch = max(1, args.batch_tokens // seq_len)
    if train is None:
        return torch.randint(vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seq_len))
    base_len = len(train[0]["input_ids"])
    return contiguous_window_rows(train, base_len, [seq_len], batch)[seq_len].input_ids


def stage_step(teacher: torch.nn.Module, input_ids: torch.Tensor, settings: TargetSettings, fingerprint: dict) -> None:
    """One batch of the cache stage: targets, the shard's value checks, its bytes and their sha256."""
    sample_ids = torch.arange(len(input_ids))
    targets = compute_targets(teacher, input_ids, sample_ids, settings)
    tensors = {"sample_ids": sample_ids, "input_ids": input_ids.int(), **targets}
    shard_fingerprint = {**fingerprint, "seq_len": input_ids.shape[1]}
    problem = checks.shard_problem(tensors, shard_fingerprint)
    if problem is not None:
        raise RuntimeError(problem)
    hashlib.sha256(shard_bytes(tensors, {"layout_version": fingerprint["layout_version"]})).hexdigest()


def torch_form_step(
    teacher: torch.nn.Module, input_ids: torch.Tensor, settings: TargetSettings, fingerprint: dict
) -> None:
    """`stage_step` with the native kernel off: what a machine without a C compiler runs."""
    loaded = native.library
    native.library = lambda: None
    try:
        stage_step(teacher, input_ids, settings, fingerprint)
    finally:
        native.library = loaded


def bare_step(teacher: torch.nn.Module, input_ids: torch.Tensor) -> None:
    with torch.no_grad():
        teacher(input_ids=input_ids, use_cache=False)


def with_selected_heads(teacher: torch.nn.Module, settings: TargetSettings, vocab_size: int) -> TargetSettings:
    """`settings` with what the kinds choose once per cache, chosen on random samples (outside every timed call)."""
    ids = torch.randint(vocab_size, (CALIBRATION_SAMPLES, CALIBRATION_LEN), generator=torch.Generator().manual_seed(0))
    return prepare_kinds(teacher, Dataset.from_dict({"input_ids": ids.tolist()}), settings, 4)[0]


def child(args: argparse.Namespace) -> None:
    """Measure one (variant, T) in this fresh process: its peak memory, or (variant `time`) both variants' times."""
    memory = PeakMemory(torch.device(args.device))
    memory.start()
    teacher, settings, fingerprint, train = load(args)
    selected = json.loads(args.settings_json)
    settings = dataclasses.replace(settings, selected_heads=selected or None)
    variant, seq_len = args.memory_of.split(":")
    vocab_size = teacher.config.vocab_size
    input_ids = batch_of(args, int(seq_len), vocab_size, train).to(args.device)
    warm = input_ids[:1, :256]  # kernels and thread pools up, at a shape that costs nothing
    bare_step(teacher, warm)
    stage_step(teacher, warm, settings, fingerprint)
    if variant == "time":
        steps = {
            "bare": lambda: bare_step(teacher, input_ids),
            "cache": lambda: stage_step(teacher, input_ids, settings, fingerprint),
        }
        if args.torch_form:
            steps["torch form"] = lambda: torch_form_step(teacher, input_ids, settings, fingerprint)
        times = time_alternately(steps, args.repeats, torch.device(args.device))
        report_memory({"times": times, "tokens": input_ids.numel()})
        return
    memory.reset()
    if variant == "bare":
        bare_step(teacher, input_ids)
    else:
        stage_step(teacher, input_ids, settings, fingerprint)
    report_memory({**memory.figures(), "tokens": input_ids.numel()})


def main() -> None:
    args = parse()
    if args.memory_of:
        child(args)
        return
    teacher, settings, _, _ = load(args)
    selected = with_selected_heads(teacher, settings, teacher.config.vocab_size).selected_heads
    extra = ("--settings-json", json.dumps(selected or {}))
    del teacher
    print(
        f"teacher {args.template or 'teacher.path'} ({args.dtype} on {args.device}); cached layers "
        f"{list(settings.layers)}; kinds {list(settings.kinds)}; head counts {list(settings.head_counts)}; "
        f"{settings.encoding} (m {settings.attn_top_m}, row fraction {settings.row_fraction}, attention values "
        f"{settings.attn_value_bits}-bit, logits {settings.logit_value_bits}-bit); {args.batch_tokens} tokens per batch"
    )
    torch_form = "  torch-form tok/s  ratio" if args.torch_form else ""
    print(f"    T  batch   bare tok/s  cache tok/s  ratio{torch_form}   bare peak MiB  cache peak MiB")
    peaks = {}
    for seq_len in args.lengths:
        script = sys.argv[0]
        row = f"{seq_len:5d}  {max(1, args.batch_tokens // seq_len):5d}"
        if "time" in args.measure:
            timed = measure_in_child(script, f"time:{seq_len}", args.timeout, *extra, timing=True)
            tokens = timed["tokens"]
            seconds = {name: statistics.median(times) for name, times in timed["times"].items()}
            bare_s, cache_s = seconds["bare"], seconds["cache"]
            row += f"  {tokens / bare_s:11,.0f}  {tokens / cache_s:11,.0f}  {bare_s / cache_s:5.2f}"
            if args.torch_form:
                row += f"  {tokens / seconds['torch form']:16,.0f}  {bare_s / seconds['torch form']:5.2f}"
        else:
            row += f"  {'—':>11}  {'—':>11}  {'—':>5}"
        if "memory" in args.measure:
            bare = measure_in_child(script, f"bare:{seq_len}", args.timeout, *extra)
            cache = measure_in_child(script, f"cache:{seq_len}", args.timeout, *extra)
            peaks[seq_len] = cache["peak"]
            row += f"  {megabytes(bare['peak'])}       {megabytes(cache['peak'])}"
        print(row, flush=True)
    if 1024 in peaks and 8192 in peaks:
        print(f"cache peak memory T 8192 ÷ T 1024: {peaks[8192] / peaks[1024]:.2f} (target ≤ 1.5)")


if __name__ == "__main__":
    main()
