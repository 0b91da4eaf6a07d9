"""`distill compare` on synthetic MLflow runs in a temporary sqlite store: table, CSV, plots, images, summary run."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from matplotlib import image as mpimg
from matplotlib import pyplot as plt

from pipeline.cli import main
from pipeline.config import config_from_dict
from pipeline.infra.mlflow_ui import (
    EXPERIMENT_KIND_TAG,
    MACHINE_LEARNING_KIND,
    PRIMARY_METRIC_TAG,
    SAVED_VIEW_TAG_PREFIX,
    VIEW_ID,
    tag_experiment,
)
from pipeline.reports.compare import CompareReport, compare_runs
from pipeline.reports.figures import MONTAGE_MAX_WIDTH, attention_heatmap_figures, save_figure
from pipeline.reports.plots import latest_images, metric_bands, plot_metric_bands
from pipeline.reports.runs import SUMMARY_TAG, CompareError, RunSummary, resolve_target, seed_variants
from pipeline.reports.tables import BEST_PPL_COLUMN, comparison_table, variants_table

EXPERIMENT = "sweep"
CONSTANT_PARAMS = {"train.lr": "0.001", "data.seq_len": "32", "teacher.source": "tiny-random-llama"}
RUNS = {
    # name → (params that vary, {metric: [(step, value)]}); h3-uniform never logs train/loss_attn
    "h2-shd": (
        {"student.num_heads": "2", "distill.attn.squeeze": "shd", "distill.kd.weight": "1.0"},
        {
            "train/loss": [(1, 5.0), (2, 4.25), (3, 3.5), (4, 3.125)],
            "train/loss_attn": [(1, 0.75), (2, 0.5), (3, 0.375), (4, 0.3125)],
            "train/tokens": [(1, 128.0), (2, 256.0), (3, 384.0), (4, 512.0)],
            "eval/ppl": [(2, 40.5), (4, 30.25)],
            "eval/top1_agreement": [(2, 0.25), (4, 0.375)],
        },
    ),
    "h3-shd": (
        {"student.num_heads": "3", "distill.attn.squeeze": "shd", "distill.kd.weight": "1.0"},
        {
            "train/loss": [(1, 4.5), (2, 3.75), (3, 3.0), (4, 2.875)],
            "train/loss_attn": [(1, 0.625), (2, 0.5), (3, 0.25), (4, 0.1875)],
            "train/tokens": [(1, 128.0), (2, 256.0), (3, 384.0), (4, 512.0)],
            "eval/ppl": [(2, 25.5), (4, 27.75)],  # best (25.5) is not the final value
            "eval/top1_agreement": [(2, 0.5), (4, 0.5625)],
        },
    ),
    "h3-uniform": (
        {"student.num_heads": "3", "distill.attn.squeeze": "uniform", "distill.kd.weight": "0.5"},
        {
            "train/loss": [(1, 4.75), (2, 4.0), (3, 3.25), (4, 3.0625)],
            "train/tokens": [(1, 128.0), (2, 256.0), (3, 384.0), (4, 512.0)],
            "eval/ppl": [(2, 33.0), (4, 31.125)],
            "eval/top1_agreement": [(2, 0.375), (4, 0.4375)],
        },
    ),
}
DIFFERING = ["distill.attn.squeeze", "distill.kd.weight", "student.num_heads"]
IMAGES = ["figures/alpha_step_5.png", "figures/alpha_step_10.png", "figures/attention/heatmap_step_10.png"]


def _png(path: Path, color: str) -> Path:
    figure, axis = plt.subplots(figsize=(2, 1.5))
    axis.bar([0, 1, 2], [1, 3, 2], color=color)
    figure.savefig(path, dpi=40)
    plt.close(figure)
    return path


def _new_experiment(root: Path, name: str) -> tuple[str, Any, str]:
    """(tracking URI, client, experiment id) of a new sqlite store under `root` holding experiment `name`."""
    from mlflow.tracking import MlflowClient  # MLflow takes seconds to import

    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment(name, artifact_location=(root / "artifacts").as_uri())


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A sqlite store with experiment `sweep`: 3 finished runs with params, metric histories and PNG artifacts."""
    from mlflow.entities import Metric, Param

    root = tmp_path_factory.mktemp("mlflow")
    uri, client, experiment_id = _new_experiment(root, EXPERIMENT)
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
    assert {
        "index.md",
        "runs.md",
        "runs.csv",
        "step",
        "tokens",
        "alpha_histograms.png",
        "attention_heatmaps.png",
    } <= top
    before = len(_summary_runs(store))
    again = compare_runs(store["uri"], EXPERIMENT, output=store["root"] / "reports")
    assert [row[0] for row in again.rows] == list(RUNS)
    assert again.rows == report.rows
    assert len(_summary_runs(store)) == before + 1


