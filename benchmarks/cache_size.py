"""The cache planner against real shards: bytes per token of every stored tensor as `pipeline.targets.plan` prices
it from the layout alone, beside the bytes per token of shards `write_cache_split` wrote with the same settings.

For each setting a real cache is written into a temporary directory and read back: per tensor pattern (tensors that
differ only in their teacher layer are one row, `attn.L*.H3.shd.codes`, as the planner groups them) the planner's
bytes per token, the bytes per token the shards' safetensors headers give (`data_offsets`), and at the end the whole
shard files (headers included) and the manifest per token. For top-m attention targets, the retained attention mass
1 − tail (the mass at τ = 1 inside the m kept entries) of every map, mean over the stored rows, heads and samples,
per cached layer, and over the stored rows at positions ≥ m only (a row i < m has at most m keys: it keeps all).

Parts (`--parts`, default all):
- `real`: the real teacher (`teacher.path` of `--config`, the demo's SmolLM2; its prepared data) at each
  `--real-seq-lens` T (`--real-tokens` ÷ T samples; longer samples are consecutive packed samples of contiguous
  text, `_common.contiguous_window_rows`), with the config's cache settings (the demo's: dense, every target kind and
  cached layer, head counts [3, 2]) and, second, the compact form `COMPACT` (top m = 16 of a quarter of the rows,
  8-bit attention values and logits). The `selective` heads are chosen once (`prepare_kinds`) for all settings.
- `template`: a random teacher of `--template`'s shape with `--template-layers` layers (LLaMA-3-8B: 2 layers, about
  6 GB of fp32, built once), one sample of random tokens at T = `--template-seq-len`, with `--template-config`'s
  settings and `TEMPLATE_OVERRIDES` (teacher layers [0, 1], SHD maps for 8 student heads, top m = 16, 8-bit values
  and logits, top-k 64) at each `--template-fractions` row fraction. Retained mass of a random teacher is printed
  but says nothing about a trained one.
- `plan`: the planner alone for the full template with the student's layer map over `--plan-layers` matched layers
  (the issue's targets: ≤ 2 KB per token with 16 layers, ≤ 512 B with 4), at each row fraction.

    .venv/bin/python benchmarks/cache_size.py                                    # every part
    .venv/bin/python benchmarks/cache_size.py --parts plan                       # the planner alone, instantly
    .venv/bin/python benchmarks/cache_size.py --parts real --real-seq-lens 256 --real-tokens 512   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from _common import WindowRows, contiguous_window_rows  # benchmarks/ is on sys.path when run as a script
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from pipeline.config import load_config
from pipeline.models.capture import CAPTURE_ATTENTION
from pipeline.models.loading import load_teacher
from pipeline.models.templates import TEACHER_TEMPLATES
from pipeline.stages.cache import cache_settings, shape_context
from pipeline.stages.context import open_run
from pipeline.targets.compute import prepare_kinds
from pipeline.targets.encoding import tail_name, unpack_indices
from pipeline.targets.fingerprint import cache_fingerprint, provenance
from pipeline.targets.kinds.base import TargetSettings
from pipeline.targets.layout import cached_maps, read_header
from pipeline.targets.manifest import MANIFEST_NAME, Manifest
from pipeline.targets.plan import bytes_per_token, format_plan, plan_rows
from pipeline.targets.rows import ROWS_TENSOR, stored_row_count
from pipeline.targets.writer import write_cache_split

ROOT = Path(__file__).resolve().parents[1]
COMPACT = (
    "cache.encoding=topk",
    "cache.attn_top_m=16",
    "cache.attn_row_fraction=0.25",
    "cache.attn_value_bits=8",
    "cache.logit_value_bits=8",
)
"""The compact cache of the real teacher: the demo's kinds, layers and head counts in their smallest form."""
TEMPLATE_OVERRIDES = (
    "cache.attn_targets=[shd]",
    "cache.head_counts=[8]",
    "cache.encoding=topk",
    "cache.attn_top_m=16",
    "cache.attn_value_bits=8",
    "cache.logit_value_bits=8",
    "distill.kd.top_k=64",
)
"""The template's cache (the row fraction, T and layers are set per run)."""
PLAN_TARGETS = {16: "≤ 2 KB", 4: "≤ 512 B"}
"""The issue's bytes per token for a cache of that many matched layers."""
LAYER_IN_NAME = re.compile(r"\.L\d+\.")
"""How the planner groups tensors over layers (`plan.plan_rows`): `attn.L6.H3.shd` → `attn.L*.H3.shd`."""


