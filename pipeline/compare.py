"""`distill compare`: the runs of one MLflow experiment side by side — a table, curves and the runs' figures.

Reads runs with an `MlflowClient`, writes `OUTPUT/<experiment>/` (published atomically, so a re-run replaces the
whole report and no stale plot survives) and logs that directory as the artifacts of a *summary run* in the same
experiment. Summary runs carry the tag `distill.summary=true` and are never compared themselves.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files

from matplotlib import image as mpimg
from matplotlib import pyplot as plt

from pipeline.atomic import staged_directory
from pipeline.config import Config, MLflowConfig
from pipeline.errors import PipelineError
from pipeline.tracking import resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow.entities import Experiment, Run
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

SUMMARY_TAG = "distill.summary"
"""Tag of the runs `distill compare` creates; runs carrying it with value `true` are left out of comparisons."""
TABLE_METRICS = (
    "train/loss",
    "train/loss_ce",
    "train/loss_kd",
    "train/loss_attn",
    "train/lr",
    "train/tokens_per_s",
    "train/loader_wait_frac",
    "eval/ppl",
    "eval/top1_agreement",
    "eval/attn_kl",
)
"""Metrics whose last value (at the highest step) goes into the table, in this column order."""
BEST_PPL_COLUMN = "best eval/ppl"
PLOTTED_PREFIXES = ("train/loss", "eval/")
"""Every loss term and every eval metric gets a curve, including ones added to training later."""
TOKENS_METRIC = "train/tokens"
"""When a run logs its cumulative token count, curves are also drawn against tokens."""
IMAGE_KINDS = {"alpha_histograms": ("alpha",), "attention_heatmaps": ("heat", "attention")}
"""Side-by-side figure name → words that mark a run's PNG artifact as that kind (matched in the lower-cased name)."""
IMAGES_PER_ROW = 4
MISSING = "—"
Cell = str | float | None
"""A table cell: a param as logged (str), a metric value (float), or None where the run lacks it."""


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


@dataclass
class CompareReport:
    """What `compare_runs` wrote: the report directory, the table and the summary run that holds a copy."""

    directory: Path
    columns: list[str]
    rows: list[list[Cell]]
    markdown: str
    summary_run_id: str


def resolve_target(config: Config | None, experiment: str | None, tracking_uri: str | None) -> tuple[str, str]:
    """(tracking URI, experiment name): the flags first, then the config's `mlflow` section, then the defaults
    (`MLFLOW_TRACKING_URI`, `sqlite:///mlflow.db`)."""
    settings = config.mlflow if config is not None else MLflowConfig()
    uri = tracking_uri or resolve_tracking_uri(settings)
    name = experiment or (config.mlflow.experiment if config is not None else None)
    if not name:
        raise CompareError("distill compare: name the experiment with --experiment NAME or give a CONFIG")
    return uri, name


def _open_client(tracking_uri: str) -> MlflowClient:
    """A client on an existing store: a sqlite URI whose file is missing would silently create an empty store."""
    from mlflow.tracking import MlflowClient

    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not Path(tracking_uri.removeprefix(prefix)).is_file():
        raise CompareError(
            f"no MLflow store at {tracking_uri} (set --tracking-uri, mlflow.tracking_uri or MLFLOW_TRACKING_URI)"
        )
    return MlflowClient(tracking_uri=tracking_uri)


def _experiment(client: MlflowClient, name: str, tracking_uri: str) -> Experiment:
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
    """Params and the histories of the tabulated and plotted metrics (plus `train/tokens`) of every run."""
    summaries = []
    for run, label in zip(runs, _labels(runs), strict=True):
        summary = RunSummary(run.info.run_id, label, dict(run.data.params))
        for key in run.data.metrics:
            if key in TABLE_METRICS or key == TOKENS_METRIC or key.startswith(PLOTTED_PREFIXES):
                points = client.get_metric_history(run.info.run_id, key)
                ordered = sorted(points, key=lambda metric: (metric.step, metric.timestamp))
                summary.histories[key] = [(metric.step, metric.value) for metric in ordered]
        summaries.append(summary)
    return summaries


