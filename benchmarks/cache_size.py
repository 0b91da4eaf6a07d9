"""Bytes per token of the teacher-target cache, read from real shards that the cache writer wrote.

Every figure comes from the safetensors headers (`data_offsets`) and file sizes of shards written by
`write_cache_split` with the real teacher on real packed text, divided by the tokens they hold:

- `dense`, 9 → 3 heads at the data's T: bytes of the `attn.L*.H3` tensors per token per cached layer against the
  naive cache (fp32 full T×T maps of every teacher head: H_t·T·4 bytes per token per layer). The arithmetic bound is
  3× (squeeze) · 2× (half precision) · 2T/(T+1) (triangle) ≈ 12×.
- `topk`, m = 32, 9 → 3 heads at T = 256, 1024, 4096: bytes of `attn.L*.H3.{values,indices,tail}` per token per layer
  (must stay flat in T) and, beside it, the retained probability mass 1 − tail of the stored rows (mean over query
  rows, heads and samples), per cached layer, and over the layers for all rows and for rows i ≥ m only (rows i < m
  keep everything by construction; mass at τ = 1). Longer samples are consecutive 256-token packed samples (consecutive
  sample ids, i.e. contiguous text) concatenated; the writer is called once per layer (one captured layer per
  forward, batch 1) to bound memory: one [1, 9, 4096, 4096] fp32 map is 600 MB.
- logits at k = 64: `topk_values` + `topk_indices` + the tail sums per token (target ≤ 300 B), and the whole shard
  file per token for the demo settings (4 cached layers, head counts [3, 2], dense fp16, top-k 64).

Every shard holds the tail sums of the `--temperatures` (τ = 1 always): 4 bytes per token (logits) and per row and
head (top-m maps) for each; dense maps hold none (they are exact at any τ). All maps are SHD-squeezed (`shd`).

    .venv/bin/python benchmarks/cache_size.py                                  # T = 256, 1024, 4096; 2 samples each
    .venv/bin/python benchmarks/cache_size.py --seq-lens 256 1024 --topk-samples 1 --dense-samples 2   # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import contiguous_window_rows  # benchmarks/ is on sys.path when run as a script
from safetensors import safe_open

from pipeline.config import load_config
from pipeline.models.loading import load_teacher
from pipeline.ops.matching import layer_map
from pipeline.stages.cache import cache_settings
from pipeline.stages.context import open_run
from pipeline.targets import kinds
from pipeline.targets.encoding import ENCODINGS, TensorSpec
from pipeline.targets.fingerprint import cache_fingerprint
from pipeline.targets.kinds.base import TargetSettings
from pipeline.targets.layout import read_header, shard_file_name
from pipeline.targets.logits import sample_tensors
from pipeline.targets.writer import write_cache_split

STUDENT_HEADS = 3
KIND = kinds.get("shd")


def map_tensors(fingerprint: dict[str, Any], layer: int, heads: int) -> dict[str, TensorSpec]:
    """The stored tensors of the SHD map of teacher layer `layer` for `heads` student heads, in the cache's encoding
    (a dense triangle; or top-m values, indices and the tail sums per τ)."""
    (spec,) = KIND.maps(layer, heads)
    return ENCODINGS[fingerprint["encoding"]].tensors(spec, fingerprint, 0)


def logit_tensors(fingerprint: dict[str, Any]) -> list[str]:
    """The stored logit targets: top-k log-probs, their token ids and the tail sums per τ (not the ids and tokens)."""
    return [name for name, spec in sample_tensors(fingerprint, 0).items() if spec.role not in ("ids", "tokens")]


def tensor_bytes(header: dict[str, Any], names: list[str]) -> int:
    """Bytes the named tensors occupy in a shard, from the header's data offsets."""
    return sum(header[name]["data_offsets"][1] - header[name]["data_offsets"][0] for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="work/demo/teacher", help="teacher directory (default the demo's)")
    parser.add_argument("--data", default="work/demo/data", help="`distill prepare` output (default the demo's)")
    parser.add_argument("--config", default="configs/demo.yaml", help="config giving the student and cache settings")
    parser.add_argument("--dense-samples", type=int, default=16, help="samples in the dense demo shard (default 16)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 4096], help="T of the topk runs")
    parser.add_argument("--topk-samples", type=int, default=2, help="samples per T for the topk runs (default 2)")
    parser.add_argument("--attn-top-m", type=int, default=32, help="kept attention entries per row (default 32)")
    parser.add_argument(
        "--temperatures", type=float, nargs="+", default=[1.0], help="cached tail-sum temperatures (default 1)"
    )
    parser.add_argument("--workdir", default=None, help="where temporary caches are written (default: system tmp)")
    args = parser.parse_args()

    started = time.perf_counter()
    temperatures = sorted({1.0, *args.temperatures})
    # What `distill cache` would cache for the config's student (its shape, data and teacher), SHD maps only.
    overrides = [
        f"teacher.path={args.teacher}",
        f"data.output_dir={args.data}",
        f"cache.attn_targets=[{KIND.name}]",
        f"cache.temperatures={temperatures}",
        "cache.dtype=float16",
    ]
    context = open_run(load_config(args.config, overrides))
    config, dims, meta = context.config, context.dims, context.meta
    train = context.splits["train"].with_format("torch", columns=["sample_id", "input_ids"])
    base_len = meta["seq_len"]
    teacher_dir = context.teacher_dir
    teacher = load_teacher(teacher_dir, dtype=torch.float32)
    vocab = context.teacher_config.vocab_size
    layers = layer_map(config.student.num_layers, dims.num_layers, "uniform")
    base_settings = dataclasses.replace(cache_settings(context), layers=tuple(layers))
    top_k = base_settings.top_k
    workdir = Path(tempfile.mkdtemp(prefix="cache-size-", dir=args.workdir))

    def write_shard(
        name: str, rows: Any, settings: TargetSettings, seq_len: int, batch: int
    ) -> tuple[Path, dict[str, Any]]:
        """One shard of `rows` (T = `seq_len`) written by `write_cache_split` with `settings`; (its path, the
        cache's fingerprint)."""
        origin = {
            **context.provenance("train"),
            "seq_len": seq_len,
            "data_fingerprint": f"{meta['fingerprint']}+T{seq_len}",
        }
        fingerprint = cache_fingerprint(
            settings, origin, teacher_num_heads=dims.num_heads, vocab_size=vocab, dtype=config.cache.dtype
        )
        directory = workdir / name
        write_cache_split(teacher, rows, directory, settings, fingerprint, shard_size=len(rows), batch_size=batch)
        return directory / shard_file_name(0), fingerprint

    try:
        # Dense, demo settings: one shard of the first samples.
        dense_rows = train.select(range(args.dense_samples))
        dense_path, dense_fingerprint = write_shard(
            "dense",
            dense_rows,
            dataclasses.replace(base_settings, head_counts=(2, 3), encoding="dense"),
            base_len,
            min(args.dense_samples, config.cache.batch_size),
        )
        header, _ = read_header(str(dense_path))
        dense_tokens = args.dense_samples * base_len
        h3_names = [name for layer in layers for name in map_tensors(dense_fingerprint, layer, STUDENT_HEADS)]
        h2_names = [name for layer in layers for name in map_tensors(dense_fingerprint, layer, 2)]
        dense_h3 = tensor_bytes(header, h3_names) / dense_tokens / len(layers)
        dense_h2 = tensor_bytes(header, h2_names) / dense_tokens / len(layers)
        naive = dims.num_heads * base_len * 4
        bound = (dims.num_heads / STUDENT_HEADS) * 2 * (2 * base_len / (base_len + 1))
        logit_names = logit_tensors(dense_fingerprint)
        logit_bytes = tensor_bytes(header, logit_names) / dense_tokens
        shard_size_bytes = dense_path.stat().st_size
        logit_dtypes = ", ".join(f"{name} {header[name]['dtype']}" for name in logit_names)

        # Top-k at several T: windows of consecutive samples, one writer call (one captured layer) per layer.
        if any(seq_len % base_len for seq_len in args.seq_lens):
            raise SystemExit(f"--seq-lens must be multiples of the packed length {base_len}")
        windows = contiguous_window_rows(train, base_len, args.seq_lens, args.topk_samples)
        topk_results = []
        for seq_len in args.seq_lens:
            rows = windows[seq_len]
            per_layer_bytes, per_layer_mass, late_mass, per_layer_seconds = [], [], [], []
            for layer in layers:
                settings = dataclasses.replace(
                    base_settings,
                    layers=(layer,),
                    head_counts=(STUDENT_HEADS,),
                    encoding="topk",
                    attn_top_m=args.attn_top_m,
                )
                start = time.perf_counter()
                path, fingerprint = write_shard(f"topk-T{seq_len}-L{layer}", rows, settings, seq_len, 1)
                per_layer_seconds.append(time.perf_counter() - start)
                header_t, _ = read_header(str(path))
                stored = map_tensors(fingerprint, layer, STUDENT_HEADS)
                per_layer_bytes.append(tensor_bytes(header_t, list(stored)) / (len(rows) * seq_len))
                # The values' companion: the tail sums at τ = 1, the mass outside the kept entries.
                mass_outside = next(spec.companion for spec in stored.values() if spec.role == "map_values")
                with safe_open(str(path), framework="pt") as shard:
                    tail = shard.get_tensor(mass_outside).double()
                per_layer_mass.append((1 - tail).mean().item())
                # Query rows i < m have at most m causal keys: all their mass is kept by construction.
                late_mass.append((1 - tail[..., args.attn_top_m :]).mean().item())
                shutil.rmtree(path.parent)
            topk_results.append((seq_len, per_layer_bytes, per_layer_mass, late_mass, sum(per_layer_seconds)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"teacher {teacher_dir} ({dims.num_layers} layers, {dims.num_heads} heads, vocab {vocab}), fp32 forward; "
        f"cached layers {layers}; SHD-squeezed maps; tail sums at τ {temperatures}; shards written by "
        "write_cache_split, sizes read from their safetensors headers"
    )
    print(f"dense, {dims.num_heads} → {STUDENT_HEADS} heads, fp16, T {base_len} ({args.dense_samples} samples):")
    print(f"  naive fp32 full maps of all {dims.num_heads} teacher heads   {naive:9.1f} B/token/layer")
    print(
        f"  attn.L*.H{STUDENT_HEADS}.shd measured                      {dense_h3:9.1f} B/token/layer   "
        f"{naive / dense_h3:6.2f}× smaller  (bound {dims.num_heads / STUDENT_HEADS:g} · 2 · 2T/(T+1) = {bound:.2f}×)"
    )
    print(f"  (attn.L*.H2.shd measured                      {dense_h2:9.1f} B/token/layer   {naive / dense_h2:6.2f}×)")
    print(
        f"topk, m = {args.attn_top_m}, {dims.num_heads} → {STUDENT_HEADS} heads "
        f"({args.topk_samples} samples per T, batch 1, one captured layer per writer call):"
    )
    layer_columns = "".join(f"{'L' + str(layer):>8s}" for layer in layers)
    print(
        f"  {'':5s} {'attn.L*.H3.shd.*':>14s} {'naive':>7s} {'':9s} | retained mass 1 − tail per row, mean over rows, "
        "heads, samples"
    )
    print(
        f"  {'T':>5s} {'B/token/layer':>14s} {'B/tok/L':>7s} {'×smaller':>9s} | {layer_columns} {'mean':>7s} "
        f"{'rows≥m':>7s} | writer s"
    )
    for seq_len, per_layer_bytes, per_layer_mass, late_mass, seconds in topk_results:
        naive_t = dims.num_heads * seq_len * 4
        low, high = min(per_layer_bytes), max(per_layer_bytes)
        byte_text = f"{low:.1f}" if low == high else f"{low:.1f}–{high:.1f}"
        mass_text = "".join(f"{mass:8.4f}" for mass in per_layer_mass)
        print(
            f"  {seq_len:5d} {byte_text:>14s} {naive_t:7d} {naive_t / high:9.1f} | {mass_text} "
            f"{sum(per_layer_mass) / len(per_layer_mass):7.4f} {sum(late_mass) / len(late_mass):7.4f} | {seconds:8.1f}"
        )
    flat = max(r[1][0] for r in topk_results) / min(r[1][0] for r in topk_results)
    print(f"  topk bytes/token, largest T ÷ smallest T: {flat:.4f} (1 = flat)")
    print(f"logits, k = {top_k} ({logit_dtypes}): {logit_bytes:.1f} B/token (target ≤ 300)")
    print(
        f"whole dense shard, demo settings (layers {layers}, heads [3, 2], fp16, top-k {top_k}, "
        f"{args.dense_samples} samples): {shard_size_bytes} bytes = {shard_size_bytes / dense_tokens:.1f} B/token"
    )
    print(f"run time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
