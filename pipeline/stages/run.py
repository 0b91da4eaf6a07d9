"""`distill run`: every stage in order, one student per `run.variants` entry, then `distill compare`; and the
compare stage itself.

A stage that finished before in exactly the state found now is skipped before its module is imported
(`stages.done`): a re-run of a finished pipeline loads no DeepSpeed, MLflow or teacher and joins no process group.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.config import variant as config_variant
from pipeline.infra import dist
from pipeline.stages import done

logger = logging.getLogger(__name__)

DRIVERS = {
    "teacher": "pipeline.stages.teacher:teacher_stage",
    "prepare": "pipeline.stages.prepare:prepare_stage",
    "cache": "pipeline.stages.cache:cache_stage",
    "train": "pipeline.stages.train:train_stage",
}
"""Each stage's driver, imported only when the stage runs: DeepSpeed, MLflow and transformers take seconds."""


def compare_stage(config: Config, report_dir: Path) -> str:
    """`distill compare` for the config's experiment: tables and plots under `report_dir/<experiment>/`."""
    from pipeline.reports.compare import compare_runs  # here: MLflow and matplotlib take seconds to import
    from pipeline.reports.runs import resolve_target

    uri, experiment = resolve_target(config, None, None)
    return compare_runs(uri, experiment, output=report_dir).markdown


def run_stage(config: Config, *, overwrite: bool = False) -> None:
    """`distill run`: every stage in order, each skipped when its output is already complete; with `run.variants`,
    one student per variant on the same prepared data (and the same cache where the variants share it), then a
    comparison of their runs. `overwrite` is handed to every stage. Prints where the time went."""
    timings: list[tuple[str, float]] = []

    def stage(name: str, stage_config: Config, label: str) -> Any:
        """Run stage `name` unless `done` says it already finished in this state; returns what the driver returned
        (None when skipped)."""
        start = time.perf_counter()
        if done.is_done(name, stage_config):
            output = done.stage_output(name, stage_config)
            logger.info("%s: done (%s unchanged since it finished), skipped", label, output)
            timings.append((f"{label} (done)", time.perf_counter() - start))
            return None
        module, function = DRIVERS[name].split(":")
        result = getattr(importlib.import_module(module), function)(stage_config, overwrite=overwrite)
        done.mark_done(name, stage_config)
        timings.append((label, time.perf_counter() - start))
        return result

    stage("teacher", config, "teacher import")
    stage("prepare", config, "prepare")
    variants = {name: config_variant(config, name) for name in config.run.variants} or {"": config}
    trained = False
    for name, variant in variants.items():
        suffix = f" [{name}]" if name else ""
        if name:
            logger.info("variant %s: %s", name, " ".join(config.run.variants[name]) or "(the base config)")
        stage("cache", variant, f"cache{suffix}")
        trained |= bool(stage("train", variant, f"train{suffix}"))
    report = Path(config.run.report_dir) / config.mlflow.experiment
    if dist.is_main() and config.mlflow.enabled and len(variants) > 1 and (trained or not report.is_dir()):
        start = time.perf_counter()
        print(compare_stage(config, Path(config.run.report_dir)), end="")
        timings.append(("compare", time.perf_counter() - start))
    dist.shutdown()
    if dist.is_main():
        total = sum(seconds for _, seconds in timings)
        print("\nwhere the time went:")
        for label, seconds in timings:
            print(f"  {label:32s} {seconds:8.1f} s  {100 * seconds / max(total, 1e-9):5.1f} %")
        print(f"  {'total':32s} {total:8.1f} s")
