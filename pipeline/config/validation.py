"""Range and cross-field checks of a built config; each error names the key, the value and what is allowed.

Checks that need the teacher (the resolved student shape, the layer map's range) are made by the stages once the
teacher's config is read (`pipeline.students.resolve`).
"""

from __future__ import annotations

import math

from pipeline.config.schema import Config, DistillConfig, StudentConfig
from pipeline.errors import require
from pipeline.objective.terms import specs as term_specs

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
    for index, count in enumerate(c.head_counts):
        require(count >= 1, f"cache.head_counts[{index}]", count, "a head count ≥ 1")
    require(len(set(c.head_counts)) == len(c.head_counts), "cache.head_counts", c.head_counts, "distinct head counts")
    for index, layer in enumerate(c.layers):
        require(layer >= 0, f"cache.layers[{index}]", layer, "a teacher layer index ≥ 0")
    require(c.attn_top_m >= 1, "cache.attn_top_m", c.attn_top_m, "an integer ≥ 1")
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
