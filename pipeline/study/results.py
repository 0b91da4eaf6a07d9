"""One JSON file per finished run, `<work>/results/<run>.json`: the run's commit point (written atomically, last) and
what the statistics, the plan and the report read. A study resumes by skipping the runs that have one.

A result holds: name, stage, setting, variant, seed, overrides, mlflow_run_id, metrics (the last `eval/…` point and
the test or validation metrics), max_grad_norm, steps, tokens, train_seconds, eval_seconds, step_seconds_median,
curves (`CURVE_KEYS` → [[step, value]]), commit, finished.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.infra.atomic import atomic_write_text
from pipeline.study.grid import RunSpec
from pipeline.study.layout import StudyError

CURVE_KEYS = ("eval/ppl", "eval/top1_agreement", "eval/attn_kl", "train/grad_norm", "train/loss")
"""Histories each result keeps (from `metrics.jsonl`), for the report's seed-band figures."""


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
            "progress — use another --work, or delete this result to train the run again"
        )
    return result


def write_result(results_dir: Path, result: Mapping[str, Any]) -> Path:
    """Publish a run's result atomically: it is the run's commit point."""
    path = results_dir / f"{result['name']}.json"
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return path


def all_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every finished result in `results_dir`, by file name; none when it does not exist."""
    if not results_dir.is_dir():
        return []
    return [json.loads(path.read_text()) for path in sorted(results_dir.glob("*.json"))]


def read_history(output_dir: Path) -> list[dict[str, Any]]:
    """A run's `metrics.jsonl` records."""
    from pipeline.training.trainer import METRICS_LOG  # the trainer imports torch and DeepSpeed

    return [json.loads(line) for line in (output_dir / METRICS_LOG).read_text().splitlines() if line.strip()]


def curves(records: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """`CURVE_KEYS` → [(step, value)] from a run's `metrics.jsonl` records."""
    return {
        key: [(record["step"], record[key]) for record in records if key in record]
        for key in CURVE_KEYS
        if any(key in record for record in records)
    }