def test_filter_and_run_selection(store: dict, tmp_path: Path) -> None:
    shd = compare_runs(store["uri"], EXPERIMENT, filter_string="params.distill.attn.squeeze = 'shd'", output=tmp_path)
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
        compare_runs(store["uri"], EXPERIMENT, filter_string="params.distill.attn.squeeze = 'none'", output=tmp_path)
    with pytest.raises(CompareError, match="--filter"):
        compare_runs(store["uri"], EXPERIMENT, filter_string="params.distill.attn.squeeze ==== 3", output=tmp_path)
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


def _summary(label: str, histories: dict, params: dict | None = None) -> RunSummary:
    return RunSummary(label, label, params or {}, histories)


def test_table_columns_follow_the_logged_metrics_in_a_stable_order() -> None:
    point = [(1, 1.0)]
    logged = [
        "eval/attn_kl",
        "train/loss_rel",
        "eval/loss_kd",
        "train/grad_norm",
        "eval/top1_agreement",
        "train/lr",
        "train/tokens",
        "train/loss_ce",
        "eval/ppl",
        "train/loss",
        "system/cpu",
    ]
    with_terms = _summary("terms", {key: point for key in logged})
    plain = _summary("plain", {"train/loss": [(1, 2.0), (2, 1.5)]})
    columns, rows = comparison_table([with_terms, plain])
    assert columns == [
        "run",
        "train/loss",
        "train/loss_ce",
        "train/loss_rel",
        "train/lr",
        "train/grad_norm",
        "eval/ppl",
        "eval/top1_agreement",
        "eval/loss_kd",
        "eval/attn_kl",
        BEST_PPL_COLUMN,
    ]
    assert rows[1] == ["plain", 1.5] + [None] * (len(columns) - 2)
    assert comparison_table([plain]) == (["run", "train/loss"], [["plain", 1.5]])  # no terms logged, no term columns


def test_latest_heatmap_set_gives_one_figure_per_layer() -> None:
    paths = [
        "alpha_histograms.png",
        "heatmaps/step-00000005.png",
        "heatmaps/step-00000010/layer-0.png",
        "heatmaps/step-00000010/layer-1.png",
        "heatmaps/step-00000020/layer-0.png",
        "heatmaps/step-00000020/layer-1.png",
        "heatmaps/eval-step-00000020/layer-0.png",
    ]
    assert latest_images(paths) == {
        "alpha_histograms": "alpha_histograms.png",
        "attention_heatmaps_layer-0": "heatmaps/step-00000020/layer-0.png",
        "attention_heatmaps_layer-1": "heatmaps/step-00000020/layer-1.png",
    }


def test_index_embeds_every_figure_of_the_report(report: CompareReport) -> None:
    index = (report.directory / "index.md").read_text()
    written = sorted(path.relative_to(report.directory) for path in report.directory.rglob("*.png"))
    assert written and sorted(report.figures) == written
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", index)
    assert sorted(Path(link) for link in linked) == written  # each figure once, by a relative link
    assert report.markdown in index and "[runs.csv](runs.csv)" in index
    assert "variants" not in index  # no two runs share settings but their seed


SEEDS = {
    # variant → seed → final train/loss; every run logs eval/ppl at steps 2 and 4, seed 2 of kd also at step 3
    "kd": {0: [10.0, 6.0], 1: [12.0, 7.0], 2: [11.0, 8.5]},
    "shd": {0: [9.0, 5.5], 1: [13.0, 6.5]},
}


