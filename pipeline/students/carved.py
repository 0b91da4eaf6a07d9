"""`student.init: teacher`: the student carved out of the teacher (`pipeline.students.importance`, `.carve` and
`.fill` hold the maths), Minitron-style, on calibration batches: depth by the layer map or block importance, heads
per squeeze group (prune or merge) or the selective targets' heads, MLP and width by activation, and optionally a
linear fill of each kept layer that stands for dropped ones.

A carved run writes `student_init.json` into `train.output_dir` (rank 0): what was kept, the block importance of
every teacher layer and the carve's wall time. `resolve` reads the kept layers back from it when it was made from the
same teacher path, data and calibration settings, so a resumed run or a later `distill eval` needs no calibration.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from pipeline.config import Config, ConfigError, StudentConfig
from pipeline.infra import dist
from pipeline.infra.atomic import atomic_write_text
from pipeline.infra.runtime import default_device
from pipeline.models.capture import attention_dims, model_family
from pipeline.models.loading import load_teacher, load_teacher_config
from pipeline.ops.matching import layer_map, squeeze_groups
from pipeline.students import carve
from pipeline.students.base import StudentInit, shape_of
from pipeline.students.calibration import calibration_ids, calibration_key, teacher_importance
from pipeline.students.fill import SegmentFill, fill_dropped_layers
from pipeline.students.importance import Importance
from pipeline.students.scratch import student_config_from_shape
from pipeline.targets.compute import calibration_passes
from pipeline.targets.kinds import get as target_kind
from pipeline.targets.kinds.selective import SELECTION_SAMPLES

logger = logging.getLogger(__name__)

RECORD_FILE = "student_init.json"


class CarvedStudent(StudentInit):
    name = "teacher"

    def shape(self, config: Config, teacher_config: PretrainedConfig) -> dict[str, int]:
        return _teacher_shape(config.student, teacher_config, config.distill.layer_map)

    def hf_config(self, config: Config, teacher_config: PretrainedConfig) -> PretrainedConfig:
        """The teacher's config in the student's shape, keeping the teacher's head dim."""
        return student_config_from_shape(config, teacher_config, attention_dims(teacher_config).head_dim)

    def resolve(self, config: Config) -> Config:
        """A carve by importance: `distill.layer_map` becomes the explicit list of the kept teacher layers, so the
        cache, the loss and the carve all use those layers."""
        if config.student.carve.layers != "importance":
            return config
        layers = carved_layers(config)
        return dataclasses.replace(config, distill=dataclasses.replace(config.distill, layer_map=layers))

    def build(
        self, config: Config, teacher_config: PretrainedConfig, hf_config: PretrainedConfig, targets: Any, seed: int
    ) -> nn.Module:
        return _carve(config, teacher_config, hf_config, targets)


def _largest_divisor_up_to(number: int, limit: int) -> int:
    return max(divisor for divisor in range(1, min(number, limit) + 1) if number % divisor == 0)


def _teacher_shape(student: StudentConfig, teacher_config: PretrainedConfig, spec: Any) -> dict[str, int]:
    """Unset keys keep the teacher's value (no pruning there); num_layers comes from an explicit layer map."""
    teacher = shape_of(teacher_config)
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
    if student.carve.layers == "importance" and num_layers > dims.num_layers:
        raise ConfigError(
            f"student.num_layers: got {num_layers}, expected at most the teacher's {dims.num_layers} layers "
            "(student.carve.layers: importance keeps distinct teacher layers)"
        )
    return {
        "num_layers": num_layers,
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "intermediate_size": intermediate,
    }


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
        record.get("calibration") == calibration_key(config)
        and record.get("carve_layers") == "importance"
        and len(record.get("teacher_layers", [])) == config.student.num_layers
    )
    return list(record["teacher_layers"]) if same else None


def carved_layers(config: Config, importance: Importance | None = None) -> list[int]:
    """The teacher layer each student layer of a carve copies (= its layer map), for a resolved `init: teacher`
    config: `distill.layer_map`, or the layers of largest block importance (from `importance`, an earlier carve's
    record, or a calibration pass) — checked against an explicit layer map."""
    student, spec = config.student, config.distill.layer_map
    if student.carve.layers != "importance":
        teacher_config = load_teacher_config(config.teacher.path)
        return layer_map(student.num_layers, attention_dims(teacher_config).num_layers, spec)
    layers = _recorded_layers(config) if importance is None else None
    if layers is None:
        importance = importance or teacher_importance(config)[0]
        layers = carve.select_layers(importance.block, student.num_layers)
    if isinstance(spec, list) and spec != layers:
        raise ConfigError(
            f"distill.layer_map: got {spec}, but student.carve.layers: importance keeps teacher layers {layers}; "
            "leave distill.layer_map 'uniform' (the layer map follows the kept layers)"
        )
    return layers


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
            "student.carve.heads: merge: no cached α statistics for teacher layers %s at %d heads; merging those "
            "layers' head groups with uniform weights",
            missing,
            num_heads,
        )
    return alphas


