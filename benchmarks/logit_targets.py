"""The teacher's sparse logit targets from its last hidden states, timed beside the output layer's own product: what
the cache stage pays for the logits' top k on a CPU.

On the last hidden states of one SDPA forward of `--batch-tokens` tokens (contiguous windows of the prepared text of
`--config`, or random tokens with `--template`):
- `product`: `output_layer(hidden)`, the whole [N, V] logits — what a bare teacher forward pays;
- `blocks`: the same product a block of `native.OUTPUT_ROW_BLOCK` × `OUTPUT_VOCAB_BLOCK` at a time into one reused
  buffer, nothing else — the product's share of the streamed path;
- `streamed`: `ops.kd.output_topk_targets` with the native kernel, each block reduced to the top k in the cache
  (what the stage runs);
- `chunked`: the path before it: `LOGIT_CHUNK_ELEMENTS` logits at a time, each chunk's top k by the kernel on the
  written logits.
Times alternate within each repeat (medians printed); the streamed and chunked targets are compared (largest value
and relative tail difference, share of indices that differ), so a speed-up that changed the targets shows.

    .venv/bin/python benchmarks/logit_targets.py                     # real teacher, 8192 tokens at T 256
    .venv/bin/python benchmarks/logit_targets.py --seq-len 1024 --repeats 5
    .venv/bin/python benchmarks/logit_targets.py --template llama3-8b --template-layers 1 --batch-tokens 2048
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from _common import time_alternately  # benchmarks/ is on sys.path when run as a script
from cache_compute import ISSUE_OVERRIDES, batch_of, load

from pipeline.ops import native
from pipeline.ops.kd import LOGIT_CHUNK_ELEMENTS, output_topk_targets, topk_targets

ROOT = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides (default: the issue's table settings)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "shakespeare.yaml")
    parser.add_argument("--template", help="a random teacher of this shape (see cache_compute.py)")
    parser.add_argument("--template-layers", type=int, help="with --template: keep this many layers")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per batch (batch = this ÷ T)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.device, args.dtype, args.overrides = "cpu", "float32", args.overrides or list(ISSUE_OVERRIDES)
    return args


def main() -> None:
    args = parse()
    if native.library() is None:
        raise SystemExit("the native kernel is not available here (no C compiler, or SHD_DISTILL_NATIVE=0)")
    teacher, settings, _, train = load(args)
    output_layer = teacher.get_output_embeddings()
    input_ids = batch_of(args, args.seq_len, teacher.config.vocab_size, train)
    with torch.no_grad():
        hidden = teacher.base_model(input_ids=input_ids, use_cache=False).last_hidden_state.flatten(0, 1)
    k, temperatures = settings.top_k, settings.temperatures
    weight = output_layer.weight
    rows, vocab = len(hidden), weight.shape[0]
    row_block, vocab_block = min(rows, native.OUTPUT_ROW_BLOCK), min(vocab, native.OUTPUT_VOCAB_BLOCK)
    buffer = torch.empty(row_block * vocab_block, dtype=weight.dtype)

    @torch.no_grad()
    def product() -> None:
        output_layer(hidden)

    @torch.no_grad()
    def blocks() -> None:
        for start in range(0, rows, row_block):
            part = hidden[start : start + row_block]
            for token in range(0, vocab, vocab_block):
                stop = min(token + vocab_block, vocab)
                torch.mm(part, weight[token:stop].T, out=buffer[: len(part) * (stop - token)].view(len(part), -1))

    def streamed() -> tuple:
        return output_topk_targets(hidden, output_layer, k, temperatures)

    @torch.no_grad()
    def chunked() -> tuple:
        step = max(1, LOGIT_CHUNK_ELEMENTS // vocab)
        parts = [
            topk_targets(output_layer(hidden[start : start + step]), k, temperatures) for start in range(0, rows, step)
        ]
        return tuple(torch.cat(part) for part in zip(*parts, strict=True))

    steps = {"product": product, "blocks": blocks, "streamed": streamed, "chunked": chunked}
    timed = time_alternately(steps, args.repeats, torch.device("cpu"))
    seconds = {name: statistics.median(values) for name, values in timed.items()}
    stream, chunks = streamed(), chunked()
    value_difference = float((stream[0] - chunks[0]).abs().max())
    tail_difference = float(((stream[2] - chunks[2]).abs() / chunks[2].abs().clamp_min(1e-30)).max())
    differing = float((stream[1] != chunks[1]).float().mean())
    print(
        f"{rows} positions (T {args.seq_len}) × {vocab} tokens, d {hidden.shape[1]}, top {k}, τ {list(temperatures)}; ",
        end="",
    )
    print(f"{args.repeats} repeats (medians)")
    print("product s  blocks s  streamed s  chunked s  streamed ÷ product  max |Δ value|  max tail Δ/tail  indices ≠")
    print(
        f"{seconds['product']:9.3f}  {seconds['blocks']:8.3f}  {seconds['streamed']:10.3f}  {seconds['chunked']:9.3f}  "
        f"{seconds['streamed'] / seconds['product']:18.2f}  {value_difference:13.2e}  {tail_difference:15.2e}  "
        f"{differing:9.2%}"
    )


if __name__ == "__main__":
    main()
