"""Where the student starts (`student.init`): its resolved shape, and the built model (scratch, pretrained or carved
from the teacher, then LoRA).

One function per call site:

- `resolve(config)`: stage drivers, before anything reads `config.student.*` or the layer map. Fills every unset
  shape key from `student.init` (`resolve_student`, no model built) and, for `carve_layers: importance`, makes
  `distill.layer_map` the explicit list of the kept teacher layers, so the cache, the loss and the carve all use
  those layers. Idempotent.
- `build_student_model(config, teacher_config, …)`: the trainer (and, with `structure_only`, a resume or an
  evaluation from a checkpoint: the same modules without calibration or teacher weights, since the checkpoint's
  weights replace them).

A carved run writes `student_init.json` into `train.output_dir` (rank 0): what was kept, the block importance of
every teacher layer and the carve's wall time. `resolve` reads the kept layers back from it when it was made from the
same teacher path, data and calibration settings, so a resumed run or a later `distill eval` needs no calibration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from pipeline.config import SCRATCH_STUDENT, Config, ConfigError, StudentConfig
from pipeline.infra import dist
from pipeline.models.capture import CAPTURE_ATTENTION, attention_dims, model_family
from pipeline.ops.shd import layer_map, squeeze_groups
from pipeline.students import carve
from pipeline.students.lora import apply_lora

logger = logging.getLogger(__name__)

SCRATCH = "scratch"
TEACHER = "teacher"
RECORD_FILE = "student_init.json"
SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")
InitKind = Literal["scratch", "teacher", "pretrained"]


def init_kind(init: str) -> InitKind:
    """`scratch`, `teacher`, or `pretrained` (any other value: a local HF directory)."""
    return init if init in (SCRATCH, TEACHER) else "pretrained"


def _shape_of(hf_config: PretrainedConfig) -> dict[str, int]:
    """The student shape keys of an HF config (GPT-2's unset n_inner is 4 × width)."""
    dims = attention_dims(hf_config)
    if model_family(hf_config) == "gpt2":
        intermediate = hf_config.n_inner if hf_config.n_inner is not None else 4 * hf_config.hidden_size
    else:
        intermediate = hf_config.intermediate_size
    return {
        "num_layers": dims.num_layers,
        "hidden_size": dims.d_model,
        "num_heads": dims.num_heads,
        "num_kv_heads": dims.num_kv_heads,
        "intermediate_size": intermediate,
    }


# --------------------------------------------------------------------------------------------------------------------
# Shape resolution


def _filled(student: StudentConfig, defaults: dict[str, int]) -> dict[str, int]:
    return {key: getattr(student, key) if getattr(student, key) is not None else defaults[key] for key in defaults}


def _scratch_shape(student: StudentConfig, teacher_config: PretrainedConfig) -> dict[str, int]:
    """Today's defaults for unset keys: 4 layers, width 384, 3 heads, KV = heads, MLP per `make_student_config`."""
    shape = _filled(student, SCRATCH_STUDENT)
    shape["num_kv_heads"] = student.num_kv_heads or shape["num_heads"]
    if student.intermediate_size is not None:
        shape["intermediate_size"] = student.intermediate_size
    elif model_family(teacher_config) == "gpt2":
        shape["intermediate_size"] = 4 * shape["hidden_size"]
    else:
        ratio = teacher_config.intermediate_size * shape["hidden_size"] / teacher_config.hidden_size
        shape["intermediate_size"] = round(ratio)
    return shape


def _pretrained_config(directory: Path) -> PretrainedConfig:
    if not directory.is_dir():
        raise ConfigError(f"student.init: {str(directory)!r} is neither 'scratch', 'teacher' nor an existing directory")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"student.init: {str(directory)!r} holds no config.json; expected a pretrained HF model")
    return AutoConfig.from_pretrained(directory, local_files_only=True)


