"""The MLflow tracker: a null object on ranks ≠ 0, a real run (read back with MlflowClient) on rank 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.figures import alpha_figure, attention_heatmap_figure
from pipeline.tracking import (
    DEFAULT_TRACKING_URI,
    MLflowTracker,
    Tracker,
    create_tracker,
    default_run_name,
    resolve_tracking_uri,
)

ALPHA_STATS = {
    "L1.H2": {
        "mean": 0.33,
        "std": 0.02,
        "min": 0.2,
        "max": 0.5,
        "per_teacher_head_mean": [0.3, 0.35, 0.35, 0.3, 0.32, 0.38],
        "histogram_bins": 4,
        "histogram": [0, 10, 5, 0],
    },
    "L3.H3": {
        "mean": 0.5,
        "std": 0.03,
        "min": 0.4,
        "max": 0.6,
        "per_teacher_head_mean": [0.5] * 6,
        "histogram_bins": 4,
        "histogram": [0, 3, 12, 0],
    },
}


def _config(store: Path, **mlflow):
    return config_from_dict({"mlflow": {"tracking_uri": f"sqlite:///{store}/mlflow.db", "experiment": "t", **mlflow}})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow_store")


def test_null_tracker_on_other_ranks_and_when_disabled_never_touches_the_store(tmp_path: Path) -> None:
    for tracker in (
        create_tracker(_config(tmp_path), rank=1),
        create_tracker(_config(tmp_path, enabled=False), rank=0),
    ):
        assert type(tracker) is Tracker and not tracker.active and tracker.run_id is None
        tracker.log_params({"a": 1})
        tracker.set_tags({"b": 2})
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        tracker.log_text("text", "notes.txt")
        tracker.log_artifact(__file__)
        tracker.log_figure(alpha_figure(ALPHA_STATS), "alpha.png")
        tracker.finish()
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no artifact directory


@pytest.mark.slow
def test_rank_zero_logs_params_metrics_and_artifacts(store: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    config = _config(store)
    tracker = create_tracker(config, rank=0)
    assert isinstance(tracker, MLflowTracker) and tracker.active
    tracker.log_params(config.flat())
    tracker.set_tags({"cache.teacher_weights_sha256": "abc", "world_size": 2})
    for step, loss in ((1, 3.0), (2, 2.5)):
        tracker.log_metrics({"train/loss": loss, "train/lr": 0.1 * step}, step=step)
    tracker.log_text(config.dump(), "config.yaml")
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    tracker.log_artifact(manifest, "cache")
    tracker.log_figure(alpha_figure(ALPHA_STATS), "alpha_histograms.png")
    maps = {layer: torch.rand(3, 8, 8).tril() for layer in (0, 1)}
    tracker.log_figure(attention_heatmap_figure(maps, maps, {0: 1, 1: 3}), "heatmaps/step-00000002.png")
    tracker.finish()

    client = MlflowClient(tracking_uri=config.mlflow.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == default_run_name(config) == "L4H3-shd-dense-ce1-kd1-attn1"
    assert run.data.params["student.num_heads"] == "3" and run.data.params["train.lr"] == "0.001"
    assert run.data.tags["cache.teacher_weights_sha256"] == "abc" and run.data.tags["world_size"] == "2"
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(point.step, point.value) for point in history] == [(1, 3.0), (2, 2.5)]
    artifacts = {item.path for item in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "cache", "alpha_histograms.png", "heatmaps"} <= artifacts
    assert [item.path for item in client.list_artifacts(tracker.run_id, "heatmaps")] == ["heatmaps/step-00000002.png"]
    # A sqlite store keeps artifacts beside the database, not in the working directory.
    assert client.get_experiment_by_name("t").artifact_location == (store / "mlartifacts").as_uri()


@pytest.mark.slow
def test_a_continued_run_keeps_its_params_and_tags_changed_ones(store: Path) -> None:
    from mlflow.tracking import MlflowClient

    first = create_tracker(_config(store), rank=0)
    first.log_params({"train.max_steps": 10, "train.lr": 0.1})
    first.finish()
    continued = create_tracker(_config(store), rank=0, run_id=first.run_id)
    assert continued.run_id == first.run_id
    continued.log_params({"train.max_steps": 20, "train.lr": 0.1, "train.seed": 0})
    continued.log_metrics({"train/loss": 1.0}, step=11)
    client = MlflowClient(tracking_uri=_config(store).mlflow.tracking_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params == {"train.max_steps": "10", "train.lr": "0.1", "train.seed": "0"}
    assert run.data.tags["param_changed.train.max_steps"] == "10 -> 20"
    continued.finish("KILLED")
    assert client.get_run(first.run_id).info.status == "KILLED"


def test_tracking_uri_comes_from_the_config_then_the_environment_then_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(config_from_dict({}).mlflow) == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(config_from_dict({}).mlflow) == "http://mlflow:5000"
    configured = config_from_dict({"mlflow": {"tracking_uri": "sqlite:///x.db"}})
    assert resolve_tracking_uri(configured.mlflow) == "sqlite:///x.db"
