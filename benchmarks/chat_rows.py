"""What the cache keeps of chat data's attention targets: at each `cache.attn_row_fraction`, the share of stored rows
that carry a loss (rows predicting a reply token) when they are drawn among those rows, against the position strata
text data uses, the share of trained rows covered, and the planner's bytes per token of the compact form (top-m 16,
8-bit values and logits) — no teacher runs.

    .venv/bin/python benchmarks/chat_rows.py configs/demo.yaml --fractions 1 0.75 0.5 0.25 --samples 2000
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_config
from pipeline.data.prepare import load_prepared
from pipeline.models.loading import load_teacher_config
from pipeline.stages.cache import cache_settings, shape_context
from pipeline.targets.fingerprint import cache_fingerprint, format_fields
from pipeline.targets.logits import trained_positions
from pipeline.targets.plan import bytes_per_token
from pipeline.targets.rows import stored_row_count, stored_rows

COMPACT = ("cache.encoding=topk", "cache.attn_top_m=16", "cache.attn_value_bits=8", "cache.logit_value_bits=8")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a chat config whose data is prepared (configs/demo.yaml)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--samples", type=int, default=2000, help="train samples the shares are measured on")
    return parser.parse_args()


def planned_bytes(config_path: Path, fraction: float) -> float:
    """Bytes per token `distill cache --plan` gives the config in the compact form at `fraction`."""
    config = load_config(config_path, [*COMPACT, f"cache.attn_row_fraction={fraction}"])
    teacher_config = load_teacher_config(config.teacher.path)
    context = shape_context(config, teacher_config)
    fingerprint = cache_fingerprint(
        cache_settings(context),
        {"seq_len": config.data.seq_len, **format_fields(config.data.format)},
        teacher_num_heads=context.dims.num_heads,
        vocab_size=teacher_config.vocab_size,
        dtype=config.cache.dtype,
    )
    return bytes_per_token(fingerprint)


def main() -> None:
    args = parse_args()
    config = load_config(args.config)
    splits, meta = load_prepared(config.data.output_dir)
    if meta.get("data_format", "text") == "text":
        raise SystemExit(f"{config.data.output_dir}: text data; this benchmark reads chat data's response mask")
    rows = splits["train"].with_format("torch", columns=["sample_id", "response_mask"])[: args.samples]
    ids, trained = rows["sample_id"], trained_positions(rows["response_mask"])
    seq_len = trained.shape[1]
    print(f"{len(ids)} train samples of {seq_len} tokens; trained share of positions {trained.float().mean():.3f}")
    print(
        "| f | rows R | stored rows trained (drawn among trained) | (position strata) | trained rows covered "
        "| compact bytes/token |"
    )
    print("|---|---|---|---|---|---|")
    for fraction in args.fractions:
        among = trained.gather(1, stored_rows(ids, seq_len, fraction, trained))
        strata = trained.gather(1, stored_rows(ids, seq_len, fraction))
        covered = among.sum().item() / trained.sum().item()
        print(
            f"| {fraction:g} | {stored_row_count(seq_len, fraction)} | {among.float().mean():.3f} | "
            f"{strata.float().mean():.3f} | {covered:.3f} | {planned_bytes(args.config, fraction):,.0f} |"
        )


if __name__ == "__main__":
    main()