def differing_params(summaries: Sequence[RunSummary]) -> list[str]:
    """Param keys whose value is not the same in every run (a key missing from some runs counts as differing),
    except those that only name a run (`RUN_IDENTITY_PARAMS`: the run label already says it)."""
    keys = sorted({key for summary in summaries for key in summary.params} - RUN_IDENTITY_PARAMS)
    return [key for key in keys if len({summary.params.get(key) for summary in summaries}) > 1]


def comparison_table(summaries: Sequence[RunSummary]) -> tuple[list[str], list[list[Cell]]]:
    """Columns and rows: run label, the differing params, the final value of each table metric any run logged,
    and the best eval/ppl."""
    params = differing_params(summaries)
    metrics = [key for key in TABLE_METRICS if any(key in summary.histories for summary in summaries)]
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


def _file_stem(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")


def plot_metrics(summaries: Sequence[RunSummary], directory: Path) -> list[Path]:
    """One PNG per loss term and eval metric: value against step, one line per run (`step/`), and against tokens
    (`tokens/`) for the runs that log `train/tokens` (eval steps placed by interpolating the token count)."""
    import numpy as np

    keys = sorted({key for summary in summaries for key in summary.histories if key.startswith(PLOTTED_PREFIXES)})
    written = []
    for axis_name in ("step", "tokens"):
        for key in keys:
            figure, axis = plt.subplots(figsize=(7, 4))
            drawn = 0
            for summary in summaries:
                history = summary.histories.get(key)
                tokens = summary.histories.get(TOKENS_METRIC)
                if not history or (axis_name == "tokens" and not tokens):
                    continue
                steps = np.array([step for step, _ in history], dtype=float)
                if axis_name == "tokens":
                    steps = np.interp(steps, [step for step, _ in tokens], [value for _, value in tokens])
                axis.plot(
                    steps,
                    [value for _, value in history],
                    marker="." if len(history) < 30 else None,
                    label=summary.label,
                )
                drawn += 1
            if drawn:
                axis.set_xlabel("optimizer step" if axis_name == "step" else "training tokens")
                axis.set_ylabel(key)
                axis.set_title(key)
                axis.grid(alpha=0.3)
                axis.legend(fontsize=8)
                figure.tight_layout()
                path = directory / axis_name / f"{_file_stem(key)}.png"
                path.parent.mkdir(exist_ok=True)
                figure.savefig(path, dpi=100)
                written.append(path)
            plt.close(figure)
    return written


def _artifact_pngs(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    """Every PNG artifact of a run, as paths relative to its artifact root, found recursively."""
    found = []
    for entry in client.list_artifacts(run_id, path):
        if entry.is_dir:
            found += _artifact_pngs(client, run_id, entry.path)
        elif entry.path.lower().endswith(".png"):
            found.append(entry.path)
    return found


def _step_in_name(path: str) -> int:
    """The step a figure's name carries: the number after `step`, else the last number in the file name, else -1."""
    after_step = re.findall(r"step\D{0,2}(\d+)", path, flags=re.IGNORECASE)
    if after_step:
        return int(after_step[-1])
    numbers = re.findall(r"\d+", Path(path).stem)
    return int(numbers[-1]) if numbers else -1


def latest_images(paths: Iterable[str]) -> dict[str, str]:
    """Figure kind → the artifact of that kind with the highest step in its name (several can exist per run)."""
    chosen: dict[str, str] = {}
    for kind, words in IMAGE_KINDS.items():
        matching = [path for path in paths if any(word in path.lower() for word in words)]
        if matching:
            chosen[kind] = max(matching, key=lambda path: (_step_in_name(path), path))
    return chosen


def side_by_side(images: Sequence[tuple[str, Path]], path: Path) -> None:
    """Compose PNGs into one figure, up to `IMAGES_PER_ROW` per row, each titled with its run's label.

    Panels are sized to the largest image's pixels (within 2–10 inches at 100 dpi), so heat-map cells are neither
    blurred by upscaling nor lost to downscaling."""
    pictures = [(label, mpimg.imread(source)) for label, source in images]
    columns = min(len(pictures), IMAGES_PER_ROW)
    rows = math.ceil(len(pictures) / columns)
    dpi = 100
    aspect = max(picture.shape[1] / picture.shape[0] for _, picture in pictures)
    panel_height = min(max(2.0, max(picture.shape[0] for _, picture in pictures) / dpi), 10.0)
    figure, axes = plt.subplots(
        rows, columns, figsize=(panel_height * aspect * columns, (panel_height + 0.4) * rows), squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    for axis, (label, picture) in zip(axes.flat, pictures, strict=False):
        axis.imshow(picture)
        axis.set_title(label, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)


def compose_run_images(client: MlflowClient, summaries: Sequence[RunSummary], directory: Path) -> None:
    """Download each run's latest α histogram and attention heat map and put the runs' images side by side."""
    # One MLflow progress bar per downloaded figure would bury the progress log; a user's explicit setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    per_kind: dict[str, list[tuple[str, Path]]] = {kind: [] for kind in IMAGE_KINDS}
    with tempfile.TemporaryDirectory() as downloads:
        for summary in summaries:
            chosen = latest_images(_artifact_pngs(client, summary.run_id))
            run_downloads = Path(downloads) / summary.run_id
            run_downloads.mkdir()
            for kind, artifact in chosen.items():
                local = client.download_artifacts(summary.run_id, artifact, str(run_downloads))
                per_kind[kind].append((summary.label, Path(local)))
        for kind, images in per_kind.items():
            if not images:
                logger.info("no %s among the runs' PNG artifacts", kind.replace("_", " "))
                continue
            path = directory / f"{kind}.png"
            side_by_side(images, path)
            logger.info("%s: %d runs side by side → %s", kind.replace("_", " "), len(images), path.name)


def _log_summary_run(
    client: MlflowClient, experiment: Experiment, report_dir: Path, markdown: str, compared: int, filter_string: str
) -> str:
    """A run in the same experiment holding the report; tagged so that later comparisons leave it out."""
    tags = {SUMMARY_TAG: "true", "distill.compared_runs": str(compared), "mlflow.note.content": markdown}
    if filter_string:
        tags["distill.filter"] = filter_string
    run = client.create_run(experiment.experiment_id, run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    try:
        client.log_artifacts(run.info.run_id, str(report_dir))
    except Exception:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def compare_runs(
    tracking_uri: str,
    experiment_name: str,
    *,
    run_refs: Sequence[str] = (),
    filter_string: str = "",
    output: Path = Path("reports"),
) -> CompareReport:
    """Compare the selected runs of one experiment: write `output/<experiment>/` and log it to a summary run."""
    client = _open_client(tracking_uri)
    experiment = _experiment(client, experiment_name, tracking_uri)
    runs = select_runs(client, experiment, run_refs, filter_string)
    logger.info("comparing %d runs of experiment %r at %s", len(runs), experiment_name, tracking_uri)
    summaries = load_summaries(client, runs)
    columns, rows = comparison_table(summaries)
    markdown = markdown_table(columns, rows)
    target = Path(output) / _file_stem(experiment_name)
    with staged_directory(target) as staging:
        (staging / "runs.md").write_text(markdown)
        write_csv(staging / "runs.csv", columns, rows, [summary.run_id for summary in summaries])
        logger.info(
            "table: %d runs × %d columns (%d differing params)",
            len(rows),
            len(columns),
            len(differing_params(summaries)),
        )
        plots = plot_metrics(summaries, staging)
        logger.info(
            "plotted %d curves (against step%s)", len(plots), " and tokens" if (staging / "tokens").is_dir() else ""
        )
        compose_run_images(client, summaries, staging)
    logger.info("report written to %s", target)
    summary_run_id = _log_summary_run(client, experiment, target, markdown, len(runs), filter_string)
    logger.info("report logged to summary run %s in experiment %r", summary_run_id, experiment_name)
    return CompareReport(target, columns, rows, markdown, summary_run_id)
