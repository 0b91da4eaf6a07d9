"""The `study:` section of a study config: the grid (variants, settings, seeds), the search and `--quick`, checked
once, with errors that name the key (`study.tune.stages[1]`), the value found and what was expected.

A study file is a plain pipeline config plus one top-level `study:` section. The pipeline's `Config` refuses unknown
sections, so the section is split off here before the rest goes to `config_from_dict`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, config_from_dict, read_yaml_file
from pipeline.config import parse_override as parse_config_override
from pipeline.errors import PipelineError

SECTION = "study"
KEYS = (
    "baseline",
    "variants",
    "settings",
    "setting_variants",
    "seeds",
    "tune",
    "quick",
    "work_dir",
    "report_dir",
    "budget_minutes",
)
TUNE_KEYS = ("setting", "variant", "stages")
QUICK_KEYS = ("settings", "variants", "seeds", "overrides")


class StudyError(PipelineError):
    """The study's config or its saved state does not fit; the message names the key or file and the fix."""


@dataclass(frozen=True)
class Stage:
    """One step of the greedy search: a dotted config key and the values it tries."""

    name: str
    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Quick:
    """What `--quick` runs: a subset of the grid, no search, the base with `overrides` (a smaller budget)."""

    settings: tuple[str, ...]
    variants: tuple[str, ...]
    seeds: int
    """The first this many seeds."""
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Study:
    """What a config's `study:` section lays out (see `configs/quality.yaml`'s header)."""

    variants: dict[str, tuple[str, ...]]
    settings: dict[str, tuple[str, ...]]
    stages: tuple[Stage, ...]
    seeds: tuple[int, ...]
    quick: Quick | None
    baseline: str
    """The variant every other one is compared with, seed by seed."""
    tune_setting: str | None = None
    tune_variant: str | None = None
    """The search runs on this setting and variant, at the first seed; None without a search."""
    work_dir: str | None = None
    report_dir: str | None = None
    budget_minutes: float | None = None
    setting_variants: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Setting → the only variants it runs (a setting not named runs every variant)."""

    def runs(self, setting: str, variant: str) -> bool:
        """Whether the grid holds `variant` in `setting`."""
        return variant in self.setting_variants.get(setting, (variant,))


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` → (dotted key, YAML value), parsed exactly as the pipeline parses a command-line override."""
    try:
        path, value = parse_config_override(text)
    except ConfigError as error:
        raise StudyError(str(error)) from error
    return ".".join(path), value


def format_override(key: str, value: Any) -> str:
    """(dotted key, value) → `key=value` with the value in YAML (JSON) form: `distill.layer_map=[0, 10]`."""
    return f"{key}={json.dumps(value)}"


def config_value(config: Config, key: str) -> Any:
    """The value of a dotted key (`distill.attn.weight`) in `config`."""
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def derive(base: Config, overrides: Sequence[str]) -> Config:
    """`base` with `overrides` (any `run.variants` dropped: a study run is one config)."""
    values = base.to_dict()
    values["run"]["variants"] = {}
    return config_from_dict(values, list(overrides))


