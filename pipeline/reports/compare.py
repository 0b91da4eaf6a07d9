"""`distill compare`: the runs of one MLflow experiment side by side — a table, curves, the runs' figures and, for
chat runs, their replies to the same prompts.

Reads runs with an `MlflowClient`, writes `OUTPUT/<experiment>/` (published atomically, so a re-run replaces the
whole report and no stale plot survives; `index.md` shows the table and embeds every figure) and logs that directory
as the artifacts of a *summary run* in the same experiment. Summary runs carry the tag `distill.summary=true` and
are never compared themselves. Runs that differ only in their seeds are also grouped into variants: mean ± std over
seeds, as a table and as bands around the curves.

The report's parts live beside this module: `reports.runs` reads the runs, `reports.tables` and `reports.plots` make
the tables and figures, `reports.generations` the replies; this module lays them out in `index.md`, publishes the
directory and logs the summary run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.infra.atomic import staged_directory
from pipeline.infra.mlflow_ui import runs_view_url, tag_experiment
from pipeline.reports.generations import write_generations_page
from pipeline.reports.plots import compose_run_images, file_stem, plot_metrics, plotted_keys, write_variants
from pipeline.reports.runs import (
    SUMMARY_TAG,
    TABLE_PREFIXES,
    find_experiment,
    load_summaries,
    open_client,
    seed_variants,
    select_runs,
)
from pipeline.reports.tables import Cell, comparison_table, differing_params, markdown_table, write_csv

if TYPE_CHECKING:
    from mlflow.entities import Experiment
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)


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
    generations: str | None = None,
) -> str:
    """The report's front page: the table, then every figure (relative links, so the directory can move), then the
    runs' replies side by side (`generations`, when runs logged any)."""
    files = "[runs.md](runs.md), [runs.csv](runs.csv)" + (", [variants.md](variants.md)" if variants else "")
    files += ", [generations.md](generations.md)" if generations else ""
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
    if generations is not None:
        lines += ["## Generations", "", "The first held-out prompts of the validation split: the reference reply, the"]
        lines += [
            "teacher's and each run's greedy reply (its latest evaluation), with ROUGE-L F1 against the reference."
        ]
        lines += ["", generations]
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
    client = open_client(tracking_uri)
    experiment = find_experiment(client, experiment_name, tracking_uri)
    runs = select_runs(client, experiment, run_refs, filter_string)
    logger.info("comparing %d runs of experiment %r at %s", len(runs), experiment_name, tracking_uri)
    summaries = load_summaries(client, runs)
    columns, rows = comparison_table(summaries)
    markdown = markdown_table(columns, rows)
    params = differing_params(summaries)
    groups = seed_variants(summaries) if group_seeds else {}
    seeded = any(len(members) > 1 for members in groups.values())
    target = Path(output) / file_stem(experiment_name)
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
            bands = write_variants(groups, plotted_keys(summaries), staging)
            logger.info("%d variants over seeds: %d band plots", len(groups), len(bands))
        run_images = compose_run_images(client, summaries, staging)
        generations = write_generations_page(client, summaries, staging)
        heading = f"distill compare: {experiment_name} ({len(runs)} runs" + (
            f", filter `{filter_string}`)" if filter_string else ")"
        )
        variants = (staging / "variants.md").read_text() if seeded else None
        address = _ui_address(tracking_uri, experiment.experiment_id)
        (staging / "index.md").write_text(
            index_markdown(staging, heading, markdown, curves, run_images, variants, bands, address, generations)
        )
        figures = [path.relative_to(staging) for path in (*curves, *bands, *run_images)]
    logger.info("report written to %s (open %s)", target, target / "index.md")
    tag_experiment(client, experiment.experiment_id, [key for key in columns if key.startswith(TABLE_PREFIXES)], params)
    summary_run_id = _log_summary_run(client, experiment, target, markdown, len(runs), filter_string)
    logger.info("report logged to summary run %s in experiment %r", summary_run_id, experiment_name)
    return CompareReport(target, columns, rows, markdown, summary_run_id, figures)
