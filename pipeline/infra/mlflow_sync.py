"""`distill mlflow sync RUN_DIR`: copy the runs of a run directory's local fallback store (`mlflow-local.db`, where
a run goes on logging when its store fails; `infra.tracking.FallbackTracker`) to the store they were meant for —
params, tags, metric histories, artifacts, status. A starting job in the same run directory does it by itself
(`infra.tracking.create_tracker`) once the store answers again.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError
from pipeline.infra.mlflow_store import (
    LOCAL_STORE,
    TAG_REMOTE_RUN,
    TAG_SYNCED,
    TAG_SYNCED_FROM,
    TAG_TRACKING_URI,
    default_artifact_location,
    find_or_create_experiment,
    local_store_uri,
    log_new_params,
    probe_store,
    reachable_but_missing,
    short_error,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

_METRIC_BATCH = 1000


class TrackingError(PipelineError):
    """`distill mlflow sync` cannot read a local store or reach its destination; the message names which."""


def sync_local_runs(run_dir: Path, tracking_uri: str | None = None, *, only_meant_for: str | None = None) -> dict:
    """Copy every run of `run_dir`'s local store to `tracking_uri` (default: the store each run was meant for);
    returns {local run id: id of its copy}.

    Idempotent: a run copied before goes to the same copy again and only what the copy lacks is added (params,
    metric points compared by step, timestamp and value); tags and artifacts are written again. A run that fell back
    mid-run is appended to the run it continues. `only_meant_for` (the automatic sync of a starting job) skips runs
    meant for another store and, without copying them again, runs already copied there.
    """
    # here, not at the top: MLflow takes seconds to import and only these calls need it
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    store = Path(run_dir) / LOCAL_STORE
    if not store.is_file():
        raise TrackingError(f"{store}: no local MLflow store here; expected the run directory (train.output_dir)")
    local = MlflowClient(tracking_uri=local_store_uri(run_dir))
    experiments = local.search_experiments(view_type=ViewType.ALL)
    runs = local.search_runs([experiment.experiment_id for experiment in experiments], run_view_type=ViewType.ALL)
    names = {experiment.experiment_id: experiment.name for experiment in experiments}
    copies: dict[str, str] = {}
    for run in runs:
        meant_for = run.data.tags.get(TAG_TRACKING_URI)
        if only_meant_for is not None and meant_for != only_meant_for:
            continue
        synced_uri, _, synced_id = run.data.tags.get(TAG_SYNCED, "").partition(" ")
        if only_meant_for is not None and synced_uri == only_meant_for and synced_id:
            copies[run.info.run_id] = synced_id
            continue
        target = tracking_uri or meant_for or os.environ.get("MLFLOW_TRACKING_URI")
        if not target:
            raise TrackingError(
                f"{store}: run {run.info.run_id} records no store it was meant for; pass --tracking-uri URI"
            )
        try:
            copies[run.info.run_id] = _sync_run(local, run, names[run.info.experiment_id], target)
        except Exception as error:
            raise TrackingError(
                f"{target}: cannot copy local run {run.info.run_id} of {store} there ({short_error(error)}); check "
                "that the tracking store is reachable (or pass another --tracking-uri) and run `distill mlflow sync` "
                "again"
            ) from error
    return copies


def _sync_run(local: MlflowClient, run: Any, experiment: str, target_uri: str) -> str:
    """Copy one local run to `target_uri` (see `sync_local_runs`); returns the id of the copy."""
    # here, not at the top: MLflow takes seconds to import and only these calls need it
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    probe_store(target_uri)
    remote = MlflowClient(tracking_uri=target_uri)
    copy_id = _copy_target(remote, run, target_uri)
    if copy_id is None:
        experiment_id = find_or_create_experiment(remote, experiment, default_artifact_location(target_uri, None))
        created = remote.create_run(experiment_id, start_time=run.info.start_time, run_name=run.info.run_name)
        copy_id = created.info.run_id
    params = log_new_params(remote, copy_id, run.data.params)
    own = {TAG_TRACKING_URI, TAG_REMOTE_RUN, TAG_SYNCED}
    for key, value in run.data.tags.items():
        if key not in own and not key.startswith("mlflow."):
            remote.set_tag(copy_id, key, value)
    remote.set_tag(copy_id, TAG_SYNCED_FROM, f"{local.tracking_uri} {run.info.run_id}")
    points = 0
    for key in run.data.metrics:
        present = {(point.step, point.timestamp, point.value) for point in remote.get_metric_history(copy_id, key)}
        missing = [
            Metric(key, point.value, point.timestamp, point.step)
            for point in local.get_metric_history(run.info.run_id, key)
            if (point.step, point.timestamp, point.value) not in present
        ]
        for start in range(0, len(missing), _METRIC_BATCH):
            remote.log_batch(copy_id, metrics=missing[start : start + _METRIC_BATCH])
        points += len(missing)
    with tempfile.TemporaryDirectory() as staging:
        if local.list_artifacts(run.info.run_id):
            remote.log_artifacts(copy_id, local.download_artifacts(run.info.run_id, "", staging))
    if run.info.status != "RUNNING":
        remote.set_terminated(copy_id, status=run.info.status, end_time=run.info.end_time)
    local.set_tag(run.info.run_id, TAG_SYNCED, f"{target_uri} {copy_id}")
    logger.info(
        "MLflow: local run %s (%s) → %s run %s: %d new params, %d new metric points, artifacts copied",
        run.info.run_id,
        run.info.run_name,
        target_uri,
        copy_id,
        params,
        points,
    )
    return copy_id


def _copy_target(remote: MlflowClient, run: Any, target_uri: str) -> str | None:
    """The run in `remote` that `run` is copied into: the copy of an earlier sync to this store, or the run it
    continues (fell back mid-run); None for a new copy."""
    synced_uri, _, synced_id = run.data.tags.get(TAG_SYNCED, "").partition(" ")
    candidates = [synced_id] if synced_uri == target_uri and synced_id else []
    if run.data.tags.get(TAG_TRACKING_URI) == target_uri and run.data.tags.get(TAG_REMOTE_RUN):
        candidates.append(run.data.tags[TAG_REMOTE_RUN])
    for candidate in candidates:
        try:
            return remote.get_run(candidate).info.run_id
        except Exception as error:
            if not reachable_but_missing(error):
                raise
    return None