def _seeded_histories(variant: str, seed: int) -> dict[str, list[tuple[int, float]]]:
    first, last = SEEDS[variant][seed]
    eval_ppl = [(2, first), (4, last)] + ([(3, 99.0)] if (variant, seed) == ("kd", 2) else [])
    return {"train/loss": [(1, first / 2), (4, last / 2)], "eval/ppl": sorted(eval_ppl)}


def test_seed_bands_are_the_mean_and_sample_std_over_seeds(tmp_path: Path) -> None:
    groups = {
        variant: [_summary(f"{variant}-seed{seed}", _seeded_histories(variant, seed)) for seed in seeds]
        for variant, seeds in SEEDS.items()
    }
    bands = metric_bands(groups, "eval/ppl")
    for variant, seeds in SEEDS.items():
        values = np.array(list(seeds.values()))  # [seeds, steps 2 and 4]; step 3 is not logged by every seed
        assert bands[variant].steps.tolist() == [2.0, 4.0] and bands[variant].runs == len(seeds)
        np.testing.assert_allclose(bands[variant].mean, values.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(bands[variant].std, values.std(axis=0, ddof=1), rtol=1e-12)
    assert metric_bands({"one": groups["kd"][:1]}, "eval/ppl")["one"].std.tolist() == [0.0, 0.0]
    assert metric_bands(groups, "eval/attn_kl") == {}
    path = plot_metric_bands(groups, "eval/ppl", tmp_path / "bands" / "eval_ppl.png")
    assert path is not None and mpimg.imread(path).ndim == 3
    assert plot_metric_bands(groups, "eval/attn_kl", tmp_path / "none.png") is None
    columns, rows = variants_table(groups)
    assert columns == ["variant", "seeds", "train/loss", "eval/ppl", BEST_PPL_COLUMN]
    finals = np.array([last for _, last in SEEDS["kd"].values()])
    assert rows[0][:2] == ["kd", "3"]
    assert rows[0][3] == f"{finals.mean():.4g} ± {finals.std(ddof=1):.2g}"


def test_runs_differing_only_in_seeds_form_named_variants() -> None:
    def run(name: str, seed: str, w_attn: str) -> RunSummary:
        params = {
            "train.seed": seed,
            "data.seed": seed,
            "distill.attn.weight": w_attn,
            "train.output_dir": f"runs/{name}",
        }
        return _summary(name, {}, params)

    runs = [
        run("kd-seed0", "0", "0"),
        run("kd-seed1", "1", "0"),
        run("shd_seed0", "0", "1"),
        run("shd_seed1", "1", "1"),
    ]
    assert {name: [member.label for member in members] for name, members in seed_variants(runs).items()} == {
        "kd": ["kd-seed0", "kd-seed1"],
        "shd": ["shd_seed0", "shd_seed1"],
    }
    unnamed = [run("a", "0", "0"), run("b", "1", "0"), run("c", "0", "1")]
    assert {name: len(members) for name, members in seed_variants(unnamed).items()} == {
        "distill.attn.weight=0": 2,
        "distill.attn.weight=1": 1,
    }


@pytest.fixture(scope="module")
def seeded_store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Experiment `seeds`: two variants × seeds, each run with per-layer heat maps logged at steps 2 and 4."""
    from mlflow.entities import Metric, Param

    root = tmp_path_factory.mktemp("seeded")
    uri, client, experiment_id = _new_experiment(root, "seeds")
    maps = {layer: torch.rand(2, 8, 8).tril().softmax(-1) for layer in (0, 1)}
    heatmaps = root / "png" / "heatmaps"  # drawn once, logged by every run at every step
    for figure_name, figure in attention_heatmap_figures(maps, maps, {0: 6, 1: 29}).items():
        save_figure(figure, heatmaps / f"{figure_name}.png")
    for variant, seeds in SEEDS.items():
        for seed in seeds:
            name = f"{variant}-seed{seed}"
            run_id = client.create_run(experiment_id, run_name=name).info.run_id
            params = {"train.seed": str(seed), "distill.attn.weight": "1" if variant == "shd" else "0"}
            histories = _seeded_histories(variant, seed)
            points = [Metric(key, value, 0, step) for key, history in histories.items() for step, value in history]
            client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()], metrics=points)
            for step in (2, 4):
                client.log_artifacts(run_id, str(heatmaps), f"heatmaps/step-{step:08d}")
            client.set_terminated(run_id)
    report = compare_runs(uri, "seeds", output=root / "reports")
    return {"client": client, "experiment_id": experiment_id, "report": report, "uri": uri}


def test_seeded_runs_get_variants_bands_and_per_layer_heatmaps(seeded_store: dict) -> None:
    report: CompareReport = seeded_store["report"]
    variants = (report.directory / "variants.md").read_text()
    assert "| kd | 3 |" in variants and "| shd | 2 |" in variants
    names = {str(path) for path in report.figures}
    assert {"bands/eval_ppl.png", "bands/train_loss.png"} <= names
    assert {"attention_heatmaps_layer-0.png", "attention_heatmaps_layer-1.png"} <= names
    index = (report.directory / "index.md").read_text()
    assert variants in index
    linked = sorted(Path(link) for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", index))
    assert linked == sorted(path.relative_to(report.directory) for path in report.directory.rglob("*.png"))
    stacked = mpimg.imread(report.directory / "attention_heatmaps_layer-0.png")
    single = mpimg.imread(report.directory.parent.parent / "png" / "heatmaps" / "layer-0.png")
    per_row = max(1, MONTAGE_MAX_WIDTH // single.shape[1])  # wide heat maps: few runs per row, the rest below
    assert stacked.shape[0] >= math.ceil(5 / per_row) * single.shape[0] and stacked.shape[1] <= MONTAGE_MAX_WIDTH


def _view(client, experiment_id: str) -> tuple[dict, dict, dict]:
    tags = client.get_experiment(experiment_id).tags
    envelope = json.loads(tags[SAVED_VIEW_TAG_PREFIX + VIEW_ID])
    return tags, envelope, json.loads(envelope["state"])


def test_compare_tags_the_experiment_for_the_mlflow_ui(seeded_store: dict) -> None:
    client, experiment_id = seeded_store["client"], seeded_store["experiment_id"]
    tags, envelope, state = _view(client, experiment_id)
    assert tags[EXPERIMENT_KIND_TAG] == MACHINE_LEARNING_KIND == "custom_model_development"
    assert tags[PRIMARY_METRIC_TAG] == "eval/ppl"
    # what the UI's saved-view parser requires: a string name, a number createdAt, the state as a JSON string
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    assert state["selectedColumns"] == [
        "metrics.`train/loss`",
        "metrics.`eval/ppl`",
        "params.`distill.attn.weight`",
        "params.`train.seed`",
    ]
    assert state["orderByKey"] == "metrics.`eval/ppl`" and state["orderByAsc"] is True
    report: CompareReport = seeded_store["report"]
    index = (report.directory / "index.md").read_text()
    assert f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_ID}" in index


def test_tagging_a_new_experiment_and_again_keeps_one_view(seeded_store: dict, tmp_path: Path) -> None:
    client = seeded_store["client"]
    experiment_id = client.create_experiment("fresh", artifact_location=(tmp_path / "artifacts").as_uri())
    tag_experiment(client, experiment_id)
    _, first, state = _view(client, experiment_id)
    assert state["selectedColumns"] == ["metrics.`eval/ppl`", "metrics.`eval/top1_agreement`", "metrics.`train/loss`"]
    tag_experiment(client, experiment_id, ["train/loss"], ["distill.attn.squeeze"])
    tags, again, state = _view(client, experiment_id)
    assert again["createdAt"] == first["createdAt"] and again["updatedAt"] >= first["updatedAt"]
    assert state == {
        "selectedColumns": ["metrics.`train/loss`", "params.`distill.attn.squeeze`"]
    }  # no eval/ppl to sort by
    assert sum(key.startswith(SAVED_VIEW_TAG_PREFIX) for key in tags) == 1


def _generation_file(step: int, replies: dict[int, str], split: str = "validation") -> dict:
    """A generation file as `publish_generations` writes it: one row per sample id → the student's reply."""
    rows = [
        {
            "sample_id": sample_id,
            "prompt": "<s>system\nBe brief.</s>\n<s>user\n"
            + "long " * 100
            + f"question {sample_id}?</s>\n<s>assistant\n",
            "reference": f"answer {sample_id}",
            "teacher": f"teacher {sample_id}",
            "student": reply,
            "rougeL": 0.25 * sample_id,
            "rougeL_teacher": 0.5,
        }
        for sample_id, reply in replies.items()
    ]
    return {"step": step, "split": split, "metrics": {"eval/rougeL": 0.5}, "rows": rows}


CHAT_RUNS = {
    # name → artifact file → the student's replies by sample id; `plain` logged no generations
    "chat-a": {
        "step-00000000.json": {0: "step zero", 1: "step zero", 2: "step zero", 3: "step zero"},
        "step-00000002.json": {0: "trained a0", 1: "trained a1", 2: "trained a2", 3: "trained a3"},
        "validation-step-00000002.json": {0: "evaluated a0 | piped\nnext line", 1: "x" * 400, 2: "a2", 3: "a3"},
        "test-step-00000009.json": {0: "on the test split"},
    },
    "chat-b": {"step-00000002.json": {0: "b0", 2: "b2"}},
    "plain": {},
}


@pytest.fixture(scope="module")
def chat_report(tmp_path_factory: pytest.TempPathFactory) -> CompareReport:
    """Three runs with eval/rougeL histories, two of them with generation files among their artifacts."""
    from mlflow.entities import Metric

    root = tmp_path_factory.mktemp("chat_mlflow")
    uri, client, experiment_id = _new_experiment(root, "chat")
    for index, (name, files) in enumerate(CHAT_RUNS.items()):
        run_id = client.create_run(experiment_id, run_name=name, start_time=1000 * (index + 1)).info.run_id
        points = [("eval/ppl", 9.0 - index), ("eval/rougeL", 0.1 * index), ("eval/rougeL_teacher", 0.5)]
        client.log_batch(run_id, metrics=[Metric(key, value, 0, 2) for key, value in points])
        staging = root / "staging" / name
        staging.mkdir(parents=True)
        for file_name, replies in files.items():
            split = "test" if file_name.startswith("test") else "validation"
            (staging / file_name).write_text(json.dumps(_generation_file(2, replies, split)))
        if files:
            client.log_artifacts(run_id, str(staging), "generations")
        client.set_terminated(run_id)
    return compare_runs(uri, "chat", output=root / "reports")


def test_rouge_l_columns_follow_ppl_and_top1(chat_report: CompareReport) -> None:
    assert chat_report.columns == ["run", "eval/ppl", "eval/rougeL", "eval/rougeL_teacher", BEST_PPL_COLUMN]
    assert [row[2] for row in chat_report.rows] == [0.0, 0.1, pytest.approx(0.2)]


def test_the_runs_replies_to_the_first_prompts_stand_side_by_side(chat_report: CompareReport) -> None:
    """For the first 3 prompts of the first run's latest validation file (distill eval's at the final step, not
    training's, and never the test split's): the prompt's end, reference, teacher and each run's reply; a run without
    that prompt gets a dash, a run without generations no row; long text is cut, pipes and line breaks escaped."""
    page = (chat_report.directory / "generations.md").read_text()
    sections = page.split("### Sample ")[1:]
    assert [section.split("\n", 1)[0] for section in sections] == ["0", "1", "2"]
    first = sections[0]
    assert "question 0?" in first and "Be brief" not in first  # a long prompt keeps its end
    assert "| reference | answer 0 | |" in first
    assert "| teacher | teacher 0 | 0.5000 |" in first
    assert "| chat-a | evaluated a0 \\| piped ⏎ next line | 0.0000 |" in first
    assert "| chat-b | b0 | 0.0000 |" in first
    assert "plain" not in page and "test split" not in page and "trained a" not in page
    assert f"| chat-a | {'x' * 300}… | 0.2500 |" in sections[1]
    assert "| chat-b | — | — |" in sections[1]
    index = (chat_report.directory / "index.md").read_text()
    assert "## Generations" in index and page in index and "[generations.md](generations.md)" in index


def test_a_comparison_without_generations_has_no_generations_page(report: CompareReport) -> None:
    assert not (report.directory / "generations.md").exists()
    assert "Generations" not in (report.directory / "index.md").read_text()
