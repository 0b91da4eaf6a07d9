"""The MLflow tracker: a null object on ranks ≠ 0, a real run (read back with MlflowClient) on rank 0; a store that
cannot be reached or fails mid-run never stops the run (local fallback store, `sync_local_runs` later); runs end
FINISHED, FAILED or KILLED by how the training block exits."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.infra import mlflow_store, tracking
from pipeline.infra.mlflow_store import (
    DEFAULT_TRACKING_URI,
    LOCAL_STORE,
    TAG_TRACKING_URI,
    local_store_uri,
    resolve_tracking_uri,
)
from pipeline.infra.mlflow_sync import TrackingError, sync_local_runs
from pipeline.infra.tracking import (
    FallbackTracker,
    Tracker,
    create_tracker,
    default_run_name,
    sigterm_as_keyboard_interrupt,
)
from pipeline.reports.figures import alpha_figure, attention_heatmap_figure

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


def _config(store: Path, run_dir: Path | None = None, **mlflow):
    """A config tracking into `store`'s sqlite database (or `mlflow.tracking_uri`), training into `run_dir`."""
    values = {"mlflow": {"tracking_uri": f"sqlite:///{store}/mlflow.db", "experiment": "t", **mlflow}}
    student = {"num_layers": 4, "num_heads": 3}
    return config_from_dict({**values, "student": student, "train": {"output_dir": str(run_dir or store / "run")}})


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
    assert isinstance(tracker, FallbackTracker) and tracker.active and not tracker.local
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


# --------------------------------------------------------------------------------------------------------------------
# A store that fails never stops the run


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(point.step, point.value) for point in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)]


def _run(uri: str, run_id: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id)