def _check_same_tokenizer(directory: Path, teacher_dir: Path) -> None:
    """Refuse a pretrained student whose tokenizer files differ from the teacher's (`data.tokenizer_fingerprint`)."""
    from pipeline.data.prepare import TOKENIZER_FILES, DataError, tokenizer_fingerprint

    try:
        found = tokenizer_fingerprint(directory)
    except DataError:
        raise ConfigError(
            f"student.init: {str(directory)!r} holds none of the tokenizer files ({', '.join(TOKENIZER_FILES)}), so "
            "its tokenizer_fingerprint cannot be compared with the teacher's; save the tokenizer with the model"
        ) from None
    expected = tokenizer_fingerprint(teacher_dir)
    if found == expected:
        return
    differing = [
        name
        for name in TOKENIZER_FILES
        if (directory / name).is_file() != (teacher_dir / name).is_file()
        or ((directory / name).is_file() and (directory / name).read_bytes() != (teacher_dir / name).read_bytes())
    ]
    raise ConfigError(
        f"student.init: {str(directory)!r} has tokenizer_fingerprint {found[:12]}…, the teacher {str(teacher_dir)!r} "
        f"has {expected[:12]}… (tokenizer files that differ: {', '.join(differing)}); a pretrained student must "
        "share the teacher's tokenizer"
    )


def _pretrained_shape(student: StudentConfig, teacher_config: PretrainedConfig, teacher_dir: Path) -> dict[str, int]:
    """The directory's own shape; every set key must agree with it."""
    directory = Path(student.init)
    hf_config = _pretrained_config(directory)
    try:
        family = model_family(hf_config)
    except ValueError as error:
        raise ConfigError(f"student.init: {str(directory)!r}: {error}") from None
    if family != model_family(teacher_config):
        raise ConfigError(
            f"student.init: {str(directory)!r} is a {family} model ({hf_config.model_type}), the teacher a "
            f"{model_family(teacher_config)} model ({teacher_config.model_type}); expected the teacher's family"
        )
    if hf_config.vocab_size != teacher_config.vocab_size:
        raise ConfigError(
            f"student.init: {str(directory)!r} has vocab_size {hf_config.vocab_size}, the teacher "
            f"{teacher_config.vocab_size}; expected the teacher's vocabulary"
        )
    _check_same_tokenizer(directory, teacher_dir)
    shape = _shape_of(hf_config)
    for key, value in shape.items():
        configured = getattr(student, key)
        if configured is not None and configured != value:
            raise ConfigError(
                f"student.{key}: got {configured}, but the pretrained student {str(directory)!r} has {value}; leave "
                f"student.{key} unset (null) or set it to {value}"
            )
    return shape


def _largest_divisor_up_to(number: int, limit: int) -> int:
    return max(divisor for divisor in range(1, min(number, limit) + 1) if number % divisor == 0)


def _teacher_shape(student: StudentConfig, teacher_config: PretrainedConfig, spec: Any) -> dict[str, int]:
    """Unset keys keep the teacher's value (no pruning there); num_layers comes from an explicit layer map."""
    teacher = _shape_of(teacher_config)
    dims = attention_dims(teacher_config)
    gpt2 = model_family(teacher_config) == "gpt2"
    num_layers = student.num_layers
    if num_layers is None:
        if not isinstance(spec, list):
            raise ConfigError(
                "student.num_layers: got null, expected a layer count (student.init: teacher takes it from "
                f"distill.layer_map only when that is an explicit list, not {spec!r})"
            )
        num_layers = len(spec)
    heads = student.num_heads if student.num_heads is not None else dims.num_heads
    if student.num_kv_heads is not None:
        kv_heads = student.num_kv_heads
    else:
        kv_heads = heads if gpt2 else _largest_divisor_up_to(heads, dims.num_kv_heads)
    hidden = student.hidden_size
    if gpt2:
        expected = heads * dims.head_dim
        if hidden is not None and hidden != expected:
            raise ConfigError(
                f"student.hidden_size: got {hidden}, expected {expected} = student.num_heads ({heads}) × the "
                f"teacher's head dim ({dims.head_dim}): a GPT-2 student carved from the teacher keeps the head dim, "
                "and GPT-2's width is heads × head dim"
            )
        hidden = expected
    elif hidden is None:
        hidden = teacher["hidden_size"]
    intermediate = student.intermediate_size or teacher["intermediate_size"]
    for key, value in (("hidden_size", hidden), ("intermediate_size", intermediate)):
        if value > teacher[key]:
            raise ConfigError(
                f"student.{key}: got {value}, expected at most the teacher's {teacher[key]} (a student carved from "
                "the teacher keeps a subset of its channels)"
            )
    if student.carve_layers == "importance" and num_layers > dims.num_layers:
        raise ConfigError(
            f"student.num_layers: got {num_layers}, expected at most the teacher's {dims.num_layers} layers "
            "(student.carve_layers: importance keeps distinct teacher layers)"
        )
    return {
        "num_layers": num_layers,
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "intermediate_size": intermediate,
    }


