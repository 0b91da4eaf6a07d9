"""`--plan`: what a study would run and how long what is left takes, measured where it can be (this study's finished
runs, else the other mode's), else from priors."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.study.grid import RunSpec, grid_specs, is_carved, start_assignment
from pipeline.study.inputs import cache_state
from pipeline.study.results import all_results
from pipeline.study.search import frozen_values, tuning_run_count
from pipeline.study.stats import Timing, estimate_seconds, format_duration, measured_timing
from pipeline.study.workspace import Context, relative_to_cwd

PRIOR_STEP_S = 1.3
PRIOR_RUN_OVERHEAD_S = 100.0
PRIOR_CACHE_TOK_S = 460.0
"""The demo's cache stage on 2 cores with the row-block capture (7 layers, 3 kinds, 2 head counts: 439–522 tok/s)."""
PRIOR_CARVE_S = 60.0
PRIOR_COMPARE_RUN_S = 3.0
"""What the plan assumes before anything was measured, on this kind of machine (2 quiet cores): a step of the
carved 4-layer student at 4 × 256 tokens took 1.3 s (median of the chat study's undisturbed 240-step runs) and each
run 80–110 s beyond its steps (start-up, evaluations, greedy answers); the cache stage's rate is the demo's; the
test evaluation (15 s), a carve (60 s) and `distill compare` per compared run (3 s) are guesses. Measured values
replace the run and comparison figures as soon as there are some (runs: this study's, else the other mode's)."""
SPLITS = 3
"""train, validation, test: the cache holds `cache.max_samples` of each."""


@dataclass(frozen=True)
class Plan:
    """The grid's runs, the search's, the estimate of what is left and the lines that say it all."""

    specs: list[RunSpec]
    tuning_runs: int
    seconds_left: float
    lines: list[str]


def searches(ctx: Context) -> bool:
    """Whether this study runs the search before the grid (not `--quick`, some stages, nothing frozen yet)."""
    return not ctx.quick and bool(ctx.study.stages) and not ctx.frozen_path.is_file()


def make_plan(ctx: Context) -> Plan:
    base, study = ctx.base, ctx.study
    start = start_assignment(study, base)
    frozen = frozen_values(ctx) or start
    specs = grid_specs(
        study, base, frozen, ctx.students_dir, settings=ctx.settings, variants=ctx.variants, seeds=ctx.seeds
    )
    tuning = tuning_run_count(study, start) if searches(ctx) else 0
    results = all_results(ctx.results_dir)
    finished = {result["name"] for result in results}
    grid_left = sum(spec.name not in finished for spec in specs)
    tune_left = max(tuning - sum(result["stage"] == "tune" for result in results), 0) if tuning else 0
    other = all_results(ctx.other_work / "results") if ctx.other_work else []
    timing = measured_timing(results, "this study") or measured_timing(other, "the other mode")
    if timing is None:
        timing = Timing(PRIOR_STEP_S, PRIOR_RUN_OVERHEAD_S, "prior: the chat study's runs, nothing measured")
    steps = base.train.max_steps
    cache_done = all(cache_state(base).values())
    samples = base.cache.max_samples
    cache_tokens = SPLITS * samples * base.data.seq_len if samples else 0
    extent = f"{samples} samples per split × {SPLITS} splits ({cache_tokens:,} tokens)" if samples else "every sample"
    measured_cache = ctx.timings.get("cache", {}).get("seconds")
    cache_s = 0.0 if cache_done else (cache_tokens / PRIOR_CACHE_TOK_S if samples else math.nan)
    carved = [setting for setting in ctx.settings if is_carved(study, setting)]
    carve_left = [setting for setting in carved if not (ctx.students_dir / setting / "config.json").is_file()]
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
    budget_s = None if ctx.quick or study.budget_minutes is None else study.budget_minutes * 60
    lines = [
        f"{ctx.grid_experiment} study ({'quick' if ctx.quick else 'full'}): {relative_to_cwd(ctx.config_path)}, "
        f"work dir {ctx.work}, report {ctx.report}",
        f"  teacher {base.teacher.path}; data {base.data.sources} seq_len {base.data.seq_len} → {base.data.output_dir}",
        f"  cache: {extent}, layers "
        f"{base.cache.layers}, targets {base.cache.attn_targets}: "
        + ("complete" if cache_done else f"to do, about {format_duration(cache_s)} at {PRIOR_CACHE_TOK_S:.0f} tok/s")
        + (f" (measured earlier: {measured_cache:.0f} s)" if measured_cache else ""),
        f"  carve: {', '.join(carved) or 'none'} ({len(carve_left)} to do, about {format_duration(carve_s)})",
        "  tuning: " + tuning_line(ctx, tuning, tune_left),
        f"  grid: {len(ctx.settings)} settings × {len(ctx.variants)} variants × {len(ctx.seeds)} seeds"
        + (" (a setting runs only its study.setting_variants)" if study.setting_variants else "")
        + f" = {len(specs)} runs, {grid_left} left",
        f"  per run: {steps} steps × {base.train.micro_batch_size} × {base.data.seq_len} tokens; "
        f"{timing.step_s:.2f} s/step + {timing.overhead_s:.0f} s set-up/eval/save = {per_run:.0f} s ({timing.source})",
        f"  estimate of what is left: cache {format_duration(cache_s)} + carve {format_duration(carve_s)} + "
        f"{grid_left + tune_left} runs {format_duration(runs_s)} + report {format_duration(compare_s)} = "
        f"{format_duration(total)}" + (f" (budget {format_duration(budget_s)})" if budget_s else ""),
    ]
    if budget_s and total > budget_s:
        lines.append(
            f"  WARNING: over the {format_duration(budget_s)} budget on these figures ({timing.source}); on a loaded "
            "machine that is expected, on a quiet one lower train.max_steps and cache.max_samples in the config"
        )
    return Plan(specs, tuning, total, lines)


def tuning_line(ctx: Context, tuning: int, left: int) -> str:
    study = ctx.study
    if ctx.quick:
        return "none (--quick: the config's values)"
    if not study.stages:
        return "none (no study.tune.stages: the config's values)"
    if ctx.frozen_path.is_file():
        return f"frozen in {ctx.frozen_path}"
    return (
        f"{len(study.stages)} stages, {tuning} runs on {study.tune_setting}/{study.tune_variant}/seed "
        f"{study.seeds[0]} (validation split), {left} left"
    )
