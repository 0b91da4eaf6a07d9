"""What the MLflow UI shows for an experiment of this pipeline: its training runs, the key metrics as columns.

MLflow 3 opens experiments in its GenAI view (traces, evaluations). What its UI bundle (3.17,
`mlflow/server/js/build`) reads, and what we set:

- experiment tag `mlflow.experimentKind` = `custom_model_development` ("Machine learning"): the experiment's type.
  In 3.17 the page follows the global workflow switch instead (browser storage `mlflow.workflowType`, default
  `genai`, or the URL parameter `workflowType=machine_learning`); the tag still types the experiment for versions
  that read it.
- experiment tag `mlflow.sharedViewState.<id>`: a *saved view* (name, timestamps, and the runs table's state as a
  JSON string: selected columns, sort). It appears under the Runs tab's saved views, and the URL parameter
  `viewStateShareKey=<id>` opens it. There is no tag for the columns of the default view.
- experiment tag `mlflow.experiment.primaryMetric.name`: the metric the runs' chart view is built around.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MACHINE_LEARNING_KIND = "custom_model_development"
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"
PRIMARY_METRIC = "eval/ppl"
SAVED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_ID = "distill-key-metrics"
"""One fixed view id: every tagging rewrites the same saved view instead of adding one (the UI keeps at most 40)."""
VIEW_NAME = "distill: key metrics"
KEY_METRICS = ("eval/ppl", "eval/top1_agreement", "train/loss")
"""Columns of the saved view when the experiment's metrics are not known yet (at its creation)."""
MAX_TAG_VALUE = 20_000
"""MLflow's limit on an experiment tag's value, and the UI's on a saved view."""


def column_key(kind: str, name: str) -> str:
    """A runs-table column as the UI names it: `metrics.`eval/ppl``, `params.`distill.squeeze``."""
    return f"{kind}.`{name}`"


def saved_view(metrics: Sequence[str], params: Sequence[str], created_ms: int, updated_ms: int) -> str:
    """The saved-view tag value: the metrics then the params as columns, sorted by `PRIMARY_METRIC` ascending when
    it is among the metrics. Params are dropped from the end until the value fits `MAX_TAG_VALUE`."""
    for kept in range(len(params), -1, -1):
        state = {
            "selectedColumns": [column_key("metrics", key) for key in metrics]
            + [column_key("params", key) for key in params[:kept]],
            **(
                {"orderByKey": column_key("metrics", PRIMARY_METRIC), "orderByAsc": True}
                if PRIMARY_METRIC in metrics
                else {}
            ),
        }
        value = json.dumps(
            {"name": VIEW_NAME, "createdAt": created_ms, "updatedAt": updated_ms, "state": json.dumps(state)}
        )
        if len(value) <= MAX_TAG_VALUE:
            return value
    raise ValueError(f"{len(metrics)} metric columns do not fit an MLflow tag of {MAX_TAG_VALUE} characters")


def tag_experiment(
    client: MlflowClient, experiment_id: str, metrics: Sequence[str] = KEY_METRICS, params: Sequence[str] = ()
) -> None:
    """Type the experiment as machine learning, name its primary metric and (re)write its key-metrics view."""
    key = SAVED_VIEW_TAG_PREFIX + VIEW_ID
    now = int(time.time() * 1000)
    previous = client.get_experiment(experiment_id).tags.get(key)
    created = json.loads(previous).get("createdAt", now) if previous else now
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MACHINE_LEARNING_KIND)
    client.set_experiment_tag(experiment_id, PRIMARY_METRIC_TAG, PRIMARY_METRIC)
    client.set_experiment_tag(experiment_id, key, saved_view(metrics, params, created, now))


def runs_view_url(server: str, experiment_id: str) -> str:
    """The address that opens the experiment's runs on the key-metrics view, on an MLflow UI at `server`."""
    return (
        f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs"
        f"?workflowType=machine_learning&viewStateShareKey={VIEW_ID}"
    )