def selective_heads(
    config: Config, teacher: PreTrainedModel, layers: list[int], targets: Any
) -> tuple[dict[int, list[int]], str]:
    """(teacher layer → the teacher heads of its `selective` targets for `student.num_heads` heads, where they came
    from): the run's targets' (`TargetSource.selected_heads`: the cache manifest's, or the live source's), else —
    targets without them — chosen as `distill cache` and the live source choose them (on the first train samples),
    so the carved heads are the matched ones."""
    heads, distinct = config.student.num_heads, tuple(sorted(set(layers)))
    selected = dict(targets.selected_heads) if targets is not None else {}
    source = "the run's targets"
    missing = [f"L{layer}.H{heads}" for layer in distinct if f"L{layer}.H{heads}" not in selected]
    if missing:
        logger.warning("selective heads %s not in %s: choosing them as `distill cache` does", missing, source)
        ids = calibration_ids(config, SELECTION_SAMPLES)
        passes = calibration_passes(teacher, ids, distinct, config.cache.batch_size)
        selected = target_kind("selective").prepare(passes, distinct, (heads,))["selected_heads"]
        source = f"chosen on the first {len(ids)} train samples as `distill cache` chooses them"
    chosen = {layer: list(selected[f"L{layer}.H{heads}"]) for layer in set(layers)}
    for layer, teacher_heads in chosen.items():
        if len(teacher_heads) != heads:
            raise ConfigError(
                f"selected_heads L{layer}.H{heads} ({source}): {teacher_heads} names {len(teacher_heads)} teacher "
                f"heads, expected student.num_heads = {heads}"
            )
    return chosen, source


def carve_groups(
    config: Config, teacher: PreTrainedModel, layers: list[int], targets: Any
) -> tuple[dict[int, list[list[int]]], str]:
    """(teacher layer → the teacher heads each student head is carved from, what they are): the heads its attention
    target squeezes — the squeeze's groups (`headwise`, `global`), or under `attn.match: selective` the one teacher
    head its target is (student head j ↔ the j-th selected head, as the selective targets are stored)."""
    dims = attention_dims(teacher.config)
    if config.distill.attn.kind() == "selective":
        chosen, source = selective_heads(config, teacher, layers, targets)
        return {layer: [[head] for head in chosen[layer]] for layer in layers}, f"selective targets' heads ({source})"
    groups = squeeze_groups(dims.num_heads, config.student.num_heads, config.distill.attn.squeeze)
    return dict.fromkeys(layers, groups), f"{config.distill.attn.squeeze} squeeze groups"


def _carve(
    config: Config, teacher_config: PretrainedConfig, hf_config: PretrainedConfig, targets: Any
) -> PreTrainedModel:
    """The carved student (see `students.carve`), logged and recorded in `train.output_dir/student_init.json`."""
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
    groups, grouping = carve_groups(config, teacher, layers, targets)
    merging = student.carve.heads == "merge" and config.distill.attn.kind() != "selective"
    alpha_stats = targets.alpha_stats if targets is not None else None
    squeeze = config.distill.attn.squeeze
    alphas = merge_alphas(alpha_stats, layers, student.num_heads, squeeze) if merging else None
    plan = carve.plan_carve(teacher_config, hf_config, layers, importance, student.carve.heads, groups, alphas)
    model = carve.carve_student(teacher, hf_config, plan)
    fills: list[SegmentFill] = []
    if student.carve.fill == "linear":
        fills = fill_dropped_layers(
            teacher, model, plan, calibration_ids(config), config.cache.batch_size, student.carve.fill_ridge
        )
        for fill in fills:
            logger.info(
                "carve fill: student layer %d stands for teacher layers %d…%d; relative error of its output against "
                "the teacher's hidden state %.3f → %.3f (ridge %g)",
                fill.student_layer,
                *fill.teacher_layers,
                fill.error_before,
                fill.error_after,
                student.carve.fill_ridge,
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
        student.carve.heads,
        grouping,
        student.carve.layers,
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
            "init": CarvedStudent.name,
            "carve_layers": student.carve.layers,
            "head_init": student.carve.heads,
            "head_groups": grouping,
            "calibration": calibration_key(config),
            **kept,
            "block_importance": [round(value, 6) for value in importance.block.tolist()],
            "merge_alpha_layers": sorted(alphas) if alphas is not None else None,
            "carve_fill": student.carve.fill,
            "carve_fill_ridge": student.carve.fill_ridge if student.carve.fill == "linear" else None,
            "fills": [fill.describe() for fill in fills],
            "carve_seconds": round(seconds, 3),
            "teacher_load_seconds": round(load_seconds, 3),
            "calibration_seconds": round(calibration_seconds, 3),
        }
        output_dir = Path(config.train.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    return model