def student_hf_config(config: Config, teacher_config: PretrainedConfig) -> PretrainedConfig:
    """The HF config of the (resolved) student: the teacher's with the student's shape (a carved student keeps the
    teacher's head dim), or the pretrained directory's; every dropout 0 (distillation is deterministic)."""
    from pipeline.models.loading import make_student_config

    student = config.student
    missing = [key for key in SHAPE_KEYS if getattr(student, key) is None]
    if missing:
        raise ValueError(f"student.{missing[0]} is unresolved; call students.resolve(config) first")
    kind = init_kind(student.init)
    if kind == "pretrained":
        hf_config = _pretrained_config(Path(student.init))
        for key, value in hf_config.to_dict().items():
            if (key.endswith("dropout") or key.endswith("_pdrop")) and isinstance(value, float):
                setattr(hf_config, key, 0.0)
        return hf_config
    head_dim = attention_dims(teacher_config).head_dim if kind == TEACHER else None
    try:
        return make_student_config(
            teacher_config,
            num_layers=student.num_layers,
            hidden_size=student.hidden_size,
            num_heads=student.num_heads,
            num_kv_heads=student.num_kv_heads,
            intermediate_size=student.intermediate_size,
            head_dim=head_dim,
        )
    except (ValueError, StrictDataclassError) as error:
        shape = ", ".join(f"{key} {getattr(student, key)}" for key in SHAPE_KEYS)
        raise ConfigError(f"student: the shape ({shape}) cannot be built: {error}") from None