def pattern(name: str) -> str:
    return LAYER_IN_NAME.sub(".L*.", name)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts", nargs="+", choices=("real", "template", "plan"), default=["real", "template", "plan"]
    )
    parser.add_argument(
        "--config", type=Path, default=ROOT / "configs" / "shakespeare.yaml", help="the real teacher's run"
    )
    parser.add_argument("--real-seq-lens", type=int, nargs="+", default=[256, 1024], help="T of the real caches")
    parser.add_argument("--real-tokens", type=int, default=2048, help="tokens per real cache (samples = this ÷ T)")
    parser.add_argument("--template", choices=sorted(TEACHER_TEMPLATES), default="llama3-8b")
    parser.add_argument("--template-config", type=Path, default=ROOT / "configs" / "llama3-8b.yaml")
    parser.add_argument("--template-layers", type=int, default=2, help="layers of the random teacher (default 2)")
    parser.add_argument("--template-seq-len", type=int, default=2048, help="T of the template's cache (default 2048)")
    parser.add_argument("--template-fractions", type=float, nargs="+", default=[0.125, 0.25], help="row fractions")
    parser.add_argument("--plan-layers", type=int, nargs="+", default=[16, 4], help="matched layers of the plans")
    parser.add_argument("--workdir", default=None, help="where temporary caches are written (default: system tmp)")
    return parser.parse_args()


# --------------------------------------------------------------------------------------------------------------------
# Reading a written cache


def shard_paths(directory: Path, manifest: Manifest) -> list[Path]:
    return [directory / entry.file for entry in manifest.shards]


def stored_bytes(directory: Path, manifest: Manifest) -> dict[str, int]:
    """Tensor pattern → bytes of its tensors in every shard, from the headers' data offsets."""
    sizes: dict[str, int] = defaultdict(int)
    for path in shard_paths(directory, manifest):
        header, _ = read_header(str(path))
        for name, entry in header.items():
            start, stop = entry["data_offsets"]
            sizes[pattern(name)] += stop - start
    return dict(sizes)


def retained_mass(directory: Path, manifest: Manifest) -> dict[str, tuple[float, float]]:
    """Map name → (mean 1 − tail over its stored rows, heads and samples; the same over the rows at positions ≥ m),
    from the τ = 1 tail sums of a top-m cache."""
    fingerprint = manifest.fingerprint
    seq_len, top_m = fingerprint["seq_len"], fingerprint["attn_top_m"]
    count = stored_row_count(seq_len, fingerprint["attn_row_fraction"])
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for path in shard_paths(directory, manifest):
        with safe_open(str(path), framework="pt") as shard:
            names = set(shard.keys())
            if ROWS_TENSOR in names:
                packed = shard.get_tensor(ROWS_TENSOR)
                positions = unpack_indices(packed, seq_len, (len(packed), count))
            else:
                positions = torch.arange(seq_len).expand(len(shard.get_tensor("sample_ids")), seq_len)
            late = (positions >= top_m)[:, None, :]
            for spec in cached_maps(fingerprint):
                kept = 1 - shard.get_tensor(tail_name(f"{spec.name}.tail", 1.0)).double()
                late_rows = late.expand_as(kept)
                totals = sums[spec.name]
                totals[0] += kept.sum().item()
                totals[1] += kept.numel()
                totals[2] += kept[late_rows].sum().item()
                totals[3] += late_rows.sum().item()
    return {name: (kept / rows, late / max(late_rows, 1)) for name, (kept, rows, late, late_rows) in sums.items()}


