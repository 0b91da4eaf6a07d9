"""One captured layer's top-m targets, timed piece by piece beside the layer's own attention: where the cache stage's
extra time per layer goes.

On one teacher layer's post-RoPE queries and keys (`--layer`, captured from one SDPA forward of `--batch-tokens`
tokens at each context length T; the stacked map weights of the config's kinds solved as the stage solves them):
- `sdpa`: the layer's own attention, `scaled_dot_product_attention(causal, GQA)` — what the teacher forward pays;
- `kernel`: `ops.topk_maps.topk_maps` on the CPU with the native kernel (scores of 16-row tiles in cache, then
  softmax, the stacked head product, top m and tails per row) — what the stage pays per layer on top of it;
- `scores only`: the blockwise q kᵀ products alone (`attention_rows.attention_scores`, 2²² entries per block), the
  BLAS share of the torch form;
- `torch form`: `topk_maps` with the kernel off (scores, causal softmax, head product, `topk_rows`, block by block).
Times alternate within each repeat (medians printed); the kernel's and the torch form's rows are compared (largest
value difference, share of indices that differ), so a speed-up that changed the targets shows.

    .venv/bin/python benchmarks/layer_targets.py                          # real teacher, T 1024 and 8192
    .venv/bin/python benchmarks/layer_targets.py --lengths 2048 --layer 0 --repeats 5
    .venv/bin/python benchmarks/layer_targets.py --template llama3-8b --template-layers 2 --layer 1 --lengths 2048
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from _common import time_alternately  # benchmarks/ is on sys.path when run as a script
from cache_compute import ISSUE_OVERRIDES, batch_of, load, with_selected_heads
from datasets import Dataset

from pipeline.ops import native
from pipeline.ops.attention_rows import attention_scores, block_size
from pipeline.ops.topk_maps import topk_maps
from pipeline.targets import kinds
from pipeline.targets.compute import solved_kinds, stacked_weights, teacher_passes
from pipeline.targets.kinds.base import TargetSettings

ROOT = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides (default: the issue's table settings)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "shakespeare.yaml")
    parser.add_argument("--template", help="a random teacher of this shape (see cache_compute.py)")
    parser.add_argument("--template-layers", type=int, help="with --template: keep this many layers")
    parser.add_argument("--layer", type=int, default=10, help="the teacher layer whose targets are timed")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per batch (batch = this ÷ T)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.device, args.dtype, args.overrides = "cpu", "float32", args.overrides or list(ISSUE_OVERRIDES)
    return args


def layer_inputs(teacher: torch.nn.Module, settings: TargetSettings, input_ids: torch.Tensor, layer: int) -> tuple:
    """(query, key, value, scale, stacked map weights) of `layer` on `input_ids`, as the cache stage forms them."""
    needs_circuits = kinds.needs_capture(settings.kinds, "circuits")
    layer_pass = teacher_passes(teacher, input_ids, (layer,), needs_circuits)[1][layer]
    stacked = stacked_weights(layer_pass, layer, *solved_kinds(layer, layer_pass, settings))[0]
    if stacked is None:
        raise SystemExit(f"kinds {list(settings.kinds)} have no map linear in the teacher heads: nothing to time")
    return layer_pass.query, layer_pass.key, layer_pass.value, layer_pass.scale, stacked


def measure(
    args: argparse.Namespace, teacher: torch.nn.Module, settings: TargetSettings, train: Dataset | None, seq_len: int
) -> str:
    """One table row: the four timings at context length `seq_len` and how far the kernel's rows are from the torch
    form's."""
    m, temperatures = settings.attn_top_m, settings.temperatures
    input_ids = batch_of(args, seq_len, teacher.config.vocab_size, train)
    query, key, value, scale, weights = layer_inputs(teacher, settings, input_ids, args.layer)
    positions = torch.arange(seq_len)
    step = block_size(query.shape[0], query.shape[1], seq_len)

    def sdpa() -> None:
        torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=True
        )

    def kernel() -> tuple:
        return topk_maps(query, key, scale, positions, weights, m, temperatures)

    def scores_only() -> None:
        for start in range(0, seq_len, step):
            attention_scores(query, key, scale, positions[start : start + step])

    def torch_form() -> tuple:
        loaded, native.library = native.library, lambda: None
        try:
            return kernel()
        finally:
            native.library = loaded

    steps = {"sdpa": sdpa, "kernel": kernel, "scores only": scores_only, "torch form": torch_form}
    timed = time_alternately(steps, args.repeats, torch.device("cpu"))
    seconds = {name: statistics.median(values) for name, values in timed.items()}
    fused, reference = kernel(), torch_form()
    difference = float((fused[0] - reference[0]).abs().max())
    differing = float((fused[1] != reference[1]).float().mean())
    return (
        f"{seq_len:5d}  {len(input_ids):5d}  {seconds['sdpa']:7.3f}  {seconds['kernel']:8.3f}  "
        f"{seconds['scores only']:13.3f}  {seconds['torch form']:12.3f}  {seconds['kernel'] / seconds['sdpa']:13.2f}  "
        f"{difference:13.2e}  {differing:9.2%}"
    )


def main() -> None:
    args = parse()
    if native.library() is None:
        raise SystemExit("the native kernel is not available here (no C compiler, or SHD_DISTILL_NATIVE=0)")
    teacher, settings, _, train = load(args)
    settings = with_selected_heads(teacher, settings, teacher.config.vocab_size)
    print(f"layer {args.layer}; kinds {list(settings.kinds)}; head counts {list(settings.head_counts)}; ", end="")
    print(f"top m {settings.attn_top_m}; {args.batch_tokens} tokens per batch; {args.repeats} repeats (medians)")
    print("    T  batch   sdpa s  kernel s  scores only s  torch form s  kernel ÷ sdpa  max |Δ value|  indices ≠")
    for seq_len in args.lengths:
        print(measure(args, teacher, settings, train, seq_len), flush=True)


if __name__ == "__main__":
    main()
