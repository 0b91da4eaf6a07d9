"""The runs `distill compare` reads: which MLflow store and experiment (`resolve_target`, `open_client`,
`find_experiment`), which of its runs (`select_runs`, never the summary runs a comparison logs), their params and
metric histories (`load_summaries` → `RunSummary`), and their grouping into variants over seeds (`seed_variants`).
Everything that talks to the MLflow store to read runs is here; the tables and plots work on `RunSummary` alone."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import Config, MLflowConfig
from pipeline.errors import PipelineError
from pipeline.infra.mlflow_store import resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow.entities import Experiment, Run
    from mlflow.tracking import MlflowClient

SUMMARY_TAG = "distill.summary"
"""Tag of the runs `distill compare` creates; runs carrying it with value `true` are left out of comparisons."""
TABLE_PREFIXES = ("train/", "eval/")
"""Every training and evaluation metric a run logged gets a column (and loss terms and eval metrics a curve), so
a loss term added to the objective shows up without touching the report."""
SEED_PARAM = re.compile(r"(^|\.)seed$")
"""Params naming a seed (`train.seed`, `data.seed`, `seed`): runs that differ only in these are one variant."""
SEED_SUFFIX = re.compile(r"[-_. ]?seed[-_=]?\d+$", flags=re.IGNORECASE)
"""How run names say their seed (`shd_kd-seed1`); stripped to name the variant."""
MISSING = "—"
"""What stands where a run lacks a value, or a variant a param that tells variants apart."""
RUN_IDENTITY_PARAMS = {"mlflow.run_name", "train.output_dir"}
"""Params that differ between any two runs by construction; as columns they would only repeat the run's name."""


class CompareError(PipelineError):
    """No store, experiment or run matches what `distill compare` was asked for; the message names it."""


@dataclass
class RunSummary:
    """One compared run: its label in tables and legends, its params and the metric histories it needs."""

    run_id: str
    label: str
    params: dict[str, str]
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """metric key → [(step, value)] sorted by step; of equal steps the later-logged value comes last."""

    def final(self, key: str) -> float | None:
        """The value at the highest step (the last logged one among equal steps), or None if never logged."""
        history = self.histories.get(key)
        return history[-1][1] if history else None

    def best(self, key: str) -> float | None:
        """The smallest value ever logged, NaNs (a diverged evaluation) ignored; None if there is none."""
        values = [value for _, value in self.histories.get(key, []) if not math.isnan(value)]
        return min(values, default=None)


def resolve_target(config: Config | None, experiment: str | None, tracking_uri: str | None) -> tuple[str, str]:
    """(tracking URI, experiment name): the flags first, then the config's `mlflow` section, then the defaults
    (`MLFLOW_TRACKING_URI`, `sqlite:///mlflow.db`)."""
    settings = config.mlflow if config is not None else MLflowConfig()
    uri = tracking_uri or resolve_tracking_uri(settings)
    name = experiment or (config.mlflow.experiment if config is not None else None)
    if not name:
        raise CompareError("distill compare: name the experiment with --experiment NAME or give a CONFIG")
    return uri, name


def open_client(tracking_uri: str) -> MlflowClient:
    """A client on an existing store: a sqlite URI whose file is missing would silently create an empty store."""
    # here, not at the top: MLflow takes seconds to import and only these calls need it
    from mlflow.tracking import MlflowClient

    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not Path(tracking_uri.removeprefix(prefix)).is_file():
        raise CompareError(
            f"no MLflow store at {tracking_uri} (set --tracking-uri, mlflow.tracking_uri or MLFLOW_TRACKING_URI)"
        )
    return MlflowClient(tracking_uri=tracking_uri)


def find_experiment(client: MlflowClient, name: str, tracking_uri: str) -> Experiment:
    found = client.get_experiment_by_name(name)
    if found is None:
        known = sorted(experiment.name for experiment in client.search_experiments())
        raise CompareError(f"no experiment {name!r} at {tracking_uri}; experiments there: {', '.join(known) or 'none'}")
    return found


