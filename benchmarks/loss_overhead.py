"""What the distillation losses cost on top of plain language-model training: step time and peak memory, side by side.

For every context length T (batch = --batch-tokens ÷ T, so every batch holds about the same tokens), forward +
backward of the student on one batch with

- CE only: `kd.cross_entropy` of the logits, as plain language-model training computes it;
- CE + KD: the objective's CE and top-k KD terms (`pipeline.objective.terms`: one fused pass over the vocabulary with a
  hand-written backward, which keeps no [B, T, V] log-probabilities and so peaks lower than plain cross_entropy);
  "vs KD" in the table is CE + KD + attention ÷ this, the attention term's own share;
- CE + KD + attention: the same plus the attention KL of every matched layer as the trainer builds it — the student
  keeps SDPA, its layers record post-RoPE q and k, and `map_losses.map_loss_sum` recomputes the scores in row blocks
  (checkpointed) against the targets as the reader serves them: dense packed triangles by default, or with
  `--encoding topk` the top m entries of every row with their tail sums.

Each loss is Σ_terms w · (sum over its units ÷ its unit count), as `Trainer.train_step` forms it on one rank, and
its backward runs as the trainer's (one backward of Σ factors · term sums).
Targets are random (costs depend on shapes, not values), stored through the cache's own writers
(`_common.stored_maps`, `_common.stored_random_logits`) and converted by `stream.training_batch` with the fingerprint
of those settings, exactly the form a cached batch has.

Time: the variants alternate within every repeat (`_common.time_alternately`); medians and their ratios are printed.
Peak memory: one fresh process per (T, variant) builds the student and the batch, runs one warm-up step, then
measures one step (`_common.PeakMemory`: the CPU's resident-set high-water mark reset right before the step, or
`torch.cuda.max_memory_allocated`). "peak" is what the process holds at the step's peak above what it held before
the model and batch existed (model, gradients, batch, activations, loss temporaries; the CE-only batch holds only
tokens and labels, as plain training's does, so the targets count against distillation); "step" is the step's own
transient memory above what was resident just before it. Issue targets at T = 2048: time ≤ 1.25×, peak ≤ 1.2×.

    .venv/bin/python benchmarks/loss_overhead.py                     # demo student, T 256 / 1024 / 2048, dense
    .venv/bin/python benchmarks/loss_overhead.py --encoding topk     # top-m attention targets (m = 32)
    .venv/bin/python benchmarks/loss_overhead.py --device cuda --dtype bfloat16
    .venv/bin/python benchmarks/loss_overhead.py --seq-lens 64 --batch-tokens 128 --repeats 2   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import (  # benchmarks/ is on sys.path when run as a script
    PeakMemory,
    measure_in_child,
    megabytes,
    random_causal_maps,
    report_memory,
    smollm2_like_config,
    stored_maps,
    stored_random_logits,
    time_alternately,
)
from torch import nn

from pipeline.infra.runtime import to_device
from pipeline.models.loading import build_student
from pipeline.objective.loss import Objective
from pipeline.objective.terms.attention import AttentionKD
from pipeline.objective.terms.ce import CrossEntropy
from pipeline.objective.terms.kd import LogitKD
from pipeline.ops.kd import cross_entropy
from pipeline.ops.matching import layer_map
from pipeline.targets.encoding import EncodeOptions
from pipeline.targets.fingerprint import cache_fingerprint
from pipeline.targets.kinds.base import TargetSettings
from pipeline.targets.needs import MapNeed, TargetNeeds
from pipeline.targets.stream import training_batch

VARIANTS = {"ce": "CE only", "kd": "CE + KD", "full": "CE + KD + attention"}
KIND = "shd"
"""The target kind of every matched layer."""


def attention_needs(args: argparse.Namespace) -> tuple[MapNeed, ...]:
    """The SHD target of every student layer: layers of the SmolLM2-shaped teacher by the uniform layer map."""
    teacher_layers = smollm2_like_config().num_hidden_layers
    return tuple(MapNeed(KIND, layer, args.heads) for layer in layer_map(args.layers, teacher_layers, "uniform"))


def objectives(args: argparse.Namespace) -> dict[str, Objective]:
    """The distillation variants as objectives of the trainer's terms (all weights 1, τ = 1)."""
    logit_terms = [CrossEntropy(1.0), LogitKD(1.0, 1.0, args.top_k)]
    return {
        "kd": Objective(logit_terms),
        "full": Objective([*logit_terms, AttentionKD(1.0, attention_needs(args), kind="kl")]),
    }


def target_fingerprint(args: argparse.Namespace, seq_len: int, needs: TargetNeeds) -> dict[str, Any]:
    """The fingerprint of a cache holding exactly `needs` at T = `seq_len` in `--encoding` (fp16, τ = 1, m capped at
    T): what `training_batch` decodes the stored tensors by."""
    settings = TargetSettings(
        layers=needs.layers(),
        head_counts=(args.heads,),
        kinds=needs.kinds(),
        encoding=args.encoding,
        attn_top_m=min(args.attn_top_m, seq_len),
        top_k=args.top_k,
        temperatures=(1.0,),
        dtype=torch.float16,
    )
    teacher = smollm2_like_config()
    return cache_fingerprint(
        settings,
        {"seq_len": seq_len},
        teacher_num_heads=teacher.num_attention_heads,
        vocab_size=teacher.vocab_size,
        dtype="float16",
    )


