"""The tables of a comparison: the runs side by side (`comparison_table`: label, the params that differ, the final
value of every metric, the best eval/ppl) and the variants over seeds (`variants_table`: mean ± std), written as
markdown (`markdown_table`) and CSV (`write_csv`). Columns are ordered by `metric_columns`."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.reports.runs import MISSING, RUN_IDENTITY_PARAMS, TABLE_PREFIXES, RunSummary

TRAIN_FIRST = ("train/loss",)
TRAIN_AFTER_TERMS = ("train/lr", "train/tokens_per_s", "train/loader_wait_frac")
EVAL_FIRST = ("eval/ppl", "eval/top1_agreement", "eval/rougeL", "eval/rougeL_teacher")
BEST_PPL_COLUMN = "best eval/ppl"
TOKENS_METRIC = "train/tokens"
"""When a run logs its cumulative token count, curves are also drawn against tokens (it gets no column)."""
Cell = str | float | None
"""A table cell: a param as logged (str), a metric value (float), or None where the run lacks it."""


def differing_params(summaries: Sequence[RunSummary]) -> list[str]:
    """Param keys whose value is not the same in every run (a key missing from some runs counts as differing),
    except those that only name a run (`RUN_IDENTITY_PARAMS`: the run label already says it)."""
    keys = sorted({key for summary in summaries for key in summary.params} - RUN_IDENTITY_PARAMS)
    return [key for key in keys if len({summary.params.get(key) for summary in summaries}) > 1]


def _metric_rank(key: str) -> tuple[int, int, int, str]:
    """Sort key of a metric column: train before eval; `train/loss`, its terms, lr and throughput, other train
    metrics; `eval/ppl`, `eval/top1_agreement`, `eval/rougeL` (and the teacher's), eval loss terms, other eval
    metrics; alphabetical within a group."""
    if key.startswith("train/"):
        if key in TRAIN_FIRST:
            return (0, 0, TRAIN_FIRST.index(key), key)
        if key.startswith("train/loss_"):
            return (0, 1, 0, key)
        if key in TRAIN_AFTER_TERMS:
            return (0, 2, TRAIN_AFTER_TERMS.index(key), key)
        return (0, 3, 0, key)
    if key in EVAL_FIRST:
        return (1, 0, EVAL_FIRST.index(key), key)
    return (1, 1 if key.startswith("eval/loss_") else 2, 0, key)


def metric_columns(keys: Iterable[str]) -> list[str]:
    """The table's metric columns: every `train/` and `eval/` metric among `keys` (but the token count, an axis
    rather than a result), in `_metric_rank` order."""
    return sorted({key for key in keys if key.startswith(TABLE_PREFIXES) and key != TOKENS_METRIC}, key=_metric_rank)


def comparison_table(summaries: Sequence[RunSummary]) -> tuple[list[str], list[list[Cell]]]:
    """Columns and rows: run label, the differing params, the final value of every metric any run logged (in
    `metric_columns` order), and the best eval/ppl."""
    params = differing_params(summaries)
    metrics = metric_columns(key for summary in summaries for key in summary.histories)
    with_ppl = any("eval/ppl" in summary.histories for summary in summaries)
    columns = ["run", *params, *metrics] + ([BEST_PPL_COLUMN] if with_ppl else [])
    rows: list[list[Cell]] = []
    for summary in summaries:
        row: list[Cell] = [summary.label, *(summary.params.get(key) for key in params)]
        row += [summary.final(key) for key in metrics]
        if with_ppl:
            row.append(summary.best("eval/ppl"))
        rows.append(row)
    return columns, rows


def _markdown_cell(value: Cell) -> str:
    """Metrics to 6 significant digits for reading, params exactly as logged, a dash where the run lacks it."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.6g}"
    return value.replace("|", "\\|")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_markdown_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Cell]], run_ids: Sequence[str]) -> None:
    """The table with every metric at full precision (a float's shortest round-trip form), each run's id last."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*columns, "run_id"])
        writer.writerows([*row, run_id] for row, run_id in zip(rows, run_ids, strict=True))


def variants_table(groups: Mapping[str, Sequence[RunSummary]]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the per-variant summary: seeds, then `mean ± std` over seeds of each final metric and of
    the best eval/ppl (a dash where no run of the variant logged it; std over the runs that did)."""
    members = [summary for runs in groups.values() for summary in runs]
    metrics = metric_columns(key for summary in members for key in summary.histories)
    if any("eval/ppl" in summary.histories for summary in members):
        metrics.append(BEST_PPL_COLUMN)
    rows = []
    for name, runs in groups.items():
        row = [name, str(len(runs))]
        for key in metrics:
            found = [summary.best("eval/ppl") if key == BEST_PPL_COLUMN else summary.final(key) for summary in runs]
            values = np.array([value for value in found if value is not None], dtype=float)
            if not len(values):
                row.append(MISSING)
                continue
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            row.append(
                f"{values.mean():.4g} ± {spread:.2g}" + (f" (n={len(values)})" if len(values) < len(runs) else "")
            )
        rows.append(row)
    return ["variant", "seeds", *metrics], rows
