"""The greedy search: one factor at a time, on the validation split, before the grid; its choice is frozen in
`<work>/frozen.json` and never revisited (delete the file to search again)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.infra.atomic import atomic_write_text
from pipeline.infra.mlflow_ui import tag_experiment
from pipeline.study.grid import start_assignment, tuning_spec
from pipeline.study.layout import Stage, Study, format_override
from pipeline.study.runner import Runner
from pipeline.study.workspace import Context, git_commit

logger = logging.getLogger(__name__)

SCORE = "tune/val_ppl"
"""A tuning run's score: perplexity of its exported student on the whole cached validation split."""


@dataclass
class TuningRow:
    """One tried value of a stage: its score and whether the stage kept it."""

    stage: str
    key: str
    value: Any
    run: str
    score: float
    chosen: bool = False


def greedy_search(
    stages: Sequence[Stage], start: Mapping[str, Any], score: Callable[[dict[str, Any]], float]
) -> tuple[dict[str, Any], list[TuningRow]]:
    """One factor at a time: each stage tries its values with the others at their current choice and keeps the
    lowest score (ties keep the current value, else the first listed). `score` gets the whole assignment; an
    assignment tried in an earlier stage is asked again (memoise it)."""
    current = dict(start)
    rows: list[TuningRow] = []
    for stage in stages:
        tried = []
        for value in stage.values:
            assignment = {**current, stage.key: value}
            tried.append(TuningRow(stage.name, stage.key, value, "", score(assignment)))
        kept = next((row for row in tried if row.value == current[stage.key]), tried[0])
        for row in tried:
            if row.score < kept.score:
                kept = row
        kept.chosen = True
        current[stage.key] = kept.value
        rows += tried
    return current, rows


def tuning_run_count(study: Study, start: Mapping[str, Any]) -> int:
    """Distinct runs the search trains: every value of the first stage; in a later stage, every value but the
    current one (already scored as the previous stage's choice)."""
    return sum(
        len(stage.values) - (index > 0 and start[stage.key] in stage.values) for index, stage in enumerate(study.stages)
    )


def frozen_values(ctx: Context) -> dict[str, Any] | None:
    """The frozen choice's values, None before the search ran."""
    return json.loads(ctx.frozen_path.read_text())["values"] if ctx.frozen_path.is_file() else None


def frozen_choice(ctx: Context, runner: Runner | None) -> tuple[dict[str, Any], list[TuningRow]]:
    """The tuned values: `frozen.json` if the search already ran (never revisited), else the search now (then frozen),
    or for `--quick` (or a study without stages) the config's own values (no search). Without a runner (a report
    rebuilt from finished runs) nothing is searched."""
    start = start_assignment(ctx.study, ctx.base)
    if ctx.quick or not ctx.study.stages:
        return start, []
    if ctx.frozen_path.is_file():
        frozen = json.loads(ctx.frozen_path.read_text())
        stages = [[stage.key, list(stage.values)] for stage in ctx.study.stages]
        if frozen["stages"] != stages:
            logger.warning(
                "%s was searched over %s; the config now lists %s. Kept: a frozen choice is never revisited (delete "
                "the file to search again)",
                ctx.frozen_path,
                frozen["stages"],
                stages,
            )
        rows = [TuningRow(**row) for row in frozen["rows"]]
        logger.info("frozen tuning %s (from %s)", frozen["values"], ctx.frozen_path)
        return frozen["values"], rows
    if runner is None:
        return start, []

    def score(assignment: dict[str, Any]) -> float:
        return runner.run(tuning_spec(ctx.study, assignment, ctx.students_dir))["metrics"][SCORE]

    study = ctx.study
    logger.info(
        "tuning on %s / %s / seed %d (validation split): %s",
        study.tune_setting,
        study.tune_variant,
        study.seeds[0],
        "; ".join(f"{stage.key} ∈ {list(stage.values)}" for stage in study.stages),
    )
    chosen, rows = greedy_search(study.stages, start, score)
    current = dict(start)
    for row in rows:  # the run each row's score came from: the stage's value with the choices made before it
        row.run = tuning_spec(study, {**current, row.key: row.value}, ctx.students_dir).name
        if row.chosen:
            current[row.key] = row.value
    frozen = {
        "values": chosen,
        "overrides": [format_override(key, value) for key, value in chosen.items()],
        "score": min(row.score for row in rows),
        "stages": [[stage.key, list(stage.values)] for stage in study.stages],
        "rows": [row.__dict__ for row in rows],
        "on": {
            "setting": study.tune_setting,
            "variant": study.tune_variant,
            "seed": study.seeds[0],
            "split": "validation",
        },
        "commit": git_commit(),
        "frozen": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_text(ctx.frozen_path, json.dumps(frozen, indent=1) + "\n")
    logger.info("frozen: %s → %s", chosen, ctx.frozen_path)
    tag_tuning_experiment(ctx)
    return chosen, rows


def tag_tuning_experiment(ctx: Context) -> None:
    """Open the tuning experiment in the MLflow UI on its training runs with the search's score and keys as columns
    (the grid's experiment is tagged by `distill compare`)."""
    from mlflow.tracking import MlflowClient  # MLflow takes seconds to import

    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    experiment = client.get_experiment_by_name(ctx.tuning_experiment)
    if experiment is not None:
        metrics = [SCORE, "tune/val_top1_agreement", "eval/ppl", "train/loss"]
        tag_experiment(client, experiment.experiment_id, metrics, [stage.key for stage in ctx.study.stages])
