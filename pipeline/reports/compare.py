"""`distill compare`: the runs of one MLflow experiment side by side — a table, curves and the runs' figures.

Reads runs with an `MlflowClient`, writes `OUTPUT/<experiment>/` (published atomically, so a re-run replaces the
whole report and no stale plot survives; `index.md` shows the table and embeds every figure) and logs that directory
as the artifacts of a *summary run* in the same experiment. Summary runs carry the tag `distill.summary=true` and
are never compared themselves. Runs that differ only in their seeds are also grouped into variants: mean ± std over
seeds, as a table and as bands around the curves.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import Config, MLflowConfig
from pipeline.errors import PipelineError
from pipeline.infra.atomic import staged_directory
from pipeline.infra.mlflow_ui import runs_view_url, tag_experiment
from pipeline.infra.tracking import resolve_tracking_uri
from pipeline.reports.figures import Curve, curve_figure, save_figure, side_by_side

if TYPE_CHECKING:
    from mlflow.entities import Experiment, Run
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

SUMMARY_TAG = "distill.summary"
"""Tag of the runs `distill compare` creates; runs carrying it with value `true` are left out of comparisons."""
TABLE_PREFIXES = ("train/", "eval/")
"""Every training and evaluation metric a run logged gets a column (and loss terms and eval metrics a curve), so
a loss term added to the objective shows up without touching this module."""
TRAIN_FIRST = ("train/loss",)
TRAIN_AFTER_TERMS = ("train/lr", "train/tokens_per_s", "train/loader_wait_frac")
EVAL_FIRST = ("eval/ppl", "eval/top1_agreement")
BEST_PPL_COLUMN = "best eval/ppl"
PLOTTED_PREFIXES = ("train/loss", "eval/")
"""Every loss term and every eval metric gets a curve, including ones added to training later."""
TOKENS_METRIC = "train/tokens"
"""When a run logs its cumulative token count, curves are also drawn against tokens (it gets no column)."""
LOG_SCALE_WORDS = ("ppl",)
"""Metrics whose name holds one of these are drawn on a log y axis (perplexity spans orders of magnitude)."""
IMAGE_KINDS = {"alpha_histograms": ("alpha",), "attention_heatmaps": ("heat", "attention")}
"""Side-by-side figure name → words that mark a run's PNG artifact as that kind (matched in the lower-cased name)."""
SEED_PARAM = re.compile(r"(^|\.)seed$")
"""Params naming a seed (`train.seed`, `data.seed`, `seed`): runs that differ only in these are one variant."""
SEED_SUFFIX = re.compile(r"[-_. ]?seed[-_=]?\d+$", flags=re.IGNORECASE)
"""How run names say their seed (`shd_kd-seed1`); stripped to name the variant."""
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
    figures: list[Path]
    """Every PNG of the report, relative to `directory` (each one embedded in `index.md`)."""


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


def differing_params(summaries: Sequence[RunSummary]) -> list[str]:
    """Param keys whose value is not the same in every run (a key missing from some runs counts as differing),
    except those that only name a run (`RUN_IDENTITY_PARAMS`: the run label already says it)."""
    keys = sorted({key for summary in summaries for key in summary.params} - RUN_IDENTITY_PARAMS)
    return [key for key in keys if len({summary.params.get(key) for summary in summaries}) > 1]


def _metric_rank(key: str) -> tuple[int, int, int, str]:
    """Sort key of a metric column: train before eval; `train/loss`, its terms, lr and throughput, other train
    metrics; `eval/ppl`, `eval/top1_agreement`, eval loss terms, other eval metrics; alphabetical within a group."""
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


