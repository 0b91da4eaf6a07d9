"""What several benchmark scripts share, so that no script imports another: side-by-side timing, the peak memory
of one step measured in a fresh process, a random teacher of the real one's shape, random targets in the cache's
stored form, samples longer than the packed ones made of contiguous text, and greedy text from a student as its run
built it at step 0.

Scripts import it as `_common` (benchmarks/ is on sys.path when a script runs); it is not a benchmark itself.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import Config
from pipeline.objective.loss import build_objective
from pipeline.ops.kd import topk_targets
from pipeline.stages.context import open_run
from pipeline.students import build_student_model
from pipeline.targets.encoding import ENCODINGS, EncodeOptions
from pipeline.targets.logits import stored_logit_tensors

# --------------------------------------------------------------------------------------------------------------------
# Timing


def time_alternately(
    variants: dict[str, Callable[[], None]],
    repeats: int,
    device: torch.device,
    after_each: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each variant per repeat, after one untimed warm-up call each.

    The variants alternate within every repeat, so machine noise hits all alike. On CUDA the device is synchronised
    around every call so that queued kernels are counted where they run. `after_each` (e.g. dropping gradients) runs
    after every call, outside the timed span.
    """

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def settle() -> None:
        if after_each is not None:
            after_each()

    for step in variants.values():
        step()
        settle()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, step in variants.items():
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            times[name].append(time.perf_counter() - start)
            settle()
    return times


# --------------------------------------------------------------------------------------------------------------------
# Peak memory of one step, in a fresh process per configuration
#
# On CUDA the figure is the allocator's own: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`. On the
# CPU torch allocates through glibc, so the figure is the process's resident set: the kernel's high-water mark VmHWM
# is reset to the current RSS by writing 5 to /proc/self/clear_refs (Linux ≥ 4.0), and read back after the step.
# `tracemalloc` sees none of torch's allocations, and `ru_maxrss` cannot be reset (it would hold the warm-up's peak
# and the imports'), hence one process per configuration and the explicit reset.
#
# For the RSS to follow the tensors that are alive, a child runs with `MALLOC_MMAP_THRESHOLD_` fixed at 1 MiB
# (`CHILD_ENV`): every larger block is its own mapping, returned to the system when freed. glibc's default raises that
# threshold after the first large free and then keeps freed tensors in its heap, so RSS would remember earlier steps.
# Linux with glibc only (clear_refs, malloc_trim).
#
# Figures, all in bytes: `baseline` (the process before the model and batch exist: interpreter, libraries; 0 on
# CUDA), `before` (just before the measured step: model, batch, warm-up leftovers), `peak` (the high-water mark during
# the step). A benchmark reports `peak − baseline` (what the step's process holds at its peak, as
# `max_memory_allocated` does on CUDA) and `peak − before` (the step's own transient memory).

CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "PYTHONUNBUFFERED": "1"}
"""Environment of a measuring child (on top of the parent's)."""

LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""Left out of a child's environment: a child sets up its own world of one, never its parent's process group."""

RESULT_PREFIX = "PEAK_MEMORY_RESULT "
"""Marks the child's output line that carries its figures (JSON)."""


def _status_bytes(field: str) -> int:
    """A `VmRSS`-style field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/self/status has no field {field!r}")


def _release_freed() -> None:
    """Collect garbage and hand glibc's free heap pages back, so that RSS is the memory in use."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """The memory figures of one step on `device`: call `start()` before building anything, `reset()` right before
    the step, `peak()` right after it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self.before = 0

    def current(self) -> int:
        """Memory in use now: allocated tensors on CUDA, the resident set on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        _release_freed()
        return _status_bytes("VmRSS")

    def start(self) -> None:
        self.baseline = 0 if self.device.type == "cuda" else self.current()

    def reset(self) -> None:
        """Mark the start of the measured span: the high-water mark becomes what is in use now."""
        self.before = self.current()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        """The high-water mark since `reset()`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_bytes("VmHWM")

    def figures(self) -> dict[str, int]:
        """`baseline`, `before` and `peak` in bytes (call right after the measured step)."""
        return {"baseline": self.baseline, "before": self.before, "peak": self.peak()}


def report_memory(figures: dict[str, Any]) -> None:
    """Print a child's figures on the line the parent reads."""
    print(RESULT_PREFIX + json.dumps(figures), flush=True)


