"""Experiment tracking: one `Tracker` with the same methods on every rank (figures: `pipeline.reports.figures`).

Rank 0 (with `mlflow.enabled`) gets a `FallbackTracker`; every other rank, or a run with tracking off, gets the base
`Tracker`, whose methods do nothing and which never imports mlflow or touches the store. Stage drivers therefore call
`tracker.log_metrics(...)` unconditionally, never `if rank == 0`.

Tracking never stops a run. A server is first probed with a short TCP connect, and MLflow's own HTTP requests get a
bounded timeout and retries (unless the user set those variables; `infra.mlflow_store` holds which store, the probe
and the limits). A store that cannot be reached at start, or fails mid-run, is a warning: the run goes on in a local
sqlite store in the run directory (`mlflow-local.db`, artifacts in `mlflow-local-artifacts/`), tagged with the store
it was meant for. `infra.mlflow_sync.sync_local_runs` (`distill mlflow sync RUN_DIR`) copies those runs there later
— params, tags, metric histories, artifacts, status — and a later job in the same run directory does it by itself
once the store answers again.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib import pyplot as plt

from pipeline.config import Config
from pipeline.infra.mlflow_store import (
    LOCAL_ARTIFACTS,
    LOCAL_STORE,
    TAG_REMOTE_RUN,
    TAG_SYNCED,
    TAG_TRACKING_URI,
    bound_http_requests,
    default_artifact_location,
    find_or_create_experiment,
    local_store_uri,
    log_new_params,
    probe_store,
    reachable_but_missing,
    resolve_tracking_uri,
    short_error,
)
from pipeline.infra.mlflow_sync import sync_local_runs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


def default_run_name(config: Config) -> str:
    """A run name that says what differs between students: shape, squeeze, encoding and the weighted loss terms
    (every `distill.<term>` section with a weight > 0)."""
    student, distill = config.student, config.distill
    sections = [(item.name, getattr(distill, item.name)) for item in dataclasses.fields(distill)]
    weights = "".join(f"-{name}{section.weight:g}" for name, section in sections if getattr(section, "weight", 0) > 0)
    return f"L{student.num_layers}H{student.num_heads}-{distill.attn.squeeze}-{config.cache.encoding}{weights}"


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
        # here, not at the top: MLflow takes seconds to import and only these calls need it
        from mlflow.entities import RunStatus
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is not None:
            self._client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self.run_id = run_id
            logger.info("MLflow: continuing run %s in %s", run_id, tracking_uri)
            return
        experiment_id = find_or_create_experiment(self._client, experiment, artifact_location)
        self.run_id = self._client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {})).info.run_id
        logger.info("MLflow: run %s (%s) in experiment %r at %s", self.run_id, run_name, experiment, tracking_uri)

    @property
    def active(self) -> bool:
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log new parameters; on a continued run, a changed value is kept as a tag `param_changed.KEY` (MLflow
        refuses to overwrite a parameter)."""
        log_new_params(self._client, self.run_id, {key: str(value) for key, value in params.items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def delete_tag(self, key: str) -> None:
        """Remove tag `key` where the run has it."""
        if key in self._client.get_run(self.run_id).data.tags:
            self._client.delete_tag(self.run_id, key)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # here, not at the top: MLflow takes seconds to import and only these calls need it
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
            short_error(failure),
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
            if reachable_but_missing(error):
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
                logger.warning("MLflow: the local store failed (%s); the run goes on untracked", short_error(error))
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
                if not reachable_but_missing(error):
                    raise
                logger.warning("MLflow: cannot continue run %s in %s (%s); starting a new run", run_id, uri, error)
                run_id = None
        return FallbackTracker(MLflowTracker(uri, settings.experiment, name, None, artifacts), **fallback)
    except Exception as error:
        return FallbackTracker(None, failure=error, run_id=run_id, **fallback)
