"""Load teachers and tokenizers from local directories, build students of any head/layer count, write tiny teachers.

Everything loads from local files only: the pipeline runs on machines without network access. Teachers and students
are loaded with ``CAPTURE_ATTENTION`` by default, so ``AttentionCapture`` works on them and every other layer runs
SDPA.
"""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from pipeline.errors import PipelineError
from pipeline.models.capture import CAPTURE_ATTENTION, model_family

PathLike = str | os.PathLike[str]

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
"""Special tokens of tiny tokenizers, in id order 0..3."""

TINY_CORPUS = """\
A language model reads a sequence of tokens and predicts the next one. Each layer of a transformer mixes
information between positions with attention, then transforms each position on its own with a small network.
An attention head compares a query with every earlier key, turns the scores into probabilities with a softmax,
and returns the weighted sum of the values. Many heads run side by side, and each one learns to look for
something different: the previous word, the start of the sentence, a matching bracket, or a repeated name.

Large models are slow and expensive to serve, so people train smaller students to imitate them. The student
learns from the labels of the text, from the probabilities the teacher gives to every next token, and from the
way the teacher spreads its attention over the sequence. When the student has fewer heads than the teacher, the
attention maps of several teacher heads must be squeezed into one map before the student can learn from them.
A simple average of the maps is one choice; a weighted mix that keeps what the heads actually do is better.

The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the warm sun by the old stone wall. A small
bird sings in the tall tree, and the wind moves the green leaves. The farmer walks to the market with a basket
of apples, pears and plums. She sells the fruit, buys bread and cheese, and returns home before the rain.

Numbers are tokens too: one, two, three, four, five, six, seven, eight, nine, ten. In 2024 the cluster had 64
machines with 8 accelerators each, and a training run of 3 days used 1,536 accelerator days. The loss fell from
10.4 to 2.9, and the validation perplexity was 18.2 at the end of the run.

def attention(query, key, value):
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])
    return scores.softmax(dim=-1) @ value

Questions and answers help a model learn to follow instructions. What is the capital of France? Paris is the
capital of France. How many legs does a spider have? A spider has eight legs. Why is the sky blue? Sunlight is
scattered by the air, and blue light is scattered more than red light.
"""
"""A few KB of English (plus a little code and numbers) to train tiny tokenizers and smoke-test data stages."""

_MIN_BYTE_LEVEL_VOCAB = 256 + len(SPECIAL_TOKENS)
# Random weights at the usual 0.02 give near-uniform attention maps, which would make attention tests blind to
# errors; 0.2 gives peaked, head-specific maps in tiny models.
_TINY_INITIALIZER_RANGE = 0.2


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed model initialisation and restore the caller's RNG state afterwards; None draws from the global RNG."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class ModelDirectoryError(PipelineError, FileNotFoundError):
    """A teacher, student or tokenizer directory is missing or holds no model; the message names the path."""


class ModelConfigError(PipelineError):
    """A model directory's config.json is unreadable or of a family transformers does not know; names the file."""


class TeacherConfigError(ModelConfigError):
    """A teacher's config.json is unreadable, of an unsupported family, or too short for the data; names the field."""


TEACHER_IMPORT_HINT = (
    "run `distill teacher import CONFIG` (it writes teacher.path), or set teacher.path to an HF model directory"
)
PRETRAINED_HINT = "expected a directory written by save_pretrained (config.json, model.safetensors, tokenizer)"


def _require_directory(path: PathLike, what: str, markers: tuple[str, ...], hint: str = "") -> Path:
    """Resolve ``path`` and check it holds one of ``markers``, so errors name the path instead of a hub lookup."""
    directory = Path(path)
    fix = f"; {hint}" if hint else ""
    if not directory.is_dir():
        raise ModelDirectoryError(f"{what} directory {str(directory)!r} does not exist{fix}")
    if not any((directory / marker).is_file() for marker in markers):
        raise ModelDirectoryError(
            f"{str(directory)!r} is not a {what} directory: expected one of {', '.join(markers)} "
            f"(a save_pretrained output){fix}"
        )
    return directory


def read_model_config(
    directory: Path, hint: str, error_type: type[ModelConfigError] = ModelConfigError
) -> PretrainedConfig:
    """The config of an HF model directory, checked before transformers reads it: every problem (a file that is not
    JSON or not an object, no ``model_type``, a family transformers does not know) is an ``error_type`` naming
    ``directory/config.json`` and ending with ``hint``, the fix."""
    config_file = directory / "config.json"
    try:
        values = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise error_type(
            f"{config_file}: not a readable JSON file ({error}); expected the config.json written by "
            f"save_pretrained — {hint}"
        ) from error
    if not isinstance(values, dict):
        raise error_type(f"{config_file}: expected a JSON object, found a JSON {type(values).__name__}; {hint}")
    if not isinstance(values.get("model_type"), str):
        found = "missing" if "model_type" not in values else repr(values["model_type"])
        raise error_type(
            f"{config_file}: field 'model_type' is {found}, expected a model type such as 'llama' or 'gpt2'; {hint}"
        )
    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise error_type(
            f"{config_file}: model_type {values['model_type']!r} cannot be read by transformers ({error}); expected "
            "a LLaMA-like or GPT-2 config"
        ) from error


