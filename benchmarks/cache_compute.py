"""The cache stage's compute on any device: `compute_targets` (teacher forward with capture, top-k logits with their
tail sums, the SHD squeeze — or any `--kinds` of target maps — encoding, copy to the host) ÷ a bare eager teacher
forward over the same batches, at several context lengths.

The teacher is a random model with SmolLM2-135M's shape (30 layers, 9 heads on 3 KV heads, vocab 49152), so the
script runs where the real weights are not available (a GPU node without the imported teacher); throughput does not
depend on the weights. Disk writes are not included: `cache_throughput.py` measures the whole stage with the real
teacher on the CPU.

    .venv/bin/python benchmarks/cache_compute.py --device cuda --dtype bfloat16
    .venv/bin/python benchmarks/cache_compute.py --lengths 256 --batch-tokens 2048 --repeats 2   # a CPU look
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from _common import smollm2_like_config, time_alternately  # benchmarks/ is on sys.path when run as a script
from datasets import Dataset
from transformers import LlamaForCausalLM

from pipeline.config import Config
from pipeline.models.capture import CAPTURE_ATTENTION
from pipeline.targets import kinds
from pipeline.targets.compute import compute_targets, prepare_kinds
from pipeline.targets.kinds.base import TargetSettings

CALIBRATION_SAMPLES, CALIBRATION_LEN = 16, 256
"""Random samples on which the kinds that choose something once per cache (`selective`: its teacher heads, on its
first 16 train samples) make their choice, outside the timed calls: which heads does not change the cost."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="teacher precision")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048], help="context lengths T")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per batch (batch = this ÷ T)")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 14, 21, 29], help="cached teacher layers")
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["shd"],
        choices=kinds.names(),
        help="target map kinds computed in the pass (cache.attn_targets; default shd)",
    )
    parser.add_argument("--encoding", choices=("dense", "topk"), default="dense", help="target map encoding")
    parser.add_argument(
        "--temperatures", type=float, nargs="+", default=[1.0], help="cached tail-sum temperatures (default 1)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each variant (default 5)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    config = smollm2_like_config()
    eager = LlamaForCausalLM(config).to(device, dtype).eval()
    eager.set_attn_implementation("eager")
    stage_teacher = LlamaForCausalLM(config).to(device, dtype).eval()
    stage_teacher.load_state_dict(eager.state_dict())
    stage_teacher.set_attn_implementation(CAPTURE_ATTENTION)

    temperatures = tuple(sorted({1.0, *args.temperatures}))
    # A kind's variant set by the run (the relation heads R of `relations`) takes the config's default.
    kind_variants = kinds.variants_of(args.kinds, Config().value)
    generator = torch.Generator().manual_seed(0)  # the timed batches below draw from the global generator as before
    calibration_ids = torch.randint(config.vocab_size, (CALIBRATION_SAMPLES, CALIBRATION_LEN), generator=generator)
    calibration = Dataset.from_dict({"input_ids": calibration_ids.tolist()})
    settings_by_heads = {
        head_counts: prepare_kinds(
            stage_teacher,
            calibration,
            TargetSettings(
                layers=tuple(args.layers),
                head_counts=head_counts,
                kinds=tuple(args.kinds),
                encoding=args.encoding,
                attn_top_m=32,
                top_k=64,
                temperatures=temperatures,
                dtype=torch.float16,
                variants=kind_variants,
            ),
        )[0]
        for head_counts in ((3,), (3, 2))
    }
    print(
        f"random SmolLM2-shaped teacher, {args.dtype} on {device}; cached layers {args.layers}; kinds {args.kinds}, "
        f"{args.encoding} fp16{' (m = 32)' if args.encoding == 'topk' else ''}, top-k 64, temperatures "
        f"{list(temperatures)}"
    )
    for seq_len in args.lengths:
        batch = max(1, args.batch_tokens // seq_len)
        input_ids = torch.randint(config.vocab_size, (batch, seq_len), device=device)
        for head_counts, settings in settings_by_heads.items():

            def bare_forward(input_ids: torch.Tensor = input_ids) -> None:
                with torch.no_grad():
                    eager(input_ids=input_ids)

            def cache_compute(input_ids: torch.Tensor = input_ids, settings: TargetSettings = settings) -> None:
                compute_targets(stage_teacher, input_ids, settings)

            variants: dict[str, Callable[[], None]] = {"eager": bare_forward, "cache": cache_compute}
            times = time_alternately(variants, args.repeats, device)
            tokens = batch * seq_len
            eager_s, cache_s = statistics.median(times["eager"]), statistics.median(times["cache"])
            print(
                f"T {seq_len:5d} batch {batch:3d} heads {list(head_counts)}: eager {tokens / eager_s:10,.0f} tok/s, "
                f"cache compute {tokens / cache_s:10,.0f} tok/s, ratio {eager_s / cache_s:.3f}"
            )


if __name__ == "__main__":
    main()
