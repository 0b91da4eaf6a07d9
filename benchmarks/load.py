"""Load: caching and reading 10,000+ tiny samples with flat memory, and the reader against training consumption.

On the tiny random LLaMA teacher (`teacher.source: tiny-random-llama`, 4 layers, 6 heads) and `configs/tiny.yaml`
(dense targets for 2- and 3-head students, teacher layers 1 and 3), with T = 32 and a synthetic corpus big enough
for the largest count (words drawn from the tiny corpus's vocabulary):

1. Cache stage, peak RSS against the number of cached samples: `distill cache` (`stages.cache.cache_stage`, the
   writer as it is) with `cache.max_samples` = each count, each in a fresh process, so its `ru_maxrss` is that run's
   peak.
2. Full read pass, peak RSS against the sample count: one epoch of the training stream (the run's target source,
   `RunContext.target_source`, read as training reads it), again one fresh process per count.
3. Reader samples/s with 0, 2 and 4 DataLoader workers on the largest cache (one epoch each, fresh processes),
   against what a tiny training step consumes: the median `train/step_time_s` of `distill train` on the same
   cache (`train.micro_batch_size` samples per step).

Memory is flat when the peak does not grow with the sample count (beyond noise of a few MB); the process baseline
(torch, transformers, datasets imported) is most of it. Each peak is given whole (`ru_maxrss`) and for its anonymous
part (`RssAnon`, sampled every 50 ms: heap and tensors), because pages of memory-mapped shards also count as
resident while a process maps them, though the kernel can drop them at any time. Timings depend on what else runs
on the machine.

    .venv/bin/python benchmarks/load.py                          # 1k, 5k, 10k samples; 0, 2, 4 workers
    .venv/bin/python benchmarks/load.py --counts 500 1000 --workers 0 --root /tmp/load   # a quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
SEQ_LEN = 32
WORDS_PER_DOCUMENT = 200
TOKENS_PER_WORD_FLOOR = 3.0
"""The tiny byte-level tokenizer (a few hundred entries) splits a random word of the tiny corpus into about 3.6
tokens; 3 leaves a margin."""


def overrides(root: Path, count: int, *extra: str) -> list[str]:
    """Config overrides: everything under `root`, the cache of the first `count` train samples in its own directory."""
    return [
        "teacher.source=tiny-random-llama",
        f"teacher.path={root / 'teacher'}",
        f"data.sources=[{root / 'corpus'}]",
        f"data.output_dir={root / 'data'}",
        f"data.seq_len={SEQ_LEN}",
        "data.val_fraction=0.01",
        f"cache.output_dir={root / f'targets-{count}'}",
        "cache.shard_size=256",
        "cache.batch_size=32",
        f"cache.max_samples={count}",
        f"train.output_dir={root / f'runs-{count}'}",
        "train.micro_batch_size=8",
        "mlflow.enabled=false",
        *extra,
    ]


def write_corpus(directory: Path, samples: int, seed: int = 0) -> None:
    """Text files of random words from the tiny corpus, enough tokens for `samples` sequences of `SEQ_LEN`."""
    from pipeline.models.loading import TINY_CORPUS

    vocabulary = sorted(set(TINY_CORPUS.split()))
    words = int(samples * SEQ_LEN / TOKENS_PER_WORD_FLOOR * 1.1)
    generator = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, words, WORDS_PER_DOCUMENT * 500)):
        documents = [
            " ".join(generator.choices(vocabulary, k=WORDS_PER_DOCUMENT))
            for _ in range(min(500, (words - start) // WORDS_PER_DOCUMENT + 1))
        ]
        (directory / f"part-{index:03d}.txt").write_text("\n\n".join(documents))


class AnonymousPeak:
    """Samples this process's anonymous resident memory (`RssAnon`: heap, tensors; not the pages of memory-mapped
    files, which the kernel can drop at any time) every `interval` seconds, keeping the peak."""

    def __init__(self, interval: float = 0.05) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def read_kb() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak_kb = max(self.peak_kb, self.read_kb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(max(self.peak_kb, self.read_kb()) / 1024, 1)


SAMPLER: AnonymousPeak | None = None


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process (all of it, and its anonymous part) and of its largest child
    (DataLoader workers), in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    anonymous = SAMPLER.stop() if SAMPLER is not None else 0.0
    return {"peak_rss_mb": round(own, 1), "peak_anon_mb": anonymous, "peak_child_rss_mb": round(children, 1)}


def phase_setup(root: Path, count: int) -> dict[str, Any]:
    from pipeline.config import load_config
    from pipeline.stages.prepare import prepare_stage
    from pipeline.stages.teacher import teacher_stage

    write_corpus(root / "corpus", count)
    config = load_config(CONFIG, overrides(root, count))
    teacher_stage(config)
    meta = prepare_stage(config)
    return {"train_samples": meta["splits"]["train"]["samples"]}


def phase_cache(root: Path, count: int) -> dict[str, Any]:
    from pipeline.config import load_config
    from pipeline.stages.cache import cache_stage

    started = time.perf_counter()
    cache_stage(load_config(CONFIG, overrides(root, count)))
    return {"seconds": round(time.perf_counter() - started, 1), **peak_rss_mb()}


def phase_read(root: Path, count: int, workers: int) -> dict[str, Any]:
    """One epoch of the training stream over the cache of `count` samples: the batches `distill train` reads (the
    run's target source for its training objective)."""
    import math

    from pipeline.config import load_config
    from pipeline.objective.loss import build_objective
    from pipeline.stages.context import open_run

    context = open_run(load_config(CONFIG, overrides(root, count, f"train.num_workers={workers}")))
    config = context.config
    targets = context.target_source(build_objective(config, context.teacher_layers).needs())
    batches = targets.batches(
        batch_size=config.train.micro_batch_size, seed=config.train.seed, start_position=0, rank=0, world_size=1
    )
    steps = math.ceil(count / config.train.micro_batch_size)
    started = time.perf_counter()
    first = len(next(batches)["sample_ids"])
    first_batch_s = time.perf_counter() - started
    samples = first + sum(len(next(batches)["sample_ids"]) for _ in range(steps - 1))
    seconds = time.perf_counter() - started
    del batches  # stops the DataLoader's workers, so that their peak RSS is counted among the children
    gc.collect()
    return {
        "samples": samples,
        "samples_per_s": round(samples / seconds, 1),
        "first_batch_s": round(first_batch_s, 2),
        **peak_rss_mb(),
    }


def phase_train(root: Path, count: int, steps: int) -> dict[str, Any]:
    """`distill train` for `steps` steps on the cache; the samples per second a step consumes (median)."""
    from pipeline.config import load_config
    from pipeline.stages.train import train_stage
    from pipeline.training.trainer import METRICS_LOG

    extra = (f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=0", "train.resume=never")
    config = load_config(CONFIG, overrides(root, count, *extra))
    train_stage(config, overwrite=True)
    records = [json.loads(line) for line in (Path(config.train.output_dir) / METRICS_LOG).read_text().splitlines()]
    times = [record["train/step_time_s"] for record in records if "train/step_time_s" in record][2:]
    per_step = config.train.micro_batch_size * config.train.grad_accum
    return {
        "step_s": round(statistics.median(times), 4),
        "samples_per_s": round(per_step / statistics.median(times), 1),
    }


def run_phase(root: Path, phase: str, *arguments: str) -> dict[str, Any]:
    """Run one phase in a fresh process (its peak RSS is its own) and return the JSON it prints last."""
    command = [sys.executable, __file__, "--root", str(root), "--phase", phase, *arguments]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 5000, 10000], help="cached sample counts")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="DataLoader workers to time")
    parser.add_argument("--train-steps", type=int, default=40, help="steps of the tiny training run")
    parser.add_argument("--root", type=Path, default=REPO / "work" / "load", help="where everything is written")
    parser.add_argument("--phase", choices=["setup", "cache", "read", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--num-workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.root.resolve()
    if args.phase is not None:
        global SAMPLER
        from pipeline.infra.runtime import configure_logging

        SAMPLER = AnonymousPeak()

        configure_logging("WARNING")
        phases = {
            "setup": lambda: phase_setup(root, args.count),
            "cache": lambda: phase_cache(root, args.count),
            "read": lambda: phase_read(root, args.count, args.num_workers),
            "train": lambda: phase_train(root, args.count, args.train_steps),
        }
        print(json.dumps(phases[args.phase]()))
        return

    largest = max(args.counts)
    setup = run_phase(root, "setup", "--count", str(largest))
    if setup["train_samples"] < largest:
        raise SystemExit(f"the corpus gave {setup['train_samples']} train samples, fewer than {largest}")
    print(f"{setup['train_samples']} train samples of {SEQ_LEN} tokens prepared under {root}\n")
    print(
        "| samples | cache: s | cache: peak RSS MiB (anonymous) | read pass: samples/s | "
        "read pass: peak RSS MiB (anonymous) |"
    )
    print("|---|---|---|---|---|")
    for count in sorted(args.counts):
        cache = run_phase(root, "cache", "--count", str(count))
        read = run_phase(root, "read", "--count", str(count))
        print(
            f"| {count} | {cache['seconds']} | {cache['peak_rss_mb']} ({cache['peak_anon_mb']}) | "
            f"{read['samples_per_s']} | {read['peak_rss_mb']} ({read['peak_anon_mb']}) |"
        )
    trained = run_phase(root, "train", "--count", str(largest), "--train-steps", str(args.train_steps))
    print(f"\ntraining consumes {trained['samples_per_s']} samples/s (median step {trained['step_s']} s, batch 8)\n")
    print(
        "| workers | reader samples/s (one epoch) | ÷ training | first batch s | peak RSS MiB (main / largest worker) |"
    )
    print("|---|---|---|---|---|")
    for workers in args.workers:
        read = run_phase(root, "read", "--count", str(largest), "--num-workers", str(workers))
        ratio = read["samples_per_s"] / trained["samples_per_s"]
        print(
            f"| {workers} | {read['samples_per_s']} | {ratio:.1f}× | {read['first_batch_s']} | "
            f"{read['peak_rss_mb']} / {read['peak_child_rss_mb']} |"
        )


if __name__ == "__main__":
    main()