@pytest.mark.slow
def test_an_unreachable_server_is_a_warning_and_the_run_logs_locally(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    config = _config(tmp_path, tmp_path / "run", tracking_uri=uri)
    started = time.perf_counter()
    with caplog.at_level("WARNING", logger="pipeline.infra.tracking"):
        tracker = create_tracker(config, rank=0)
    elapsed = time.perf_counter() - started
    assert elapsed < 15, elapsed  # the local sqlite store's creation included; MLflow's defaults took ~4 minutes
    assert tracker.active and tracker.local
    assert uri in caplog.text and f"distill mlflow sync {tmp_path / 'run'}" in caplog.text
    tracker.log_params({"train.lr": 0.01})
    tracker.log_metrics({"train/loss": 2.0}, step=1)
    tracker.log_text("notes", "notes.txt")
    tracker.finish()
    local = local_store_uri(tmp_path / "run")
    assert local == f"sqlite:///{tmp_path / 'run' / LOCAL_STORE}"
    run = _run(local, tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.lr": "0.01"}
    assert run.data.tags[TAG_TRACKING_URI] == uri and run.info.run_name == default_run_name(config)
    assert _history(local, tracker.run_id, "train/loss") == [(1, 2.0)]


def test_http_limits_are_set_only_where_the_user_set_none(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in mlflow_store.HTTP_LIMITS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    mlflow_store.bound_http_requests()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 300 and MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 3  # MLflow reads them


class _Failing(http.server.BaseHTTPRequestHandler):
    """A tracking server that accepts connections and answers every request with 503."""

    def do_GET(self) -> None:
        self.send_error(503, "down for maintenance")

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_a_server_that_answers_errors_is_left_for_the_local_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's setting wins over ours
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with caplog.at_level("WARNING", logger="pipeline.infra.tracking"):
            tracker = create_tracker(_config(tmp_path, tmp_path / "run", tracking_uri=uri), rank=0)
    finally:
        server.shutdown()
    assert tracker.local and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert uri in caplog.text and "503" in caplog.text


@pytest.mark.slow
def test_a_store_failing_mid_run_moves_the_run_to_the_local_store_and_sync_appends_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, tmp_path / "run")
    remote = config.mlflow.tracking_uri
    tracker = create_tracker(config, rank=0)
    remote_id = tracker.run_id
    tracker.log_params({"train.lr": 0.01, "train.seed": 0})
    tracker.set_tags({"world_size": 1})
    logged = [(1, 3.0), (2, 2.5), (3, 2.25), (4, 2.0)]
    for step, loss in logged[:2]:
        tracker.log_metrics({"train/loss": loss}, step=step)

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionError("the server went away")

    tracker._current._client.log_batch = refuse  # the store dies between two steps
    with caplog.at_level("WARNING", logger="pipeline.infra.tracking"):
        for step, loss in logged[2:]:
            tracker.log_metrics({"train/loss": loss}, step=step)
    assert tracker.local and "the server went away" in caplog.text
    tracker.finish()

    local = local_store_uri(tmp_path / "run")
    moved = _run(local, tracker.run_id)
    assert moved.data.params == {"train.lr": "0.01", "train.seed": "0"} and moved.data.tags["world_size"] == "1"
    assert _history(local, tracker.run_id, "train/loss") == logged[2:]
    assert _history(remote, remote_id, "train/loss") == logged[:2]

    assert sync_local_runs(tmp_path / "run") == {tracker.run_id: remote_id}  # into the run it continues
    assert _history(remote, remote_id, "train/loss") == logged
    assert _run(remote, remote_id).info.status == "FINISHED"


@pytest.mark.slow
def test_sync_copies_a_local_run_into_another_store_once(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    tracker = create_tracker(_config(tmp_path, run_dir, tracking_uri=f"http://127.0.0.1:{_closed_port()}"), rank=0)
    tracker.log_params({"train.lr": 0.01})
    tracker.set_tags({"cache.top_k": 16})
    metrics = {"train/loss": [(1, 3.0), (2, 2.0)], "eval/ppl": [(2, 40.0)]}
    for step in (1, 2):
        tracker.log_metrics({key: dict(points)[step] for key, points in metrics.items() if step in dict(points)}, step)
    tracker.log_text("config", "config.yaml")
    tracker.finish("KILLED")

    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    (tmp_path / "other").mkdir()
    copies = sync_local_runs(run_dir, other)
    copy_id = copies[tracker.run_id]
    copy = _run(other, copy_id)
    assert (
        copy.info.status == "KILLED"
        and copy.info.run_name == _run(local_store_uri(run_dir), tracker.run_id).info.run_name
    )
    assert copy.data.params == {"train.lr": "0.01"} and copy.data.tags["cache.top_k"] == "16"
    for key, points in metrics.items():
        assert _history(other, copy_id, key) == _history(local_store_uri(run_dir), tracker.run_id, key) == points
    assert [item.path for item in MlflowClient(tracking_uri=other).list_artifacts(copy_id)] == ["config.yaml"]
    assert sync_local_runs(run_dir, other) == copies  # the same copy again, nothing duplicated
    assert _history(other, copy_id, "train/loss") == metrics["train/loss"]

    with pytest.raises(TrackingError, match=str(tmp_path / "nowhere" / LOCAL_STORE)):
        sync_local_runs(tmp_path / "nowhere", other)
    with pytest.raises(TrackingError, match="cannot copy local run"):
        sync_local_runs(run_dir, f"http://127.0.0.1:{_closed_port()}")


@pytest.mark.slow
def test_a_resumed_job_copies_its_fallback_run_and_continues_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, tmp_path / "run")
    remote = config.mlflow.tracking_uri

    def unreachable(uri: str) -> None:
        raise ConnectionRefusedError(f"{uri} is down")

    with monkeypatch.context() as down:
        down.setattr(tracking, "probe_store", unreachable)
        first = create_tracker(config, rank=0)
        assert first.local
        first.log_metrics({"train/loss": 3.0}, step=1)
        first.finish("KILLED")
        again = create_tracker(config, rank=0, run_id=first.run_id)  # still down: the same local run goes on
        assert again.local and again.run_id == first.run_id
        again.log_metrics({"train/loss": 2.5}, step=2)
        again.finish("KILLED")

    resumed = create_tracker(config, rank=0, run_id=first.run_id)  # the store is back
    assert not resumed.local and resumed.run_id != first.run_id
    resumed.log_metrics({"train/loss": 2.0}, step=3)
    resumed.finish()
    assert _history(remote, resumed.run_id, "train/loss") == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert _run(remote, resumed.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_the_run_ends_finished_failed_or_killed_by_how_the_block_exits(tmp_path: Path) -> None:
    config = _config(tmp_path)
    statuses = {}
    tracker = create_tracker(config, rank=0)
    with tracker.running():
        tracker.log_metrics({"train/loss": 1.0}, step=1)
    statuses["finished"] = tracker.run_id
    tracker = create_tracker(config, rank=0)
    with pytest.raises(ValueError, match="a bug"), tracker.running():
        raise ValueError("a bug")
    statuses["failed"] = tracker.run_id
    tracker = create_tracker(config, rank=0)
    with pytest.raises(KeyboardInterrupt), tracker.running():
        raise KeyboardInterrupt
    statuses["killed"] = tracker.run_id
    tracker = create_tracker(config, rank=0)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), sigterm_as_keyboard_interrupt(), tracker.running():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
    statuses["sigterm"] = tracker.run_id
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone after the block
    found = {name: _run(config.mlflow.tracking_uri, run_id).info.status for name, run_id in statuses.items()}
    assert found == {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED", "sigterm": "KILLED"}
    with Tracker().running() as null:  # the null tracker takes the same block
        null.log_metrics({"train/loss": 1.0}, step=1)


def test_when_the_local_store_fails_too_the_run_goes_on_untracked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracking, "MLflowTracker", broken)
    with caplog.at_level("WARNING", logger="pipeline.infra.tracking"):
        tracker = create_tracker(_config(tmp_path), rank=0)
    assert not tracker.active and tracker.run_id is None and "untracked" in caplog.text
    with tracker.running():
        tracker.log_params({"a": 1})
        tracker.log_metrics({"train/loss": 1.0}, step=1)
