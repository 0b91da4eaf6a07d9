"""Range and cross-field checks of a built config; each error names the key, the value and what is allowed.

Checks that need the teacher (the resolved student shape, the layer map's range, `validate_for_teacher`) are made
by the stages once the teacher's config is read (`pipeline.students.resolve`).
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.config.schema import Config, DistillConfig, StudentConfig
from pipeline.errors import ConfigError, require
from pipeline.objective.terms import specs as term_specs

DIRECTORY_KEYS = ("teacher.path", "data.output_dir", "cache.output_dir", "train.output_dir", "run.report_dir")
"""The keys that name a directory (a stage's input or output): none of them may be, or lie under, a file."""
SCRATCH_STUDENT = {"num_layers": 4, "hidden_size": 384, "num_heads": 3}
"""The shape of a `student.init: scratch` student where the config leaves it unset (the defaults before `init`)."""


def _validate_student(s: StudentConfig, d: DistillConfig) -> None:
    """The student checks that need no teacher: ranges of the keys that are set, and for a scratch student the
    shape with `SCRATCH_STUDENT` filled in. The whole resolved shape is checked by `students.resolve_student`."""
    require(bool(s.init.strip()), "student.init", s.init, "'scratch', 'teacher' or a pretrained HF directory")
    for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size"):
        value = getattr(s, key)
        require(value is None or value >= 1, f"student.{key}", value, "an integer ≥ 1 or null")
    carve = s.carve
    require(
        carve.calibration_samples >= 1, "student.carve.calibration_samples", carve.calibration_samples, "an integer ≥ 1"
    )
    require(
        0 < carve.fill_ridge < math.inf, "student.carve.fill_ridge", carve.fill_ridge, "a finite ridge strength > 0"
    )
    lora = s.lora
    require(lora.r >= 0, "student.lora.r", lora.r, "an adapter rank ≥ 0 (0: no LoRA)")
    require(lora.alpha is None or lora.alpha > 0, "student.lora.alpha", lora.alpha, "a number > 0 or null (2 × r)")
    require(0 <= lora.dropout < 1, "student.lora.dropout", lora.dropout, "a dropout probability in [0, 1)")
    targets = lora.target_modules
    require(
        bool(targets) and (isinstance(targets, str) or all(targets)),
        "student.lora.target_modules",
        targets,
        "'all-linear' or a non-empty list of module names",
    )
    explicit_map = d.layer_map if isinstance(d.layer_map, list) else None
    num_layers = s.num_layers if s.num_layers is not None or s.init != "scratch" else SCRATCH_STUDENT["num_layers"]
    if explicit_map is not None and num_layers is not None:
        require(
            len(explicit_map) == num_layers,
            "distill.layer_map",
            explicit_map,
            f"'uniform', 'spread', 'last' or a list of {num_layers} teacher layer indices (one per student layer)",
        )
    if s.init == "scratch":
        heads = s.num_heads if s.num_heads is not None else SCRATCH_STUDENT["num_heads"]
        hidden = s.hidden_size if s.hidden_size is not None else SCRATCH_STUDENT["hidden_size"]
        require(hidden % heads == 0, "student.hidden_size", hidden, f"a multiple of student.num_heads ({heads})")
    if s.num_kv_heads is not None and s.num_heads is not None:
        require(
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
            require(layer >= 0, f"distill.layer_map[{index}]", layer, "a teacher layer index ≥ 0")
    for spec in term_specs():
        getattr(d, spec.name).validate(f"distill.{spec.name}")
    weights = {spec.name: getattr(d, spec.name).weight for spec in term_specs()}
    require(
        sum(weights.values()) > 0,
        f"distill.{next(iter(weights))}.weight",
        weights,
        f"at least one of {', '.join(f'distill.{name}.weight' for name in weights)} > 0",
    )
    if d.decay_steps is not None:
        require(d.decay_steps >= 1, "distill.decay_steps", d.decay_steps, "an integer ≥ 1 or null")
    for index, temperature in enumerate(c.temperatures):
        require(temperature > 0, f"cache.temperatures[{index}]", temperature, "a temperature > 0")
    require(
        len(set(c.attn_targets)) == len(c.attn_targets), "cache.attn_targets", c.attn_targets, "distinct target kinds"
    )
    require(data.seq_len >= 2, "data.seq_len", data.seq_len, "an integer ≥ 2")
    require(0 <= data.val_fraction < 1, "data.val_fraction", data.val_fraction, "a fraction in [0, 1)")
    require(
        0 <= data.test_fraction < 1 - data.val_fraction,
        "data.test_fraction",
        data.test_fraction,
        f"a fraction in [0, 1 − data.val_fraction = {1 - data.val_fraction:g})",
    )
    require(data.num_proc >= 1, "data.num_proc", data.num_proc, "an integer ≥ 1")
    fields = {"data.prompt_field": data.prompt_field, "data.response_field": data.response_field}
    if data.system_field is not None:
        fields["data.system_field"] = data.system_field
    for key, name in fields.items():
        require(bool(name), key, name, "a non-empty field name")
        others = [other for other, value in fields.items() if other != key and value == name]
        require(not others, key, name, f"a field name different from {' and '.join(others)}")
    for index, count in enumerate(c.head_counts):
        require(count >= 1, f"cache.head_counts[{index}]", count, "a head count ≥ 1")
    require(len(set(c.head_counts)) == len(c.head_counts), "cache.head_counts", c.head_counts, "distinct head counts")
    for index, layer in enumerate(c.layers):
        require(layer >= 0, f"cache.layers[{index}]", layer, "a teacher layer index ≥ 0")
    require(c.attn_top_m >= 1, "cache.attn_top_m", c.attn_top_m, "an integer ≥ 1")
    require(
        c.encoding != "topk" or c.attn_top_m <= data.seq_len,
        "cache.attn_top_m",
        c.attn_top_m,
        f"at most data.seq_len = {data.seq_len} entries per row (a row has at most T keys)",
    )
    require(0 < c.attn_row_fraction <= 1, "cache.attn_row_fraction", c.attn_row_fraction, "a fraction in (0, 1]")
    sparse_only = (("attn_row_fraction", 1.0, "every row"), ("attn_value_bits", 16, "16-bit values"))
    for key, dense_value, dense_form in sparse_only:
        value = getattr(c, key)
        require(
            c.encoding == "topk" or value == dense_value,
            f"cache.{key}",
            value,
            f"{dense_value} with cache.encoding: dense (a dense cache stores {dense_form}); use cache.encoding: topk",
        )
    require(c.shard_size >= 1, "cache.shard_size", c.shard_size, "an integer ≥ 1")
    require(c.batch_size >= 1, "cache.batch_size", c.batch_size, "an integer ≥ 1")
    if c.max_samples is not None:
        require(c.max_samples >= 1, "cache.max_samples", c.max_samples, "an integer ≥ 1 or null")
    require(t.max_steps >= 1, "train.max_steps", t.max_steps, "an integer ≥ 1")
    require(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "an integer ≥ 1")
    require(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "an integer ≥ 1")
    require(t.lr > 0, "train.lr", t.lr, "a learning rate > 0")
    require(0 <= t.min_lr <= t.lr, "train.min_lr", t.min_lr, f"a value in [0, train.lr = {t.lr}]")
    require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "an integer ≥ 0")
    require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "a norm ≥ 0 (0 disables clipping)")
    for key, value in (("train.save_every", t.save_every), ("train.eval_every", t.eval_every)):
        require(value >= 0, key, value, "an integer ≥ 0 (0: only at the end)")
    require(t.log_every >= 1, "train.log_every", t.log_every, "an integer ≥ 1")
    require(t.generations >= 0, "train.generations", t.generations, "an integer ≥ 0 (0: no generations)")
    require(
        t.generations == 0 or data.format != "text",
        "train.generations",
        t.generations,
        "0 with data.format: text (generations need a prompt and a reference reply: data.format chat or "
        "prompt_response)",
    )
    require(t.max_new_tokens >= 1, "train.max_new_tokens", t.max_new_tokens, "an integer ≥ 1")
    require(t.num_workers >= 0, "train.num_workers", t.num_workers, "an integer ≥ 0")
    require(t.keep_checkpoints >= 0, "train.keep_checkpoints", t.keep_checkpoints, "an integer ≥ 0 (0 keeps all)")
    for name, overrides in config.run.variants.items():
        require(
            isinstance(overrides, list) and all(isinstance(item, str) for item in overrides),
            f"run.variants.{name}",
            overrides,
            "a list of section.key=value overrides",
        )
    stage = config.deepspeed.zero_stage
    require(stage is None or stage in (0, 1, 2, 3), "deepspeed.zero_stage", stage, "0, 1, 2, 3 or null")
    for key in DIRECTORY_KEYS:
        require_directory_path(config.value(key), key)


