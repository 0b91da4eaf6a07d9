"""The study's report: `<report>/index.md` (command, commit, budget, tuning, per-setting tables and figures, the
claims, `distill compare` per setting), `results.csv` and the figures, published atomically; then a summary run in
the study's MLflow experiment holding them, with each cell's mean test perplexity and paired Δ as metrics."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.infra.atomic import staged_directory
from pipeline.reports.compare import compare_runs
from pipeline.reports.runs import SUMMARY_TAG
from pipeline.study.figures import band_figure, delta_figure, tuning_figure
from pipeline.study.grid import TUNE_STAGE, RunSpec
from pipeline.study.layout import format_override
from pipeline.study.results import all_results
from pipeline.study.search import TuningRow
from pipeline.study.stats import format_duration, grid_runs, mean_std, paired
from pipeline.study.tables import cell, honest_reading, setting_table, step0_ppl, write_csv
from pipeline.study.workspace import Context, git_commit, study_files_changed

logger = logging.getLogger(__name__)

Result = Mapping[str, Any]
MAX_NOTE = 8000
"""MLflow's limit on a tag's value: the summary run's note (the setting tables) is cut there."""


def write_report(
    ctx: Context, specs: Sequence[RunSpec], frozen: Mapping[str, Any], rows: Sequence[TuningRow], plan_lines: list[str]
) -> Path:
    """`index.md`, `results.csv`, the figures and `distill compare`'s report per setting, published atomically, then
    logged to MLflow; returns the path of `index.md`."""
    wanted = {spec.name for spec in specs} | {row.run for row in rows}
    results = [result for result in all_results(ctx.results_dir) if result["name"] in wanted]
    baseline = ctx.study.baseline
    tables = []
    with staged_directory(ctx.report) as staging:
        write_csv(results, staging / "results.csv")
        lines = [
            *header_lines(ctx, results),
            *tuning_lines(ctx, frozen, rows),
            *budget_lines(ctx, results, plan_lines),
        ]
        if tuning_figure(results, staging / "figures" / "tuning-eval-ppl.png") is not None:
            lines += ["![tuning runs: validation ppl](figures/tuning-eval-ppl.png)", ""]
        for setting in ctx.settings:
            table = [f"## {setting}: test split, mean ± std over seeds", ""]
            table += [
                f"Δppl: per seed, the variant's test ppl minus {baseline}'s (negative: better), mean ± std over "
                "seeds; wins: seeds where it is lower.",
                "",
                *setting_table(results, setting, ctx.variants, baseline),
                "",
            ]
            tables += table
            lines += [
                *table,
                f"Validation ppl before the first update (every variant of a seed starts there; left out of the "
                f"curves below): {cell(step0_ppl(results, setting))}.",
                "",
            ]
            lines += setting_figures(results, setting, ctx.variants, baseline, staging)
        lines += honest_reading(results, ctx.settings, ctx.variants, baseline)
        lines += ["## distill compare", ""]
        lines += compare_settings(ctx, staging)
        lines += ["## Every run", "", "| run | stage | seed | score | max grad norm | train s | eval s |"]
        lines.append("|---|---|---|---|---|---|---|")
        for result in results:
            key = "tune/val_ppl" if result["stage"] == TUNE_STAGE else "test/ppl"
            lines.append(
                f"| {result['name']} | {result['stage']} | {result['seed']} | {key} {result['metrics'][key]:.4g} | "
                f"{result['max_grad_norm']:.3g} | {result['train_seconds']:.0f} | {result['eval_seconds']:.0f} |"
            )
        (staging / "index.md").write_text("\n".join(lines) + "\n")
    logger.info("report written to %s", ctx.report / "index.md")
    log_summary_run(ctx, results, "\n".join(tables))
    return ctx.report / "index.md"


def header_lines(ctx: Context, results: Sequence[Result]) -> list[str]:
    """Title, command, commit, machine, teacher, students and settings."""
    commit, changed = git_commit(), study_files_changed(ctx.config_path)
    command = ctx.timings.get("command", "(not recorded)")
    rebuilt = ctx.command if ctx.command and ctx.command != command else None
    student = ctx.base.student
    return [
        f"# {ctx.grid_experiment.capitalize()} study{' (--quick)' if ctx.quick else ''}: which objective pays for "
        "this teacher and student?",
        "",
        f"Command: `{command}` (from the directory the config's paths are relative to"
        + (f"; this report rebuilt by `{rebuilt}`" if rebuilt else "")
        + f"). Commit `{commit}`"
        + (f" with local changes to {', '.join(changed)}" if changed else "")
        + f". Written {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({os.cpu_count()} CPU cores). "
        + run_commits(results),
        "",
        f"Teacher: {teacher_description(ctx.base)}. Students: {student.num_layers} layers, hidden "
        f"{student.hidden_size}, MLP {student.intermediate_size}, {student.num_kv_heads} KV head(s). Settings: "
        + "; ".join(f"**{s}** `{' '.join(ctx.study.settings[s])}`" for s in ctx.settings)
        + ". A carved setting is carved once and every run starts from the same weights; `train.seed` changes "
        "the data order (and a scratch student's initial weights). Tables: [results.csv](results.csv) (one row "
        "per run).",
        "",
    ]


