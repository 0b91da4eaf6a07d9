"""How fast the target-cache reader serves training batches, against how fast a demo student step consumes them.

Builds a cache of the demo's shape — synthetic shards of valid targets with exactly the tensors the layout schema
(`layout.expected_tensors`) names for the demo (4 cached layers, SHD targets for head counts [3, 2] of a 9-head
teacher with their α, T 256, fp16 packed triangles — or with `--encoding topk` top-m rows with their tail sums and
bit-packed key indices —, top-k 64 over a 49152 vocabulary with bit-packed token ids and the tail mass; 320 samples
in shards of 64, like `cache.max_samples`), stored through the cache's own writers (`_common.stored_maps`: the
encoding's `MapWriter`; `_common.stored_random_logits`: `logits.stored_logit_tensors`) from random logits (of 4
samples, repeated) and random row-stochastic maps: the reader's cost depends on shapes and bytes, not values. A
compact cache (`--encoding topk --row-fraction 0.25 --value-bits 8`: the attention targets of a quarter of each
sample's query rows, `cache.attn_row_fraction`, and 8-bit log-probability codes for the top-m values and the logits,
`cache.attn_value_bits` and `cache.logit_value_bits`) shows what the loader pays to decode codes and packed indices
(the issue's bar: loader wait < 5 % of the step). Then times
`TargetStream` (the needs of a 3-head student matched to the 4 layers: its SHD maps and the logits at τ = 1; batch 8,
shuffled, checksums on) through a `DataLoader(batch_size=None)` with and without its
prefetch thread and with 0 and 2 workers, in two states (a batch is then final: the loss expands dense triangles block
by block on the consumer's device, inside the student step below):

- first epoch: the process has not checksummed any shard yet (every shard is hashed once per process, per worker),
- steady: every shard already verified (what an endless training stream sees after its first pass).

Beside it, one forward + backward of the demo student (`loading.build_student` from the teacher's config: 4
layers × 384 hidden, 3 heads on 1 KV head, intermediate 1024, tied 49152 vocabulary) on a batch from the stream with
the trainer's terms CE + top-k KD + attention KL (`pipeline.objective.terms`): its samples/s is what training consumes.
Runs alternate, medians are printed, with the ratio reader ÷ consumption (the reader must be far faster) and one
batch's read time ÷ the student step (what the step would wait for the loader if nothing overlapped: workers 0,
prefetch off). Shards are read right after being written, so from the page cache: the figures are those of a warm
cache, not of a cold disk.

    .venv/bin/python benchmarks/reader_throughput.py                   # demo shape, 7 repeats
    .venv/bin/python benchmarks/reader_throughput.py --encoding topk --row-fraction 0.25 --value-bits 8   # compact
    .venv/bin/python benchmarks/reader_throughput.py --samples 64 --shard-size 32 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import random_causal_maps, stored_maps, stored_random_logits  # benchmarks/ is on sys.path as a script
from torch.utils.data import DataLoader
from transformers import AutoConfig

from pipeline.models.loading import build_student
from pipeline.objective.loss import Objective
from pipeline.objective.terms.attention import AttentionKD
from pipeline.objective.terms.ce import CrossEntropy
from pipeline.objective.terms.kd import LogitKD
from pipeline.targets import store
from pipeline.targets.codecs import bits_for, pack_bits
from pipeline.targets.encoding import EncodeOptions
from pipeline.targets.fingerprint import cache_fingerprint, provenance
from pipeline.targets.kinds.base import TargetSettings
from pipeline.targets.layout import (
    LAYOUT_VERSION,
    STORED_DTYPES,
    cached_maps,
    expected_tensors,
    shard_bytes,
    shard_file_name,
)
from pipeline.targets.manifest import Manifest, ShardEntry, sha256_bytes, write_manifest
from pipeline.targets.needs import MapNeed
from pipeline.targets.rows import ROWS_TENSOR, stored_rows, stores_rows
from pipeline.targets.stream import TargetStream

KIND = "shd"
"""The target kind of the cache and of the student's attention term."""
LOGIT_ROWS = 4
"""Samples of random logits [rows, T, vocab] reduced to top-k targets; every shard repeats them (computing them for
every sample would take most of the set-up, and the reader's cost depends on bytes, not values)."""