def _file_stem(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")


def _plotted_keys(summaries: Sequence[RunSummary]) -> list[str]:
    """Loss terms and eval metrics any run logged, in column order: the metrics that get curves."""
    return metric_columns(key for summary in summaries for key in summary.histories if key.startswith(PLOTTED_PREFIXES))


def plot_metrics(summaries: Sequence[RunSummary], directory: Path) -> list[Path]:
    """One PNG per loss term and eval metric: value against step, one line per run (`step/`), and against tokens
    (`tokens/`) for the runs that log `train/tokens` (eval steps placed by interpolating the token count).
    Perplexity on a log axis."""
    written = []
    for axis_name in ("step", "tokens"):
        for key in _plotted_keys(summaries):
            curves = []
            for summary in summaries:
                history = summary.histories.get(key)
                tokens = summary.histories.get(TOKENS_METRIC)
                if not history or (axis_name == "tokens" and not tokens):
                    continue
                steps = np.array([step for step, _ in history], dtype=float)
                if axis_name == "tokens":
                    steps = np.interp(steps, [step for step, _ in tokens], [value for _, value in tokens])
                curves.append(Curve(summary.label, steps, [value for _, value in history]))
            if curves:
                figure = curve_figure(
                    key,
                    curves,
                    x_label="optimizer step" if axis_name == "step" else "training tokens",
                    log_y=any(word in key for word in LOG_SCALE_WORDS),
                )
                written.append(save_figure(figure, directory / axis_name / f"{_file_stem(key)}.png"))
    return written


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


@dataclass
class Band:
    """One variant's metric over its seeds, at the steps every seed logged: [S] arrays."""

    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    """Sample standard deviation over seeds (ddof 1); zero for a single seed."""
    runs: int


def metric_bands(groups: Mapping[str, Sequence[RunSummary]], key: str) -> dict[str, Band]:
    """Mean and std over each variant's runs of `key` at the steps all its runs logged (the last value logged at
    a step); variants where no run logged `key`, or whose runs share no step, are left out."""
    bands = {}
    for name, members in groups.items():
        series = [dict(member.histories.get(key, [])) for member in members]
        steps = sorted(set.intersection(*(set(points) for points in series)))
        if not steps:
            continue
        values = np.array([[points[step] for step in steps] for points in series], dtype=float)
        std = values.std(axis=0, ddof=1) if len(members) > 1 else np.zeros(len(steps))
        bands[name] = Band(np.array(steps, dtype=float), values.mean(axis=0), std, len(members))
    return bands


def plot_metric_bands(groups: Mapping[str, Sequence[RunSummary]], key: str, path: Path) -> Path | None:
    """`key` against step, one line per variant: the mean over its seeds, shaded ± one std; None when no variant
    logged `key`."""
    bands = metric_bands(groups, key)
    if not bands:
        return None
    curves = [
        Curve(f"{name} (n={band.runs})", band.steps, band.mean, band.mean - band.std, band.mean + band.std)
        for name, band in bands.items()
    ]
    log_y = any(word in key for word in LOG_SCALE_WORDS)
    figure = curve_figure(key, curves, x_label="optimizer step", log_y=log_y, note="mean ± std over seeds")
    return save_figure(figure, path)


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


def _in_step_directory(path: str) -> bool:
    """Whether a figure sits in a directory named after a step (`heatmaps/step-00000024/layer-0.png`): one of a set
    of figures logged together, named by its file."""
    return re.search(r"step\D{0,2}\d+", Path(path).parent.name, flags=re.IGNORECASE) is not None


def latest_images(paths: Iterable[str]) -> dict[str, str]:
    """Figure name → the artifact with the highest step in its name, for each kind of `IMAGE_KINDS`.

    A single figure per step (`heatmaps/step-00000024.png`) is named after its kind; a set of figures logged into
    a step's directory (`heatmaps/step-00000024/layer-0.png`, …) gives one name per file (`attention_heatmaps_layer-0`).
    Of several sets at the latest step (training's and `distill eval`'s), the last by path is taken."""
    paths = list(paths)
    chosen: dict[str, str] = {}
    for kind, words in IMAGE_KINDS.items():
        matching = [path for path in paths if any(word in path.lower() for word in words)]
        if not matching:
            continue
        latest = max(_step_in_name(path) for path in matching)
        sets: dict[str, list[str]] = {}
        for path in sorted(path for path in matching if _step_in_name(path) == latest):
            sets.setdefault(str(Path(path).parent) if _in_step_directory(path) else path, []).append(path)
        for path in sets[max(sets)]:
            chosen[f"{kind}_{Path(path).stem}" if _in_step_directory(path) else kind] = path
    return chosen


def compose_run_images(client: MlflowClient, summaries: Sequence[RunSummary], directory: Path) -> list[Path]:
    """Download each run's latest α histogram and attention heat maps and put the runs' images side by side, one
    PNG per figure name; returns the PNGs written."""
    # One MLflow progress bar per downloaded figure would bury the progress log; a user's explicit setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    per_name: dict[str, list[tuple[str, Path]]] = {}
    written = []
    with tempfile.TemporaryDirectory() as downloads:
        for summary in summaries:
            chosen = latest_images(_artifact_pngs(client, summary.run_id))
            run_downloads = Path(downloads) / summary.run_id
            run_downloads.mkdir()
            for name, artifact in chosen.items():
                local = client.download_artifacts(summary.run_id, artifact, str(run_downloads))
                per_name.setdefault(name, []).append((summary.label, Path(local)))
        for kind in IMAGE_KINDS:
            if not any(name == kind or name.startswith(f"{kind}_") for name in per_name):
                logger.info("no %s among the runs' PNG artifacts", kind.replace("_", " "))
        for name, images in sorted(per_name.items()):
            path = directory / f"{name}.png"
            side_by_side(images, path)
            written.append(path)
            logger.info("%s: %d runs side by side → %s", name.replace("_", " "), len(images), path.name)
    return written


def write_variants(groups: Mapping[str, Sequence[RunSummary]], keys: Sequence[str], directory: Path) -> list[Path]:
    """`variants.md` (mean ± std over seeds of the final metrics) and one seed-band plot per key under `bands/`;
    returns the plots written."""
    columns, rows = variants_table(groups)
    (directory / "variants.md").write_text(markdown_table(columns, rows))
    plots = [plot_metric_bands(groups, key, directory / "bands" / f"{_file_stem(key)}.png") for key in keys]
    return [plot for plot in plots if plot is not None]


def _ui_address(tracking_uri: str, experiment_id: str) -> str:
    """How to open the experiment's key-metrics view: the server's address, or the `mlflow ui` command first."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"<{runs_view_url(tracking_uri, experiment_id)}>"
    return (
        f"run `mlflow ui --backend-store-uri {tracking_uri}`, then open "
        f"<{runs_view_url('http://127.0.0.1:5000', experiment_id)}>"
    )


def _image(path: Path, directory: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(directory).as_posix()})"


def index_markdown(
    directory: Path,
    heading: str,
    table: str,
    curves: Sequence[Path],
    run_images: Sequence[Path],
    variants: str | None,
    bands: Sequence[Path],
    ui_address: str,
) -> str:
    """The report's front page: the table, then every figure (relative links, so the directory can move)."""
    files = "[runs.md](runs.md), [runs.csv](runs.csv)" + (", [variants.md](variants.md)" if variants else "")
    lines = [f"# {heading}", "", f"Tables: {files}.", "", "## Runs", ""]
    lines += ["Last value of each metric (at the highest step), the lowest eval/ppl of any evaluation, and the params"]
    lines += ["that differ between runs.", "", table]
    if variants is not None:
        lines += ["## Variants over seeds", "", "Runs that differ only in their seeds: mean ± std (ddof 1).", ""]
        lines += [variants, *(_image(path, directory, path.stem) + "\n" for path in bands)]
    lines += ["## Curves", ""]
    for stem in dict.fromkeys(path.stem for path in curves):
        drawn = [path for path in curves if path.stem == stem]
        lines += [" ".join(_image(path, directory, f"{stem} against {path.parent.name}") for path in drawn), ""]
    if run_images:
        lines += ["## The runs' figures", "", "Each run's latest α statistics and attention heat maps.", ""]
        for path in run_images:
            lines += [f"### {path.stem.replace('_', ' ')}", "", _image(path, directory, path.stem), ""]
    lines += ["## In MLflow", "", f"The runs with the key metrics as columns: {ui_address}.", ""]
    return "\n".join(lines)


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
    group_seeds: bool = True,
) -> CompareReport:
    """Compare the selected runs of one experiment: write `output/<experiment>/` and log it to a summary run.

    With `group_seeds`, runs that differ only in their seeds also get a variants table and seed-band curves (when
    some variant has two runs or more). The experiment is tagged so that the MLflow UI shows these runs with the
    table's metrics and params as columns (`pipeline.infra.mlflow_ui`)."""
    client = _open_client(tracking_uri)
    experiment = _experiment(client, experiment_name, tracking_uri)
    runs = select_runs(client, experiment, run_refs, filter_string)
    logger.info("comparing %d runs of experiment %r at %s", len(runs), experiment_name, tracking_uri)
    summaries = load_summaries(client, runs)
    columns, rows = comparison_table(summaries)
    markdown = markdown_table(columns, rows)
    params = differing_params(summaries)
    groups = seed_variants(summaries) if group_seeds else {}
    seeded = any(len(members) > 1 for members in groups.values())
    target = Path(output) / _file_stem(experiment_name)
    with staged_directory(target) as staging:
        (staging / "runs.md").write_text(markdown)
        write_csv(staging / "runs.csv", columns, rows, [summary.run_id for summary in summaries])
        logger.info("table: %d runs × %d columns (%d differing params)", len(rows), len(columns), len(params))
        curves = plot_metrics(summaries, staging)
        logger.info(
            "plotted %d curves (against step%s)", len(curves), " and tokens" if (staging / "tokens").is_dir() else ""
        )
        bands = []
        if seeded:
            bands = write_variants(groups, _plotted_keys(summaries), staging)
            logger.info("%d variants over seeds: %d band plots", len(groups), len(bands))
        run_images = compose_run_images(client, summaries, staging)
        heading = f"distill compare: {experiment_name} ({len(runs)} runs" + (
            f", filter `{filter_string}`)" if filter_string else ")"
        )
        variants = (staging / "variants.md").read_text() if seeded else None
        address = _ui_address(tracking_uri, experiment.experiment_id)
        (staging / "index.md").write_text(
            index_markdown(staging, heading, markdown, curves, run_images, variants, bands, address)
        )
        figures = [path.relative_to(staging) for path in (*curves, *bands, *run_images)]
    logger.info("report written to %s (open %s)", target, target / "index.md")
    tag_experiment(client, experiment.experiment_id, [key for key in columns if key.startswith(TABLE_PREFIXES)], params)
    summary_run_id = _log_summary_run(client, experiment, target, markdown, len(runs), filter_string)
    logger.info("report logged to summary run %s in experiment %r", summary_run_id, experiment_name)
    return CompareReport(target, columns, rows, markdown, summary_run_id, figures)