def measure_in_child(script: str, cell: str, timeout: float, *extra: str, timing: bool = False) -> dict[str, Any]:
    """Rerun `script` in a fresh process with this process's arguments plus `--memory-of CELL` and `extra` (with
    `CHILD_ENV`, without `LAUNCHER_VARIABLES`) and return the figures it `report_memory`ed. A `timing` child keeps
    glibc's default allocator settings instead, as the commands run: with every block over 1 MiB its own mapping,
    each large temporary is faulted in afresh, which slows a step of many 16 MB blocks far more than a forward."""
    command = [sys.executable, script, *sys.argv[1:], "--memory-of", cell, *extra]
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    if timing:
        env = {key: value for key, value in env.items() if not key.startswith("MALLOC_")}
    child_env = {"PYTHONUNBUFFERED": "1"} if timing else CHILD_ENV
    result = subprocess.run(
        command, env={**env, **child_env}, capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if result.returncode != 0 or not lines:
        sys.exit(
            f"memory child {' '.join(command)} exited {result.returncode} without figures:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def megabytes(value: float) -> str:
    """Bytes as MiB in a 9-wide column."""
    return f"{value / 2**20:9.1f}"


# --------------------------------------------------------------------------------------------------------------------
# A teacher's shape without its weights


def smollm2_like_config() -> LlamaConfig:
    """The real teacher's geometry (SmolLM2-135M: 30 layers, 9 heads on 3 KV heads, vocab 49152), for random models
    where only shapes matter (costs), so a script runs where the imported teacher is not available."""
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


# --------------------------------------------------------------------------------------------------------------------
# Random targets in the cache's stored form (costs depend on shapes and bytes, not values)


def random_causal_maps(batch: int, heads: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Row-stochastic causal maps [B, H, T, T] standing in for a teacher's attention targets."""
    scores = torch.randn(batch, heads, seq_len, seq_len, generator=generator)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def stored_maps(
    name: str, maps: torch.Tensor, encoding: str, options: EncodeOptions, rows: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The stored tensors of whole maps [N, H, T, T] named `name`, through the cache's own writer in one block
    (`rows` [N, R]: only those query rows, as a cache with `cache.attn_row_fraction` < 1 stores them; top-m only)."""
    writer = ENCODINGS[encoding].writer(name, options)
    if rows is None:
        seq_len = maps.shape[-1]
        writer.add(maps, torch.arange(seq_len).expand(len(maps), seq_len))
    else:
        index = rows[:, None, :, None].expand(*maps.shape[:2], rows.shape[1], maps.shape[-1])
        writer.add(maps.gather(2, index), rows)
    return writer.tensors()


def stored_random_logits(
    batch: int,
    seq_len: int,
    vocab_size: int,
    top_k: int,
    temperatures: tuple[float, ...],
    dtype: torch.dtype,
    value_bits: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The stored logit targets (`logits.stored_logit_tensors` of `ops.kd.topk_targets`) of random teacher logits
    [batch, T, vocab]."""
    logits = torch.randn(batch, seq_len, vocab_size, generator=generator)
    values, indices, tails = topk_targets(logits, top_k, temperatures)
    return stored_logit_tensors(values, indices, tails, vocab_size, temperatures, dtype, value_bits)


# --------------------------------------------------------------------------------------------------------------------
# Samples longer than the packed T


class WindowRows:
    """Rows of concatenated packed samples in the shape `write_cache_split` reads: `rows[a:b]` → ids [b-a, T]."""

    def __init__(self, input_ids: torch.Tensor, sample_ids: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.sample_ids = sample_ids

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, rows: slice) -> dict[str, Any]:
        return {"input_ids": self.input_ids[rows], "sample_id": self.sample_ids[rows]}


def _contiguous_windows(sample_ids: np.ndarray, length: int, count: int) -> list[int]:
    """First rows of `count` windows of `length` rows whose sample ids are consecutive (contiguous packed text).

    The train split lacks the validation samples, so neighbouring rows are not always neighbouring text; windows are
    taken from runs of consecutive ids, spread evenly over all such runs (different plays).
    """
    breaks = np.flatnonzero(np.diff(sample_ids) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(sample_ids)]])
    usable = [int(start) for start, stop in zip(starts, stops, strict=True) if stop - start >= length]
    if len(usable) < count:
        raise SystemExit(f"only {len(usable)} runs of {length} consecutive samples in the split, asked for {count}")
    picks = np.linspace(0, len(usable) - 1, count).round().astype(int)
    return [usable[pick] for pick in picks]


def contiguous_window_rows(split: Any, base_len: int, seq_lens: list[int], count: int) -> dict[int, WindowRows]:
    """T → `count` samples of T tokens for each T of `seq_lens`, each made of consecutive packed samples of `split`
    (a prepared split of `base_len`-token samples) concatenated and cut to T, named by their first sample id.

    The windows are chosen once, for the longest T, so a shorter T's samples are the starts of the longer ones'.
    """
    split = split.with_format("torch", columns=["sample_id", "input_ids"])
    parts = -(-max(seq_lens) // base_len)
    starts = _contiguous_windows(np.asarray(split["sample_id"][:]), parts, count)
    windows = [split[start : start + parts] for start in starts]
    first_ids = torch.stack([window["sample_id"][0] for window in windows])
    return {
        seq_len: WindowRows(
            torch.stack([window["input_ids"].reshape(-1)[:seq_len] for window in windows]).long(), first_ids
        )
        for seq_len in seq_lens
    }


# --------------------------------------------------------------------------------------------------------------------
# Text from a student


def step0_student(config: Config) -> nn.Module:
    """The student a run of `config` builds before its first update: random weights from the run's seed, the
    pretrained directory, or the carve from the teacher reading the run's own targets (`RunContext.target_source`:
    the train cache's α statistics and selective heads, or the live teacher's). A carve writes its record into
    `train.output_dir`: point it away from a finished run's directory."""
    context = open_run(config)
    targets = context.target_source(build_objective(context.config, context.teacher_layers).needs())
    return build_student_model(context.config, context.teacher_config, targets=targets)


@torch.no_grad()
def greedy_text(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, new_tokens: int, repetition_penalty: float
) -> str:
    """`prompt` and exactly `new_tokens` greedy tokens after it, with `repetition_penalty` on tokens already written
    (1: plain greedy, which settles into a loop of newlines at a young student's perplexity). No sampling."""
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt")
    output = model.generate(
        **ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        repetition_penalty=repetition_penalty,
        pad_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0], skip_special_tokens=True)