def random_logit_targets(fingerprint: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The stored logit targets of `LOGIT_ROWS` samples of random teacher logits, in the fingerprint's form."""
    return stored_random_logits(
        LOGIT_ROWS,
        fingerprint["seq_len"],
        fingerprint["vocab_size"],
        fingerprint["top_k"],
        tuple(fingerprint["temperatures"]),
        getattr(torch, fingerprint["dtype"]),
        fingerprint["logit_value_bits"],
        generator,
    )


def synthetic_shard(
    first: int, rows: int, fingerprint: dict, logit_block: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Every tensor of one shard of a cache with `fingerprint`, in the writer's on-disk names, dtypes and shapes,
    stored by the cache's own writers from random teacher outputs (the logit targets `logit_block` repeated) at the
    stored rows of each sample (`rows.stored_rows`, as the cache stage picks them); checked against the layout
    schema."""
    seq_len, vocab = fingerprint["seq_len"], fingerprint["vocab_size"]
    repeated = torch.arange(rows) % LOGIT_ROWS
    tensors = {name: tensor[repeated] for name, tensor in logit_block.items()}
    tensors["sample_ids"] = torch.arange(first, first + rows, dtype=torch.int64)
    tensors["input_ids"] = torch.randint(0, vocab, (rows, seq_len), generator=generator, dtype=torch.int32)
    positions = None
    if stores_rows(fingerprint["attn_row_fraction"], fingerprint["attn_targets"]):
        positions = stored_rows(tensors["sample_ids"], seq_len, fingerprint["attn_row_fraction"])
        tensors[ROWS_TENSOR] = pack_bits(positions, bits_for(seq_len))
    options = EncodeOptions(
        fingerprint["attn_top_m"] or 1,
        getattr(torch, fingerprint["dtype"]),
        tuple(fingerprint["temperatures"]),
        fingerprint["attn_value_bits"],
        seq_len,
    )
    for spec in cached_maps(fingerprint):
        maps = random_causal_maps(rows, spec.heads, seq_len, generator)
        tensors.update(stored_maps(spec.name, maps, fingerprint["encoding"], options, positions))
    specs = expected_tensors(fingerprint, rows)
    for name, spec in specs.items():
        if spec.role == "alpha":  # the kind's per-sample extras: weights in [0, 1]
            tensors[name] = torch.rand(spec.shape, generator=generator)
    found = {name: (STORED_DTYPES[tensor.dtype], tuple(tensor.shape)) for name, tensor in tensors.items()}
    wanted = {name: (spec.dtype, spec.shape) for name, spec in specs.items()}
    if found != wanted:
        raise RuntimeError(
            f"synthetic shard differs from the layout schema: {sorted(set(found.items()) ^ set(wanted.items()))}"
        )
    return tensors


def write_demo_cache(directory: Path, args: argparse.Namespace, teacher_heads: int, vocab: int) -> int:
    """A complete cache of the demo's shape under `directory`; returns its size in bytes."""
    directory.mkdir(parents=True)
    settings = TargetSettings(
        layers=tuple(args.layers),
        head_counts=tuple(args.head_counts),
        kinds=(KIND,),
        encoding=args.encoding,
        attn_top_m=args.attn_top_m,
        top_k=args.top_k,
        temperatures=(1.0,),
        dtype=torch.float16,
        row_fraction=args.row_fraction,
        attn_value_bits=args.value_bits if args.encoding == "topk" else 16,
        logit_value_bits=args.value_bits,
    )
    data_meta = {"tokenizer_fingerprint": "synthetic", "fingerprint": "synthetic", "seq_len": args.seq_len}
    fingerprint = cache_fingerprint(
        settings,
        provenance(data_meta, "train", "synthetic"),
        teacher_num_heads=teacher_heads,
        vocab_size=vocab,
        dtype="float16",
    )
    manifest = Manifest(fingerprint=fingerprint, num_samples=args.samples, shard_size=args.shard_size, complete=True)
    generator = torch.Generator().manual_seed(0)
    logit_block = random_logit_targets(fingerprint, generator)
    for index, first in enumerate(range(0, args.samples, args.shard_size)):
        rows = min(args.shard_size, args.samples - first)
        tensors = synthetic_shard(first, rows, fingerprint, logit_block, generator)
        data = shard_bytes(tensors, {"layout_version": LAYOUT_VERSION, "first_sample": first, "num_samples": rows})
        (directory / shard_file_name(index)).write_bytes(data)
        entry = ShardEntry(shard_file_name(index), first, rows, len(data), sha256_bytes(data), first, first + rows - 1)
        manifest.shards.append(entry)
    write_manifest(directory, manifest)
    return sum(entry.bytes for entry in manifest.shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="work/demo/teacher", help="teacher directory whose config shapes it all")
    parser.add_argument("--samples", type=int, default=320, help="samples in the cache (default 320, the demo's)")
    parser.add_argument("--shard-size", type=int, default=64, help="samples per shard (default 64)")
    parser.add_argument("--seq-len", type=int, default=256, help="T (default 256)")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 14, 21, 29], help="cached teacher layers")
    parser.add_argument("--head-counts", type=int, nargs="+", default=[3, 2], help="cached student head counts")
    parser.add_argument("--heads", type=int, default=3, help="student heads read by the stream (default 3)")
    parser.add_argument("--top-k", type=int, default=64, help="cached logits per token (default 64)")
    parser.add_argument("--encoding", choices=("dense", "topk"), default="dense", help="target map encoding")
    parser.add_argument("--attn-top-m", type=int, default=32, help="kept entries per row with topk (default 32)")
    parser.add_argument(
        "--row-fraction", type=float, default=1.0, help="share of query rows stored, topk only (default 1: all)"
    )
    parser.add_argument(
        "--value-bits",
        type=int,
        choices=(16, 8),
        default=16,
        help="16-bit values or 8-bit codes of the logits and, with topk, of the attention values (default 16)",
    )
    parser.add_argument("--batch", type=int, default=8, help="micro-batch (default 8)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of every variant (default 7)")
    parser.add_argument("--workdir", default=None, help="where the cache is written (default: system tmp)")
    args = parser.parse_args()
    if not 0 < args.row_fraction <= 1:
        parser.error(f"--row-fraction {args.row_fraction}: expected a fraction in (0, 1]")
    if args.row_fraction < 1 and args.encoding != "topk":
        parser.error(f"--row-fraction {args.row_fraction}: a dense cache stores every row; add --encoding topk")

    torch.manual_seed(0)
    teacher_config = AutoConfig.from_pretrained(args.teacher, local_files_only=True)
    teacher_heads, vocab = teacher_config.num_attention_heads, teacher_config.vocab_size
    workdir = Path(tempfile.mkdtemp(prefix="reader-throughput-", dir=args.workdir))
    directory = workdir / "train"
    start = time.perf_counter()
    cache_bytes = write_demo_cache(directory, args, teacher_heads, vocab)
    build_seconds = time.perf_counter() - start
    batches_per_epoch = -(-args.samples // args.batch)
    shard_paths = [directory / shard_file_name(index) for index in range(-(-args.samples // args.shard_size))]

    # The trainer's terms for a student matched to the cached layers (all weights 1, τ = 1).
    needed = tuple(MapNeed(KIND, layer, args.heads) for layer in args.layers)
    objective = Objective([CrossEntropy(1.0), LogitKD(1.0, 1.0, args.top_k), AttentionKD(1.0, needed)])

    def stream(prefetch: bool) -> TargetStream:
        return TargetStream(
            directory=directory,
            needs=objective.needs(),
            batch_size=args.batch,
            num_batches=batches_per_epoch,
            verify_checksums=True,
            prefetch=prefetch,
        )

    def read_epoch(prefetch: bool, workers: int, verified: bool) -> float:
        """Seconds to read one epoch of batches from a fresh stream."""
        store._verified_shards.clear()
        if verified:  # in this process, so forked workers inherit it too
            manifest = store.open_cache(directory)
            for path, entry in zip(shard_paths, manifest.shards, strict=True):
                store._verify_once(path, entry)
        loader = DataLoader(stream(prefetch), batch_size=None, num_workers=workers)
        start = time.perf_counter()
        served = 0
        for batch in loader:
            served += len(batch["sample_ids"])
        seconds = time.perf_counter() - start
        if served != args.samples:
            raise RuntimeError(f"the stream served {served} samples, expected {args.samples}")
        return seconds

    student = build_student(
        teacher_config,
        num_layers=4,
        hidden_size=384,
        num_heads=3,
        num_kv_heads=1,
        intermediate_size=1024,
        seed=0,
    ).train()
    sample_batch = next(iter(stream(prefetch=False)))
    factors = (objective.weights(0) / objective.counts(sample_batch).clamp_min(1)).float()

    def student_step() -> float:
        start = time.perf_counter()
        with objective.forward(student, student, sample_batch) as forward:
            loss = (objective.sums(forward) * factors).sum()
            loss.backward()
        seconds = time.perf_counter() - start
        student.zero_grad(set_to_none=True)
        return seconds

    variants: dict[str, Callable[[], float]] = {}
    for verified, workers, prefetch in itertools.product((False, True), (0, 2), (False, True)):
        state = "steady     " if verified else "first epoch"
        name = f"{state} workers {workers} prefetch {'on ' if prefetch else 'off'}"
        variants[name] = lambda p=prefetch, w=workers, v=verified: read_epoch(p, w, v)
    variants["student fwd+bwd"] = student_step

    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for run in variants.values():  # warm-up
            run()
        for _ in range(args.repeats):
            for name, run in variants.items():
                times[name].append(run())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    medians = {name: statistics.median(values) for name, values in times.items()}
    step = medians.pop("student fwd+bwd")
    consumed = args.batch / step
    parameters = sum(p.numel() for p in student.parameters())
    if args.encoding == "topk":
        attention = (
            f"top-m rows (m = {args.attn_top_m}, {args.row_fraction:g} of the rows, "
            f"{'8-bit codes' if args.value_bits == 8 else 'fp16'})"
        )
    else:
        attention = "fp16 triangles"
    print(
        f"synthetic {args.encoding} cache of the demo shape: {args.samples} samples in shards of {args.shard_size}, T "
        f"{args.seq_len}, layers {args.layers}, head counts {args.head_counts} of {teacher_heads} teacher heads, "
        f"{attention}, top-k {args.top_k} (vocab {vocab}, {'8-bit codes' if args.value_bits == 8 else 'fp16'}); "
        f"{cache_bytes / 2**20:.1f} MiB written in {build_seconds:.1f} s (page cache warm)"
    )
    print(
        f"stream: the maps of a {args.heads}-head student, batch {args.batch}, shuffled, checksums on, one epoch = "
        f"{batches_per_epoch} batches per timed run; {torch.get_num_threads()} threads; "
        f"median of {args.repeats}"
    )
    print(
        f"student: {parameters / 1e6:.1f}M parameters, fwd+bwd (CE + top-k KD + attention KL on {len(args.layers)} "
        "layers) "
        f"on {args.batch} × {args.seq_len}: {step:.2f} s (min {min(times['student fwd+bwd']):.2f} s) "
        f"→ training consumes {consumed:.3f} samples/s"
    )
    for name, seconds in medians.items():
        rate = args.samples / seconds
        per_batch = [1000 * value / batches_per_epoch for value in (seconds, min(times[name]), max(times[name]))]
        print(
            f"  {name}  {rate:8.1f} samples/s  {per_batch[0]:7.1f} ms/batch (min {per_batch[1]:6.1f}, max "
            f"{per_batch[2]:6.1f})  reader ÷ consumption {rate / consumed:7.1f}×  batch read ÷ step "
            f"{100 * per_batch[0] / (1000 * step):5.2f} %"
        )
    print("batch read ÷ step: the loader's wait per step if nothing overlapped it (issue bar: < 5 %)")


if __name__ == "__main__":
    main()
