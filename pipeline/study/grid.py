"""The study's runs: names, and the overrides of the base config that make each one, in a fixed order.

A run's overrides apply setting → frozen tuning → variant → seed, so within a seed every variant of a setting shares
its start, data order and budget and differs in its own overrides only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.study.layout import Study, config_value, format_override, parse_override, short_key

TUNE_STAGE, GRID_STAGE = "tune", "grid"


@dataclass(frozen=True)
class RunSpec:
    """One training run: its name (run directory, result file, MLflow run name) and the overrides of the base config
    that make it, in order (setting, tuned values, variant, seed)."""

    name: str
    stage: str
    """`tune` (validation score, the tuning experiment) or `grid` (test metrics, the study's experiment)."""
    setting: str
    variant: str
    seed: int
    overrides: tuple[str, ...]


def run_name(setting: str, variant: str, seed: int) -> str:
    """`<setting>-<variant>-seed<seed>`: `distill compare` strips the `-seed<N>` suffix to name the variant."""
    return f"{setting}-{variant}-seed{seed}"


def is_carved(study: Study, setting: str) -> bool:
    """Whether a setting starts from the teacher (carved once, then loaded)."""
    return any(parse_override(text) == ("student.init", "teacher") for text in study.settings[setting])


def setting_overrides(study: Study, setting: str, students_dir: Path) -> tuple[str, ...]:
    """A setting's overrides for training: a carved setting starts from its saved student directory."""
    overrides = []
    for text in study.settings[setting]:
        key, value = parse_override(text)
        overrides.append(
            f"student.init={students_dir / setting}" if key == "student.init" and value == "teacher" else text
        )
    return tuple(overrides)


def variant_overrides(study: Study, variant: str, frozen: Mapping[str, Any], base: Config) -> tuple[str, ...]:
    """A variant's overrides; a relation weight > 0 becomes the frozen attention weight (MiniLMv2 gets the weight the
    search chose for attention)."""
    w_attn = frozen.get("distill.attn.weight", base.distill.attn.weight)
    overrides = []
    for text in study.variants[variant]:
        key, value = parse_override(text)
        overrides.append(format_override(key, w_attn) if key == "distill.rel.weight" and value and value > 0 else text)
    return tuple(overrides)


def grid_specs(
    study: Study,
    base: Config,
    frozen: Mapping[str, Any],
    students_dir: Path,
    *,
    settings: Sequence[str],
    variants: Sequence[str],
    seeds: Sequence[int],
) -> list[RunSpec]:
    """Every grid run, seed-major (all settings and variants of the first seed first: an interrupted study has
    whole seeds), with the overrides setting → frozen tuning → variant → seed; a setting runs only its
    `study.setting_variants` where it has some."""
    tuned = tuple(format_override(key, value) for key, value in frozen.items())
    return [
        RunSpec(
            run_name(setting, variant, seed),
            GRID_STAGE,
            setting,
            variant,
            seed,
            (
                *setting_overrides(study, setting, students_dir),
                *tuned,
                *variant_overrides(study, variant, frozen, base),
                f"train.seed={seed}",
            ),
        )
        for seed in seeds
        for setting in settings
        for variant in variants
        if study.runs(setting, variant)
    ]


def tuning_spec(study: Study, assignment: Mapping[str, Any], students_dir: Path) -> RunSpec:
    """The tuning run of one assignment of every stage key (named by it, so equal assignments are one run)."""
    seed = study.seeds[0]
    label = ",".join(f"{short_key(key)}={json.dumps(value).strip(chr(34))}" for key, value in assignment.items())
    return RunSpec(
        f"tune-{label}",
        TUNE_STAGE,
        study.tune_setting,
        study.tune_variant,
        seed,
        (
            *setting_overrides(study, study.tune_setting, students_dir),
            *(format_override(key, value) for key, value in assignment.items()),
            *study.variants[study.tune_variant],
            f"train.seed={seed}",
        ),
    )


def start_assignment(study: Study, base: Config) -> dict[str, Any]:
    """Every stage key at the base config's value: where the search starts (and what `--quick` trains with)."""
    return {stage.key: config_value(base, stage.key) for stage in study.stages}