def select_runs(
    client: MlflowClient, experiment: Experiment, run_refs: Sequence[str] = (), filter_string: str = ""
) -> list[Run]:
    """Active, non-summary runs of `experiment` matching `filter_string`, oldest first; with `run_refs`, only the
    runs whose id or name is listed (every reference must match at least one run)."""
    # here, not at the top: MLflow takes seconds to import and only these calls need it
    from mlflow.exceptions import MlflowException

    runs: list[Run] = []
    page_token = None
    while True:
        try:
            page = client.search_runs(
                [experiment.experiment_id],
                filter_string=filter_string,
                order_by=["attributes.start_time ASC"],
                page_token=page_token,
            )
        except MlflowException as error:
            raise CompareError(f"--filter {filter_string!r}: {error.message}") from None
        runs += [run for run in page if run.data.tags.get(SUMMARY_TAG) != "true"]
        page_token = page.token
        if not page_token:
            break
    where = f"experiment {experiment.name!r}" + (f" with filter {filter_string!r}" if filter_string else "")
    if run_refs:
        missing = [ref for ref in run_refs if not any(ref in (run.info.run_id, run.info.run_name) for run in runs)]
        if missing:
            raise CompareError(f"no run with id or name {', '.join(map(repr, missing))} in {where}")
        runs = [run for run in runs if run.info.run_id in run_refs or run.info.run_name in run_refs]
    if not runs:
        raise CompareError(f"no runs to compare in {where}")
    return runs


def _labels(runs: Sequence[Run]) -> list[str]:
    """Run names, with a short id appended where two runs share a name (legends and titles must tell them apart)."""
    names = [run.info.run_name or run.info.run_id[:8] for run in runs]
    return [
        f"{name} ({run.info.run_id[:8]})" if names.count(name) > 1 else name
        for name, run in zip(names, runs, strict=True)
    ]


def load_summaries(client: MlflowClient, runs: Sequence[Run]) -> list[RunSummary]:
    """Params and the histories of every training and evaluation metric of every run."""
    summaries = []
    for run, label in zip(runs, _labels(runs), strict=True):
        summary = RunSummary(run.info.run_id, label, dict(run.data.params))
        for key in run.data.metrics:
            if key.startswith(TABLE_PREFIXES):
                points = client.get_metric_history(run.info.run_id, key)
                ordered = sorted(points, key=lambda metric: (metric.step, metric.timestamp))
                summary.histories[key] = [(metric.step, metric.value) for metric in ordered]
        summaries.append(summary)
    return summaries


def seed_variants(summaries: Sequence[RunSummary]) -> dict[str, list[RunSummary]]:
    """Runs grouped into variants: runs whose params agree but for seeds (`SEED_PARAM`) and run identity are one
    variant. Named by the runs' common name without its seed suffix, else by the params that tell variants apart."""
    groups: dict[tuple[tuple[str, str], ...], list[RunSummary]] = {}
    for summary in summaries:
        settings = tuple(
            sorted(
                (key, value)
                for key, value in summary.params.items()
                if key not in RUN_IDENTITY_PARAMS and not SEED_PARAM.search(key)
            )
        )
        groups.setdefault(settings, []).append(summary)
    stripped = [{SEED_SUFFIX.sub("", member.label) for member in members} for members in groups.values()]
    if all(len(names) == 1 for names in stripped) and len({min(names) for names in stripped}) == len(groups):
        return {min(names): members for names, members in zip(stripped, groups.values(), strict=True)}
    settings_of = [dict(settings) for settings in groups]
    keys = sorted({key for settings in settings_of for key in settings})
    telling = [key for key in keys if len({settings.get(key) for settings in settings_of}) > 1]
    return {
        ", ".join(f"{key}={settings.get(key, MISSING)}" for key in telling) or "all runs": members
        for settings, members in zip(settings_of, groups.values(), strict=True)
    }
