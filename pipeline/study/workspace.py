"""Where a study lives and what it runs: its work and report directories, its base config (this work dir's cache,
runs and MLflow store; `--quick`'s budget), the subset of the grid, the timings kept between sessions, and the
provenance (commit, local changes) its results and report record."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.infra.atomic import atomic_write_text
from pipeline.study.layout import Study, StudyError, load_base, load_study, split_study_file

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
"""The checkout the study's code comes from: its commit is the one results and reports name."""
QUICK_SUFFIX = "-quick"
TUNING_SUFFIX = "-tuning"


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
    other_work: Path | None = None
    """The other mode's default work dir (quick ↔ full): its finished runs were timed on this machine too."""
    command: str = ""
    """The command line that runs this study, as one would type it."""
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

    @property
    def grid_experiment(self) -> str:
        return self.base.mlflow.experiment

    @property
    def tuning_experiment(self) -> str:
        return self.base.mlflow.experiment + TUNING_SUFFIX

    def record_timing(self, key: str, value: Any) -> None:
        self.timings[key] = value
        atomic_write_text(self.timings_path, json.dumps(self.timings, indent=1) + "\n")


def relative_to_cwd(path: Path) -> Path:
    """Paths under the working directory as relative ones (a study runs from the directory its config's relative
    paths are read from), so results and the report name the same paths on any checkout."""
    resolved = Path(path).resolve()
    return resolved.relative_to(Path.cwd()) if resolved.is_relative_to(Path.cwd()) else resolved


def default_dir(configured: str | None, parent: str, base: Config, quick: bool) -> Path:
    """`study.work_dir`/`study.report_dir`, else `<parent>/<mlflow.experiment>`; `--quick` appends `-quick`."""
    return Path((configured or f"{parent}/{base.mlflow.experiment}") + (QUICK_SUFFIX if quick else ""))


def work_overrides(work: Path) -> list[str]:
    """A work dir's own cache, runs and MLflow store (the prepared data are shared by `--quick` and the full study)."""
    return [
        f"cache.output_dir={work / 'targets'}",
        f"train.output_dir={work / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
    ]


def open_study(
    config_path: Path,
    *,
    quick: bool = False,
    work: Path | None = None,
    report: Path | None = None,
    keep_models: bool = False,
    overrides: Sequence[str] = (),
    command: str = "",
) -> Context:
    """Read and check a study config and lay out its work: the base config with this work dir's outputs, `--quick`'s
    overrides and the user's `overrides` (applied last), and the settings, variants and seeds to run."""
    config_path = Path(config_path).resolve()
    study, probe = load_study(config_path, overrides)
    _, values = split_study_file(config_path)
    if quick and study.quick is None:
        raise StudyError(f"{config_path}: study.quick: missing; --quick needs its settings, variants and seeds")
    work = relative_to_cwd(work or default_dir(study.work_dir, "work", probe, quick))
    report = relative_to_cwd(report or default_dir(study.report_dir, "reports", probe, quick))
    quick_overrides = study.quick.overrides if quick else ()
    base = load_base(config_path, values, [*work_overrides(work), *quick_overrides, *overrides])
    if quick:
        settings, variants, seeds = study.quick.settings, study.quick.variants, study.seeds[: study.quick.seeds]
    else:
        settings, variants, seeds = tuple(study.settings), tuple(study.variants), study.seeds
    other_work = default_dir(study.work_dir, "work", probe, not quick) if study.quick else None
    ctx = Context(
        config_path, base, study, quick, work, report, keep_models, settings, variants, seeds, other_work, command
    )
    if ctx.timings_path.is_file():
        ctx.timings = json.loads(ctx.timings_path.read_text())
    return ctx


def git_commit() -> str:
    """The commit of the study's code, `unknown` outside a git checkout."""
    found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_ROOT, capture_output=True, text=True, check=False)
    return found.stdout.strip() or "unknown"


def study_files_changed(config_path: Path) -> list[str]:
    """The study's own files (its code, its config when in the checkout) that differ from the commit: the report says
    so beside the hash."""
    paths = [str(Path(__file__).parent.relative_to(PACKAGE_ROOT))]
    if config_path.is_relative_to(PACKAGE_ROOT):
        paths.append(str(config_path.relative_to(PACKAGE_ROOT)))
    found = subprocess.run(
        ["git", "status", "--porcelain", "--", *paths], cwd=PACKAGE_ROOT, capture_output=True, text=True, check=False
    )
    return [line[3:] for line in found.stdout.splitlines()]