def make_batch(
    args: argparse.Namespace, seq_len: int, batch: int, device: torch.device, *, targets: bool = True
) -> dict[str, Any]:
    """A batch in the reader's form with random targets: top-k logits and every matched layer's target map; with
    `targets=False` only the tokens and labels (what plain language-model training holds)."""
    generator = torch.Generator().manual_seed(seq_len)
    needs = objectives(args)["full"].needs()
    fingerprint = target_fingerprint(args, seq_len, needs)
    vocab = fingerprint["vocab_size"]
    raw = {
        "sample_ids": torch.arange(batch),
        "input_ids": torch.randint(vocab, (batch, seq_len), generator=generator, dtype=torch.int32),
        **stored_random_logits(batch, seq_len, vocab, args.top_k, (1.0,), torch.float16, 16, generator),
    }
    options = EncodeOptions(fingerprint["attn_top_m"] or 1, torch.float16, (1.0,), 16, seq_len)
    for name, _ in needs.reads():
        maps = random_causal_maps(batch, args.heads, seq_len, generator)
        raw.update(stored_maps(name, maps, args.encoding, options))
    converted = training_batch(raw, torch.arange(batch), needs, fingerprint)
    if not targets:
        converted = {key: converted[key] for key in ("input_ids", "labels")}
    return to_device(converted, device)


