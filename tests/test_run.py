"""`distill run` on the tiny config: every stage, two variants, the comparison report; a re-run changes nothing and
skips every stage before importing it (no DeepSpeed, MLflow, transformers or datasets, so no process group); a
changed `train.max_steps` trains again and skips the rest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stages.done import STAGES

ROOT = Path(__file__).resolve().parents[1]


HEAVY = ("deepspeed", "mlflow", "transformers", "datasets", *(f"pipeline.stages.{name}" for name in STAGES))
"""What a re-run of a finished pipeline must not import: the stage drivers open process groups and load models."""


def _distill_run(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`distill run` of the tiny config in `workdir`, its imports listed on stderr (`-X importtime`)."""
    overrides = [
        f"teacher.path={workdir}/teacher",
        f"data.output_dir={workdir}/data",
        f"cache.output_dir={workdir}/targets",
        f"train.output_dir={workdir}/runs",
        f"mlflow.tracking_uri=sqlite:///{workdir}/mlflow.db",
        f"run.report_dir={workdir}/reports",
        *extra,
    ]
    command = [sys.executable, "-X", "importtime", "-m", "pipeline.cli", "run", "configs/tiny.yaml", *overrides]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _tree(directory: Path) -> dict[str, int]:
    return {
        str(path.relative_to(directory)): path.stat().st_mtime_ns for path in directory.rglob("*") if path.is_file()
    }


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_then_a_no_op(tmp_path: Path) -> None:
    first = _distill_run(tmp_path)
    report = tmp_path / "reports" / "tiny"
    names = ("index.md", "runs.md", "runs.csv", "alpha_histograms.png", "attention_heatmaps_layer-0.png")
    for name in (*names, "attention_heatmaps_layer-1.png", "step/train_loss.png", "step/eval_ppl.png"):
        assert (report / name).is_file(), name
    table = (report / "runs.md").read_text()
    assert "| shd |" in table and "| ce_only |" in table
    assert "where the time went" in first.stdout
    for variant in ("shd", "ce_only"):
        assert (tmp_path / "runs" / variant / "student" / "config.json").is_file()

    before = _tree(tmp_path)
    second = _distill_run(tmp_path)
    after = _tree(tmp_path)
    changed = sorted(name for name in after if before.get(name) != after[name] and not name.startswith("mlflow.db"))
    assert changed == [], changed
    assert second.stderr.count("unchanged since it finished), skipped") == 6  # teacher, prepare, 2 × (cache, train)
    imported = _imported(second.stderr)
    assert not [name for name in HEAVY if name in imported], sorted(imported & set(HEAVY))

    third = _distill_run(tmp_path, "train.max_steps=12")
    assert third.stderr.count("unchanged since it finished), skipped") == 4  # teacher, prepare, 2 × cache
    for variant in ("shd", "ce_only"):
        assert (tmp_path / "runs" / variant / "checkpoints" / "latest").read_text().strip() == "step-00000012"


def _imported(importtime: str) -> set[str]:
    """Module names of `python -X importtime` output."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime.splitlines() if line.startswith("import time:")}