def resolve_student(config: Config, teacher_config: PretrainedConfig) -> Config:
    """`config` with every student shape key filled from `student.init` (see `StudentConfig`), checked on the
    resolved values with errors naming the key; deterministic, builds no model. Idempotent."""
    student = config.student
    kind = init_kind(student.init)
    if kind == SCRATCH:
        shape = _scratch_shape(student, teacher_config)
    elif kind == "pretrained":
        shape = _pretrained_shape(student, teacher_config, Path(config.teacher.path))
    else:
        shape = _teacher_shape(student, teacher_config, config.distill.layer_map)
    if kind != "pretrained" and shape["hidden_size"] % shape["num_heads"]:
        raise ConfigError(
            f"student.hidden_size: got {shape['hidden_size']}, expected a multiple of student.num_heads "
            f"({shape['num_heads']})"
        )
    if kind == SCRATCH and model_family(teacher_config) == "llama" and (shape["hidden_size"] // shape["num_heads"]) % 2:
        raise ConfigError(
            f"student.hidden_size: got {shape['hidden_size']}, expected an even head dim hidden_size // num_heads "
            f"(here {shape['hidden_size'] // shape['num_heads']}) for rotary embeddings"
        )
    if shape["num_heads"] % shape["num_kv_heads"]:
        raise ConfigError(
            f"student.num_kv_heads: got {shape['num_kv_heads']}, expected a divisor of student.num_heads "
            f"({shape['num_heads']})"
        )
    if model_family(teacher_config) == "gpt2" and shape["num_kv_heads"] != shape["num_heads"]:
        raise ConfigError(
            f"student.num_kv_heads: got {shape['num_kv_heads']}, expected student.num_heads ({shape['num_heads']}): "
            "GPT-2 has no grouped-query attention"
        )
    resolved = dataclasses.replace(config, student=dataclasses.replace(student, **shape))
    student_hf_config(resolved, teacher_config)
    num_teacher_layers = attention_dims(teacher_config).num_layers
    if not (kind == TEACHER and student.carve_layers == "importance"):
        try:
            layer_map(shape["num_layers"], num_teacher_layers, config.distill.layer_map)
        except ValueError as error:
            raise ConfigError(f"distill.layer_map: {error}") from None
    return resolved


# --------------------------------------------------------------------------------------------------------------------
# Calibration and the layer map of a carve by importance


def calibration_ids(config: Config, count: int | None = None) -> Tensor:
    """The first `count` (default `student.calibration_samples`) packed train sequences [N, T] int64 (fewer when the
    split is smaller, with a warning)."""
    from pipeline.data.prepare import load_prepared

    splits, _ = load_prepared(Path(config.data.output_dir))
    rows = splits["train"]
    wanted = config.student.calibration_samples if count is None else count
    if len(rows) < wanted:
        logger.warning("calibration: %d samples wanted, but the train split has %d sequences", wanted, len(rows))
    rows = rows.select(range(min(wanted, len(rows)))).with_format("torch", columns=["input_ids"])
    return torch.stack(list(rows["input_ids"])).long()


def _calibration_key(config: Config) -> dict[str, Any]:
    """What calibration statistics depend on: the teacher (path and its files' sizes and times), the data, the
    number of samples."""
    from pipeline.data.prepare import load_prepared

    teacher_dir = Path(config.teacher.path).resolve()
    files = sorted((path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in teacher_dir.iterdir())
    _, meta = load_prepared(Path(config.data.output_dir))
    return {
        "teacher_path": str(teacher_dir),
        "teacher_files_sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest(),
        "data_fingerprint": meta["fingerprint"],
        "calibration_samples": config.student.calibration_samples,
    }


_MEMO: dict[str, tuple[carve.Importance, float]] = {}
"""The last calibration statistics of this process and the seconds they took (stage drivers resolve, then train
carves: one teacher pass)."""


def teacher_importance(config: Config, teacher: PreTrainedModel | None = None) -> tuple[carve.Importance, float]:
    """(`carve.Importance` of the teacher on the calibration batches, seconds the measurement took), measured once
    per process and inputs; loads the teacher unless given (in its checkpoint's dtype, like the carve: copying
    weights from a teacher cast to `teacher.dtype` would round the student's fp32 weights)."""
    from pipeline.infra.runtime import default_device
    from pipeline.models.loading import load_teacher

    key = json.dumps(_calibration_key(config), sort_keys=True)
    if key in _MEMO:
        return _MEMO[key]
    started = time.perf_counter()
    if teacher is None:
        device = default_device()
        teacher = load_teacher(config.teacher.path, device=device)
    ids = calibration_ids(config)
    importance = carve.measure_importance(teacher, ids, config.cache.batch_size)
    seconds = time.perf_counter() - started
    logger.info(
        "calibration: importance of %d teacher layers on %d × %d tokens in %.1f s",
        importance.block.numel(),
        ids.shape[0],
        ids.shape[1],
        seconds,
    )
    _MEMO.clear()
    _MEMO[key] = importance, seconds
    return importance, seconds


def _recorded_layers(config: Config) -> list[int] | None:
    """The kept layers of an earlier carve in `train.output_dir` made from the same inputs, else None."""
    path = Path(config.train.output_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = (
        record.get("calibration") == _calibration_key(config)
        and record.get("carve_layers") == "importance"
        and len(record.get("teacher_layers", [])) == config.student.num_layers
    )
    return list(record["teacher_layers"]) if same else None


def carved_layers(config: Config, importance: carve.Importance | None = None) -> list[int]:
    """The teacher layer each student layer of a carve copies (= its layer map), for a resolved `init: teacher`
    config: `distill.layer_map`, or the layers of largest block importance (from `importance`, an earlier carve's
    record, or a calibration pass) — checked against an explicit layer map."""
    from pipeline.models.loading import load_teacher_config

    student, spec = config.student, config.distill.layer_map
    if student.carve_layers != "importance":
        teacher_config = load_teacher_config(config.teacher.path)
        return layer_map(student.num_layers, attention_dims(teacher_config).num_layers, spec)
    layers = _recorded_layers(config) if importance is None else None
    if layers is None:
        importance = importance or teacher_importance(config)[0]
        layers = carve.select_layers(importance.block, student.num_layers)
    if isinstance(spec, list) and spec != layers:
        raise ConfigError(
            f"distill.layer_map: got {spec}, but student.carve_layers: importance keeps teacher layers {layers}; "
            "leave distill.layer_map 'uniform' (the layer map follows the kept layers)"
        )
    return layers


def resolve(config: Config) -> Config:
    """What a stage driver calls first: the resolved student shape (`resolve_student`) and, for a student carved by
    layer importance, `distill.layer_map` set to the kept teacher layers (`carved_layers`). Idempotent."""
    from pipeline.models.loading import load_teacher_config

    resolved = resolve_student(config, load_teacher_config(config.teacher.path))
    student = resolved.student
    if init_kind(student.init) == TEACHER and student.carve_layers == "importance":
        layers = carved_layers(resolved)
        resolved = dataclasses.replace(resolved, distill=dataclasses.replace(resolved.distill, layer_map=layers))
    return resolved


# --------------------------------------------------------------------------------------------------------------------
# Building


def merge_alphas(
    alpha_stats: dict[str, Any] | None, layers: list[int], num_heads: int, squeeze: str
) -> dict[int, Tensor]:
    """Per teacher layer, the per-teacher-head mean α [H_t] of the cache manifest's `alpha_stats`
    (`L<layer>.H<heads>.<squeeze>`, the squeeze whose groups the carve uses); layers without statistics are left out
    (merged uniformly), with a warning."""
    alphas: dict[int, Tensor] = {}
    for layer in layers:
        stats = (alpha_stats or {}).get(f"L{layer}.H{num_heads}.{squeeze}")
        if stats is not None:
            alphas[layer] = torch.tensor(stats["per_teacher_head_mean"], dtype=torch.float64)
    missing = sorted(set(layers) - set(alphas))
    if missing:
        logger.warning(
            "student.head_init: merge: no cached α statistics for teacher layers %s at %d heads; merging those "
            "layers' head groups with uniform weights",
            missing,
            num_heads,
        )
    return alphas


def selective_heads(
    config: Config, teacher: PreTrainedModel, layers: list[int], selected_heads: dict[str, list[int]] | None
) -> tuple[dict[int, list[int]], str]:
    """(teacher layer → the teacher heads of its `selective` targets for `student.num_heads` heads, where they came
    from): `selected_heads` (a cache manifest's `L<layer>.H<heads>` → heads), else the train cache's manifest in
    cached mode, else — online mode, or a manifest without them — chosen as `distill cache` and the online teacher
    choose them (`select_teacher_heads` on the first train samples), so the carved heads are the matched ones."""
    from pipeline.targets.manifest import CacheError, read_manifest
    from pipeline.targets.writer import SELECTION_SAMPLES, select_teacher_heads

    heads, distinct = config.student.num_heads, tuple(sorted(set(layers)))
    source = "given"
    if selected_heads is None and config.train.mode == "cached":
        directory = Path(config.cache.output_dir) / "train"
        try:
            selected_heads, source = read_manifest(directory).selected_heads, f"the cache manifest in {directory}"
        except CacheError:
            source = f"no cache manifest in {directory}"
    missing = [f"L{layer}.H{heads}" for layer in distinct if f"L{layer}.H{heads}" not in (selected_heads or {})]
    if missing:
        logger.warning("selective heads %s not in %s: choosing them as `distill cache` does", missing, source)
        ids = calibration_ids(config, SELECTION_SAMPLES)
        selected_heads, _ = select_teacher_heads(teacher, ids, distinct, (heads,))
        source = f"chosen on the first {len(ids)} train samples as `distill cache` chooses them"
    chosen = {layer: list(selected_heads[f"L{layer}.H{heads}"]) for layer in set(layers)}
    for layer, teacher_heads in chosen.items():
        if len(teacher_heads) != heads:
            raise ConfigError(
                f"selected_heads L{layer}.H{heads} ({source}): {teacher_heads} names {len(teacher_heads)} teacher "
                f"heads, expected student.num_heads = {heads}"
            )
    return chosen, source


def carve_groups(
    config: Config,
    teacher: PreTrainedModel,
    layers: list[int],
    selected_heads: dict[str, list[int]] | None,
) -> tuple[dict[int, list[list[int]]], str]:
    """(teacher layer → the teacher heads each student head is carved from, what they are): the heads its attention
    target squeezes — the squeeze's groups (`headwise`, `global`), or under `attn_match: selective` the one teacher
    head its target is (student head j ↔ the j-th selected head, as the selective targets are stored)."""
    dims = attention_dims(teacher.config)
    if config.attention_kind() == "selective":
        chosen, source = selective_heads(config, teacher, layers, selected_heads)
        return {layer: [[head] for head in chosen[layer]] for layer in layers}, f"selective targets' heads ({source})"
    groups = squeeze_groups(dims.num_heads, config.student.num_heads, config.distill.squeeze)
    return dict.fromkeys(layers, groups), f"{config.distill.squeeze} squeeze groups"


def _carve(
    config: Config,
    teacher_config: PretrainedConfig,
    hf_config: PretrainedConfig,
    alpha_stats: dict[str, Any] | None,
    selected_heads: dict[str, list[int]] | None,
) -> PreTrainedModel:
    """The carved student (see `students.carve`), logged and recorded in `train.output_dir/student_init.json`."""
    from pipeline.infra.atomic import atomic_write_text
    from pipeline.infra.runtime import default_device
    from pipeline.models.loading import load_teacher

    student = config.student
    device = default_device()
    started = time.perf_counter()
    teacher = load_teacher(config.teacher.path, device=device)
    load_seconds = time.perf_counter() - started
    importance, calibration_seconds = teacher_importance(config, teacher)
    started = time.perf_counter()
    # A resolved importance carve already names its kept layers (measured or read from the record by `resolve`).
    spec = config.distill.layer_map
    layers = list(spec) if isinstance(spec, list) else carved_layers(config, importance)
    dims = attention_dims(teacher_config)
    groups, grouping = carve_groups(config, teacher, layers, selected_heads)
    merging = student.head_init == "merge" and config.attention_kind() != "selective"
    alphas = merge_alphas(alpha_stats, layers, student.num_heads, config.distill.squeeze) if merging else None
    plan = carve.plan_carve(teacher_config, hf_config, layers, importance, student.head_init, groups, alphas)
    model = carve.carve_student(teacher, hf_config, plan)
    fills: list[carve.SegmentFill] = []
    if student.carve_fill == "linear":
        fills = carve.fill_dropped_layers(
            teacher, model, plan, calibration_ids(config), config.cache.batch_size, student.carve_fill_ridge
        )
        for fill in fills:
            logger.info(
                "carve fill: student layer %d stands for teacher layers %d…%d; relative error of its output against "
                "the teacher's hidden state %.3f → %.3f (ridge %g)",
                fill.student_layer,
                *fill.teacher_layers,
                fill.error_before,
                fill.error_after,
                student.carve_fill_ridge,
            )
    seconds = time.perf_counter() - started
    kept = plan.describe()
    logger.info(
        "carved the student from the teacher in %.2f s (teacher load %.1f s, calibration %.1f s) (%s heads of the "
        "%s, layers by %s): teacher layers %s; heads per layer %s; KV heads %s; MLP channels %s of %d; hidden "
        "channels %d of %d",
        seconds,
        load_seconds,
        calibration_seconds,
        student.head_init,
        grouping,
        student.carve_layers,
        kept["teacher_layers"],
        kept["heads"],
        kept["kv_heads"],
        kept["mlp_channels"],
        importance.mlp.shape[1],
        kept["hidden_channels"],
        dims.d_model,
    )
    if dist.is_main():
        record = {
            "init": TEACHER,
            "carve_layers": student.carve_layers,
            "head_init": student.head_init,
            "head_groups": grouping,
            "calibration": _calibration_key(config),
            **kept,
            "block_importance": [round(value, 6) for value in importance.block.tolist()],
            "merge_alpha_layers": sorted(alphas) if alphas is not None else None,
            "carve_fill": student.carve_fill,
            "carve_fill_ridge": student.carve_fill_ridge if student.carve_fill == "linear" else None,
            "fills": [fill.describe() for fill in fills],
            "carve_seconds": round(seconds, 3),
            "teacher_load_seconds": round(load_seconds, 3),
            "calibration_seconds": round(calibration_seconds, 3),
        }
        output_dir = Path(config.train.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    return model


def build_student_model(
    config: Config,
    teacher_config: PretrainedConfig,
    *,
    structure_only: bool = False,
    alpha_stats: dict[str, Any] | None = None,
    selected_heads: dict[str, list[int]] | None = None,
    seed: int | None = None,
) -> nn.Module:
    """The student of a resolved `config` (see `resolve`), fp32, capture attention, train mode, with LoRA adapters
    when `student.lora.r` > 0 (then a PEFT model whose only trainable parameters are the adapters).

    `scratch`: random weights from `seed` (default `train.seed`), exactly `models.build_student`'s; a pretrained
    directory: its weights; `teacher`: carved from the teacher on calibration batches, heads merged with the cache's
    `alpha_stats` (a manifest's `alpha_stats`; None merges uniformly), or under `attn_match: selective` each head
    from its target's teacher head (`selected_heads`, a manifest's; None: see `selective_heads`). `structure_only`:
    the same modules with random weights and no calibration, for a caller about to load a checkpoint's weights.
    """
    from pipeline.models.loading import build_student

    student = config.student
    hf_config = student_hf_config(config, teacher_config)
    seed = config.train.seed if seed is None else seed
    kind = init_kind(student.init)
    if kind == SCRATCH:
        model = build_student(
            teacher_config,
            num_layers=student.num_layers,
            hidden_size=student.hidden_size,
            num_heads=student.num_heads,
            num_kv_heads=student.num_kv_heads,
            intermediate_size=student.intermediate_size,
            attn_implementation=CAPTURE_ATTENTION,
            seed=seed,
        )
    elif structure_only:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(
                hf_config, attn_implementation=CAPTURE_ATTENTION, dtype=torch.float32
            )
    elif kind == "pretrained":
        model = AutoModelForCausalLM.from_pretrained(
            student.init,
            config=hf_config,
            attn_implementation=CAPTURE_ATTENTION,
            dtype=torch.float32,
            local_files_only=True,
        )
        logger.info("student: pretrained weights from %s", student.init)
    else:
        model = _carve(config, teacher_config, hf_config, alpha_stats, selected_heads)
    model.train()
    if student.lora.r > 0 and kind == SCRATCH:
        logger.warning(
            "student.lora.r = %d with student.init: scratch trains adapters on a random base", student.lora.r
        )
    return apply_lora(model, student.lora)
