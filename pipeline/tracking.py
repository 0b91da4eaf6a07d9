"""Experiment tracking: one `Tracker` with the same methods on every rank (figures are drawn in `pipeline.figures`).

Rank 0 (with `mlflow.enabled`) gets an `MLflowTracker`; every other rank, or a run with tracking off, gets the base
`Tracker`, whose methods do nothing and which never imports mlflow or touches the store. Stage drivers therefore call
`tracker.log_metrics(...)` unconditionally, never `if rank == 0`.

Store: `mlflow.tracking_uri`, else the environment's `MLFLOW_TRACKING_URI`, else the embedded `sqlite:///mlflow.db`.
With a sqlite store, a new experiment keeps its artifacts in `mlartifacts/` beside the database file (MLflow's own
default would be the current directory).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib import pyplot as plt

from pipeline.config import Config, MLflowConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


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
    """A run name that says what differs between students: shape, squeeze, encoding and loss weights."""
    student, distill = config.student, config.distill
    return (
        f"L{student.num_layers}H{student.num_heads}-{distill.squeeze}-{config.cache.encoding}"
        f"-ce{distill.w_ce:g}-kd{distill.w_kd:g}-attn{distill.w_attn:g}"
    )


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


class MLflowTracker(Tracker):
    """One MLflow run, created or continued (`run_id`), written through an `MlflowClient` (no global state)."""

    def __init__(
        self, tracking_uri: str, experiment: str, run_name: str, run_id: str | None = None, artifact_location=None
    ) -> None:
        from mlflow.entities import RunStatus
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._running = RunStatus.to_string(RunStatus.RUNNING)
        if run_id is not None:
            self._client.update_run(run_id, status=self._running)
            self.run_id = run_id
            logger.info("MLflow: continuing run %s in %s", run_id, tracking_uri)
            return
        found = self._client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            try:
                experiment_id = self._client.create_experiment(experiment, artifact_location=artifact_location)
            except Exception:  # another job created it between the lookup and the create
                experiment_id = self._client.get_experiment_by_name(experiment).experiment_id
        self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        logger.info("MLflow: run %s (%s) in experiment %r at %s", self.run_id, run_name, experiment, tracking_uri)

    @property
    def active(self) -> bool:
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log new parameters; on a continued run, a changed value is kept as a tag `param_changed.KEY` (MLflow
        refuses to overwrite a parameter)."""
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        fresh = [Param(key, str(value)) for key, value in params.items() if key not in existing]
        changed = {
            f"param_changed.{key}": f"{existing[key]} -> {value}"
            for key, value in params.items()
            if key in existing and existing[key] != str(value)
        }
        for start in range(0, len(fresh), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=fresh[start : start + 100])
        if changed:
            self.set_tags(changed)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

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


def create_tracker(config: Config, *, rank: int, run_id: str | None = None, run_name: str | None = None) -> Tracker:
    """`MLflowTracker` on rank 0 with tracking on (continuing `run_id` when given), else the null `Tracker`."""
    settings = config.mlflow
    if rank != 0 or not settings.enabled:
        return Tracker()
    uri = resolve_tracking_uri(settings)
    return MLflowTracker(
        uri,
        settings.experiment,
        run_name or settings.run_name or default_run_name(config),
        run_id=run_id,
        artifact_location=default_artifact_location(uri, settings.artifact_location),
    )
