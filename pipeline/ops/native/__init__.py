"""The cache stage's fused CPU kernel (`topk_rows.c`), built on first use with the machine's C compiler and loaded
with ctypes.

Why a kernel: at T 8192 the torch form of a captured layer's targets — the scores, softmax, the stacked head product,
the top m's block maxima, candidate gathers, two top-k calls and the tail sums, each a pass over a 16 MB block — cost
four times the layer's own SDPA attention; the kernel computes a tile of query rows' scores in the core's cache and
then does the rest in one sweep per query row, so neither scores nor probabilities ever go to memory.

No torch headers, so a build takes about a second. The library is cached under `$XDG_CACHE_HOME/shd-distill/native`
(default `~/.cache`), keyed by the source, the flags and libraries, the compiler's version and the CPU (its
/proc/cpuinfo flags or features and model, `CPU_FIELDS`), so every kind of machine of a cluster builds its own; the
build is written to a temporary name and renamed, so ranks that build at once do not read half a file, and a file
that does not load is built again once. Without a compiler, with `SHD_DISTILL_NATIVE=0`, or when the build fails,
`library()` is None (a warning says why, once per process) and callers use the torch form, which gives the same
numbers to fp32 rounding. The library links the OpenMP runtime by its usual name (`libgomp.so.1`), so in a process
whose torch already loaded one it shares torch's.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("topk_rows.c")
ENV_SWITCH = "SHD_DISTILL_NATIVE"
"""Set to 0 to use the torch form everywhere (debugging, or a machine whose compiler builds a broken library)."""
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")
"""-ffast-math for the vector exp/log of libmvec and reassociated sums; the link below leaves it out, so the
library does not switch the whole process to flush-to-zero (gcc < 13 links crtfastmath.o into shared objects)."""
if platform.machine() in {"x86_64", "AMD64"}:
    COMPILE_FLAGS += ("-mprefer-vector-width=512",)  # 12 % faster than gcc's 256-bit default on AVX-512 machines
LINK_FLAGS = ("-shared", "-fopenmp")
LIBRARIES = ("-lmvec", "-lm")


def enabled() -> bool:
    """Whether the native kernels may be used (`SHD_DISTILL_NATIVE` is not 0)."""
    return os.environ.get(ENV_SWITCH, "1").strip() not in {"0", "false", "no", "off"}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shd-distill" / "native"


CPU_FIELDS = ("flags", "Features", "model name", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")
"""The /proc/cpuinfo lines that tell a -march=native build's CPU apart (x86 flags; ARM's features and part)."""


def _cpu_identity() -> str:
    """What a -march=native build depends on: the machine and, on Linux, the CPU's flags or features and model."""
    lines = {platform.machine(), platform.processor()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    lines.update(line for line in text.splitlines() if line.split(":", 1)[0].strip() in CPU_FIELDS)
    return "\n".join(sorted(lines))


def _build(compiler: str, target: Path, defines: tuple[str, ...] = ()) -> None:
    """Compile and link `SOURCE` into `target` (through a temporary directory beside it, renamed into place);
    `defines`: extra -D flags (the tests build the portable form of the score product with SHD_DISTILL_PORTABLE)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        objects, library = Path(scratch) / "topk_rows.o", Path(scratch) / target.name
        for command in (
            [compiler, *COMPILE_FLAGS, *(f"-D{name}" for name in defines), "-c", str(SOURCE), "-o", str(objects)],
            [compiler, *LINK_FLAGS, str(objects), "-o", str(library), *LIBRARIES],
        ):
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
        os.replace(library, target)


def load(path: Path) -> ctypes.CDLL:
    """The built library at `path`, its functions' signatures declared."""
    loaded = ctypes.CDLL(str(path))
    pointer, integer, outputs = ctypes.c_void_p, ctypes.c_int64, [*[ctypes.c_void_p] * 3, ctypes.c_int]
    loaded.topk_map_qk.restype = loaded.topk_logit_block.restype = ctypes.c_int
    loaded.topk_map_qk.argtypes = [*[pointer] * 2, ctypes.c_float, *[pointer] * 2, *[integer] * 9, pointer, integer]
    loaded.topk_map_qk.argtypes += outputs
    stream = [*[pointer] * 4, ctypes.c_int]  # a row block's heaps (values, tokens), maxima, sums; threads
    loaded.topk_logit_block.argtypes = [pointer, *[integer] * 4, pointer, integer, *stream]
    loaded.topk_logit_finish.restype = None
    loaded.topk_logit_finish.argtypes = [*[integer] * 2, pointer, integer, *[pointer] * 4, *outputs]
    return loaded


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None where it cannot be (see the module docstring)."""
    if not enabled():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler (CC or cc): the cache stage uses the torch form of its top-m targets (slower)")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        recipe = [SOURCE.read_text(), *COMPILE_FLAGS, *LINK_FLAGS, *LIBRARIES, version, _cpu_identity()]
        key = hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:16]
        target = _cache_dir() / key / "libtopk_rows.so"
        if not target.exists():
            log.info("building the native top-m kernel with %s into %s", compiler, target.parent)
            _build(compiler, target)
        try:
            loaded = load(target)
        except OSError:  # a damaged file (a machine that crashed mid-write): built again, once
            log.info("%s could not be loaded; building it again", target)
            _build(compiler, target)
            loaded = load(target)
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        log.warning("the native top-m kernel could not be built or loaded (%s): using the torch form", detail)
        return None
    return loaded


def _loaded() -> ctypes.CDLL:
    loaded = library()
    if loaded is None:
        raise RuntimeError("the native top-m kernel is not available (see pipeline.ops.native)")
    return loaded


def _run(function: Any, arguments: list[Any], lead: tuple[int, ...], k: int, temperatures: tuple[float, ...]) -> Any:
    """Call `topk_map_qk` with `arguments` followed by what it takes last (the exponents 1/τ, their count, the
    outputs, the thread count): (values [*lead, k] fp32, indices [*lead, k] int64, tails [*lead, len(temperatures)]
    fp32), or None when the kernel could not allocate its scratch."""
    values = torch.empty(*lead, k, dtype=torch.float32)
    indices = torch.empty(*lead, k, dtype=torch.int64)
    tails = torch.empty(*lead, len(temperatures), dtype=torch.float32)
    exponents = torch.tensor([1.0 / tau for tau in temperatures], dtype=torch.float32)
    failed = function(
        *arguments,
        exponents.data_ptr(),
        len(temperatures),
        values.data_ptr(),
        indices.data_ptr(),
        tails.data_ptr(),
        torch.get_num_threads(),
    )
    return None if failed else (values, indices, tails)


KEY_STEP = 32
"""The kernel's score product takes keys 32 at a time: the transposed keys are padded to a multiple of it."""


def topk_map_qk(
    query: Tensor,
    key: Tensor,
    scale: float,
    positions: Tensor,
    weights: Tensor,
    m: int,
    temperatures: tuple[float, ...],
    kernel: ctypes.CDLL | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel on CPU tensors: `query` [B, H, T, d] and `key` [B, H_kv, T, d] (post-RoPE; query head h reads key
    head h // (H / H_kv)), the score `scale`, `positions` [R] or [B, R] (sorted query rows: row r sees keys
    0..positions[r]), `weights` [B, S, H] → (values [B, S, R, m] fp32, indices [B, S, R, m] int64, tails
    [B, S, R, len(temperatures)] fp32), as `pipeline.ops.topk_maps.topk_maps` describes them. Needs `library()`
    (or `kernel`: a library `load` gave)."""
    loaded = kernel or _loaded()
    batch, heads, seq_len, dim = query.shape
    key_heads = key.shape[1]
    positions = positions.to(torch.int64).expand(batch, -1).contiguous()
    rows = positions.shape[1]
    weights = weights.float().contiguous()
    maps = weights.shape[1]
    if weights.shape != (batch, maps, heads) or bool((weights < 0).any()):
        raise ValueError(
            f"weights of shape {tuple(weights.shape)}: expected non-negative weights [{batch}, S, {heads}] (the maps"
            " are probabilities; the torch form takes any weights)"
        )
    if key.shape != (batch, key_heads, seq_len, dim) or heads % key_heads:
        expected = f"[{batch}, H_kv, {seq_len}, {dim}] with H_kv dividing {heads}"
        raise ValueError(f"keys of shape {tuple(key.shape)}: expected {expected}")
    low, high = (int(positions.min()), int(positions.max())) if rows else (0, -1)
    if m < 1 or rows == 0 or low < 0 or high >= seq_len:
        raise ValueError(
            f"m={m}, {rows} query rows in {low}..{high}: expected m >= 1 and at least one row, all in [0, {seq_len})"
        )
    if bool((positions.diff(dim=-1) < 0).any()):
        raise ValueError("query rows out of order: expected each sample's rows sorted")
    padded = -(-seq_len // KEY_STEP) * KEY_STEP
    keys_t = torch.zeros(batch, key_heads, dim, padded)
    keys_t[..., :seq_len] = key.transpose(-1, -2)
    query = query.float().contiguous()
    sizes = [batch, heads, key_heads, dim, seq_len, padded, rows, maps, m]
    arguments = [query.data_ptr(), keys_t.data_ptr(), scale, positions.data_ptr(), weights.data_ptr(), *sizes]
    outputs = _run(loaded.topk_map_qk, arguments, (batch, maps, rows), m, temperatures)
    if outputs is None:
        raise MemoryError(
            f"the native top-m kernel could not allocate a tile of {heads} x 16 rows of {padded} scores per thread"
        )
    return outputs


OUTPUT_ROW_BLOCK, OUTPUT_VOCAB_BLOCK = 1024, 2048
"""`topk_output_rows` takes the output layer's product a block of 1024 rows x 2048 tokens at a time: 8 MB of fp32
logits, read back by the kernel from the cache rather than from memory. `benchmarks/logit_targets.py` on 8192 of the
real SmolLM2's positions (d 576, V 49,152; 2 cores): the product alone 2.53 s in such blocks, 2.96 s whole."""


def _logit_stream(
    blocks: Iterator[tuple[int, Tensor]], rows: int, k: int, temperatures: tuple[float, ...], kernel: ctypes.CDLL
) -> tuple[Tensor, Tensor, Tensor]:
    """`topk_logit_block` over `blocks` ((first token, fp32 logits [rows, width]) in token order, covering the
    vocabulary), then `topk_logit_finish`: (values [rows, k], tokens [rows, k], tails [rows, len(temperatures)])."""
    heap_values = torch.empty(rows, k, dtype=torch.float32)
    heap_keys = torch.empty(rows, k, dtype=torch.int64)
    maxima = torch.full((rows,), torch.finfo(torch.float32).min)
    sums = torch.zeros(rows, 1 + len(temperatures), dtype=torch.float64)
    exponents = torch.tensor([1.0 / tau for tau in temperatures], dtype=torch.float32)
    state = [heap_values.data_ptr(), heap_keys.data_ptr(), maxima.data_ptr(), sums.data_ptr()]
    threads = torch.get_num_threads()
    for start, logits in blocks:
        width = logits.shape[1]
        if kernel.topk_logit_block(
            logits.data_ptr(), rows, width, start, k, exponents.data_ptr(), len(temperatures), *state, threads
        ):
            raise MemoryError(f"the native top-k kernel could not allocate its scratch for blocks of {width} entries")
    values = torch.empty(rows, k, dtype=torch.float32)
    indices = torch.empty(rows, k, dtype=torch.int64)
    tails = torch.empty(rows, len(temperatures), dtype=torch.float32)
    outputs = [values.data_ptr(), indices.data_ptr(), tails.data_ptr(), threads]
    kernel.topk_logit_finish(rows, k, exponents.data_ptr(), len(temperatures), *state, *outputs)
    return values, indices, tails


def _check_k(k: int, vocab: int) -> None:
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k}: expected 1 <= k <= vocabulary size {vocab}")


def topk_logit_rows(logits: Tensor, k: int, temperatures: tuple[float, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's sparse logit targets of CPU `logits` [R, V] → (top-k log-probabilities [R, k] fp32 descending,
    their tokens [R, k] int64, tail sums [R, len(temperatures)] fp32), as `pipeline.ops.kd.topk_targets` describes
    them. Needs `library()`."""
    loaded = _loaded()
    logits = logits.float().contiguous()
    rows, vocab = logits.shape
    _check_k(k, vocab)
    return _logit_stream(iter([(0, logits)]), rows, k, temperatures, loaded)


def topk_output_rows(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, k: int, temperatures: tuple[float, ...]
) -> tuple[Tensor, Tensor, Tensor]:
    """`topk_logit_rows` of the logits `hidden` [N, d] @ `weight`.T [d, V] (+ `bias` [V]) without forming them: the
    product a block of `OUTPUT_ROW_BLOCK` rows x `OUTPUT_VOCAB_BLOCK` tokens at a time into one reused buffer (in
    the weight's dtype, then fp32), each block streamed through the kernel while it is in the cache. Needs
    `library()`."""
    loaded = _loaded()
    rows, vocab = hidden.shape[0], weight.shape[0]
    _check_k(k, vocab)
    hidden = hidden.to(weight.dtype)
    row_block, vocab_block = min(rows, OUTPUT_ROW_BLOCK), min(vocab, OUTPUT_VOCAB_BLOCK)
    product = torch.empty(row_block * vocab_block, dtype=weight.dtype)
    converted = weight.dtype != torch.float32
    logits = torch.empty(row_block * vocab_block) if converted else product

    def blocks(part: Tensor) -> Iterator[tuple[int, Tensor]]:
        for start in range(0, vocab, vocab_block):
            stop = min(start + vocab_block, vocab)
            out = product[: len(part) * (stop - start)].view(len(part), stop - start)
            if bias is None:
                torch.mm(part, weight[start:stop].T, out=out)
            else:
                torch.addmm(bias[start:stop], part, weight[start:stop].T, out=out)
            yield start, logits[: out.numel()].view(out.shape).copy_(out) if converted else out

    parts = []
    for start in range(0, rows, row_block):
        part = hidden[start : start + row_block]
        parts.append(_logit_stream(blocks(part), len(part), k, temperatures, loaded))
    values, indices, tails = (torch.cat(part) for part in zip(*parts, strict=True))
    return values, indices, tails
