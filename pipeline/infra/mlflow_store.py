"""Where the MLflow store is and the few calls on it that the trackers (`infra.tracking`) and the sync of the local
fallback store (`infra.mlflow_sync`) share.

Store: `mlflow.tracking_uri`, else the environment's `MLFLOW_TRACKING_URI`, else the embedded `sqlite:///mlflow.db`.
With a sqlite store, a new experiment keeps its artifacts in `mlartifacts/` beside the database file (MLflow's own
default would be the current directory). A server is probed with a short TCP connect (`CONNECT_TIMEOUT_S`) before
use, and MLflow's own HTTP requests get a bounded timeout and retries (`HTTP_LIMITS`). The fallback store of a run is
`mlflow-local.db` in its run directory, its runs tagged with the store they were meant for (`TAG_*`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from pipeline.config import MLflowConfig

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
LOCAL_STORE = "mlflow-local.db"
"""The fallback store, in the run directory."""
LOCAL_ARTIFACTS = "mlflow-local-artifacts"
CONNECT_TIMEOUT_S = 5.0
"""How long the probe waits for a tracking server's TCP handshake."""
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
"""MLflow's defaults (120 s per request, 7 retries with backoff factor 2) add up to minutes per failing call; these
bound one call to about 90 s at worst (a server that accepts connections and never answers), 6 s when it refuses."""
TAG_TRACKING_URI = "shd.tracking_uri"
"""On a local fallback run: the store it was meant for."""
TAG_REMOTE_RUN = "shd.remote_run_id"
"""On a local fallback run started mid-run: the run in that store it continues."""
TAG_SYNCED = "shd.synced_to"
"""On a local run after a sync: `<store URI> <run id>` of its copy."""
TAG_SYNCED_FROM = "shd.synced_from"
"""On a synced copy: `<local store URI> <run id>` it came from."""
_PARAM_BATCH = 100


def resolve_tracking_uri(settings: MLflowConfig) -> str:
    """`mlflow.tracking_uri`, else `MLFLOW_TRACKING_URI`, else the embedded sqlite store in the working directory."""
    return settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def default_artifact_location(tracking_uri: str, configured: str | None) -> str | None:
    """Where a new experiment stores artifacts: the configured place, `mlartifacts/` beside a sqlite file, or None
    (the server's default)."""
    if configured:
        return configured
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        database = Path(tracking_uri.removeprefix(prefix)).resolve()
        return (database.parent / "mlartifacts").as_uri()
    return None


def local_store_uri(run_dir: Path) -> str:
    """The sqlite URI of the fallback store in `run_dir`."""
    return f"sqlite:///{(Path(run_dir) / LOCAL_STORE).resolve()}"


def bound_http_requests() -> None:
    """Set `HTTP_LIMITS` in the environment, each only where the user has not set it."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


def probe_store(tracking_uri: str) -> None:
    """Raise OSError unless an http(s) tracking server accepts a TCP connection within `CONNECT_TIMEOUT_S`
    (other stores are opened directly)."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()


def reachable_but_missing(error: BaseException) -> bool:
    """Whether the store answered that a run does not exist (as opposed to not answering)."""
    return getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def short_error(error: BaseException | None) -> str:
    """The first line of an error, at most 300 characters (MLflow's messages carry whole retry histories)."""
    text = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else repr(error)
    return text[:300]


def find_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created when missing."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another job created it between the lookup and the create
        return client.get_experiment_by_name(name).experiment_id


def log_new_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> int:
    """Log the params the run lacks; a changed value becomes the tag `param_changed.KEY`. Returns how many were
    logged."""
    # here, not at the top: MLflow takes seconds to import and only these calls need it
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    fresh = [Param(key, value) for key, value in params.items() if key not in existing]
    for start in range(0, len(fresh), _PARAM_BATCH):
        client.log_batch(run_id, params=fresh[start : start + _PARAM_BATCH])
    for key, value in params.items():
        if key in existing and existing[key] != value:
            client.set_tag(run_id, f"param_changed.{key}", f"{existing[key]} -> {value}")
    return len(fresh)