def split_study_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the `study:` section, the plain pipeline config) of a study file; errors name the file."""
    values = read_yaml_file(path, "study config") or {}
    if not isinstance(values, dict):
        raise StudyError(f"{path}: got a {type(values).__name__}, expected a mapping of config sections")
    section = values.pop(SECTION, None)
    if not isinstance(section, dict):
        raise StudyError(
            f"{path}: {SECTION}: got {section!r}, expected a mapping (baseline, variants, settings, seeds, …); "
            "see configs/quality.yaml"
        )
    return section, values


def load_base(path: Path, values: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """The pipeline config of a study file (its sections but `study:`) with `overrides`; errors name the file."""
    try:
        return config_from_dict(dict(values), list(overrides))
    except ConfigError as error:
        raise StudyError(f"{path}: {error}") from None


def load_study(path: Path, overrides: Sequence[str] = ()) -> tuple[Study, Config]:
    """The study and its base config (with `overrides`) from a study file; errors name the file and the key."""
    section, values = split_study_file(path)
    base = load_base(path, values, overrides)
    try:
        return read_study(section, base), base
    except StudyError as error:
        raise StudyError(f"{path}: {error}") from None


def _expect(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise StudyError(f"{SECTION}.{key}: got {value!r}, expected {expected}")


def _names(section: Mapping[str, Any], key: str, base: Config) -> dict[str, tuple[str, ...]]:
    """`variants` or `settings`: name → overrides, each list applied to `base` to check it."""
    entries = section.get(key)
    _expect(isinstance(entries, dict) and bool(entries), key, entries, "a mapping of name → [section.key=value, …]")
    for name, overrides in entries.items():
        _checked_overrides(f"{key}.{name}", overrides, base)
    return {str(name): tuple(overrides) for name, overrides in entries.items()}


def _checked_overrides(key: str, overrides: Any, base: Config) -> None:
    """Overrides must be a list of `section.key=value` strings that make a valid config from `base`."""
    _expect(
        isinstance(overrides, list) and all(isinstance(item, str) for item in overrides),
        key,
        overrides,
        "a list of section.key=value overrides",
    )
    try:
        derive(base, overrides)
    except ConfigError as error:
        raise StudyError(f"{SECTION}.{key}: {error}") from None


def _subset(value: Any, key: str, known: Mapping[str, Any], kind: str) -> tuple[str, ...]:
    _expect(isinstance(value, list) and bool(value), key, value, f"a list of {kind} names")
    missing = [name for name in value if name not in known]
    _expect(not missing, key, value, f"names among study.{kind} ({', '.join(known)})")
    return tuple(value)


def read_stages(tune: Mapping[str, Any], base: Config) -> tuple[Stage, ...]:
    """`tune.stages`: a list of one-key mappings `config.key: [values]`, each key tuned once."""
    stages_value = tune.get("stages") or []
    _expect(isinstance(stages_value, list), "tune.stages", stages_value, "a list of `config.key: [values]` entries")
    stages: list[Stage] = []
    for index, entry in enumerate(stages_value):
        where = f"tune.stages[{index}]"
        expected = "one `config.key: [candidate values]` entry (distill.attn.weight: [0.1, 0.3])"
        _expect(isinstance(entry, dict) and len(entry) == 1, where, entry, expected)
        ((key, values),) = entry.items()
        _expect(isinstance(values, list) and bool(values), f"{where}.{key}", values, "a list of candidate values")
        if any(stage.key == key for stage in stages):
            raise StudyError(f"{SECTION}.{where}: {key} is already tuned by another stage; expected one stage per key")
        try:
            config_value(base, key)
        except AttributeError:
            raise StudyError(f"{SECTION}.{where}: {key!r} is no config key; expected section.key") from None
        for value in values:
            _checked_overrides(f"{where}.{key}", [format_override(key, value)], base)
        stages.append(Stage(short_key(key), key, tuple(values)))
    return tuple(stages)


def short_key(key: str) -> str:
    """A config key without its section (`distill.attn.weight` → `attn.weight`): how stages and tuning runs name it."""
    return key.split(".", 1)[-1]


def _known_keys(value: Mapping[str, Any], where: str, keys: Sequence[str]) -> None:
    unknown = [key for key in value if key not in keys]
    if unknown:
        raise StudyError(f"{SECTION}.{where}.{unknown[0]}: unknown key; expected one of {', '.join(keys)}")


def read_quick(
    quick: Any, variants: Mapping[str, Any], settings: Mapping[str, Any], seeds: Sequence[int], base: Config
) -> Quick | None:
    """`quick`: the subset `--quick` runs and its overrides of the base; None when the study has no quick mode."""
    if quick is None:
        return None
    _expect(isinstance(quick, dict), "quick", quick, f"a mapping of {', '.join(QUICK_KEYS)}")
    _known_keys(quick, "quick", QUICK_KEYS)
    count = quick.get("seeds", 1)
    _expect(
        isinstance(count, int) and 1 <= count <= len(seeds),
        "quick.seeds",
        count,
        f"how many of the first seeds to run (1 to {len(seeds)})",
    )
    overrides = quick.get("overrides", [])
    _checked_overrides("quick.overrides", overrides, base)
    return Quick(
        _subset(quick.get("settings"), "quick.settings", settings, "settings"),
        _subset(quick.get("variants"), "quick.variants", variants, "variants"),
        count,
        tuple(overrides),
    )


def read_setting_variants(
    value: Any, settings: Mapping[str, Any], variants: Mapping[str, Any], baseline: str
) -> dict[str, tuple[str, ...]]:
    """`setting_variants`: setting → the subset of variants it runs; each subset holds the baseline (every run is
    compared with it, seed by seed)."""
    if value is None:
        return {}
    _expect(isinstance(value, dict), "setting_variants", value, "a mapping of setting → [variant, …]")
    chosen = {}
    for setting, names in value.items():
        _expect(
            setting in settings, "setting_variants", setting, f"a setting among study.settings ({', '.join(settings)})"
        )
        subset = _subset(names, f"setting_variants.{setting}", variants, "variants")
        _expect(
            baseline in subset, f"setting_variants.{setting}", names, f"a list that includes the baseline {baseline!r}"
        )
        chosen[str(setting)] = subset
    return chosen


def read_study(section: Mapping[str, Any], base: Config) -> Study:
    """Check a `study:` section against its base config and return it as a `Study`."""
    unknown = [key for key in section if key not in KEYS]
    if unknown:
        raise StudyError(f"{SECTION}.{unknown[0]}: unknown key; expected one of {', '.join(KEYS)}")
    variants = _names(section, "variants", base)
    settings = _names(section, "settings", base)
    baseline = section.get("baseline")
    if baseline not in variants:
        raise StudyError(
            f"{SECTION}.baseline: no variant {baseline!r} among study.variants ({', '.join(variants)}); expected "
            "the variant every other one is compared with"
        )
    seeds = section.get("seeds")
    _expect(
        isinstance(seeds, list) and bool(seeds) and all(isinstance(seed, int) for seed in seeds),
        "seeds",
        seeds,
        "a list of train.seed integers, one per repetition ([0, 1, 2])",
    )
    _expect(len(set(seeds)) == len(seeds), "seeds", seeds, "distinct seeds")
    tune = section.get("tune") or {}
    _expect(isinstance(tune, dict), "tune", tune, f"a mapping of {', '.join(TUNE_KEYS)}")
    _known_keys(tune, "tune", TUNE_KEYS)
    stages = read_stages(tune, base)
    tune_setting, tune_variant = (tune.get("setting"), tune.get("variant")) if stages else (None, None)
    if stages:
        for key, value, known in (("setting", tune_setting, settings), ("variant", tune_variant, variants)):
            _expect(value in known, f"tune.{key}", value, f"one of study.{key}s ({', '.join(known)})")
    for key in ("work_dir", "report_dir"):
        _expect(section.get(key) is None or isinstance(section[key], str), key, section.get(key), "a directory")
    budget = section.get("budget_minutes")
    _expect(budget is None or (isinstance(budget, int | float) and budget > 0), "budget_minutes", budget, "minutes > 0")
    return Study(
        variants,
        settings,
        stages,
        tuple(seeds),
        read_quick(section.get("quick"), variants, settings, seeds, base),
        baseline,
        tune_setting,
        tune_variant,
        section.get("work_dir"),
        section.get("report_dir"),
        budget,
        read_setting_variants(section.get("setting_variants"), settings, variants, baseline),
    )
