"""The report's tables from finished results: per setting, each variant's mean ± std over seeds and its paired
comparison with the baseline; the claims a reader checks; one CSV row per run."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.study.stats import Paired, grid_runs, mean_std, paired

Result = Mapping[str, Any]
CSV_COLUMNS = (
    "name",
    "stage",
    "setting",
    "variant",
    "seed",
    "test/ppl",
    "test/top1_agreement",
    "test/attn_kl",
    "test/rougeL",
    "test/rougeL_teacher",
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
)
CLAIMS = (
    ("shd_kd", None, "squeezed attention on top of logit KD vs logit KD alone"),
    ("shd_kd", "uniform_kd", "per-sample α vs a constant merge"),
    ("shd_kd", "selective_kd", "per-sample α vs hard head selection"),
    ("shd_kd", "shd_pairwise_kd", "exact group α vs the paper's pairwise merge"),
    ("shd_kd", "shd_mse_kd", "KL vs MSE"),
    ("shd_kd", "minilm_kd", "SHD vs MiniLMv2 relations"),
)
"""The paper's claims as pairs of variants (None: the baseline), read where both variants ran."""


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


def median_grad_norm(result: Result) -> float:
    """The median over a run's steps of the pre-clip gradient norm (the max is the first steps' alone)."""
    points = result["curves"].get("train/grad_norm", [])
    return statistics.median(value for _, value in points) if points else math.nan


def setting_table(results: Sequence[Result], setting: str, variants: Sequence[str], baseline: str) -> list[str]:
    """Markdown rows of one setting: per variant, mean ± std over seeds and the paired comparison with `baseline`."""
    rouge = any("test/rougeL" in r["metrics"] for r in grid_runs(results, setting))
    lines = [
        "| variant | seeds | test ppl | top-1 agreement | "
        + ("ROUGE-L (test) | " if rouge else "")
        + "attention KL to own targets (test) | max pre-clip grad norm | median pre-clip grad norm | train wall s | "
        f"Δppl vs {baseline} (per seed) | wins vs {baseline} |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if rouge else ""),
    ]
    for variant in variants:
        runs = grid_runs(results, setting, variant)
        if not runs:
            continue
        pair = paired(results, setting, variant, baseline, "test/ppl")
        comparison = (
            ("(baseline)", "—") if variant == baseline else (paired_cell(pair), f"{pair.wins}/{len(pair.deltas)}")
        )
        rouge_cell = cell([r["metrics"]["test/rougeL"] for r in runs if "test/rougeL" in r["metrics"]], 3)
        lines.append(
            f"| {variant} | {len(runs)} | {cell([r['metrics']['test/ppl'] for r in runs])} | "
            f"{cell([r['metrics']['test/top1_agreement'] for r in runs], 3)} | "
            + (f"{rouge_cell} | " if rouge else "")
            + f"{cell([r['metrics']['test/attn_kl'] for r in runs], 3)} | "
            f"{cell([r['max_grad_norm'] for r in runs], 3)} | {cell([median_grad_norm(r) for r in runs], 3)} | "
            f"{mean_std([r['train_seconds'] for r in runs])[0]:.0f} | "
            f"{comparison[0]} | {comparison[1]} |"
        )
    return lines


def step0_ppl(results: Sequence[Result], setting: str) -> list[float]:
    """Validation perplexity before the first update of each grid run of a setting (the start every variant shares
    within a seed)."""
    return [
        points[0][1]
        for r in grid_runs(results, setting)
        for points in [r["curves"].get("eval/ppl", [])]
        if points and points[0][0] == 0
    ]


def claims(results: Sequence[Result], setting: str, variants: Sequence[str], baseline: str) -> list[str]:
    """`CLAIMS` as paired test-ppl differences (Δ < 0: the first one is better), where both variants ran."""
    lines = []
    for first, second, meaning in CLAIMS:
        second = second or baseline
        if first not in variants or second not in variants:
            continue
        pair = paired(results, setting, first, second, "test/ppl")
        if pair.deltas:
            lines.append(
                f"  - {meaning}: {first} − {second} = {paired_cell(pair)} test ppl, {first} lower in "
                f"{pair.wins}/{len(pair.deltas)} seeds."
            )
    return lines


def honest_reading(
    results: Sequence[Result], settings: Sequence[str], variants: Sequence[str], baseline: str
) -> list[str]:
    """A template with every figure filled in; the words are the lead's to write."""
    lines = [
        "## Honest reading (template: the figures are filled in, the conclusions are for the lead to write)",
        "",
    ]
    for setting in settings:
        grid = grid_runs(results, setting)
        means = {
            variant: mean_std([r["metrics"]["test/ppl"] for r in grid if r["variant"] == variant])
            for variant in variants
        }
        means = {variant: value for variant, value in means.items() if value[2]}
        if not means:
            continue
        best = min(means, key=lambda variant: means[variant][0])
        spreads = [value[1] for value in means.values() if value[2] > 1]
        lines += [
            f"- **{setting}**: lowest mean test ppl {best} ({means[best][0]:.4g} ± {means[best][1]:.2g}); "
            f"{baseline} {means.get(baseline, (math.nan,))[0]:.4g}. Seed spread (std of test ppl over seeds): "
            + (f"{min(spreads):.3g} to {max(spreads):.3g} across variants." if spreads else "one seed only."),
            *claims(results, setting, variants, baseline),
            f"  - Reading: _(where SHD wins or not in {setting}, and whether the differences exceed the seed spread)_",
        ]
    lines += [
        "- What a user should pick by default: _(lead)_",
        "- Caveats: the budget (see Budget); attention KL is measured against each variant's OWN targets (its "
        "squeeze or match; the base config's for a variant without an attention term), so it is not comparable "
        "across variants; a carved student's heads are merged along SHD's contiguous head groups, whatever the "
        "variant; _(lead)_",
        "",
    ]
    return lines


def write_csv(results: Sequence[Result], path: Path) -> None:
    """One row per run: `CSV_COLUMNS`, its overrides joined by spaces."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for result in results:
            row = {**result, **result["metrics"], "overrides": " ".join(result["overrides"])}
            writer.writerow([row.get(column, "") for column in CSV_COLUMNS])