def require_directory_path(path: str | Path, key: str) -> None:
    """Refuse a directory key whose path, or a folder above it, is an existing file: every stage would otherwise
    stop deep inside with an OSError (`File exists`, `Not a directory`)."""
    path = Path(path)
    for above in (path, *path.parents):
        if above.exists() and not above.is_dir():
            found = "is a file" if above == path else f"lies under {str(above)!r}, which is a file"
            raise ConfigError(
                f"{key}: {str(path)!r} {found}; expected a directory (or a path not created yet) — move the file "
                f"away or set {key} to another path"
            )


def validate_for_teacher(config: Config, *, vocab_size: int, num_heads: int) -> None:
    """The checks that need the teacher's vocabulary and head count, on a config whose student shape is resolved:
    the logits' top k fits the vocabulary, and `selective` targets (one teacher head per student head) ask for at
    most the teacher's heads."""
    top_k = config.distill.kd.top_k
    require(
        top_k <= vocab_size,
        "distill.kd.top_k",
        top_k,
        f"at most the teacher's vocabulary of {vocab_size} tokens (the cached logits are its top k); set "
        f"distill.kd.top_k to at most {vocab_size}",
    )
    student_heads = config.student.num_heads
    require(
        config.distill.attn.kind() != "selective" or student_heads <= num_heads,
        "student.num_heads",
        student_heads,
        f"at most the teacher's {num_heads} heads with distill.attn.match: selective (each student head is matched "
        "with one teacher head of its own); use fewer student heads or another distill.attn.match",
    )
    cache = config.cache
    if "selective" in (cache.attn_targets or [config.distill.attn.kind()]) and cache.head_counts:
        require(
            max(cache.head_counts) <= num_heads,
            "cache.head_counts",
            cache.head_counts,
            f"head counts of at most the teacher's {num_heads} heads: the selective targets (cache.attn_targets) "
            "pick one teacher head per student head; drop the larger counts or leave 'selective' out of "
            "cache.attn_targets",
        )


def validate_for_data(config: Config, *, train_samples: int, world_size: int) -> None:
    """Refuse a micro-step (`world_size` ranks × `train.micro_batch_size`) larger than the `train_samples` a run
    trains on: the stream would serve every sample several times within one micro-batch (1000 of 77 samples: 13
    times each), the same gradient at many times the cost, with samples seen and throughput overstated."""
    micro = config.train.micro_batch_size
    fits = max(train_samples // world_size, 1)
    ranks = f" on each of {world_size} ranks" if world_size > 1 else ""
    require(
        world_size * micro <= train_samples,
        "train.micro_batch_size",
        micro,
        f"at most {fits}{ranks}: a training epoch holds {train_samples} samples (the prepared train split, cut at "
        "cache.max_samples), and a larger micro-batch repeats samples within itself; lower it (raise "
        "train.grad_accum for the same global batch) or prepare more data",
    )