def report(title: str, directory: Path, manifest: Manifest, seconds: float) -> None:
    """The planner's bytes per token beside the shards', per tensor pattern; the files; the retained mass."""
    fingerprint = manifest.fingerprint
    tokens = manifest.num_samples * fingerprint["seq_len"]
    measured = stored_bytes(directory, manifest)
    tensor_total = sum(measured.values()) / tokens
    rows = plan_rows(fingerprint)
    width = max(len(row.pattern) for row in rows)
    print(f"\n{title}")
    print(
        f"  {manifest.num_samples} samples × T {fingerprint['seq_len']} in {len(manifest.shards)} shard(s), written "
        f"by write_cache_split in {seconds:.0f} s"
    )
    print(f"  {'tensor':<{width}}  dtype   ×layers  planner B/token  shards B/token")
    for row in rows:
        planned = row.bytes_per_sample / fingerprint["seq_len"]
        found = measured.pop(row.pattern, 0) / tokens
        flag = "" if abs(planned - found) < 1e-9 else "  ← differs"
        print(f"  {row.pattern:<{width}}  {row.dtype:<6}  {row.count:>7}  {planned:>15.2f}  {found:>14.2f}{flag}")
    for name, size in measured.items():  # in the shards, not in the plan (the writer's schema check forbids it)
        print(f"  {name:<{width}}  {'':6}  {'':7}  {'—':>15}  {size / tokens:>14.2f}  ← not planned")
    planned_total = bytes_per_token(fingerprint)
    files = sum(path.stat().st_size for path in shard_paths(directory, manifest))
    manifest_bytes = (directory / MANIFEST_NAME).stat().st_size
    print(f"  {'tensors, total':<{width}}  {'':6}  {'':7}  {planned_total:>15.2f}  {tensor_total:>14.2f}")
    print(
        f"  whole shard files {files / tokens:.2f} B/token (headers {(files - tensor_total * tokens) / tokens:.2f}); "
        f"with the manifest ({manifest_bytes} bytes) {(files + manifest_bytes) / tokens:.2f} B/token"
    )
    if fingerprint["encoding"] != "topk":
        return
    mass = retained_mass(directory, manifest)
    layers = fingerprint["cached_layers"]
    by_pattern: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    for spec in cached_maps(fingerprint):
        by_pattern[pattern(spec.name)][spec.layer] = mass[spec.name]
    print(
        f"  retained attention mass 1 − tail (m = {fingerprint['attn_top_m']}), mean over the stored rows, heads and "
        "samples:"
    )
    columns = "".join(f"{'L' + str(layer):>8s}" for layer in layers)
    names = max(len(name) for name in by_pattern)
    print(f"  {'map':<{names}}{columns} {'mean':>7s} {'rows≥m':>7s}")
    for name, per_layer in by_pattern.items():
        values = [per_layer[layer][0] for layer in layers]
        late = [per_layer[layer][1] for layer in layers]
        cells = "".join(f"{value:8.4f}" for value in values)
        print(f"  {name:<{names}}{cells} {sum(values) / len(values):7.4f} {sum(late) / len(late):7.4f}")


def write_and_report(
    title: str,
    teacher: torch.nn.Module,
    rows: Any,
    settings: TargetSettings,
    fingerprint: dict[str, Any],
    workdir: Path,
    batch_size: int,
    records: dict[str, Any] | None = None,
) -> None:
    """Write one cache of `rows` (one shard, `batch_size` samples per teacher pass) with `settings` into a fresh
    directory, report it, remove it."""
    directory = Path(tempfile.mkdtemp(dir=workdir)) / "train"
    start = time.perf_counter()
    manifest = write_cache_split(
        teacher,
        rows,
        directory,
        settings,
        fingerprint,
        shard_size=len(rows),
        batch_size=batch_size,
        records=records,
    )
    seconds = time.perf_counter() - start
    try:
        report(title, directory, manifest, seconds)
    finally:
        shutil.rmtree(directory.parent)


def describe(settings: TargetSettings) -> str:
    compact = (
        f"top m {settings.attn_top_m}, row fraction {settings.row_fraction:g}, {settings.attn_value_bits}-bit values"
        if settings.encoding == "topk"
        else "dense"
    )
    return (
        f"layers {list(settings.layers)}, kinds {list(settings.kinds)}, head counts {list(settings.head_counts)}, "
        f"{compact}; logits top-k {settings.top_k}, {settings.logit_value_bits}-bit"
    )


# --------------------------------------------------------------------------------------------------------------------
# Parts


