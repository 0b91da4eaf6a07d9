"""`distill compare` on synthetic MLflow runs in a temporary sqlite store: table, CSV, plots, images, summary run."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import pytest
import yaml

matplotlib.use("Agg")

from matplotlib import image as mpimg
from matplotlib import pyplot as plt

from pipeline.cli import main
from pipeline.compare import (
    BEST_PPL_COLUMN,
    SUMMARY_TAG,
    CompareError,
    CompareReport,
    RunSummary,
    compare_runs,
    latest_images,
    resolve_target,
)
from pipeline.config import config_from_dict

EXPERIMENT = "sweep"
CONSTANT_PARAMS = {"train.lr": "0.001", "data.seq_len": "32", "teacher.source": "tiny-random-llama"}
RUNS = {
    # name → (params that vary, {metric: [(step, value)]}); h3-uniform never logs train/loss_attn
    "h2-shd": (
        {"student.num_heads": "2", "distill.squeeze": "shd", "distill.w_kd": "1.0"},
        {
            "train/loss": [(1, 5.0), (2, 4.25), (3, 3.5), (4, 3.125)],
            "train/loss_attn": [(1, 0.75), (2, 0.5), (3, 0.375), (4, 0.3125)],
            "train/tokens": [(1, 128.0), (2, 256.0), (3, 384.0), (4, 512.0)],
            "eval/ppl": [(2, 40.5), (4, 30.25)],
            "eval/top1_agreement": [(2, 0.25), (4, 0.375)],
        },
    ),
    "h3-shd": (
        {"student.num_heads": "3", "distill.squeeze": "shd", "distill.w_kd": "1.0"},
        {
            "train/loss": [(1, 4.5), (2, 3.75), (3, 3.0), (4, 2.875)],
            "train/loss_attn": [(1, 0.625), (2, 0.5), (3, 0.25), (4, 0.1875)],
            "train/tokens": [(1, 128.0), (2, 256.0), (3, 384.0), (4, 512.0)],
            "eval/ppl": [(2, 25.5), (4, 27.75)],  # best (25.5) is not the final value
            "eval/top1_agreement": [(2, 0.5), (4, 0.5625)],
        },
    ),
    "h3-uniform": (
        {"student.num_heads": "3", "distill.squeeze": "uniform", "distill.w_kd": "0.5"},
        {
            "train/loss": [(1, 4.75), (2, 4.0), (3, 3.25), (4, 3.0625)],
            "train/tokens": [(1, 128.0), (2, 256.0), (3, 384.0), (4, 512.0)],
            "eval/ppl": [(2, 33.0), (4, 31.125)],
            "eval/top1_agreement": [(2, 0.375), (4, 0.4375)],
        },
    ),
}
DIFFERING = ["distill.squeeze", "distill.w_kd", "student.num_heads"]
IMAGES = ["figures/alpha_step_5.png", "figures/alpha_step_10.png", "figures/attention/heatmap_step_10.png"]


def _png(path: Path, color: str) -> Path:
    figure, axis = plt.subplots(figsize=(2, 1.5))
    axis.bar([0, 1, 2], [1, 3, 2], color=color)
    figure.savefig(path, dpi=40)
    plt.close(figure)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A sqlite store with experiment `sweep`: 3 finished runs with params, metric histories and PNG artifacts."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    run_ids = {}
    for index, (name, (params, metrics)) in enumerate(RUNS.items()):
        run_id = client.create_run(experiment_id, run_name=name, start_time=1000 * (index + 1)).info.run_id
        run_ids[name] = run_id
        all_params = {**CONSTANT_PARAMS, **params}
        points = [Metric(key, value, 0, step) for key, history in metrics.items() for step, value in history]
        client.log_batch(run_id, params=[Param(key, value) for key, value in all_params.items()], metrics=points)
        # a resumed job logs the last train/loss step again, later: the later value is the final one
        client.log_batch(run_id, metrics=[Metric("train/loss", metrics["train/loss"][-1][1], 1, 4)])
        staging = root / "png" / name
        (staging / "attention").mkdir(parents=True)
        for artifact in IMAGES:
            _png(staging / artifact.removeprefix("figures/"), ["C0", "C1", "C2"][index])
        client.log_artifacts(run_id, str(staging), "figures")
        client.set_terminated(run_id)
    return {"uri": uri, "client": client, "experiment_id": experiment_id, "run_ids": run_ids, "root": root}


@pytest.fixture(scope="module")
def report(store: dict) -> CompareReport:
    return compare_runs(store["uri"], EXPERIMENT, output=store["root"] / "reports")


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and mpimg.imread(path).ndim == 3


def _summary_runs(store: dict) -> list:
    return store["client"].search_runs([store["experiment_id"]], f"tags.`{SUMMARY_TAG}` = 'true'")


def test_table_has_differing_params_and_final_metrics(report: CompareReport) -> None:
    assert report.columns == [
        "run",
        *DIFFERING,
        "train/loss",
        "train/loss_attn",
        "eval/ppl",
        "eval/top1_agreement",
        BEST_PPL_COLUMN,
    ]
    rows = {row[0]: dict(zip(report.columns, row, strict=True)) for row in report.rows}
    assert list(rows) == list(RUNS)  # oldest run first
    for name, (params, metrics) in RUNS.items():
        row = rows[name]
        assert {key: row[key] for key in DIFFERING} == {key: params[key] for key in DIFFERING}
        for key in ("train/loss", "train/loss_attn", "eval/ppl", "eval/top1_agreement"):
            expected = metrics[key][-1][1] if key in metrics else None
            assert row[key] == expected, (name, key)
        assert row[BEST_PPL_COLUMN] == min(value for _, value in metrics["eval/ppl"])


def test_markdown_and_csv_hold_the_same_table(report: CompareReport) -> None:
    lines = (report.directory / "runs.md").read_text().splitlines()
    assert lines[0] == "| " + " | ".join(report.columns) + " |"
    assert len(lines) == 2 + len(RUNS)
    assert "| h3-shd | shd | 1.0 | 3 | 2.875 | 0.1875 | 27.75 | 0.5625 | 25.5 |" in lines
    assert "| h3-uniform | uniform | 0.5 | 3 | 3.0625 | — |" in lines[-1]
    with open(report.directory / "runs.csv", newline="") as handle:
        parsed = list(csv.reader(handle))
    assert parsed[0] == [*report.columns, "run_id"]
    for csv_row, row in zip(parsed[1:], report.rows, strict=True):
        assert csv_row[:-1] == ["" if value is None else str(value) for value in row]
        assert [float(text) for text in csv_row[len(DIFFERING) + 1 : -1] if text] == [
            value for value in row[len(DIFFERING) + 1 :] if value is not None
        ]
    assert all(len(row[-1]) == 32 for row in parsed[1:])


def test_curves_against_step_and_tokens_are_pngs(report: CompareReport) -> None:
    for axis in ("step", "tokens"):
        names = sorted(path.name for path in (report.directory / axis).iterdir())
        assert names == ["eval_ppl.png", "eval_top1_agreement.png", "train_loss.png", "train_loss_attn.png"]
        assert all(_is_png(report.directory / axis / name) for name in names)


def test_run_images_side_by_side(report: CompareReport) -> None:
    single_width = mpimg.imread(next(Path(report.directory).parent.parent.glob("png/h2-shd/alpha_step_5.png"))).shape[1]
    for kind in ("alpha_histograms", "attention_heatmaps"):
        path = report.directory / f"{kind}.png"
        assert _is_png(path)
        assert mpimg.imread(path).shape[1] > 3 * single_width  # three runs next to each other


def test_latest_image_is_chosen_by_step_number() -> None:
    chosen = latest_images([*IMAGES, "figures/loss_curve.png"])
    assert chosen == {"alpha_histograms": "figures/alpha_step_10.png", "attention_heatmaps": IMAGES[2]}


def test_final_is_the_last_logged_at_the_highest_step_and_best_skips_nan() -> None:
    summary = RunSummary("id", "run", {}, {"eval/ppl": [(2, 9.0), (4, float("nan")), (4, 7.5)]})
    assert summary.final("eval/ppl") == 7.5
    assert summary.best("eval/ppl") == 7.5
    assert summary.final("eval/attn_kl") is None and summary.best("eval/attn_kl") is None


def test_store_and_experiment_come_from_flags_then_config_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    config = config_from_dict({"mlflow": {"experiment": "tiny", "tracking_uri": "sqlite:///c.db"}})
    assert resolve_target(config, None, None) == ("sqlite:///c.db", "tiny")
    assert resolve_target(config, "other", "sqlite:///flag.db") == ("sqlite:///flag.db", "other")
    assert resolve_target(None, "other", None) == ("http://tracking:5000", "other")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_target(None, "other", None) == ("sqlite:///mlflow.db", "other")
    with pytest.raises(CompareError, match="--experiment"):
        resolve_target(None, None, None)


def test_summary_run_holds_the_report_and_is_excluded_next_time(store: dict, report: CompareReport) -> None:
    client = store["client"]
    summary = client.get_run(report.summary_run_id)
    assert summary.data.tags[SUMMARY_TAG] == "true"
    assert summary.info.status == "FINISHED"
    top = {entry.path for entry in client.list_artifacts(report.summary_run_id)}
    assert {"runs.md", "runs.csv", "step", "tokens", "alpha_histograms.png", "attention_heatmaps.png"} <= top
    before = len(_summary_runs(store))
    again = compare_runs(store["uri"], EXPERIMENT, output=store["root"] / "reports")
    assert [row[0] for row in again.rows] == list(RUNS)
    assert again.rows == report.rows
    assert len(_summary_runs(store)) == before + 1


def test_filter_and_run_selection(store: dict, tmp_path: Path) -> None:
    shd = compare_runs(store["uri"], EXPERIMENT, filter_string="params.distill.squeeze = 'shd'", output=tmp_path)
    assert [row[0] for row in shd.rows] == ["h2-shd", "h3-shd"]
    assert shd.columns[:2] == ["run", "student.num_heads"]  # squeeze and w_kd are constant within the selection
    picked = compare_runs(
        store["uri"], EXPERIMENT, run_refs=["h3-uniform", store["run_ids"]["h2-shd"]], output=tmp_path
    )
    assert [row[0] for row in picked.rows] == ["h2-shd", "h3-uniform"]


def test_nothing_matching_is_a_named_error(store: dict, tmp_path: Path) -> None:
    with pytest.raises(CompareError, match=r"no experiment 'nope'.*sweep"):
        compare_runs(store["uri"], "nope", output=tmp_path)
    with pytest.raises(CompareError, match="no run with id or name 'h9-shd' in experiment 'sweep'"):
        compare_runs(store["uri"], EXPERIMENT, run_refs=["h9-shd"], output=tmp_path)
    with pytest.raises(CompareError, match="no runs to compare in experiment 'sweep' with filter"):
        compare_runs(store["uri"], EXPERIMENT, filter_string="params.distill.squeeze = 'none'", output=tmp_path)
    with pytest.raises(CompareError, match="--filter"):
        compare_runs(store["uri"], EXPERIMENT, filter_string="params.distill.squeeze ==== 3", output=tmp_path)
    with pytest.raises(CompareError, match="no MLflow store"):
        compare_runs(f"sqlite:///{tmp_path}/missing.db", EXPERIMENT, output=tmp_path)
    assert not (tmp_path / "missing.db").exists()


def test_cli_prints_the_table(
    store: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    argv = ["compare", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"], "--output", str(tmp_path)]
    assert main([*argv, "--runs", "h2-shd", "h3-shd"]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / EXPERIMENT / "runs.md").read_text()
    assert printed.splitlines()[0].startswith("| run | student.num_heads | train/loss |")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"mlflow": {"experiment": EXPERIMENT, "tracking_uri": store["uri"]}}))
    assert main(["compare", str(config), "--runs", "h3-uniform", "--output", str(tmp_path / "from-config")]) == 0
    assert "| h3-uniform |" in capsys.readouterr().out
    assert main(["compare", "--experiment", "nope", "--tracking-uri", store["uri"]]) == 2
    assert "no experiment 'nope'" in caplog.text
