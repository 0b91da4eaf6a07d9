"""Does squeezed-attention distillation pay? A reproducible, resumable quality study on the real teacher.

The SmolLM2-135M teacher (9 heads) is distilled into 4-layer students (the demo's shape) from three settings —
carved from the teacher with 3 and with 2 heads (the 2-head squeeze is not divisible), and random with 3 heads —
under nine objectives (CE only, KD only, uniform-α / SHD / SHD-pairwise / selective / global / SHD-MSE attention +
KD, MiniLMv2 relations + KD), each over several seeds, with one token budget, data order and set of
hyper-parameters per seed. Everything is laid out in `configs/quality.yaml` (see its header).

What it does, in order (every step skips what is already done, so a killed study continues where it stopped):

1. prepares Shakespeare with a held-out `test` split and caches the teacher's targets once for every variant (the
   cache stage resumes by itself);
2. carves each `student.init=teacher` setting once and saves it as a plain HF directory (with the teacher's
   tokenizer files); every run of the setting starts from it (`student.init=<directory>`): no recalibration;
3. tunes the attention hyper-parameters greedily, one factor at a time (the `tune.*` stages of the config), on
   setting carved3, variant shd_kd, the first seed; score: perplexity on the whole cached VALIDATION split; every
   tuning run goes to MLflow experiment `quality-tuning`; the choice is frozen in `<work>/frozen.json` and never
   revisited (a rerun reads it; delete it to search again);
4. trains the grid (settings × variants × seeds) with the frozen values, each run `<setting>-<variant>-seed<seed>`
   in MLflow experiment `quality`, then evaluates the exported student on the cached held-out TEST split
   (`evaluate_stage(split="test")`); each finished run writes `<work>/results/<run>.json` (atomically) and its
   checkpoint and exported weights are deleted (`--keep-models` keeps them);
5. writes `<report>/index.md` (command, commit, budget, tuning, per-setting tables with mean ± std over seeds and the
   paired comparison against kd_only, curves with seed bands), `results.csv`, the figures, and `distill compare`'s
   report per setting under `<report>/compare/<setting>/`.

    .venv/bin/python benchmarks/quality.py --plan      # what would run and how long (measured when it can be)
    .venv/bin/python benchmarks/quality.py             # the study: work/quality, reports/quality
    .venv/bin/python benchmarks/quality.py --quick     # ≤ 15 min: carved3; kd_only, uniform_kd, shd_kd; 2 seeds
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, ConfigError, config_from_dict, load_config
from pipeline.config import parse_override as parse_config_override
from pipeline.errors import PipelineError
from pipeline.infra.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("quality")

BASELINE = "kd_only"
"""The variant every other one is compared with, seed by seed."""
TUNE_SETTING, TUNE_VARIANT = "carved3", "shd_kd"
"""The search runs on this setting and variant, at the first seed of `seeds`."""
QUICK_SETTINGS = ("carved3",)
QUICK_VARIANTS = ("kd_only", "uniform_kd", "shd_kd")
QUICK_SEEDS = 2
"""`--quick` takes the first this many seeds."""
SETTING_PREFIX, TUNE_PREFIX, SEEDS_ENTRY, QUICK_ENTRY = "setting.", "tune.", "seeds", "quick"
TUNING_EXPERIMENT, GRID_EXPERIMENT = "quality-tuning", "quality"
BUDGET_S = 2.5 * 3600
"""The whole study, unattended, on 2 quiet CPU cores."""
PRIOR_STEP_S = 66.8 / 24
PRIOR_RUN_OVERHEAD_S = 15.0
PRIOR_CACHE_TOK_S = 110.0
PRIOR_CARVE_S = 60.0
PRIOR_COMPARE_RUN_S = 3.0
"""What `--plan` assumes before anything was measured, from the README's demo on this kind of machine (2 cores,
two other jobs): a 24-step shd_kd run took 66.8 s with its five evaluations (all counted as step time here), the
cache stage wrote 110 tok/s; the test evaluation (15 s), a carve (60 s) and `distill compare` per compared run (3 s)
are guesses. Measured values replace the run and comparison figures as soon as there are some (runs: this study's,
else the other mode's)."""
CURVE_KEYS = ("eval/ppl", "eval/top1_agreement", "eval/attn_kl", "train/grad_norm", "train/loss")
"""Histories each result keeps (from `metrics.jsonl`), for the report's seed-band figures."""


class StudyError(PipelineError):
    """The study's config or its saved state does not fit; the message names the key or file and the fix."""


# --------------------------------------------------------------------------------------------------------------------
# The study's layout (pure)


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


@dataclass(frozen=True)
class Stage:
    """One step of the greedy search: a dotted config key and the values it tries."""

    name: str
    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Study:
    """What `configs/quality.yaml` lays out in `run.variants` (see its header)."""

    variants: dict[str, tuple[str, ...]]
    settings: dict[str, tuple[str, ...]]
    stages: tuple[Stage, ...]
    seeds: tuple[int, ...]
    quick: tuple[str, ...]


def read_study(config: Config) -> Study:
    """Split a loaded study config's `run.variants` into variants, settings, tuning stages, seeds and the quick
    budget; errors name the entry (`run.variants.<name>`) and what was expected."""
    variants, settings, stages = {}, {}, []
    seeds: tuple[int, ...] = ()
    quick: tuple[str, ...] = ()
    for name, overrides in config.run.variants.items():
        where = f"run.variants.{name}"
        if name.startswith(SETTING_PREFIX):
            settings[name.removeprefix(SETTING_PREFIX)] = tuple(overrides)
        elif name.startswith(TUNE_PREFIX):
            parsed = [parse_override(text) for text in overrides]
            keys = {key for key, _ in parsed}
            if len(keys) != 1 or not parsed:
                raise StudyError(f"{where}: got {overrides}, expected candidates of one key (distill.w_attn=0.1, …)")
            (key,) = keys
            if any(stage.key == key for stage in stages):
                raise StudyError(f"{where}: {key} is already tuned by another stage; expected one stage per key")
            stages.append(Stage(name.removeprefix(TUNE_PREFIX), key, tuple(value for _, value in parsed)))
        elif name == SEEDS_ENTRY:
            parsed = [parse_override(text) for text in overrides]
            if not parsed or any(key != "train.seed" or not isinstance(value, int) for key, value in parsed):
                raise StudyError(f"{where}: got {overrides}, expected train.seed=<int> overrides, one per seed")
            seeds = tuple(value for _, value in parsed)
        elif name == QUICK_ENTRY:
            quick = tuple(overrides)
        else:
            variants[name] = tuple(overrides)
    if BASELINE not in variants:
        raise StudyError(f"run.variants: no variant {BASELINE!r}, the baseline of the paired comparison")
    if not seeds:
        raise StudyError(f"run.variants.{SEEDS_ENTRY}: missing; expected [train.seed=0, train.seed=1, …]")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"run.variants.{SEEDS_ENTRY}: got {list(seeds)}, expected distinct seeds")
    if not settings:
        raise StudyError(f"run.variants: no {SETTING_PREFIX}<name> entry; expected at least one student setting")
    return Study(variants, settings, tuple(stages), seeds, quick)


def config_value(config: Config, key: str) -> Any:
    """The value of a dotted key (`distill.w_attn`) in `config`."""
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


@dataclass(frozen=True)
class RunSpec:
    """One training run: its name (run directory, result file, MLflow run name) and the overrides of the base config
    that make it, in order (setting, tuned values, variant, seed)."""

    name: str
    stage: str
    """`tune` (validation score, experiment quality-tuning) or `grid` (test metrics, experiment quality)."""
    setting: str
    variant: str
    seed: int
    overrides: tuple[str, ...]


