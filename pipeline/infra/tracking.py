"""Experiment tracking: one `Tracker` with the same methods on every rank (figures: `pipeline.reports.figures`).

Rank 0 (with `mlflow.enabled`) gets a `FallbackTracker`; every other rank, or a run with tracking off, gets the base
`Tracker`, whose methods do nothing and which never imports mlflow or touches the store. Stage drivers therefore call
`tracker.log_metrics(...)` unconditionally, never `if rank == 0`.

Store: `mlflow.tracking_uri`, else the environment's `MLFLOW_TRACKING_URI`, else the embedded `sqlite:///mlflow.db`.
With a sqlite store, a new experiment keeps its artifacts in `mlartifacts/` beside the database file (MLflow's own
default would be the current directory).

Tracking never stops a run. A server is first probed with a short TCP connect (`CONNECT_TIMEOUT_S`), and MLflow's
own HTTP requests get a bounded timeout and retries (`HTTP_LIMITS`, unless the user set those variables). A store that
cannot be reached at start, or fails mid-run, is a warning: the run goes on in a local sqlite store in the run
directory (`mlflow-local.db`, artifacts in `mlflow-local-artifacts/`), tagged with the store it was meant for.
`sync_local_runs` (`distill mlflow sync RUN_DIR`) copies those runs there later — params, tags, metric histories,
artifacts, status — and a later job in the same run directory does it by itself once the store answers again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from matplotlib import pyplot as plt

from pipeline.config import Config, MLflowConfig
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

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
_METRIC_BATCH = 1000
_PARAM_BATCH = 100


class TrackingError(PipelineError):
    """`distill mlflow sync` cannot read a local store or reach its destination; the message names which."""


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


def default_run_name(config: Config) -> str:
    """A run name that says what differs between students: shape, squeeze, encoding and the weighted loss terms
    (every `distill.<term>` section with a weight > 0)."""
    student, distill = config.student, config.distill
    sections = [(item.name, getattr(distill, item.name)) for item in dataclasses.fields(distill)]
    weights = "".join(f"-{name}{section.weight:g}" for name, section in sections if getattr(section, "weight", 0) > 0)
    return f"L{student.num_layers}H{student.num_heads}-{distill.attn.squeeze}-{config.cache.encoding}{weights}"


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


@contextmanager
def sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (what schedulers and the DeepSpeed launcher send to stop a job) raises
    KeyboardInterrupt in the main thread, so `Tracker.running` ends the run KILLED; the old handler comes back
    after. Outside the main thread (where Python cannot install handlers) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Tracker:
    """The do-nothing tracker (non-zero ranks, tracking off); `MLflowTracker` implements the same methods."""

    run_id: str | None = None

    @property
    def active(self) -> bool:
        """Whether calls reach a store."""
        return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record run parameters (e.g. `config.flat()`)."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Record tags (provenance: cache fingerprint, world size, precision)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record metric values at optimizer step `step`."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file into the run's artifacts (under `artifact_path`)."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store `text` as the artifact `artifact_file`."""

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        """Store a matplotlib figure as a PNG artifact; the figure is closed either way."""
        plt.close(figure)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (`FINISHED`, `FAILED` or `KILLED`)."""

    @contextmanager
    def running(self) -> Iterator[Tracker]:
        """End the run with the status of how the block exits: FINISHED, KILLED (KeyboardInterrupt, or SIGTERM
        inside `sigterm_as_keyboard_interrupt`) or FAILED (any other exception, which propagates)."""
        try:
            yield self
        except KeyboardInterrupt:
            self.finish("KILLED")
            raise
        except BaseException:
            self.finish("FAILED")
            raise
        self.finish("FINISHED")


class MLflowTracker(Tracker):
    """One MLflow run, created or continued (`run_id`), written through an `MlflowClient` (no global state).

    Errors of the store propagate; `FallbackTracker` decides what to do with them.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None = None,
        artifact_location: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow.entities import RunStatus
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is not None:
            self._client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self.run_id = run_id
            logger.info("MLflow: continuing run %s in %s", run_id, tracking_uri)
            return
        experiment_id = _experiment_id(self._client, experiment, artifact_location)
        self.run_id = self._client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {})).info.run_id
        logger.info("MLflow: run %s (%s) in experiment %r at %s", self.run_id, run_name, experiment, tracking_uri)

    @property
    def active(self) -> bool:
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log new parameters; on a continued run, a changed value is kept as a tag `param_changed.KEY` (MLflow
        refuses to overwrite a parameter)."""
        _log_params(self._client, self.run_id, {key: str(value) for key, value in params.items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def delete_tag(self, key: str) -> None:
        """Remove tag `key` where the run has it."""
        if key in self._client.get_run(self.run_id).data.tags:
            self._client.delete_tag(self.run_id, key)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        try:
            with tempfile.TemporaryDirectory() as staging:
                path = Path(staging) / Path(artifact_file).name
                figure.savefig(path, dpi=100)
                self._client.log_artifact(self.run_id, str(path), str(Path(artifact_file).parent).strip(".") or None)
        finally:
            plt.close(figure)

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


class FallbackTracker(Tracker):
    """Rank 0's tracker: an `MLflowTracker` on the configured store that, when the store fails, warns once and goes
    on in a local sqlite store in `run_dir` (a new run there, with the params and tags logged so far). Never raises:
    if the local store fails too, tracking stops with a warning and the run goes on untracked."""

    def __init__(
        self,
        current: MLflowTracker | None,
        *,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_dir: Path,
        failure: BaseException | None = None,
        run_id: str | None = None,
    ) -> None:
        self._current = current
        self._tracking_uri = tracking_uri
        self._experiment = experiment
        self._run_name = run_name
        self._run_dir = Path(run_dir)
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        if current is None:
            self._fall_back(failure, run_id)

    @property
    def active(self) -> bool:
        return self._current is not None

    @property
    def run_id(self) -> str | None:
        return self._current.run_id if self._current is not None else None

    @property
    def local(self) -> bool:
        """Whether the run is logging to the local fallback store."""
        return self._current is not None and self._current.tracking_uri == local_store_uri(self._run_dir)

    def _fall_back(self, failure: BaseException | None, run_id: str | None) -> None:
        """Go on in the local store: continue `run_id` where it is a local run (an earlier fallback of this run),
        else a new local run that records the store it was meant for and the run there it continues."""
        local_uri = local_store_uri(self._run_dir)
        logger.warning(
            "MLflow: %s failed (%s); the run goes on logging to %s — copy it there later with `distill mlflow sync %s`",
            self._tracking_uri,
            _short(failure),
            local_uri,
            self._run_dir,
        )
        try:
            self._run_dir.mkdir(parents=True, exist_ok=True)
            local = self._continue_local(local_uri, run_id) if run_id is not None else None
            if local is None:
                local = MLflowTracker(
                    local_uri,
                    self._experiment,
                    self._run_name,
                    artifact_location=(self._run_dir / LOCAL_ARTIFACTS).resolve().as_uri(),
                    tags={TAG_TRACKING_URI: self._tracking_uri, **({TAG_REMOTE_RUN: run_id} if run_id else {})},
                )
            if self._params:
                local.log_params(self._params)
            if self._tags:
                local.set_tags(self._tags)
        except Exception as error:
            logger.warning("MLflow: the local store %s failed too (%s); the run goes on untracked", local_uri, error)
            self._current = None
            return
        self._current = local

    def _continue_local(self, local_uri: str, run_id: str) -> MLflowTracker | None:
        """`run_id` continued in the local store, marked as not synced any more; None if it is not a local run."""
        try:
            local = MLflowTracker(local_uri, self._experiment, self._run_name, run_id=run_id)
        except Exception as error:
            if _reachable_but_missing(error):
                return None
            raise
        local.delete_tag(TAG_SYNCED)
        return local

    def _call(self, method: str, *args: Any) -> None:
        """`method` on the current store; a failure of the configured store moves the run to the local one (and
        repeats the call there), a failure of the local store ends tracking. Never raises."""
        if self._current is None:
            return
        try:
            getattr(self._current, method)(*args)
            return
        except Exception as error:
            if self.local:
                logger.warning("MLflow: the local store failed (%s); the run goes on untracked", _short(error))
                self._current = None
                return
            self._fall_back(error, self._current.run_id)
        self._call(method, *args)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._params.update({key: str(value) for key, value in params.items()})
        self._call("log_params", params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._tags.update({key: str(value) for key, value in tags.items()})
        self._call("set_tags", tags)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._call("log_metrics", metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log_text", text, artifact_file)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        try:
            self._call("log_figure", figure, artifact_file)
        finally:
            plt.close(figure)

    def finish(self, status: str = "FINISHED") -> None:
        self._call("finish", status)


def create_tracker(
    config: Config,
    *,
    rank: int,
    run_id: str | None = None,
    run_name: str | None = None,
    run_dir: Path | None = None,
) -> Tracker:
    """Rank 0 with tracking on: a `FallbackTracker` continuing `run_id` when given (a new run, with a warning, when
    that run is gone); elsewhere the null `Tracker`. Never raises and never waits minutes for a server.

    `run_dir` (default `train.output_dir`) holds the local fallback store. Runs that fell back there earlier and
    were meant for this store are copied to it first (`sync_local_runs`), so a resumed job continues the copy of
    its run.
    """
    settings = config.mlflow
    if rank != 0 or not settings.enabled:
        return Tracker()
    uri = resolve_tracking_uri(settings)
    run_dir = Path(run_dir if run_dir is not None else config.train.output_dir)
    name = run_name or settings.run_name or default_run_name(config)
    artifacts = default_artifact_location(uri, settings.artifact_location)
    fallback = {"tracking_uri": uri, "experiment": settings.experiment, "run_name": name, "run_dir": run_dir}
    bound_http_requests()
    try:
        probe_store(uri)
        if (run_dir / LOCAL_STORE).is_file():
            copies = sync_local_runs(run_dir, uri, only_meant_for=uri)
            run_id = copies.get(run_id, run_id) if run_id is not None else None
        if run_id is not None:
            try:
                return FallbackTracker(MLflowTracker(uri, settings.experiment, name, run_id, artifacts), **fallback)
            except Exception as error:
                if not _reachable_but_missing(error):
                    raise
                logger.warning("MLflow: cannot continue run %s in %s (%s); starting a new run", run_id, uri, error)
                run_id = None
        return FallbackTracker(MLflowTracker(uri, settings.experiment, name, None, artifacts), **fallback)
    except Exception as error:
        return FallbackTracker(None, failure=error, run_id=run_id, **fallback)


def _reachable_but_missing(error: BaseException) -> bool:
    """Whether the store answered that a run does not exist (as opposed to not answering)."""
    return getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _short(error: BaseException | None) -> str:
    """The first line of an error, at most 300 characters (MLflow's messages carry whole retry histories)."""
    text = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else repr(error)
    return text[:300]


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created when missing."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another job created it between the lookup and the create
        return client.get_experiment_by_name(name).experiment_id


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> int:
    """Log the params the run lacks; a changed value becomes the tag `param_changed.KEY`. Returns how many were
    logged."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    fresh = [Param(key, value) for key, value in params.items() if key not in existing]
    for start in range(0, len(fresh), _PARAM_BATCH):
        client.log_batch(run_id, params=fresh[start : start + _PARAM_BATCH])
    for key, value in params.items():
        if key in existing and existing[key] != value:
            client.set_tag(run_id, f"param_changed.{key}", f"{existing[key]} -> {value}")
    return len(fresh)


def sync_local_runs(run_dir: Path, tracking_uri: str | None = None, *, only_meant_for: str | None = None) -> dict:
    """Copy every run of `run_dir`'s local store to `tracking_uri` (default: the store each run was meant for);
    returns {local run id: id of its copy}.

    Idempotent: a run copied before goes to the same copy again and only what the copy lacks is added (params,
    metric points compared by step, timestamp and value); tags and artifacts are written again. A run that fell back
    mid-run is appended to the run it continues. `only_meant_for` (the automatic sync of a starting job) skips runs
    meant for another store and, without copying them again, runs already copied there.
    """
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
                f"{target}: cannot copy local run {run.info.run_id} of {store} there ({_short(error)}); check that "
                "the tracking store is reachable (or pass another --tracking-uri) and run `distill mlflow sync` again"
            ) from error
    return copies


def _sync_run(local: MlflowClient, run: Any, experiment: str, target_uri: str) -> str:
    """Copy one local run to `target_uri` (see `sync_local_runs`); returns the id of the copy."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    probe_store(target_uri)
    remote = MlflowClient(tracking_uri=target_uri)
    copy_id = _copy_target(remote, run, target_uri)
    if copy_id is None:
        experiment_id = _experiment_id(remote, experiment, default_artifact_location(target_uri, None))
        created = remote.create_run(experiment_id, start_time=run.info.start_time, run_name=run.info.run_name)
        copy_id = created.info.run_id
    params = _log_params(remote, copy_id, run.data.params)
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
            if not _reachable_but_missing(error):
                raise
    return None