def setting_figures(
    results: Sequence[Result], setting: str, variants: Sequence[str], baseline: str, staging: Path
) -> list[str]:
    """A setting's validation curves, their paired Δ from the baseline and the gradient norms, as markdown images."""
    figures = (
        (
            "val-ppl",
            "validation ppl against step",
            lambda path: band_figure(results, setting, variants, "eval/ppl", path),
        ),
        (
            "val-ppl-delta",
            f"validation ppl minus {baseline}'s, per seed",
            lambda path: delta_figure(results, setting, variants, baseline, "eval/ppl", path),
        ),
        (
            "grad-norm",
            "pre-clip gradient norm against step",
            lambda path: band_figure(results, setting, variants, "train/grad_norm", path),
        ),
    )
    lines = []
    for stem, alt, draw in figures:
        if draw(staging / "figures" / f"{setting}-{stem}.png"):
            lines += [f"![{setting}: {alt}](figures/{setting}-{stem}.png)", ""]
    return lines


def tuning_lines(ctx: Context, frozen: Mapping[str, Any], rows: Sequence[TuningRow]) -> list[str]:
    values = ", ".join(f"`{format_override(key, value)}`" for key, value in frozen.items())
    if ctx.quick or not ctx.study.stages:
        why = "`--quick`" if ctx.quick else "no `study.tune.stages`"
        return ["## Hyper-parameters", "", f"No search ({why}): the config's values {values or '(none tuned)'}.", ""]
    study = ctx.study
    lines = [
        "## Tuning (validation split only)",
        "",
        f"Greedy, one factor at a time, on {study.tune_setting} / {study.tune_variant} / seed {study.seeds[0]}; "
        "score: perplexity of the exported student on the whole cached validation split (the test split was never "
        f"read). Every run is in MLflow experiment `{ctx.tuning_experiment}`.",
        "",
        "| stage | key | value | validation ppl | kept | run |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row.stage} | `{row.key}` | `{json.dumps(row.value)}` | {row.score:.5g} | "
        f"{'**yes**' if row.chosen else ''} | {row.run} |"
        for row in rows
    ]
    lines += [
        "",
        f"Frozen ({ctx.frozen_path}): {values}; applied to every variant (one that sets `distill.rel.weight` > 0 gets "
        "`distill.rel.weight` = the frozen `distill.attn.weight`).",
        "",
    ]
    return lines