def real_part(args: argparse.Namespace, workdir: Path) -> None:
    """The real teacher: the config's cache and the compact one, at each T."""
    contexts = {
        "config's": open_run(load_config(args.config)),
        "compact": open_run(load_config(args.config, list(COMPACT))),
    }
    context = contexts["config's"]
    teacher = load_teacher(context.teacher_dir, dtype=torch.float32)
    train = context.splits["train"]
    # Once per cache, as `distill cache` does; the same choice for every setting here (same layers and head counts).
    chosen, records = prepare_kinds(teacher, train, cache_settings(context), context.config.cache.batch_size)
    base_len = context.meta["seq_len"]
    windows = {}
    for seq_len in args.real_seq_lens:
        count = max(1, args.real_tokens // seq_len)
        if seq_len == base_len:
            windows[seq_len] = train.select(range(count)).with_format("torch", columns=["sample_id", "input_ids"])
        else:
            windows[seq_len] = contiguous_window_rows(train, base_len, [seq_len], count)[seq_len]
    for seq_len, rows in windows.items():
        for name, run in contexts.items():
            settings = dataclasses.replace(cache_settings(run), selected_heads=chosen.selected_heads)
            origin = {
                **run.provenance("train"),
                "seq_len": seq_len,
                "data_fingerprint": f"{run.meta['fingerprint']}+T{seq_len}",
            }
            fingerprint = cache_fingerprint(
                settings,
                origin,
                teacher_num_heads=run.dims.num_heads,
                vocab_size=run.teacher_config.vocab_size,
                dtype=run.config.cache.dtype,
            )
            title = f"[real] {run.teacher_dir}, T {seq_len}, the {name} cache: {describe(settings)}"
            batch_size = run.config.cache.batch_size
            write_and_report(title, teacher, rows, settings, fingerprint, workdir, batch_size, records)


def template_settings(args: argparse.Namespace, fraction: float, extra: list[str]) -> tuple[TargetSettings, dict]:
    """What the template config caches at row fraction `fraction` with `extra` overrides, priced for the full
    template's shape: (settings, fingerprint)."""
    overrides = [*TEMPLATE_OVERRIDES, f"cache.attn_row_fraction={fraction}", f"data.seq_len={args.template_seq_len}"]
    config = load_config(args.template_config, [*overrides, *extra])
    shape = TEACHER_TEMPLATES[args.template]()
    settings = cache_settings(shape_context(config, shape))
    data_meta = {"tokenizer_fingerprint": "random", "fingerprint": "random-tokens", "seq_len": args.template_seq_len}
    fingerprint = cache_fingerprint(
        settings,
        provenance(data_meta, "train", f"random {args.template}"),
        teacher_num_heads=shape.num_attention_heads,
        vocab_size=shape.vocab_size,
        dtype=config.cache.dtype,
    )
    return settings, fingerprint


def template_part(args: argparse.Namespace, workdir: Path) -> None:
    """A random teacher of the template's shape, a few layers of it: the written bytes beside the planner's."""
    shape = TEACHER_TEMPLATES[args.template](args.template_layers)
    torch.manual_seed(0)
    start = time.perf_counter()
    teacher = AutoModelForCausalLM.from_config(shape, dtype=torch.float32, attn_implementation=CAPTURE_ATTENTION)
    teacher.eval().requires_grad_(False)
    built = time.perf_counter() - start
    parameters = sum(parameter.numel() for parameter in teacher.parameters())
    print(
        f"\n[template] random {args.template} teacher of {args.template_layers} layers: {parameters / 1e9:.2f} B "
        f"parameters, fp32, built in {built:.0f} s"
    )
    seq_len = args.template_seq_len
    ids = torch.randint(shape.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    rows = WindowRows(ids, torch.tensor([0]))
    layers = f"cache.layers={list(range(args.template_layers))}"
    for fraction in args.template_fractions:
        settings, fingerprint = template_settings(args, fraction, [layers])
        title = f"[template] random {args.template}, T {seq_len}: {describe(settings)}"
        write_and_report(title, teacher, rows, settings, fingerprint, workdir, 1)


def plan_part(args: argparse.Namespace) -> None:
    """The planner alone for the full template, the student's layer map over each count of matched layers."""
    summary = []
    for matched in args.plan_layers:
        for fraction in args.template_fractions:
            extra = [f"student.num_layers={matched}", "cache.layers=[]"]
            settings, fingerprint = template_settings(args, fraction, extra)
            title = f"\n[plan] full {args.template}, {matched} matched layers: {describe(settings)}"
            print(format_plan(fingerprint, {}, title))
            summary.append((matched, fraction, bytes_per_token(fingerprint)))
    print(f"\n[plan] full {args.template}, T {args.template_seq_len}, bytes per token:")
    for matched, fraction, total in summary:
        target = PLAN_TARGETS.get(matched, "—")
        print(
            f"  {matched:3d} matched layers, row fraction {fraction:<6g} {total:8.1f} B/token   issue target {target}"
        )


def main() -> None:
    args = parse()
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="cache-size-", dir=args.workdir))
    try:
        if "real" in args.parts:
            real_part(args, workdir)
        if "template" in args.parts:
            template_part(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if "plan" in args.parts:
        plan_part(args)
    print(f"\nrun time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
