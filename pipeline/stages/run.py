"""`distill run`: every stage in order, one student per `run.variants` entry, then `distill compare`; and the
compare stage itself."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.config import variant as config_variant
from pipeline.infra import dist
from pipeline.reports.compare import compare_runs
from pipeline.reports.runs import resolve_target
from pipeline.stages.cache import cache_stage
from pipeline.stages.prepare import prepare_stage
from pipeline.stages.teacher import teacher_stage
from pipeline.stages.train import train_stage

logger = logging.getLogger(__name__)


def compare_stage(config: Config, report_dir: Path) -> str:
    """`distill compare` for the config's experiment: tables and plots under `report_dir/<experiment>/`."""
    uri, experiment = resolve_target(config, None, None)
    return compare_runs(uri, experiment, output=report_dir).markdown


def run_stage(config: Config, *, overwrite: bool = False) -> None:
    """`distill run`: every stage in order, each skipped when its output is already complete; with `run.variants`,
    one student per variant on the same prepared data (and the same cache where the variants share it), then a
    comparison of their runs. `overwrite` is handed to every stage. Prints where the time went."""
    timings: list[tuple[str, float]] = []

    def timed(label: str, stage: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = stage()
        timings.append((label, time.perf_counter() - start))
        return result

    timed("teacher import", lambda: teacher_stage(config, overwrite=overwrite))
    timed("prepare", lambda: prepare_stage(config, overwrite=overwrite))
    variants = {name: config_variant(config, name) for name in config.run.variants} or {"": config}
    trained = False
    for name, variant in variants.items():
        suffix = f" [{name}]" if name else ""
        if name:
            logger.info("variant %s: %s", name, " ".join(config.run.variants[name]) or "(the base config)")
        timed(f"cache{suffix}", lambda variant=variant: cache_stage(variant, overwrite=overwrite))
        trained |= bool(timed(f"train{suffix}", lambda variant=variant: train_stage(variant, overwrite=overwrite)))
    report = Path(config.run.report_dir) / config.mlflow.experiment
    if dist.is_main() and config.mlflow.enabled and len(variants) > 1 and (trained or not report.is_dir()):
        print(timed("compare", lambda: compare_stage(config, Path(config.run.report_dir))), end="")
    dist.shutdown()
    if dist.is_main():
        total = sum(seconds for _, seconds in timings)
        print("\nwhere the time went:")
        for label, seconds in timings:
            print(f"  {label:32s} {seconds:8.1f} s  {100 * seconds / max(total, 1e-9):5.1f} %")
        print(f"  {'total':32s} {total:8.1f} s")