def build(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The student: the demo's shape by default, on the SmolLM2 vocabulary, SDPA outside captures."""
    student = build_student(
        smollm2_like_config(),
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        seed=0,
    )
    return student.to(device=device, dtype=getattr(torch, args.dtype)).train()


def step_function(variant: str, student: nn.Module, batch: dict[str, Any], args: argparse.Namespace) -> Callable:
    """Forward + backward of `variant` on `batch` (gradients accumulate into the student's `.grad`)."""
    if variant == "ce":

        def ce_only() -> None:
            logits = student(input_ids=batch["input_ids"], use_cache=False).logits
            cross_entropy(logits, batch["labels"]).backward()

        return ce_only
    objective = objectives(args)[variant]
    factors = (objective.weights(0) / objective.counts(batch).clamp_min(1)).float().to(batch["input_ids"].device)

    def distil() -> None:
        with objective.forward(student, student, batch) as forward:
            loss = (objective.sums(forward) * factors).sum()
            loss.backward()

    return distil


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: build one (T, variant), warm up, measure one step's peak, report it."""
    seq_len, variant = args.memory_of.split(":")
    seq_len = int(seq_len)
    device = torch.device(args.device)
    meter = PeakMemory(device)
    meter.start()
    student = build(args, device)
    batch = make_batch(args, seq_len, max(1, args.batch_tokens // seq_len), device, targets=variant != "ce")
    step = step_function(variant, student, batch, args)
    step()
    student.zero_grad(set_to_none=True)
    meter.reset()
    step()
    report_memory(meter.figures())


def measure_memory(args: argparse.Namespace) -> dict[tuple[int, str], dict[str, int]]:
    """(T, variant) → figures of a fresh child process each, one at a time."""
    figures = {}
    for seq_len in args.seq_lens:
        for variant in VARIANTS:
            figures[seq_len, variant] = measure_in_child(__file__, f"{seq_len}:{variant}", args.child_timeout)
    return figures


def measure_time(args: argparse.Namespace, device: torch.device) -> dict[int, dict[str, list[float]]]:
    """T → variant name → seconds per repeat, the variants alternating on one student and one batch per T."""
    student = build(args, device)
    times = {}
    for seq_len in args.seq_lens:
        batch = make_batch(args, seq_len, max(1, args.batch_tokens // seq_len), device)
        variants = {name: step_function(variant, student, batch, args) for variant, name in VARIANTS.items()}
        times[seq_len] = time_alternately(
            variants, args.repeats, device, after_each=lambda: student.zero_grad(set_to_none=True)
        )
        del batch, variants
    return times


def print_tables(
    args: argparse.Namespace,
    times: dict[int, dict[str, list[float]]] | None,
    memory: dict[tuple[int, str], dict[str, int]] | None,
) -> None:
    """The table CE only vs CE + KD + attention, with the attention term's own share (full ÷ CE + KD) beside each
    ratio; then the details."""
    ce, full, kd = VARIANTS["ce"], VARIANTS["full"], VARIANTS["kd"]

    def median_ms(seq_len: int, name: str) -> float:
        return statistics.median(times[seq_len][name]) * 1000

    def peak(seq_len: int, variant: str, over: str = "baseline") -> int:
        figures = memory[seq_len, variant]
        return figures["peak"] - figures[over]

    print(
        f"{'T':>6s} {'batch':>5s} | {'CE ms':>9s} {'full ms':>9s} {'ratio':>6s} {'vs KD':>6s} | {'CE MB':>9s} "
        f"{'full MB':>9s} {'ratio':>6s} {'vs KD':>6s}"
    )
    for seq_len in args.seq_lens:
        cells = [f"{seq_len:6d} {max(1, args.batch_tokens // seq_len):5d}"]
        if times is not None:
            ce_ms, full_ms, kd_ms = (median_ms(seq_len, name) for name in (ce, full, kd))
            cells.append(f"{ce_ms:9.1f} {full_ms:9.1f} {full_ms / ce_ms:6.3f} {full_ms / kd_ms:6.3f}")
        else:
            cells.append(f"{'-':>9s} {'-':>9s} {'-':>6s} {'-':>6s}")
        if memory is not None:
            ce_mb, full_mb, kd_mb = (peak(seq_len, variant) for variant in ("ce", "full", "kd"))
            cells.append(f"{megabytes(ce_mb)} {megabytes(full_mb)} {full_mb / ce_mb:6.3f} {full_mb / kd_mb:6.3f}")
        print(" | ".join(cells))
    print(
        "ratio: CE + KD + attention ÷ CE only (targets at T = 2048: time ≤ 1.25, peak memory ≤ 1.2); vs KD: "
        "CE + KD + attention ÷ CE + KD, the attention term's own share (the fused CE + KD pass keeps no [B, T, V] "
        "log-probabilities for its backward, plain cross_entropy does)"
    )
    if times is not None:
        print(f"time, median of {args.repeats} (min in brackets); same-repeat ratio median:")
        for seq_len in args.seq_lens:
            parts = []
            for name in VARIANTS.values():
                values = times[seq_len][name]
                parts.append(f"{name} {statistics.median(values) * 1000:.1f} ({min(values) * 1000:.1f}) ms")
            paired = [f / c for f, c in zip(times[seq_len][full], times[seq_len][ce], strict=True)]
            paired_kd = [f / c for f, c in zip(times[seq_len][full], times[seq_len][kd], strict=True)]
            print(
                f"  T {seq_len:5d}: {'; '.join(parts)}; full ÷ CE {statistics.median(paired):.3f}, full ÷ CE + KD "
                f"{statistics.median(paired_kd):.3f} (same-repeat)"
            )
    if memory is not None:
        print("memory, MB (peak: above the process before model and batch; step: above the RSS just before the step):")
        for seq_len in args.seq_lens:
            parts = [
                f"{name} peak {megabytes(peak(seq_len, variant)).strip()} "
                f"step {megabytes(peak(seq_len, variant, 'before')).strip()}"
                for variant, name in VARIANTS.items()
            ]
            step_ratio = peak(seq_len, "full", "before") / peak(seq_len, "kd", "before")
            print(f"  T {seq_len:5d}: {'; '.join(parts)}; step full ÷ CE + KD {step_ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="student layers, all matched (default 4)")
    parser.add_argument("--hidden", type=int, default=384, help="student width (default 384)")
    parser.add_argument("--heads", type=int, default=3, help="student heads (default 3)")
    parser.add_argument("--kv-heads", type=int, default=1, help="student KV heads (default 1)")
    parser.add_argument("--intermediate", type=int, default=1024, help="student MLP width (default 1024)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 2048], help="context lengths T")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="tokens per batch: batch = this ÷ T")
    parser.add_argument("--top-k", type=int, default=64, help="cached teacher logits per token (default 64)")
    parser.add_argument("--encoding", choices=("dense", "topk"), default="dense", help="attention target encoding")
    parser.add_argument("--attn-top-m", type=int, default=32, help="kept entries per row with topk (default 32)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of each variant (default 7)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="student precision")
    parser.add_argument("--measure", nargs="+", choices=("time", "memory"), default=["time", "memory"])
    parser.add_argument("--child-timeout", type=float, default=900, help="seconds per memory child (default 900)")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of is not None:
        memory_child(args)
        return

    began = time.perf_counter()
    device = torch.device(args.device)
    torch.manual_seed(0)
    parameters = sum(p.numel() for p in build(args, torch.device("cpu")).parameters())
    print(
        f"student {args.layers} layers × {args.hidden} hidden, {args.heads} heads on {args.kv_heads} KV, "
        f"intermediate {args.intermediate}, vocab {smollm2_like_config().vocab_size} ({parameters / 1e6:.1f}M "
        f"parameters); {args.layers} matched layers, {args.encoding} attention targets"
        f"{f' (m = {args.attn_top_m})' if args.encoding == 'topk' else ''}, top-k {args.top_k}; about "
        f"{args.batch_tokens} tokens a batch; {args.dtype} on {device}"
        f"{'' if device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}"
    )
    times = measure_time(args, device) if "time" in args.measure else None
    memory = measure_memory(args) if "memory" in args.measure else None
    print_tables(args, times, memory)
    print(f"whole benchmark {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
