"""What the distillation losses cost on top of plain language-model training, measured side by side.

Times forward + backward of a student step with (CE + sparse top-k KD + SHD attention KL on every matched layer)
against the same step with CE alone, on the same batch, alternating the two so that machine noise hits both alike.
Prints the medians and their ratio (issue target: ≤ 1.25).

    .venv/bin/python benchmarks/loss_overhead.py            # student 4 × 256, T = 256, batch 8, vocab 49152
    .venv/bin/python benchmarks/loss_overhead.py --repeats 3 --batch 2 --seq-len 64   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from timing import time_alternately  # benchmarks/ is on sys.path when run as a script
from transformers import LlamaConfig

from pipeline.attention import AttentionCapture
from pipeline.kd import cross_entropy, logit_losses, topk_targets
from pipeline.models import build_student
from pipeline.shd import attention_loss


def smollm2_like_config() -> LlamaConfig:
    """The real teacher's geometry (SmolLM2-135M: 30 layers, 9 heads on 3 KV heads, vocab 49152); no weights."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


def random_causal_maps(batch: int, heads: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Row-stochastic causal maps [B, H, T, T] standing in for cached squeezed teacher targets."""
    scores = torch.randn(batch, heads, seq_len, seq_len, generator=generator)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="student layers, all matched (default 4)")
    parser.add_argument("--hidden", type=int, default=256, help="student width (default 256)")
    parser.add_argument("--heads", type=int, default=4, help="student heads (default 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="sequence length (default 256)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--top-k", type=int, default=64, help="cached teacher logits per token (default 64)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of each variant (default 7)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="student precision")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    teacher_config = smollm2_like_config()
    student = (
        build_student(teacher_config, num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads, seed=0)
        .to(device=device, dtype=dtype)
        .train()
    )
    vocab = teacher_config.vocab_size
    input_ids = torch.randint(vocab, (args.batch, args.seq_len), generator=generator)
    labels = torch.cat([input_ids[:, 1:], torch.full((args.batch, 1), -100)], dim=1)
    mask = torch.ones(args.batch, args.seq_len, dtype=torch.bool)
    topk_values, topk_indices, tail_mass = topk_targets(torch.randn(args.batch, args.seq_len, vocab), args.top_k)
    input_ids, labels, mask = input_ids.to(device), labels.to(device), mask.to(device)
    topk_values, topk_indices, tail_mass = topk_values.half().to(device), topk_indices.to(device), tail_mass.to(device)
    layers = list(range(args.layers))
    targets = {
        layer: random_causal_maps(args.batch, args.heads, args.seq_len, generator).to(device) for layer in layers
    }

    def ce_only() -> None:
        logits = student(input_ids=input_ids).logits
        cross_entropy(logits, labels).backward()

    def full_distillation() -> None:
        with AttentionCapture(student, layers) as capture:
            logits = student(input_ids=input_ids).logits
        ce, kd = logit_losses(logits, labels, topk_values, topk_indices, tail_mass, mask)
        attention = [attention_loss(capture.maps[layer], targets[layer], mask) for layer in layers]
        (ce + kd + torch.stack(attention).mean()).backward()

    variants: dict[str, Callable[[], None]] = {"CE only": ce_only, "CE + KD + SHD": full_distillation}
    times = time_alternately(variants, args.repeats, device, after_each=lambda: student.zero_grad(set_to_none=True))

    parameters = sum(p.numel() for p in student.parameters())
    print(
        f"student {args.layers} layers × {args.hidden} hidden, {args.heads} heads, vocab {vocab} "
        f"({parameters / 1e6:.1f}M parameters); batch {args.batch} × T {args.seq_len}; "
        f"{args.layers} matched layers; top-k {args.top_k}; {args.dtype} on {device}"
        f"{'' if device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}; "
        f"median of {args.repeats}"
    )
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"  {name:14s} fwd+bwd {value * 1000:8.1f} ms   (min {min(times[name]) * 1000:.1f} ms)")
    print(f"loss overhead ratio (CE + KD + SHD) / CE = {medians['CE + KD + SHD'] / medians['CE only']:.3f}")


if __name__ == "__main__":
    main()