def load_pretrained(directory: Path, what: str, hint: str, **options: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` of a local directory (``options`` passed on); weights that are
    missing or unreadable (truncated, a forged header) are a ``ModelDirectoryError`` naming ``what`` and the
    directory and ending with ``hint``, the fix."""
    try:
        return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, **options)
    except (OSError, SafetensorError) as error:
        raise ModelDirectoryError(f"{what} {str(directory)!r}: cannot load its weights ({error}); {hint}") from error


def load_teacher_config(path: PathLike) -> PretrainedConfig:
    """The teacher's config from ``path/config.json``, checked before anything else reads it.

    Every problem is a ``PipelineError`` naming the file and field: a missing directory or file (with the hint to
    run ``distill teacher import``), invalid JSON, no ``model_type``, a family transformers does not know, or one the
    pipeline cannot distil (neither GPT-2 nor LLaMA-like).
    """
    directory = _require_directory(path, "teacher", ("config.json",), TEACHER_IMPORT_HINT)
    config = read_model_config(directory, TEACHER_IMPORT_HINT, TeacherConfigError)
    try:
        model_family(config)
    except ValueError as error:
        raise TeacherConfigError(f"{directory / 'config.json'}: {error}") from error
    return config


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings cover (LLaMA ``max_position_embeddings``, GPT-2
    ``n_positions``), or None when the config sets no limit."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(config: PretrainedConfig, seq_len: int, key: str = "data.seq_len") -> None:
    """Refuse sequences longer than the teacher's positions (GPT-2 would index past its table, LLaMA would run
    outside the context it was trained for), naming ``key``."""
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        field = "n_positions" if getattr(config, "model_type", "") == "gpt2" else "max_position_embeddings"
        raise TeacherConfigError(
            f"{key} = {seq_len} is longer than the teacher's context ({field} = {limit} in its config.json); "
            f"set {key} to at most {limit}"
        )


def load_tokenizer(path: PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local HF directory; a missing pad token becomes eos so batches can be padded."""
    directory = _require_directory(path, "tokenizer", ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PipelineError(f"tokenizer in {str(directory)!r} has neither a pad_token nor an eos_token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_teacher(
    path: PathLike,
    dtype: torch.dtype | None = None,
    attn_implementation: str = CAPTURE_ATTENTION,
    device: torch.device | str | None = None,
) -> PreTrainedModel:
    """Load a frozen causal-LM teacher (GPT-2 or LLaMA-like) from a local directory.

    The config is checked first (``load_teacher_config``), so a missing or broken teacher is a ``PipelineError``
    naming the file. ``dtype=None`` keeps the checkpoint's dtype. The model is in eval mode (GPT-2 has dropout on
    by default) with ``requires_grad`` off, so it never collects gradients or optimizer state.
    """
    config = load_teacher_config(path)
    model = load_pretrained(
        Path(path),
        "teacher directory",
        TEACHER_IMPORT_HINT,
        config=config,
        dtype=dtype if dtype is not None else "auto",
        attn_implementation=attn_implementation,
    )
    model.eval()
    model.requires_grad_(False)
    if device is not None:
        model.to(device)
    return model


def _check_heads(family: Literal["llama", "gpt2"], hidden_size: int, num_heads: int, num_kv_heads: int) -> None:
    """Reject head counts the attention layers cannot split, naming the field."""
    if num_heads < 1 or hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    if family == "gpt2" and num_kv_heads != num_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads}: GPT-2 has no grouped-query attention")
    if family == "llama" and (hidden_size // num_heads) % 2 != 0:
        raise ValueError(f"hidden_size // num_heads = {hidden_size // num_heads} must be even for rotary embeddings")


def make_student_config(
    teacher_config: PretrainedConfig,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    head_dim: int | None = None,
) -> PretrainedConfig:
    """The teacher's config with the student's shape: same family, vocabulary, special tokens and tying.

    ``num_kv_heads=None`` gives multi-head attention (as many KV heads as query heads). ``intermediate_size=None``
    keeps the teacher's MLP-to-hidden ratio (LLaMA-like) or GPT-2's default 4×hidden. ``head_dim=None`` is
    hidden_size // num_heads; LLaMA-like students may set another (a student carved from the teacher keeps the
    teacher's head dim whatever its width). Every dropout is 0 so that distillation is deterministic.
    """
    family = model_family(teacher_config)
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be at least 1")
    values: dict[str, Any] = teacher_config.to_dict()
    values.pop("_name_or_path", None)
    for key, value in values.items():
        if (key.endswith("dropout") or key.endswith("_pdrop")) and isinstance(value, float):
            values[key] = 0.0
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if family == "gpt2" and head_dim is not None and head_dim * num_heads != hidden_size:
        raise ValueError(f"head_dim={head_dim}: GPT-2's head dim is hidden_size={hidden_size} // num_heads={num_heads}")
    _check_heads(family, hidden_size if head_dim is None else head_dim * num_heads, num_heads, kv_heads)
    if family == "gpt2":
        values.update(n_layer=num_layers, n_embd=hidden_size, n_head=num_heads, n_inner=intermediate_size)
    else:
        if intermediate_size is None:
            intermediate_size = round(teacher_config.intermediate_size * hidden_size / teacher_config.hidden_size)
        values.update(
            num_hidden_layers=num_layers,
            hidden_size=hidden_size,
            num_attention_heads=num_heads,
            num_key_value_heads=kv_heads,
            head_dim=hidden_size // num_heads if head_dim is None else head_dim,
            intermediate_size=intermediate_size,
        )
        layer_types = values.get("layer_types")
        # One kind per layer: a uniform pattern carries over to the new depth, a mixed one is re-derived by the
        # config class from its own rules (e.g. Qwen2's max_window_layers).
        if layer_types is not None:
            values["layer_types"] = [layer_types[0]] * num_layers if len(set(layer_types)) == 1 else None
    return type(teacher_config).from_dict(values)


def build_student(
    teacher_config: PretrainedConfig,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    attn_implementation: str = CAPTURE_ATTENTION,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A randomly initialised student of the teacher's family (see ``make_student_config``), in train mode.

    ``seed`` makes the initialisation reproducible without touching the global RNG. Parameters are ``dtype``
    (fp32 by default: the training precision is applied by the trainer, not inherited from a bf16 teacher config).
    """
    config = make_student_config(
        teacher_config,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
    )
    # from_config sets the implementation on this fresh config, not on the teacher's (to_dict dropped it).
    with _seeded(seed):
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)


def train_tiny_tokenizer(corpus: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus``, with ``SPECIAL_TOKENS`` at ids 0..3.

    Byte-level means any text encodes without unknown tokens; the vocabulary holds at least the 256 bytes and the
    special tokens, and fewer than ``vocab_size`` entries when the corpus has too few merges to learn.
    """
    if vocab_size < _MIN_BYTE_LEVEL_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} must be at least {_MIN_BYTE_LEVEL_VOCAB} (256 bytes + specials)")
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def _tiny_config(
    family: Literal["llama", "gpt2"],
    tokenizer: PreTrainedTokenizerFast,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    max_positions: int,
) -> PretrainedConfig:
    """A tiny config of ``family`` whose vocabulary and special-token ids are the tokenizer's."""
    common = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": _TINY_INITIALIZER_RANGE,
        "tie_word_embeddings": True,
    }
    if family == "gpt2":
        return GPT2Config(n_layer=num_layers, n_embd=hidden_size, n_head=num_heads, n_positions=max_positions, **common)
    return LlamaConfig(
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_positions,
        **common,
    )


def write_tiny_teacher(
    directory: PathLike,
    family: Literal["llama", "gpt2"] = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    vocab_size: int = 384,
    max_positions: int = 512,
    seed: int = 0,
    corpus: str | None = None,
) -> Path:
    """Write a tiny random teacher (safetensors weights + tokenizer) that ``load_teacher``/``load_tokenizer`` read.

    For tests and CPU demos. ``num_kv_heads=None`` means 2 KV heads for LLaMA (GQA with the default 4 query heads)
    and one per head for GPT-2; a SmolLM2-like LLaMA is ``num_heads=9, num_kv_heads=3``. The model vocabulary is the
    tokenizer's length; the tokenizer is trained on ``corpus`` (default ``TINY_CORPUS``). Same arguments, same files.
    """
    if family not in ("llama", "gpt2"):
        raise ValueError(f"family={family!r}: expected 'llama' or 'gpt2'")
    if num_kv_heads is None:
        num_kv_heads = 2 if family == "llama" else num_heads
    _check_heads(family, hidden_size, num_heads, num_kv_heads)
    tokenizer = train_tiny_tokenizer(TINY_CORPUS if corpus is None else corpus, vocab_size)
    tokenizer.model_max_length = max_positions
    config = _tiny_config(family, tokenizer, num_layers, hidden_size, num_heads, num_kv_heads, max_positions)
    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    output = Path(directory)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output