def budget_lines(ctx: Context, results: Sequence[Result], plan_lines: Sequence[str]) -> list[str]:
    base = ctx.base
    train, cache = base.train, base.cache
    tokens = train.max_steps * train.micro_batch_size * train.grad_accum * base.data.seq_len
    runs_s = sum(r["train_seconds"] + r["eval_seconds"] for r in results)
    cache_s = ctx.timings.get("cache", {}).get("seconds")
    carves = {key.removeprefix("carve."): value for key, value in ctx.timings.items() if key.startswith("carve.")}
    consumed = train.max_steps * train.micro_batch_size * train.grad_accum
    return [
        "## Budget",
        "",
        f"- Every run: {train.max_steps} optimizer steps × {train.micro_batch_size} × {base.data.seq_len} tokens = "
        f"{tokens:,} tokens, lr {train.lr:g} (warm-up {train.warmup_steps}, {train.schedule}), {train.precision}, "
        f"evaluated every {train.eval_every} steps on {train.eval_batches} validation batches (the curves).",
        f"- Cache: {cache_extent(cache.max_samples, consumed)}, targets {', '.join(cache.attn_targets) or 'as needed'} "
        f"for {cache.head_counts or 'the student'} heads at teacher layers {cache.layers or 'the matched ones'}, "
        f"{cache.encoding}: every variant of a seed reads the same sequences in the same order. Test metrics: every "
        "cached test sequence.",
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


def cache_extent(max_samples: int | None, consumed: int) -> str:
    """How much of each split the cache holds, against what a run's steps consume."""
    if max_samples is None:
        return "every sequence of each split (train, validation, test)"
    return (
        f"the first {max_samples} sequences of each split (train, validation, test), which a run's {consumed} "
        f"sequences read {consumed / max_samples:g} time(s) over (caching, a teacher forward, costs the most per "
        "token: it holds what training reads and no more)"
    )


def teacher_description(base: Config) -> str:
    """`source (path: family, layers, heads)` from the teacher's own config."""
    from pipeline.models.loading import load_teacher_config  # imports torch and transformers

    try:
        hf = load_teacher_config(Path(base.teacher.path))
    except PipelineError as error:  # a report rebuilt where the teacher is gone still says which one it was
        return f"{base.teacher.source} ({base.teacher.path}; its config cannot be read: {error})"
    heads, kv_heads = hf.num_attention_heads, getattr(hf, "num_key_value_heads", hf.num_attention_heads)
    return (
        f"{base.teacher.source} ({base.teacher.path}: {hf.model_type}, {hf.num_hidden_layers} layers, {heads} heads "
        f"on {kv_heads} KV heads)"
    )


def run_commits(results: Sequence[Result]) -> str:
    """Which commits the runs were trained at (a resumed study may span several)."""
    counts: dict[str, int] = {}
    for result in results:
        counts[result.get("commit", "unknown")] = counts.get(result.get("commit", "unknown"), 0) + 1
    return "Runs trained at " + ", ".join(f"`{commit[:12]}` ({count})" for commit, count in counts.items()) + "."


def compare_settings(ctx: Context, staging: Path) -> list[str]:
    """`compare_runs` on the study's experiment, one report per setting (every run's heat maps in one montage would
    outgrow what matplotlib can draw for the whole grid), with seeds grouped into variants."""
    lines = []
    for setting in ctx.settings:
        output = staging / "compare" / setting
        started = time.perf_counter()
        try:
            report = compare_runs(
                ctx.tracking_uri,
                ctx.grid_experiment,
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


def summary_metrics(ctx: Context, results: Sequence[Result]) -> dict[str, float]:
    """`test_ppl/<setting>/<variant>` (mean over seeds) and `delta_ppl/<setting>/<variant>` (mean paired Δ from the
    baseline) of every cell that finished."""
    metrics = {}
    for setting in ctx.settings:
        for variant in ctx.variants:
            mean, _, count = mean_std([r["metrics"]["test/ppl"] for r in grid_runs(results, setting, variant)])
            if count:
                metrics[f"test_ppl/{setting}/{variant}"] = mean
            pair = paired(results, setting, variant, ctx.study.baseline, "test/ppl")
            if variant != ctx.study.baseline and pair.deltas:
                metrics[f"delta_ppl/{setting}/{variant}"] = mean_std(pair.deltas)[0]
    return {key: value for key, value in metrics.items() if not math.isnan(value)}


def log_summary_run(ctx: Context, results: Sequence[Result], tables: str) -> str | None:
    """A run in the study's experiment holding the report, its note the setting `tables` (tagged as a summary:
    comparisons leave it out); None when there is no store or experiment yet (no run trained) or MLflow fails, which
    is logged: the report stands."""
    prefix = "sqlite:///"
    if ctx.tracking_uri.startswith(prefix) and not Path(ctx.tracking_uri.removeprefix(prefix)).is_file():
        logger.info("no MLflow store at %s: the report is not logged to MLflow", ctx.tracking_uri)
        return None
    from mlflow.entities import Metric  # MLflow takes seconds to import
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=ctx.tracking_uri)
        experiment = client.get_experiment_by_name(ctx.grid_experiment)
        if experiment is None:
            logger.info("no experiment %r at %s: the report is not logged", ctx.grid_experiment, ctx.tracking_uri)
            return None
        mode = "quick" if ctx.quick else "full"
        note = tables if len(tables) <= MAX_NOTE else tables[: MAX_NOTE - 40] + "\n\n… (the rest: artifact index.md)"
        tags = {SUMMARY_TAG: "true", "distill.study": mode, "mlflow.note.content": note}
        run = client.create_run(
            experiment.experiment_id, run_name=f"study-{mode}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags
        )
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, 0) for key, value in summary_metrics(ctx, results).items()]
        client.log_batch(run.info.run_id, metrics=metrics)
        for name in ("index.md", "results.csv"):
            client.log_artifact(run.info.run_id, str(ctx.report / name))
        if (ctx.report / "figures").is_dir():
            client.log_artifacts(run.info.run_id, str(ctx.report / "figures"), "figures")
        client.set_terminated(run.info.run_id)
    except Exception:  # the report on disk is the product; its copy in MLflow is a convenience
        logger.exception("logging the report to MLflow experiment %r failed", ctx.grid_experiment)
        return None
    logger.info("report logged to summary run %s in experiment %r", run.info.run_id, ctx.grid_experiment)
    return run.info.run_id