def run_name(setting: str, variant: str, seed: int) -> str:
    """`<setting>-<variant>-seed<seed>`: `distill compare` strips the `-seed<N>` suffix to name the variant."""
    return f"{setting}-{variant}-seed{seed}"


def setting_overrides(study: Study, setting: str, students_dir: Path) -> tuple[str, ...]:
    """A setting's overrides for training: a carved setting starts from its saved student directory."""
    overrides = []
    for text in study.settings[setting]:
        key, value = parse_override(text)
        overrides.append(
            f"student.init={students_dir / setting}" if key == "student.init" and value == "teacher" else text
        )
    return tuple(overrides)


def is_carved(study: Study, setting: str) -> bool:
    """Whether a setting starts from the teacher (carved once, then loaded)."""
    return any(parse_override(text) == ("student.init", "teacher") for text in study.settings[setting])


def variant_overrides(study: Study, variant: str, frozen: Mapping[str, Any], base: Config) -> tuple[str, ...]:
    """A variant's overrides; a relation weight > 0 becomes the frozen attention weight (MiniLMv2 gets the weight the
    search chose for attention)."""
    w_attn = frozen.get("distill.w_attn", base.distill.w_attn)
    overrides = []
    for text in study.variants[variant]:
        key, value = parse_override(text)
        overrides.append(format_override(key, w_attn) if key == "distill.w_rel" and value and value > 0 else text)
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
    whole seeds), with the overrides setting → frozen tuning → variant → seed."""
    tuned = tuple(format_override(key, value) for key, value in frozen.items())
    return [
        RunSpec(
            run_name(setting, variant, seed),
            "grid",
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
    ]


def tuning_spec(study: Study, assignment: Mapping[str, Any], students_dir: Path) -> RunSpec:
    """The tuning run of one assignment of every stage key (named by it, so equal assignments are one run)."""
    seed = study.seeds[0]
    label = ",".join(f"{key.split('.')[-1]}={json.dumps(value).strip(chr(34))}" for key, value in assignment.items())
    return RunSpec(
        f"tune-{label}",
        "tune",
        TUNE_SETTING,
        TUNE_VARIANT,
        seed,
        (
            *setting_overrides(study, TUNE_SETTING, students_dir),
            *(format_override(key, value) for key, value in assignment.items()),
            *study.variants[TUNE_VARIANT],
            f"train.seed={seed}",
        ),
    )


def start_assignment(study: Study, base: Config) -> dict[str, Any]:
    """Every stage key at the base config's value: where the search starts (and what `--quick` trains with)."""
    return {stage.key: config_value(base, stage.key) for stage in study.stages}


@dataclass
class TuningRow:
    """One tried value of a stage: its score and whether the stage kept it."""

    stage: str
    key: str
    value: Any
    run: str
    score: float
    chosen: bool = False


def greedy_search(
    stages: Sequence[Stage], start: Mapping[str, Any], score: Callable[[dict[str, Any]], float]
) -> tuple[dict[str, Any], list[TuningRow]]:
    """One factor at a time: each stage tries its values with the others at their current choice and keeps the
    lowest score (ties keep the current value, else the first listed). `score` gets the whole assignment; an
    assignment tried in an earlier stage is asked again (memoise it)."""
    current = dict(start)
    rows: list[TuningRow] = []
    for stage in stages:
        tried = []
        for value in stage.values:
            assignment = {**current, stage.key: value}
            tried.append(TuningRow(stage.name, stage.key, value, "", score(assignment)))
        kept = next((row for row in tried if row.value == current[stage.key]), tried[0])
        for row in tried:
            if row.score < kept.score:
                kept = row
        kept.chosen = True
        current[stage.key] = kept.value
        rows += tried
    return current, rows


def tuning_run_count(study: Study, start: Mapping[str, Any]) -> int:
    """Distinct runs the search trains: every value of the first stage; in a later stage, every value but the
    current one (already scored as the previous stage's choice)."""
    return sum(
        len(stage.values) - (index > 0 and start[stage.key] in stage.values) for index, stage in enumerate(study.stages)
    )


# --------------------------------------------------------------------------------------------------------------------
# Results: one JSON per finished run (pure)


def result_path(results_dir: Path, spec: RunSpec) -> Path:
    return results_dir / f"{spec.name}.json"


def load_result(results_dir: Path, spec: RunSpec) -> dict[str, Any] | None:
    """The finished result of `spec`, or None when it has not finished. A result made with other overrides is
    refused (the config changed under a study in progress): use another work dir or delete the file."""
    path = result_path(results_dir, spec)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError as error:
        raise StudyError(f"{path}: not a readable result ({error}); delete it to train the run again") from None
    if tuple(result.get("overrides", ())) != spec.overrides:
        found, wanted = result.get("overrides"), list(spec.overrides)
        raise StudyError(
            f"{path}: made with overrides {found}, the study now asks {wanted}; the config changed under a study in "
            "progress — use another --work-dir, or delete this result to train the run again"
        )
    return result


