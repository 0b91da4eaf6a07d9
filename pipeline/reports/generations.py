"""Generation files of chat runs: their names and tables (written by `pipeline.training.generations`), and the
side-by-side page `distill compare` makes of them — for the first few prompts, the reference, the teacher's reply
and each compared run's student reply, from each run's latest validation generations in MLflow.

A file `generations/step-<step>.json` (training) or `generations/<split>-step-<step>.json` (`distill eval`) holds
`step`, `split`, `max_new_tokens`, `metrics` and `rows`, one per prompt with the fields of `ROW_FIELDS`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.reports.runs import MISSING, RunSummary

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

GENERATIONS_DIR = "generations"
"""Where a run keeps its generation files (beside `metrics.jsonl`), and their MLflow artifact directory."""
ROW_FIELDS = ("sample_id", "prompt", "reference", "teacher", "student", "rougeL", "rougeL_teacher")
"""The fields of each row of a generation file."""
VALIDATION_FILE = re.compile(r"^(?:validation-)?step-(\d+)\.json$")
"""A file of generations on the validation split: training's (`step-…`) or `distill eval`'s (`validation-step-…`)."""
SHOWN_PROMPTS = 3
"""Prompts a comparison shows side by side."""
SHOWN_CHARACTERS = 300
"""A reply longer than this is cut (with `…`) in the comparison; a prompt keeps its last characters."""
logger = logging.getLogger(__name__)


def generations_file(step: int, split: str | None = None) -> str:
    """The name of a generation file: training's at `step`, or `distill eval`'s on `split`."""
    return f"{split}-step-{step:08d}.json" if split is not None else f"step-{step:08d}.json"


def _cell(value: Any) -> str:
    """One line of a markdown table cell: pipes escaped, line breaks shown as ⏎."""
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def rows_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A generation file's rows as a markdown table (for reading in MLflow): prompt, reference, teacher, student,
    ROUGE-L of the student's reply."""
    columns = ("sample_id", "prompt", "reference", "teacher", "student", "rougeL")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[column]) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def latest_validation_file(paths: Sequence[str]) -> str | None:
    """Of a run's artifact paths, the validation generations of the highest step (`distill eval`'s over training's
    at the same step: it evaluated the exported student of that step); None when there are none."""
    found = [
        (int(match[1]), Path(path).name.startswith("validation-"), path)
        for path in paths
        if (match := VALIDATION_FILE.match(Path(path).name))
    ]
    return max(found)[2] if found else None


def load_run_generations(client: MlflowClient, summaries: Sequence[RunSummary]) -> dict[str, dict[str, Any]]:
    """Run label → its latest validation generation file, for the runs that logged one."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    found = {}
    with tempfile.TemporaryDirectory() as downloads:
        for summary in summaries:
            paths = [entry.path for entry in client.list_artifacts(summary.run_id, GENERATIONS_DIR)]
            chosen = latest_validation_file(paths)
            if chosen is not None:
                local = client.download_artifacts(summary.run_id, chosen, str(Path(downloads) / summary.run_id))
                found[summary.label] = json.loads(Path(local).read_text())
    return found


def _clip(text: str, limit: int = SHOWN_CHARACTERS, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    return "…" + text[-limit:] if keep_end else text[:limit] + "…"


def side_by_side_markdown(runs: dict[str, dict[str, Any]], prompts: int = SHOWN_PROMPTS) -> str:
    """For the first `prompts` prompts of the first run's file: the prompt's end, then a table of the reference,
    the teacher's reply and each run's student reply with its ROUGE-L (a dash for a run without that prompt).
    Prompts are matched by sample id; the teacher is the first run's (runs of one teacher share it)."""
    first = next(iter(runs.values()))
    lines = []
    for row in first["rows"][:prompts]:
        sample_id = row["sample_id"]
        lines += [f"### Sample {sample_id}", "", f"Prompt: `{_cell(_clip(row['prompt'], keep_end=True))}`", ""]
        lines += ["| who | reply | ROUGE-L |", "|---|---|---|"]
        lines += [f"| reference | {_cell(_clip(row['reference']))} | |"]
        lines += [f"| teacher | {_cell(_clip(row['teacher']))} | {row['rougeL_teacher']:.4f} |"]
        for label, record in runs.items():
            match = next((other for other in record["rows"] if other["sample_id"] == sample_id), None)
            reply, score = (MISSING, MISSING) if match is None else (_clip(match["student"]), f"{match['rougeL']:.4f}")
            lines.append(f"| {_cell(label)} | {_cell(reply)} | {score} |")
        lines.append("")
    return "\n".join(lines)


def write_generations_page(client: MlflowClient, summaries: Sequence[RunSummary], directory: Path) -> str | None:
    """`generations.md`: the runs' replies side by side (`side_by_side_markdown`); returns its text, or None (and
    writes nothing) when no run logged generations."""
    runs = load_run_generations(client, summaries)
    if not runs:
        logger.info("no run logged generations (train.generations)")
        return None
    markdown = side_by_side_markdown(runs)
    (directory / "generations.md").write_text(markdown)
    logger.info("generations of %d runs side by side → generations.md", len(runs))
    return markdown