def write_result(results_dir: Path, result: Mapping[str, Any]) -> Path:
    """Publish a run's result atomically: it is the run's commit point."""
    path = results_dir / f"{result['name']}.json"
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return path


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof 1 (0 for one value), count); NaN mean for none."""
    array = np.asarray([value for value in values if value is not None and not math.isnan(value)], dtype=float)
    if not len(array):
        return math.nan, math.nan, 0
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0, len(array)


@dataclass(frozen=True)
class Paired:
    """A variant against another, seed by seed: Δ = metric(variant) − metric(other) per seed both finished."""

    deltas: tuple[float, ...]
    seeds: tuple[int, ...]

    @property
    def wins(self) -> int:
        """Seeds where the variant is lower (better, for perplexity)."""
        return sum(delta < 0 for delta in self.deltas)


def paired(results: Iterable[Mapping[str, Any]], setting: str, variant: str, other: str, metric: str) -> Paired:
    """Per-seed differences of `metric` between two variants of one setting, over the seeds both have."""
    by_seed: dict[str, dict[int, float]] = {variant: {}, other: {}}
    for result in results:
        if result["setting"] == setting and result["variant"] in by_seed and result["stage"] == "grid":
            by_seed[result["variant"]][result["seed"]] = result["metrics"][metric]
    seeds = tuple(sorted(set(by_seed[variant]) & set(by_seed[other])))
    return Paired(tuple(by_seed[variant][seed] - by_seed[other][seed] for seed in seeds), seeds)


@dataclass(frozen=True)
class Timing:
    """What a run costs: seconds per optimizer step and the rest of a run (set-up, evaluations, saving, test)."""

    step_s: float
    overhead_s: float
    source: str


def measured_timing(results: Sequence[Mapping[str, Any]], source: str) -> Timing | None:
    """Medians over finished runs; None when there are none."""
    if not results:
        return None
    step = statistics.median(result["step_seconds_median"] for result in results)
    overhead = statistics.median(
        result["train_seconds"] + result["eval_seconds"] - result["steps"] * result["step_seconds_median"]
        for result in results
    )
    return Timing(step, max(overhead, 0.0), f"{source}: medians of {len(results)} finished runs")


def estimate_seconds(pending_runs: int, steps: int, timing: Timing) -> float:
    return pending_runs * (steps * timing.step_s + timing.overhead_s)


def format_duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "?"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 0)} min"


# --------------------------------------------------------------------------------------------------------------------
# Running (the teacher, the cache, the carves, training, evaluation)


@dataclass
class Context:
    """Where this study lives and what it runs."""

    config_path: Path
    base: Config
    study: Study
    quick: bool
    work: Path
    report: Path
    keep_models: bool
    settings: tuple[str, ...]
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def students_dir(self) -> Path:
        return self.work / "students"

    @property
    def results_dir(self) -> Path:
        return self.work / "results"

    @property
    def runs_dir(self) -> Path:
        return self.work / "runs"

    @property
    def frozen_path(self) -> Path:
        return self.work / "frozen.json"

    @property
    def timings_path(self) -> Path:
        return self.work / "timings.json"

    @property
    def tracking_uri(self) -> str:
        return self.base.mlflow.tracking_uri

    def record_timing(self, key: str, value: Any) -> None:
        self.timings[key] = value
        atomic_write_text(self.timings_path, json.dumps(self.timings, indent=1) + "\n")


def base_config(config_path: Path, work: Path, quick_overrides: Sequence[str]) -> Config:
    """The study config with this work dir's outputs (the cache, runs and MLflow store; the prepared data are shared
    by `--quick` and the full study) and, for `--quick`, its budget."""
    overrides = [
        f"cache.output_dir={work / 'targets'}",
        f"train.output_dir={work / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        *quick_overrides,
    ]
    return load_config(config_path, overrides)


def derive(base: Config, overrides: Sequence[str]) -> Config:
    """`base` with `overrides` (its `run.variants` layout dropped: a run is one config)."""
    values = base.to_dict()
    values["run"]["variants"] = {}
    return config_from_dict(values, list(overrides))


def run_config(ctx: Context, spec: RunSpec) -> Config:
    experiment = TUNING_EXPERIMENT if spec.stage == "tune" else GRID_EXPERIMENT
    return derive(
        ctx.base,
        [
            *spec.overrides,
            f"train.output_dir={ctx.runs_dir / spec.name}",
            f"mlflow.experiment={experiment}",
            f"mlflow.run_name={spec.name}",
        ],
    )


def prepare_inputs(ctx: Context) -> None:
    """The teacher (the demo's import, checked), the prepared data with a test split, and the one cache."""
    from pipeline import stages

    stages.teacher_stage(ctx.base)
    stages.prepare_stage(ctx.base)
    done = cache_state(ctx.base)
    if all(done.values()):
        logger.info("cache %s: complete, reused", ctx.base.cache.output_dir)
        return
    logger.info(
        "caching the teacher's targets (%s) at layers %s for %s heads: the first %s samples of each split",
        ", ".join(ctx.base.cache.attn_targets),
        ctx.base.cache.layers,
        ctx.base.cache.head_counts,
        ctx.base.cache.max_samples,
    )
    started = time.perf_counter()
    stages.cache_stage(ctx.base)
    ctx.record_timing("cache", {"seconds": round(time.perf_counter() - started, 1), "resumed": any(done.values())})


def cache_state(base: Config) -> dict[str, bool]:
    """Per split: whether its cache is complete with the samples this config caches (the cache stage itself loads
    the teacher and chooses the selective heads before it finds that out: a minute saved on every restart). A
    cache of other inputs is found by the cache stage, which refuses it naming the field, and by training."""
    from pipeline.data.prepare import load_prepared
    from pipeline.targets.manifest import CacheError, read_manifest

    state = {}
    try:
        splits, _ = load_prepared(Path(base.data.output_dir))
    except PipelineError:
        return {"train": False}
    for split, rows in splits.items():
        wanted = min(len(rows), base.cache.max_samples or len(rows))
        try:
            manifest = read_manifest(Path(base.cache.output_dir) / split)
        except CacheError:
            state[split] = False
            continue
        state[split] = manifest.complete and manifest.num_samples == wanted
    return state


def carve_setting(ctx: Context, setting: str) -> Path:
    """Carve a `student.init=teacher` setting once and save it (model, the teacher's tokenizer files, the carve's
    `student_init.json`) as a plain HF directory; an existing one is reused."""
    from pipeline import students
    from pipeline.data.prepare import TOKENIZER_FILES
    from pipeline.infra.atomic import staged_directory
    from pipeline.models.loading import load_teacher_config
    from pipeline.targets.manifest import read_manifest

    target = ctx.students_dir / setting
    if (target / "config.json").is_file():
        logger.info("%s: carved student %s reused", setting, target)
        return target
    started = time.perf_counter()
    teacher_dir = Path(ctx.base.teacher.path)
    with staged_directory(target) as staging:
        config = students.resolve(derive(ctx.base, [*ctx.study.settings[setting], f"train.output_dir={staging}"]))
        # A `merge` carve weights each head group by the cache's SHD α statistics (the study caches first).
        alpha_stats = read_manifest(Path(ctx.base.cache.output_dir) / "train").alpha_stats
        model = students.build_student_model(config, load_teacher_config(teacher_dir), alpha_stats=alpha_stats)
        model.save_pretrained(staging, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (teacher_dir / name).is_file():
                shutil.copy2(teacher_dir / name, staging / name)
    seconds = time.perf_counter() - started
    logger.info("%s: carved from the teacher in %.0f s → %s", setting, seconds, target)
    ctx.record_timing(f"carve.{setting}", round(seconds, 1))
    return target


def discard_unfinished(ctx: Context, spec: RunSpec) -> None:
    """A run directory without a result is an interrupted run: its MLflow run is deleted (a comparison must not
    show it) and the directory removed, so the run starts again from its first step."""
    directory = ctx.runs_dir / spec.name
    if not directory.exists():
        return
    from pipeline.training.checkpoints import RUN_ID_FILE

    run_id_file = directory / RUN_ID_FILE
    if run_id_file.is_file():
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        run_id = run_id_file.read_text().strip()
        try:
            MlflowClient(tracking_uri=ctx.tracking_uri).delete_run(run_id)
            logger.info("%s: interrupted earlier; deleted its MLflow run %s", spec.name, run_id)
        except MlflowException as error:  # e.g. a run of the local fallback store, removed with the directory
            logger.warning("%s: could not delete MLflow run %s (%s)", spec.name, run_id, error.message)
    shutil.rmtree(directory)
    logger.info("%s: removed the interrupted run's directory, training it again", spec.name)


def drop_models(ctx: Context, spec: RunSpec) -> None:
    """Delete a finished run's checkpoint and exported weights (hundreds of MB each) unless `--keep-models`."""
    if ctx.keep_models:
        return
    from pipeline.training.checkpoints import CHECKPOINTS, STUDENT

    for name in (CHECKPOINTS, STUDENT):
        shutil.rmtree(ctx.runs_dir / spec.name / name, ignore_errors=True)


def validation_metrics(config: Config) -> dict[str, float]:
    """The exported student on the whole cached validation split (what `distill eval` computes), logged nowhere:
    the search's score must not be confused with the training's `eval/…` points at the same step."""
    from pipeline.data.prepare import load_prepared
    from pipeline.infra import dist
    from pipeline.models.capture import attention_dims
    from pipeline.models.loading import load_teacher_config
    from pipeline.students import resolve
    from pipeline.targets.fingerprint import student_layers, teacher_weights_digest
    from pipeline.training.evaluate import Evaluator, load_student_for_eval

    dist.init_cpu_group()
    config = resolve(config)
    teacher_dir = Path(config.teacher.path)
    dims = attention_dims(load_teacher_config(teacher_dir))
    _, meta = load_prepared(Path(config.data.output_dir))
    layers = student_layers(config, dims.num_layers)
    evaluator = Evaluator.from_config(
        config, layers, meta, teacher_weights_digest(teacher_dir), dims.num_layers, max_batches=None
    )
    if evaluator is None:
        raise StudyError(f"{config.cache.output_dir}/validation: no validation cache to score the search on")
    model, _ = load_student_for_eval(config, None, None)
    return evaluator.run(model, model).metrics


def read_history(output_dir: Path) -> list[dict[str, Any]]:
    from pipeline.training.trainer import METRICS_LOG

    return [json.loads(line) for line in (output_dir / METRICS_LOG).read_text().splitlines() if line.strip()]


def curves(records: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """`CURVE_KEYS` → [(step, value)] from a run's `metrics.jsonl` records."""
    return {
        key: [(record["step"], record[key]) for record in records if key in record]
        for key in CURVE_KEYS
        if any(key in record for record in records)
    }


def tag_run(ctx: Context, run_id: str, spec: RunSpec, extra: Mapping[str, float]) -> None:
    """The setting, variant and seed as params and tags (filters, grouping) and any extra metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    client.log_param(run_id, "quality.setting", spec.setting)
    client.log_param(run_id, "quality.variant", spec.variant)
    for key, value in (
        ("setting", spec.setting),
        ("variant", spec.variant),
        ("seed", spec.seed),
        ("stage", spec.stage),
    ):
        client.set_tag(run_id, f"quality_{key}", str(value))
    for key, value in extra.items():
        client.log_metric(run_id, key, value, step=ctx.base.train.max_steps)


def execute(ctx: Context, spec: RunSpec) -> dict[str, Any]:
    """Train one run, evaluate it (validation for the search, the held-out test split for the grid), tag its MLflow
    run, publish its result; returns the result."""
    from pipeline.training.checkpoints import RUN_ID_FILE
    from pipeline.training.evaluate import evaluate_stage
    from pipeline.training.trainer import train

    discard_unfinished(ctx, spec)
    config = run_config(ctx, spec)
    output_dir = Path(config.train.output_dir)
    started = time.perf_counter()
    train(config)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    if spec.stage == "tune":
        metrics = {f"tune/val_{key.split('/', 1)[1]}": value for key, value in validation_metrics(config).items()}
    else:
        metrics = evaluate_stage(config, split="test")
    eval_seconds = time.perf_counter() - started
    records = read_history(output_dir)
    steps = [record for record in records if "train/loss" in record]
    evals = [record for record in records if "eval/ppl" in record]
    grad_norms = [record["train/grad_norm"] for record in steps if "train/grad_norm" in record]
    run_id = (output_dir / RUN_ID_FILE).read_text().strip()
    tag_run(ctx, run_id, spec, metrics if spec.stage == "tune" else {})
    result = {
        "name": spec.name,
        "stage": spec.stage,
        "setting": spec.setting,
        "variant": spec.variant,
        "seed": spec.seed,
        "overrides": list(spec.overrides),
        "mlflow_run_id": run_id,
        "metrics": {**{key: value for key, value in evals[-1].items() if key.startswith("eval/")}, **metrics},
        "max_grad_norm": max(grad_norms) if grad_norms else math.nan,
        "steps": len(steps),
        "tokens": steps[-1]["train/tokens"] if steps else 0,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "step_seconds_median": statistics.median(record["train/step_time_s"] for record in steps),
        "curves": curves(records),
        "commit": git_commit(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_result(ctx.results_dir, result)
    drop_models(ctx, spec)
    gc.collect()
    return result


def resident_mib() -> float:
    """This process's resident memory now (it trains every run in turn: a leak would show here), NaN off Linux."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return math.nan
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class Runner:
    """Runs specs in order with one progress bar, skipping finished ones, and logs a line per run with its figures
    and the time left. A run asked for again (the search scores the kept value of a stage once more) counts once."""

    def __init__(self, ctx: Context, total: int) -> None:
        from tqdm import tqdm

        self.ctx = ctx
        self.total = total
        self.finished: list[dict[str, Any]] = []
        self.counted: set[str] = set()
        self.progress = tqdm(total=total, desc="study", unit="run", position=0, dynamic_ncols=True)

    def _count(self, spec: RunSpec) -> None:
        if spec.name not in self.counted:
            self.counted.add(spec.name)
            self.progress.update(1)

    def run(self, spec: RunSpec) -> dict[str, Any]:
        result = load_result(self.ctx.results_dir, spec)
        if result is not None:
            drop_models(self.ctx, spec)
            self._count(spec)
            return result
        logger.info("[%d/%d] %s: %s", self.progress.n + 1, self.total, spec.name, " ".join(spec.overrides))
        result = execute(self.ctx, spec)
        self.finished.append(result)
        self._count(spec)
        metrics = result["metrics"]
        shown = (
            ("val ppl", "tune/val_ppl"),
            ("test ppl", "test/ppl"),
            ("top-1", "test/top1_agreement"),
            ("attn KL", "test/attn_kl"),
        )
        figures = ", ".join(f"{label} {metrics[key]:.4g}" for label, key in shown if key in metrics)
        timing = measured_timing(self.finished, "this session")
        left = estimate_seconds(self.total - self.progress.n, self.ctx.base.train.max_steps, timing)
        logger.info(
            "[%d/%d] %s: %s, max grad norm %.3g; train %.0f s (%.2f s/step), eval %.0f s; resident memory %.0f MiB; "
            "about %s left",
            self.progress.n,
            self.total,
            spec.name,
            figures,
            result["max_grad_norm"],
            result["train_seconds"],
            result["step_seconds_median"],
            result["eval_seconds"],
            resident_mib(),
            format_duration(left),
        )
        return result

    def close(self) -> None:
        self.progress.close()


def frozen_choice(ctx: Context, runner: Runner | None) -> tuple[dict[str, Any], list[TuningRow]]:
    """The tuned values: `frozen.json` if the search already ran (never revisited), else the search now (then frozen),
    or for `--quick` the config's own values (no search)."""
    start = start_assignment(ctx.study, ctx.base)
    if ctx.quick:
        return start, []
    if ctx.frozen_path.is_file():
        frozen = json.loads(ctx.frozen_path.read_text())
        stages = [[stage.key, list(stage.values)] for stage in ctx.study.stages]
        if frozen["stages"] != stages:
            logger.warning(
                "%s was searched over %s; the config now lists %s. Kept: a frozen choice is never revisited (delete "
                "the file to search again)",
                ctx.frozen_path,
                frozen["stages"],
                stages,
            )
        rows = [TuningRow(**row) for row in frozen["rows"]]
        logger.info("frozen tuning %s (from %s)", frozen["values"], ctx.frozen_path)
        return frozen["values"], rows
    if runner is None:
        return start, []

    def score(assignment: dict[str, Any]) -> float:
        return runner.run(tuning_spec(ctx.study, assignment, ctx.students_dir))["metrics"]["tune/val_ppl"]

    logger.info(
        "tuning on %s / %s / seed %d (validation split): %s",
        TUNE_SETTING,
        TUNE_VARIANT,
        ctx.study.seeds[0],
        "; ".join(f"{stage.key} ∈ {list(stage.values)}" for stage in ctx.study.stages),
    )
    chosen, rows = greedy_search(ctx.study.stages, start, score)
    current = dict(start)
    for row in rows:  # the run each row's score came from: the stage's value with the choices made before it
        row.run = tuning_spec(ctx.study, {**current, row.key: row.value}, ctx.students_dir).name
        if row.chosen:
            current[row.key] = row.value
    frozen = {
        "values": chosen,
        "overrides": [format_override(key, value) for key, value in chosen.items()],
        "score": min(row.score for row in rows),
        "stages": [[stage.key, list(stage.values)] for stage in ctx.study.stages],
        "rows": [row.__dict__ for row in rows],
        "on": {"setting": TUNE_SETTING, "variant": TUNE_VARIANT, "seed": ctx.study.seeds[0], "split": "validation"},
        "commit": git_commit(),
        "frozen": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_text(ctx.frozen_path, json.dumps(frozen, indent=1) + "\n")
    logger.info("frozen: %s → %s", chosen, ctx.frozen_path)
    tag_tuning_experiment(ctx)
    return chosen, rows


def tag_tuning_experiment(ctx: Context) -> None:
    """Open `quality-tuning` in the MLflow UI on its training runs with the search's score and keys as columns (the
    grid's experiment is tagged by `distill compare`)."""
    from mlflow.tracking import MlflowClient

    from pipeline.infra.mlflow_ui import tag_experiment

    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    experiment = client.get_experiment_by_name(TUNING_EXPERIMENT)
    if experiment is not None:
        metrics = ["tune/val_ppl", "tune/val_top1_agreement", "eval/ppl", "train/loss"]
        tag_experiment(client, experiment.experiment_id, metrics, [stage.key for stage in ctx.study.stages])


# --------------------------------------------------------------------------------------------------------------------
# The plan


def git_commit() -> str:
    found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return found.stdout.strip() or "unknown"


def study_files_changed() -> list[str]:
    """The study's own files that differ from the commit (the report says so beside the hash)."""
    paths = ["benchmarks/quality.py", "configs/quality.yaml"]
    found = subprocess.run(
        ["git", "status", "--porcelain", "--", *paths], cwd=REPO, capture_output=True, text=True, check=False
    )
    return [line[3:] for line in found.stdout.splitlines()]


def other_mode_results(ctx: Context) -> list[dict[str, Any]]:
    """Finished results of the other mode's default work dir (quick ↔ full): measured on this machine too."""
    other = REPO / "work" / ("quality" if ctx.quick else "quality-quick") / "results"
    return [json.loads(path.read_text()) for path in sorted(other.glob("*.json"))] if other.is_dir() else []


def all_results(ctx: Context) -> list[dict[str, Any]]:
    directory = ctx.results_dir
    return [json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))] if directory.is_dir() else []


def plan(ctx: Context) -> tuple[list[RunSpec], int, float, list[str]]:
    """(grid specs, tuning runs, estimated seconds of what is left, lines describing it all)."""
    base, study = ctx.base, ctx.study
    start = start_assignment(study, base)
    frozen_known = ctx.frozen_path.is_file() or ctx.quick
    frozen = json.loads(ctx.frozen_path.read_text())["values"] if ctx.frozen_path.is_file() else start
    specs = grid_specs(
        study, base, frozen, ctx.students_dir, settings=ctx.settings, variants=ctx.variants, seeds=ctx.seeds
    )
    tuning = 0 if frozen_known else tuning_run_count(study, start)
    results = all_results(ctx)
    finished = {result["name"] for result in results}
    grid_left = sum(spec.name not in finished for spec in specs)
    tune_left = 0 if frozen_known else max(tuning - sum(result["stage"] == "tune" for result in results), 0)
    timing = measured_timing(results, "this study") or measured_timing(other_mode_results(ctx), "the other mode")
    if timing is None:
        timing = Timing(PRIOR_STEP_S, PRIOR_RUN_OVERHEAD_S, "prior: the README's demo run, nothing measured yet")
    steps = base.train.max_steps
    cache_done = all(cache_state(base).values())
    cache_tokens = 3 * (base.cache.max_samples or 0) * base.data.seq_len
    measured_cache = ctx.timings.get("cache", {}).get("seconds")
    cache_s = 0.0 if cache_done else cache_tokens / PRIOR_CACHE_TOK_S
    carve_left = [
        setting
        for setting in ctx.settings
        if is_carved(study, setting) and not (ctx.students_dir / setting / "config.json").is_file()
    ]
    carve_s = len(carve_left) * PRIOR_CARVE_S
    runs_s = estimate_seconds(grid_left + tune_left, steps, timing)
    compared = [value for key, value in ctx.timings.items() if key.startswith("compare.")]
    compare_run_s = (
        sum(item["seconds"] for item in compared) / max(sum(item["runs"] for item in compared), 1)
        if compared
        else PRIOR_COMPARE_RUN_S
    )
    compare_s = len(specs) * compare_run_s
    total = cache_s + carve_s + runs_s + compare_s
    per_run = steps * timing.step_s + timing.overhead_s
    lines = [
        f"quality study ({'quick' if ctx.quick else 'full'}): {relative_to_repo(ctx.config_path)}, work dir "
        f"{ctx.work}, report {ctx.report}",
        f"  teacher {base.teacher.path}; data {base.data.sources} seq_len {base.data.seq_len} → {base.data.output_dir}",
        f"  cache: {base.cache.max_samples} samples per split × 3 splits ({cache_tokens:,} tokens), layers "
        f"{base.cache.layers}, targets {base.cache.attn_targets}: "
        + ("complete" if cache_done else f"to do, about {format_duration(cache_s)} at {PRIOR_CACHE_TOK_S:.0f} tok/s")
        + (f" (measured earlier: {measured_cache:.0f} s)" if measured_cache else ""),
        f"  carve: {', '.join(setting for setting in ctx.settings if is_carved(study, setting)) or 'none'} "
        f"({len(carve_left)} to do, about {format_duration(carve_s)})",
        "  tuning: "
        + (
            "none (--quick: the config's values)"
            if ctx.quick
            else (
                f"frozen in {ctx.frozen_path}"
                if ctx.frozen_path.is_file()
                else f"{len(study.stages)} stages, {tuning} runs on {TUNE_SETTING}/{TUNE_VARIANT}/seed "
                f"{study.seeds[0]} (validation split), {tune_left} left"
            )
        ),
        f"  grid: {len(ctx.settings)} settings × {len(ctx.variants)} variants × {len(ctx.seeds)} seeds = "
        f"{len(specs)} runs, {grid_left} left",
        f"  per run: {steps} steps × {base.train.micro_batch_size} × {base.data.seq_len} tokens; "
        f"{timing.step_s:.2f} s/step + {timing.overhead_s:.0f} s set-up/eval/save = {per_run:.0f} s ({timing.source})",
        f"  estimate of what is left: cache {format_duration(cache_s)} + carve {format_duration(carve_s)} + "
        f"{grid_left + tune_left} runs {format_duration(runs_s)} + report {format_duration(compare_s)} = "
        f"{format_duration(total)}" + ("" if ctx.quick else f" (budget {format_duration(BUDGET_S)})"),
    ]
    if not ctx.quick and total > BUDGET_S:
        lines.append(
            f"  WARNING: over the {format_duration(BUDGET_S)} budget on these figures ({timing.source}); on a loaded "
            "machine that is expected, on a quiet one lower train.max_steps and cache.max_samples in the config"
        )
    return specs, tuning, total, lines


# --------------------------------------------------------------------------------------------------------------------
# The report


def cell(values: Sequence[float], digits: int = 4) -> str:
    mean, std, count = mean_std(values)
    if not count:
        return "—"
    return f"{mean:.{digits}g} ± {std:.2g}"


def paired_cell(pair: Paired) -> str:
    if not pair.deltas:
        return "—"
    mean, std, _ = mean_std(pair.deltas)
    return f"{mean:+.4g} ± {std:.2g}"


def median_grad_norm(result: Mapping[str, Any]) -> float:
    """The median over a run's steps of the pre-clip gradient norm (the max is the first steps' alone)."""
    points = result["curves"].get("train/grad_norm", [])
    return statistics.median(value for _, value in points) if points else math.nan


def setting_table(results: Sequence[Mapping[str, Any]], setting: str, variants: Sequence[str]) -> list[str]:
    """Markdown rows of one setting: per variant, mean ± std over seeds and the paired comparison with kd_only."""
    lines = [
        "| variant | seeds | test ppl | top-1 agreement | attention KL to own targets (test) | "
        "max pre-clip grad norm | median pre-clip grad norm | train wall s | "
        f"Δppl vs {BASELINE} (per seed) | wins vs {BASELINE} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in variants:
        runs = [r for r in results if r["setting"] == setting and r["variant"] == variant and r["stage"] == "grid"]
        if not runs:
            continue
        pair = paired(results, setting, variant, BASELINE, "test/ppl")
        comparison = (
            ("(baseline)", "—") if variant == BASELINE else (paired_cell(pair), f"{pair.wins}/{len(pair.deltas)}")
        )
        lines.append(
            f"| {variant} | {len(runs)} | {cell([r['metrics']['test/ppl'] for r in runs])} | "
            f"{cell([r['metrics']['test/top1_agreement'] for r in runs], 3)} | "
            f"{cell([r['metrics']['test/attn_kl'] for r in runs], 3)} | "
            f"{cell([r['max_grad_norm'] for r in runs], 3)} | {cell([median_grad_norm(r) for r in runs], 3)} | "
            f"{mean_std([r['train_seconds'] for r in runs])[0]:.0f} | "
            f"{comparison[0]} | {comparison[1]} |"
        )
    return lines


def band_figure(
    results: Sequence[Mapping[str, Any]], setting: str, variants: Sequence[str], key: str, path: Path
) -> Path | None:
    """`key` against step for every variant of a setting: the mean over seeds, ± one std shaded, on a log axis
    (perplexity and gradient norms span decades); evaluations at step 0 (before the first update, the same for every
    variant of a seed) are left out, so the axis shows where the variants differ."""
    from pipeline.reports.compare import RunSummary, metric_bands
    from pipeline.reports.figures import Curve, curve_figure, save_figure

    groups = {}
    for variant in variants:
        runs = [r for r in results if r["setting"] == setting and r["variant"] == variant and r["stage"] == "grid"]
        members = [
            RunSummary(r["mlflow_run_id"], r["name"], {}, {key: [tuple(p) for p in r["curves"].get(key, []) if p[0]]})
            for r in runs
        ]
        if members:
            groups[variant] = members
    bands = metric_bands(groups, key)
    if not bands:
        return None
    lines = [
        Curve(f"{name} (n={band.runs})", band.steps, band.mean, band.mean - band.std, band.mean + band.std)
        for name, band in bands.items()
    ]
    note = f"{setting}, mean ± std over seeds, step 0 left out"
    return save_figure(curve_figure(key, lines, x_label="optimizer step", log_y=True, note=note), path)


def delta_figure(
    results: Sequence[Mapping[str, Any]], setting: str, variants: Sequence[str], key: str, path: Path
) -> Path | None:
    """The paired comparison as curves: per seed, a variant's `key` minus `BASELINE`'s at the same step (the same
    validation batches, the same start and data order), mean ± one std over seeds; step 0 left out (Δ = 0)."""
    from pipeline.reports.compare import RunSummary, metric_bands
    from pipeline.reports.figures import Curve, curve_figure, save_figure

    grid = [r for r in results if r["setting"] == setting and r["stage"] == "grid"]
    baseline = {r["seed"]: dict(map(tuple, r["curves"].get(key, []))) for r in grid if r["variant"] == BASELINE}
    groups = {}
    for variant in variants:
        members = []
        for r in grid:
            if r["variant"] != variant or variant == BASELINE or r["seed"] not in baseline:
                continue
            base = baseline[r["seed"]]
            history = [(step, value - base[step]) for step, value in r["curves"].get(key, []) if step and step in base]
            members.append(RunSummary(r["mlflow_run_id"], r["name"], {}, {key: history}))
        if members:
            groups[variant] = members
    bands = metric_bands(groups, key)
    if not bands:
        return None
    lines = [
        Curve(f"{name} (n={band.runs})", band.steps, band.mean, band.mean - band.std, band.mean + band.std)
        for name, band in bands.items()
    ]
    note = f"{setting}: variant − {BASELINE} per seed, mean ± std over seeds; < 0: better"
    figure = curve_figure(f"Δ {key}", lines, x_label="optimizer step", note=note)
    figure.axes[0].axhline(0.0, color="black", linewidth=0.8)
    return save_figure(figure, path)


def step0_ppl(results: Sequence[Mapping[str, Any]], setting: str) -> list[float]:
    """Validation perplexity before the first update of each grid run of a setting (the start every variant shares
    within a seed)."""
    return [
        points[0][1]
        for r in results
        if r["setting"] == setting and r["stage"] == "grid"
        for points in [r["curves"].get("eval/ppl", [])]
        if points and points[0][0] == 0
    ]


def tuning_figure(results: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Validation perplexity (the 2-batch curve) of every tuning run against step."""
    from pipeline.reports.figures import Curve, curve_figure, save_figure

    runs = [r for r in results if r["stage"] == "tune"]
    if not runs:
        return None
    lines = [
        Curve(r["name"].removeprefix("tune-"), *zip(*r["curves"]["eval/ppl"], strict=True))
        for r in runs
        if r["curves"].get("eval/ppl")
    ]
    figure = curve_figure("eval/ppl", lines, x_label="optimizer step", log_y=True, note="tuning runs, 2 batches")
    return save_figure(figure, path)


def claims(results: Sequence[Mapping[str, Any]], setting: str, variants: Sequence[str]) -> list[str]:
    """The paper's claims as paired test-ppl differences (Δ < 0: the first one is better), where both variants ran."""
    pairs = (
        ("shd_kd", BASELINE, "squeezed attention on top of logit KD vs logit KD alone"),
        ("shd_kd", "uniform_kd", "per-sample α vs a constant merge"),
        ("shd_kd", "selective_kd", "per-sample α vs hard head selection"),
        ("shd_kd", "shd_pairwise_kd", "exact group α vs the paper's pairwise merge"),
        ("shd_kd", "shd_mse_kd", "KL vs MSE"),
        ("shd_kd", "minilm_kd", "SHD vs MiniLMv2 relations"),
    )
    lines = []
    for first, second, meaning in pairs:
        if first not in variants or second not in variants:
            continue
        pair = paired(results, setting, first, second, "test/ppl")
        if pair.deltas:
            lines.append(
                f"  - {meaning}: {first} − {second} = {paired_cell(pair)} test ppl, {first} lower in "
                f"{pair.wins}/{len(pair.deltas)} seeds."
            )
    return lines


def honest_reading(results: Sequence[Mapping[str, Any]], ctx: Context) -> list[str]:
    """A template with every figure filled in; the words are the lead's to write."""
    lines = [
        "## Honest reading (template: the figures are filled in, the conclusions are for the lead to write)",
        "",
    ]
    for setting in ctx.settings:
        grid = [r for r in results if r["setting"] == setting and r["stage"] == "grid"]
        means = {
            variant: mean_std([r["metrics"]["test/ppl"] for r in grid if r["variant"] == variant])
            for variant in ctx.variants
        }
        means = {variant: value for variant, value in means.items() if value[2]}
        if not means:
            continue
        best = min(means, key=lambda variant: means[variant][0])
        spreads = [value[1] for value in means.values() if value[2] > 1]
        lines += [
            f"- **{setting}**: lowest mean test ppl {best} ({means[best][0]:.4g} ± {means[best][1]:.2g}); "
            f"{BASELINE} {means.get(BASELINE, (math.nan,))[0]:.4g}. Seed spread (std of test ppl over seeds): "
            + (f"{min(spreads):.3g} to {max(spreads):.3g} across variants." if spreads else "one seed only."),
            *claims(results, setting, ctx.variants),
            f"  - Reading: _(where SHD wins or not in {setting}, and whether the differences exceed the seed spread)_",
        ]
    lines += [
        "- What a user should pick by default: _(lead)_",
        "- Caveats: the budget is 2 CPU cores (see Budget); attention KL is measured against each variant's OWN "
        "targets (SHD maps for ce_only, kd_only and minilm_kd; the global mean map for global_kd), so it is not "
        "comparable across variants; the selective and pairwise variants train students carved on SHD's "
        "contiguous head groups; _(lead)_",
        "",
    ]
    return lines


def write_csv(results: Sequence[Mapping[str, Any]], path: Path) -> None:
    columns = [
        "name",
        "stage",
        "setting",
        "variant",
        "seed",
        "test/ppl",
        "test/top1_agreement",
        "test/attn_kl",
        "tune/val_ppl",
        "eval/ppl",
        "max_grad_norm",
        "steps",
        "tokens",
        "train_seconds",
        "eval_seconds",
        "step_seconds_median",
        "mlflow_run_id",
        "overrides",
    ]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for result in results:
            row = {**result, **result["metrics"], "overrides": " ".join(result["overrides"])}
            writer.writerow([row.get(column, "") for column in columns])


def budget_lines(ctx: Context, results: Sequence[Mapping[str, Any]], plan_lines: Sequence[str]) -> list[str]:
    base = ctx.base
    train, cache = base.train, base.cache
    tokens = train.max_steps * train.micro_batch_size * train.grad_accum * base.data.seq_len
    runs_s = sum(r["train_seconds"] + r["eval_seconds"] for r in results)
    cache_s = ctx.timings.get("cache", {}).get("seconds")
    carves = {key.removeprefix("carve."): value for key, value in ctx.timings.items() if key.startswith("carve.")}
    epochs = train.max_steps * train.micro_batch_size * train.grad_accum / max(cache.max_samples or 1, 1)
    return [
        "## Budget",
        "",
        f"- Every run: {train.max_steps} optimizer steps × {train.micro_batch_size} × {base.data.seq_len} tokens = "
        f"{tokens:,} tokens, lr {train.lr:g} (warm-up {train.warmup_steps}, {train.schedule}), {train.precision}, "
        f"evaluated every {train.eval_every} steps on {train.eval_batches} validation batches (the curves).",
        f"- Cache: the first {cache.max_samples} sequences of each split (train, validation, test), targets "
        f"{', '.join(cache.attn_targets)} for {cache.head_counts} heads at teacher layers {cache.layers}, "
        f"{cache.encoding}. {cache.max_samples} = what {train.max_steps} steps × {train.micro_batch_size} consume "
        f"({epochs:g} epoch(s)): caching is the teacher forward (about 100 tok/s on 2 cores), the costliest stage "
        "per token, so it holds what training reads and no more; every variant of a seed reads the same sequences "
        "in the same order. Test metrics: every cached test sequence.",
        f"- Measured: cache {f'{cache_s:.0f} s' if cache_s else 'not run in this work dir since timings were kept'}; "
        f"carves {', '.join(f'{k} {v:.0f} s' for k, v in carves.items()) or '—'}; {len(results)} runs "
        f"{format_duration(runs_s)} (train + evaluation, sum).",
        "- The plan this report was made with:",
        "",
        "```",
        *plan_lines,
        "```",
        "",
    ]


def tuning_lines(ctx: Context, frozen: Mapping[str, Any], rows: Sequence[TuningRow]) -> list[str]:
    if ctx.quick:
        values = ", ".join(f"`{format_override(key, value)}`" for key, value in frozen.items())
        return ["## Hyper-parameters", "", f"No search (`--quick`): the config's values {values}.", ""]
    lines = [
        "## Tuning (validation split only)",
        "",
        f"Greedy, one factor at a time, on {TUNE_SETTING} / {TUNE_VARIANT} / seed {ctx.study.seeds[0]}; score: "
        "perplexity of the exported student on the whole cached validation split (the test split was never read). "
        f"Every run is in MLflow experiment `{TUNING_EXPERIMENT}`.",
        "",
        "| stage | key | value | validation ppl | kept | run |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row.stage} | `{row.key}` | `{json.dumps(row.value)}` | {row.score:.5g} | "
        f"{'**yes**' if row.chosen else ''} | {row.run} |"
        for row in rows
    ]
    values = ", ".join(f"`{format_override(key, value)}`" for key, value in frozen.items())
    lines += [
        "",
        f"Frozen ({ctx.frozen_path}): {values}; applied to every attention-transfer variant (minilm_kd: "
        "`distill.w_rel` = the frozen `distill.w_attn`; shd_mse_kd keeps its MSE loss).",
        "",
    ]
    return lines


def write_report(
    ctx: Context, specs: Sequence[RunSpec], frozen: Mapping[str, Any], rows: Sequence[TuningRow], plan_lines: list[str]
) -> Path:
    """`index.md`, `results.csv`, the figures and `distill compare`'s report per setting, published atomically."""
    from pipeline.infra.atomic import staged_directory

    wanted = {spec.name for spec in specs} | {row.run for row in rows}
    results = [result for result in all_results(ctx) if result["name"] in wanted]
    commit, changed = git_commit(), study_files_changed()
    command = ctx.timings.get("command", "(not recorded)")
    rebuilt = invocation() if invocation() != command else None
    with staged_directory(ctx.report) as staging:
        write_csv(results, staging / "results.csv")
        lines = [
            f"# Quality study{' (--quick)' if ctx.quick else ''}: does squeezed-attention distillation pay?",
            "",
            f"Command: `{command}` (from the repository root"
            + (f"; this report rebuilt by `{rebuilt}`" if rebuilt else "")
            + f"). Commit `{commit}`"
            + (f" with local changes to {', '.join(changed)}" if changed else "")
            + f". Written {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({os.cpu_count()} CPU cores). "
            + run_commits(results),
            "",
            f"Teacher: {teacher_description(ctx.base)}. Students: {ctx.base.student.num_layers} layers, hidden "
            f"{ctx.base.student.hidden_size}, MLP {ctx.base.student.intermediate_size}, "
            f"{ctx.base.student.num_kv_heads} KV head(s). Settings: "
            + "; ".join(f"**{s}** `{' '.join(ctx.study.settings[s])}`" for s in ctx.settings)
            + ". A carved setting is carved once and every run starts from the same weights; `train.seed` changes "
            "the data order (and a scratch student's initial weights). Tables: [results.csv](results.csv) (one row "
            "per run).",
            "",
            *tuning_lines(ctx, frozen, rows),
            *budget_lines(ctx, results, plan_lines),
        ]
        tuning_png = tuning_figure(results, staging / "figures" / "tuning-eval-ppl.png")
        if tuning_png is not None:
            lines += ["![tuning runs: validation ppl](figures/tuning-eval-ppl.png)", ""]
        for setting in ctx.settings:
            lines += [
                f"## {setting}: test split, mean ± std over seeds",
                "",
                f"Δppl: per seed, the variant's test ppl minus {BASELINE}'s (negative: better), mean ± std over "
                "seeds; wins: seeds where it is lower.",
                "",
                *setting_table(results, setting, ctx.variants),
                "",
                f"Validation ppl before the first update (every variant of a seed starts there; left out of the "
                f"curves below): {cell(step0_ppl(results, setting))}.",
                "",
            ]
            figures = (
                (band_figure, "eval/ppl", "val-ppl", "validation ppl against step"),
                (delta_figure, "eval/ppl", "val-ppl-delta", f"validation ppl minus {BASELINE}'s, per seed"),
                (band_figure, "train/grad_norm", "grad-norm", "pre-clip gradient norm against step"),
            )
            for draw, key, stem, alt in figures:
                if draw(results, setting, ctx.variants, key, staging / "figures" / f"{setting}-{stem}.png"):
                    lines += [f"![{setting}: {alt}](figures/{setting}-{stem}.png)", ""]
        lines += honest_reading(results, ctx)
        lines += ["## distill compare", ""]
        lines += compare_settings(ctx, staging)
        lines += ["## Every run", "", "| run | stage | seed | score | max grad norm | train s | eval s |"]
        lines.append("|---|---|---|---|---|---|---|")
        for result in results:
            key = "tune/val_ppl" if result["stage"] == "tune" else "test/ppl"
            lines.append(
                f"| {result['name']} | {result['stage']} | {result['seed']} | {key} {result['metrics'][key]:.4g} | "
                f"{result['max_grad_norm']:.3g} | {result['train_seconds']:.0f} | {result['eval_seconds']:.0f} |"
            )
        (staging / "index.md").write_text("\n".join(lines) + "\n")
    logger.info("report written to %s", ctx.report / "index.md")
    return ctx.report / "index.md"


def invocation() -> str:
    """This process's command line as one would type it from the repository root."""
    return shlex.join([".venv/bin/python", "benchmarks/quality.py", *sys.argv[1:]])


def teacher_description(base: Config) -> str:
    """`source (path: family, layers, heads)` from the teacher's own config."""
    from pipeline.models.loading import load_teacher_config

    try:
        hf = load_teacher_config(Path(base.teacher.path))
    except PipelineError as error:  # a report rebuilt where the teacher is gone still says which one it was
        return f"{base.teacher.source} ({base.teacher.path}; its config cannot be read: {error})"
    heads, kv_heads = hf.num_attention_heads, getattr(hf, "num_key_value_heads", hf.num_attention_heads)
    return (
        f"{base.teacher.source} ({base.teacher.path}: {hf.model_type}, {hf.num_hidden_layers} layers, {heads} heads "
        f"on {kv_heads} KV heads)"
    )


def run_commits(results: Sequence[Mapping[str, Any]]) -> str:
    """Which commits the runs were trained at (a resumed study may span several)."""
    counts: dict[str, int] = {}
    for result in results:
        counts[result.get("commit", "unknown")] = counts.get(result.get("commit", "unknown"), 0) + 1
    return "Runs trained at " + ", ".join(f"`{commit[:12]}` ({count})" for commit, count in counts.items()) + "."


def compare_settings(ctx: Context, staging: Path) -> list[str]:
    """`compare_runs` on experiment `quality`, one report per setting (every run's heat maps in one montage would
    outgrow what matplotlib can draw for the whole grid), with seeds grouped into variants."""
    from pipeline.reports.compare import compare_runs

    lines = []
    for setting in ctx.settings:
        output = staging / "compare" / setting
        started = time.perf_counter()
        try:
            report = compare_runs(
                ctx.tracking_uri,
                GRID_EXPERIMENT,
                filter_string=f"tags.quality_setting = '{setting}'",
                output=output,
                group_seeds=True,
            )
        except Exception as error:  # the study's own report must survive a failing comparison, which is logged
            logger.exception("distill compare of %s failed", setting)
            lines += [f"- {setting}: `compare_runs` failed: {type(error).__name__}: {error}", ""]
            continue
        index = report.directory.relative_to(staging) / "index.md"
        seconds = time.perf_counter() - started
        ctx.record_timing(f"compare.{setting}", {"seconds": round(seconds, 1), "runs": len(report.rows)})
        lines += [f"- {setting}: [{index}]({index}) ({len(report.rows)} runs, {seconds:.0f} s)"]
    return [*lines, ""]


# --------------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "quality.yaml", help="the study's config")
    parser.add_argument("--quick", action="store_true", help="carved3; kd_only, uniform_kd, shd_kd; 2 seeds; no tuning")
    parser.add_argument("--plan", action="store_true", help="print what would run and the time estimate, then stop")
    parser.add_argument("--work-dir", type=Path, help="default work/quality (--quick: work/quality-quick)")
    parser.add_argument("--report-dir", type=Path, help="default reports/quality (--quick: reports/quality-quick)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the finished runs")
    parser.add_argument("--keep-models", action="store_true", help="keep each run's checkpoint and exported student")
    parser.add_argument("--log-level", default="WARNING", help="the pipeline's log level (the study logs at INFO)")
    return parser.parse_args(argv)


def make_context(args: argparse.Namespace) -> Context:
    config_path = args.config.resolve()
    probe = load_config(config_path)
    study = read_study(probe)
    name = "quality-quick" if args.quick else "quality"
    work = relative_to_repo(args.work_dir or REPO / "work" / name)
    report = relative_to_repo(args.report_dir or REPO / "reports" / name)
    base = base_config(config_path, work, study.quick if args.quick else ())
    settings = QUICK_SETTINGS if args.quick else tuple(study.settings)
    variants = QUICK_VARIANTS if args.quick else tuple(study.variants)
    seeds = study.seeds[:QUICK_SEEDS] if args.quick else study.seeds
    for kind, chosen, known in (("setting", settings, study.settings), ("variant", variants, study.variants)):
        missing = [item for item in chosen if item not in known]
        if missing:
            raise StudyError(f"{config_path}: no {kind} {missing} in run.variants (needed by the study)")
    if not args.quick and (TUNE_SETTING not in study.settings or TUNE_VARIANT not in study.variants):
        raise StudyError(f"{config_path}: the search runs on setting {TUNE_SETTING} and variant {TUNE_VARIANT}")
    ctx = Context(config_path, base, study, args.quick, work, report, args.keep_models, settings, variants, seeds)
    if ctx.timings_path.is_file():
        ctx.timings = json.loads(ctx.timings_path.read_text())
    return ctx


def relative_to_repo(path: Path) -> Path:
    """Paths inside the repository as relative ones (the study runs from its root), so results and the report name
    the same paths on any checkout."""
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved


STAGE_LOGGERS = ("pipeline.stages", "pipeline.targets.writer", "pipeline.students", "pipeline.data.prepare")
"""Pipeline loggers kept at INFO whatever --log-level: what the cache, carve and data stages are doing."""


def configure_logs(level: str) -> None:
    """The study at INFO, the stages' own progress at INFO, the rest of the pipeline and the libraries at `level`
    (DeepSpeed prints its config at every engine start: WARNING unless asked)."""
    from pipeline.infra.runtime import configure_logging

    configure_logging(level)
    logger.setLevel(logging.INFO)
    for name in STAGE_LOGGERS:
        logging.getLogger(name).setLevel(min(logging.INFO, logging.getLevelName(level.upper())))
    library_level = max(logging.WARNING, logging.getLevelName(level.upper()))
    for name in ("transformers", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(library_level)


def quiet_deepspeed(level: str) -> None:
    """DeepSpeed sets its logger's level when imported: lower it after the import."""
    import deepspeed  # noqa: F401  (imported for its logger)

    logging.getLogger("DeepSpeed").setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)  # the config's relative paths are read from the repository root
    configure_logs(args.log_level)
    try:
        ctx = make_context(args)
        specs, _, _, plan_lines = plan(ctx)
        print("\n".join(plan_lines), flush=True)
        if args.plan:
            return 0
        if args.report_only:
            frozen, rows = frozen_choice(ctx, None)
            write_report(ctx, specs, frozen, rows, plan_lines)
            return 0
        quiet_deepspeed(args.log_level)
        return run_study(ctx, len(specs))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run_study(ctx: Context, grid_runs: int) -> int:
    """Inputs, carves, the search (or the frozen choice), the grid, the report."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    started = time.perf_counter()
    ctx.work.mkdir(parents=True, exist_ok=True)
    ctx.record_timing("command", invocation())
    prepare_inputs(ctx)
    for setting in ctx.settings:
        if is_carved(ctx.study, setting):
            carve_setting(ctx, setting)
    start = start_assignment(ctx.study, ctx.base)
    tuning = 0 if ctx.quick or ctx.frozen_path.is_file() else tuning_run_count(ctx.study, start)
    runner = Runner(ctx, tuning + grid_runs)
    with logging_redirect_tqdm():
        try:
            frozen, rows = frozen_choice(ctx, runner)
            specs = grid_specs(
                ctx.study,
                ctx.base,
                frozen,
                ctx.students_dir,
                settings=ctx.settings,
                variants=ctx.variants,
                seeds=ctx.seeds,
            )
            for spec in specs:
                runner.run(spec)
        finally:
            runner.close()
    _, _, _, plan_lines = plan(ctx)
    write_report(ctx, specs, frozen, rows, plan_lines)
    logger.info("study done in %s; open %s", format_duration(time.perf_counter() - started), ctx.report / "index.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
