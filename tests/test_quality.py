"""`benchmarks/quality.py`'s pure parts: the study's layout, the grid, the search, paired statistics, resumption.

No teacher and no training: runs are fake results, the search scores a lookup table, and every statistic is checked
against numpy written out in the test.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import quality
from pipeline.config import config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quality.yaml"
VARIANTS = (
    "ce_only",
    "kd_only",
    "uniform_kd",
    "shd_kd",
    "shd_pairwise_kd",
    "selective_kd",
    "global_kd",
    "shd_mse_kd",
    "minilm_kd",
)


@pytest.fixture(scope="module")
def shipped() -> tuple[Any, quality.Study]:
    config = load_config(CONFIG)
    return config, quality.read_study(config)


def test_the_shipped_layout(shipped: tuple[Any, quality.Study]) -> None:
    config, study = shipped
    assert tuple(study.variants) == VARIANTS
    assert tuple(study.settings) == ("carved3", "carved2", "scratch3")
    assert [stage.key for stage in study.stages] == [
        "distill.attn.weight",
        "distill.attn.temperature",
        "distill.schedule",
        "distill.layer_map",
        "distill.attn.sink",
    ]
    assert study.stages[0].values == (0.03, 0.1, 0.3, 1.0)
    assert study.stages[-1].values == ("keep", "drop")
    assert study.seeds == (0, 1, 2)
    assert quality.start_assignment(study, config) == {
        "distill.attn.weight": 0.1,
        "distill.attn.temperature": 1.0,
        "distill.schedule": "constant",
        "distill.layer_map": "spread",
        "distill.attn.sink": "keep",
    }
    # every stage's start value is among its candidates: 4 + 1 + 1 + 1 + 1 distinct runs
    assert quality.tuning_run_count(study, quality.start_assignment(study, config)) == 8
    # the cache holds every target and the union of the spread and uniform layers of a 4-layer student
    assert config.cache.layers == sorted({0, 10, 19, 29} | {6, 14, 21, 29})
    assert config.cache.max_samples == config.train.max_steps * config.train.micro_batch_size


def test_the_grid_applies_setting_then_frozen_then_variant(shipped: tuple[Any, quality.Study], tmp_path: Path) -> None:
    config, study = shipped
    frozen = {"distill.attn.weight": 0.3, "distill.layer_map": "uniform", "distill.attn.sink": "keep"}
    specs = quality.grid_specs(
        study, config, frozen, tmp_path, settings=tuple(study.settings), variants=VARIANTS, seeds=study.seeds
    )
    assert len(specs) == 3 * 9 * 3 == len({spec.name for spec in specs})
    assert [spec.seed for spec in specs[:27]] == [0] * 27  # seed-major: an interrupted study has whole seeds
    assert specs[0].name == "carved3-ce_only-seed0"
    by_name = {spec.name: spec for spec in specs}

    def resolved(name: str) -> Any:
        return quality.derive(config, by_name[name].overrides)

    carved = resolved("carved2-kd_only-seed1")
    assert carved.student.init == str(tmp_path / "carved2") and carved.student.num_heads == 2
    assert carved.distill.attn.weight == 0.0  # the variant wins over the frozen weight
    assert carved.distill.layer_map == "uniform"  # the frozen map wins over the setting's carve map
    assert carved.train.seed == 1
    assert not any(text == "student.init=teacher" for spec in specs for text in spec.overrides)
    scratch = resolved("scratch3-shd_kd-seed2")
    assert (
        scratch.student.init == "scratch"
        and scratch.distill.attn.weight == 0.3
        and scratch.distill.attn.squeeze == "shd"
    )
    minilm = resolved("carved3-minilm_kd-seed0")
    assert (minilm.distill.attn.weight, minilm.distill.rel.weight) == (
        0.0,
        0.3,
    )  # relations get the frozen attention weight
    mse = resolved("carved3-shd_mse_kd-seed0")
    assert (mse.distill.attn.loss, mse.distill.attn.weight) == ("mse", 0.3)
    selective = resolved("carved3-selective_kd-seed0")
    assert selective.distill.attn.match == "selective" and selective.distill.attn.weight == 0.3
    # within a seed, variants differ in their own overrides only: same start, data order and budget
    seed0 = [spec for spec in specs if spec.seed == 0 and spec.setting == "carved3"]
    shared = set.intersection(*(set(spec.overrides) for spec in seed0))
    assert {"train.seed=0", f"student.init={tmp_path / 'carved3'}"} <= shared


def test_quick_grid(shipped: tuple[Any, quality.Study], tmp_path: Path) -> None:
    args = argparse.Namespace(
        config=CONFIG, quick=True, work_dir=tmp_path / "work", report_dir=tmp_path / "report", keep_models=False
    )
    ctx = quality.make_context(args)
    assert (ctx.settings, ctx.variants, ctx.seeds) == (("carved3",), ("kd_only", "uniform_kd", "shd_kd"), (0, 1))
    assert ctx.base.train.max_steps == 12 and ctx.base.cache.max_samples == 24
    assert ctx.base.cache.output_dir == str(tmp_path / "work" / "targets")
    specs, tuning, _, lines = quality.plan(ctx)
    assert len(specs) == 6 and tuning == 0
    assert any("6 runs, 6 left" in line for line in lines)


def test_greedy_search_keeps_the_lowest_score_per_stage() -> None:
    stages = (
        quality.Stage("a", "x.a", (1, 2, 3)),
        quality.Stage("b", "x.b", ("p", "q")),
        quality.Stage("c", "x.c", (None, 0.5)),
    )
    table = {
        (1, "p", None): 9.0,
        (2, "p", None): 5.0,
        (3, "p", None): 7.0,
        (2, "q", None): 5.0,  # a tie keeps the current value p
        (2, "p", 0.5): 4.0,
    }
    asked: list[tuple] = []

    def score(assignment: dict[str, Any]) -> float:
        key = (assignment["x.a"], assignment["x.b"], assignment["x.c"])
        asked.append(key)
        return table[key]

    chosen, rows = quality.greedy_search(stages, {"x.a": 1, "x.b": "p", "x.c": None}, score)
    assert chosen == {"x.a": 2, "x.b": "p", "x.c": 0.5}
    assert [(row.key, row.value, row.score, row.chosen) for row in rows] == [
        ("x.a", 1, 9.0, False),
        ("x.a", 2, 5.0, True),
        ("x.a", 3, 7.0, False),
        ("x.b", "p", 5.0, True),
        ("x.b", "q", 5.0, False),
        ("x.c", None, 5.0, False),
        ("x.c", 0.5, 4.0, True),
    ]
    study = quality.Study({}, {}, stages, (0,), ())
    assert len(set(asked)) == quality.tuning_run_count(study, {"x.a": 1, "x.b": "p", "x.c": None}) == 5


def test_tuning_runs_are_named_by_their_assignment(shipped: tuple[Any, quality.Study], tmp_path: Path) -> None:
    config, study = shipped
    start = quality.start_assignment(study, config)
    spec = quality.tuning_spec(study, start, tmp_path)
    assert spec.name == quality.tuning_spec(study, dict(start), tmp_path).name
    assert spec.name == ("tune-w_attn=0.1,attn_temperature=1.0,attn_schedule=constant,layer_map=spread,attn_sink=keep")
    other = quality.tuning_spec(study, {**start, "distill.attn.temperature": 2.0}, tmp_path)
    assert other.name != spec.name
    tuned = quality.derive(config, other.overrides)
    assert tuned.distill.attn.temperature == 2.0 and tuned.student.init == str(tmp_path / "carved3")
    assert tuned.distill.attn.squeeze == "shd" and tuned.train.seed == 0 and tuned.student.num_heads == 3


def _result(setting: str, variant: str, seed: int, ppl: float, stage: str = "grid") -> dict[str, Any]:
    return {
        "name": quality.run_name(setting, variant, seed),
        "stage": stage,
        "setting": setting,
        "variant": variant,
        "seed": seed,
        "overrides": [],
        "mlflow_run_id": f"id-{setting}-{variant}-{seed}",
        "metrics": {"test/ppl": ppl, "test/top1_agreement": 0.2, "test/attn_kl": 2.0},
        "max_grad_norm": 3.0,
        "train_seconds": 60.0,
        "eval_seconds": 10.0,
        "steps": 24,
        "step_seconds_median": 2.0,
        "curves": {},
    }


def test_paired_statistics_match_numpy() -> None:
    rng = np.random.default_rng(3)
    base = rng.uniform(300, 900, size=4)
    other = base + rng.normal(0, 40, size=4)
    results = [_result("carved3", "kd_only", seed, value) for seed, value in enumerate(base)]
    results += [_result("carved3", "shd_kd", seed, value) for seed, value in enumerate(other[:3])]  # seed 3 missing
    results.append(_result("carved2", "shd_kd", 3, 1.0))  # another setting: never paired with carved3
    results.append(_result("carved3", "shd_kd", 3, 1.0, stage="tune"))  # a tuning run: never part of the grid
    pair = quality.paired(results, "carved3", "shd_kd", "kd_only", "test/ppl")
    deltas = other[:3] - base[:3]
    assert pair.seeds == (0, 1, 2)
    np.testing.assert_allclose(pair.deltas, deltas, rtol=0, atol=1e-12)
    mean, std, count = quality.mean_std(pair.deltas)
    assert count == 3
    assert mean == pytest.approx(deltas.sum() / 3, abs=1e-12)
    assert std == pytest.approx(np.sqrt(((deltas - deltas.mean()) ** 2).sum() / 2), abs=1e-12)
    assert pair.wins == int((deltas < 0).sum())
    assert quality.mean_std([5.0]) == (5.0, 0.0, 1)
    assert quality.mean_std([float("nan"), 2.0, 4.0])[:2] == (3.0, pytest.approx(np.sqrt(2.0)))


def test_the_setting_table_shows_mean_std_and_the_paired_comparison() -> None:
    results = [_result("carved3", "kd_only", seed, value) for seed, value in enumerate((500.0, 520.0, 540.0))]
    results += [_result("carved3", "shd_kd", seed, value) for seed, value in enumerate((510.0, 515.0, 560.0))]
    rows = quality.setting_table(results, "carved3", ("ce_only", "kd_only", "shd_kd"))
    assert len(rows) == 4  # header, rule, kd_only, shd_kd (ce_only has no runs)
    deltas = np.array([10.0, -5.0, 20.0])
    assert rows[2].startswith("| kd_only | 3 | 520 ± 20 |") and "(baseline)" in rows[2]
    expected = f"{deltas.mean():+.4g} ± {deltas.std(ddof=1):.2g} | 1/3 |"
    assert rows[3].startswith(f"| shd_kd | 3 | {np.mean([510, 515, 560]):.4g} ± ") and rows[3].endswith(expected)


def test_timing_estimate_from_finished_runs() -> None:
    results = [_result("carved3", "kd_only", seed, 1.0) for seed in range(3)]
    results[1]["train_seconds"] = 100.0  # overheads 70 − 48 = 22, 110 − 48 = 62, 22: median 22
    timing = quality.measured_timing(results, "here")
    assert (timing.step_s, timing.overhead_s) == (2.0, 22.0)
    assert quality.estimate_seconds(10, 24, timing) == 10 * (24 * 2.0 + 22.0)
    assert quality.measured_timing([], "here") is None
    assert quality.format_duration(3 * 3600 + 7 * 60) == "3 h 07 min"


@pytest.fixture
def context(tmp_path: Path) -> quality.Context:
    args = argparse.Namespace(
        config=CONFIG, quick=True, work_dir=tmp_path / "work", report_dir=tmp_path / "report", keep_models=False
    )
    ctx = quality.make_context(args)
    ctx.base = quality.derive(ctx.base, [f"teacher.path={tmp_path / 'no-teacher'}"])  # none of these reads it
    return ctx


def test_a_finished_run_is_skipped(context: quality.Context, monkeypatch: pytest.MonkeyPatch) -> None:
    done, todo = quality.grid_specs(
        context.study,
        context.base,
        {},
        context.students_dir,
        settings=("carved3",),
        variants=("kd_only",),
        seeds=(0, 1),
    )
    finished = {**_result("carved3", "kd_only", 0, 700.0), "overrides": list(done.overrides)}
    quality.write_result(context.results_dir, finished)
    leftover = context.runs_dir / done.name / "checkpoints"
    leftover.mkdir(parents=True)  # killed after its result was written, before the clean-up
    trained: list[str] = []

    def execute(ctx: quality.Context, spec: quality.RunSpec) -> dict[str, Any]:
        trained.append(spec.name)
        return {**_result("carved3", "kd_only", spec.seed, 650.0), "overrides": list(spec.overrides)}

    monkeypatch.setattr(quality, "execute", execute)
    runner = quality.Runner(context, 2)
    try:
        assert runner.run(done)["metrics"]["test/ppl"] == 700.0
        assert runner.run(todo)["metrics"]["test/ppl"] == 650.0
        assert runner.run(done)["metrics"]["test/ppl"] == 700.0  # the search asks for a kept value again
    finally:
        runner.close()
    assert trained == [todo.name]
    assert runner.progress.n == 2  # each run counts once
    assert not leftover.exists()


def test_a_result_of_other_overrides_is_refused(context: quality.Context) -> None:
    (spec,) = quality.grid_specs(
        context.study, context.base, {}, context.students_dir, settings=("carved3",), variants=("shd_kd",), seeds=(0,)
    )
    path = quality.write_result(context.results_dir, {**_result("carved3", "shd_kd", 0, 1.0), "overrides": ["x.y=1"]})
    before = path.read_text()
    with pytest.raises(quality.StudyError, match=r"carved3-shd_kd-seed0\.json: made with overrides \['x\.y=1'\]"):
        quality.load_result(context.results_dir, spec)
    path.write_text("{not json")
    with pytest.raises(quality.StudyError, match=r"carved3-shd_kd-seed0\.json: not a readable result"):
        quality.load_result(context.results_dir, spec)
    assert path.read_text() == "{not json" != before  # nothing rewritten behind the user's back
    assert quality.load_result(context.results_dir, quality.RunSpec("other", "grid", "a", "b", 0, ())) is None


def test_an_interrupted_run_is_discarded(context: quality.Context) -> None:
    spec = quality.RunSpec("carved3-kd_only-seed0", "grid", "carved3", "kd_only", 0, ())
    directory = context.runs_dir / spec.name
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("{}\n")
    quality.discard_unfinished(context, spec)
    assert not directory.exists()


@pytest.mark.parametrize(
    ("entry", "overrides", "named"),
    [
        ("tune.mixed", ["distill.attn.weight=0.1", "distill.attn.temperature=2"], "run.variants.tune.mixed"),
        ("tune.again", ["distill.attn.weight=0.5"], "run.variants.tune.again: distill.attn.weight is already tuned"),
        ("seeds", ["train.lr=0.1"], "run.variants.seeds: got ['train.lr=0.1'], expected train.seed=<int>"),
        ("seeds", ["train.seed=1", "train.seed=1"], "expected distinct seeds"),
    ],
)
def test_layout_errors_name_the_entry(entry: str, overrides: list[str], named: str) -> None:
    values = load_config(CONFIG).to_dict()
    values["run"]["variants"] = {**values["run"]["variants"], entry: overrides}
    with pytest.raises(quality.StudyError) as error:
        quality.read_study(config_from_dict(values))
    assert named in str(error.value)


def test_the_baseline_must_be_a_variant() -> None:
    values = load_config(CONFIG).to_dict()
    del values["run"]["variants"]["kd_only"]
    with pytest.raises(quality.StudyError, match="no variant 'kd_only'"):
        quality.read_study(config_from_dict(values))


def test_overrides_round_trip() -> None:
    for key, value in (("distill.attn.sink", "keep"), ("distill.attn.weight", 0.03), ("distill.layer_map", "uniform")):
        assert quality.parse_override(quality.format_override(key, value)) == (key, value)
    assert quality.parse_override("cache.layers=[0, 10]") == ("cache.layers", [0, 10])
    with pytest.raises(quality.StudyError, match=r"'w_attn': expected section\.key=value"):
        quality.parse_override("w_attn")
    with pytest.raises(quality.StudyError, match=r"'distill\.layer_map=\[0, 10': value is not valid YAML"):
        quality.parse_override("distill.layer_map=[0, 10")


def test_the_report_from_finished_results(context: quality.Context, caplog: pytest.LogCaptureFixture) -> None:
    specs = quality.grid_specs(
        context.study,
        context.base,
        {},
        context.students_dir,
        settings=context.settings,
        variants=context.variants,
        seeds=context.seeds,
    )
    test_ppl = {("kd_only", 0): 600.0, ("kd_only", 1): 640.0, ("uniform_kd", 0): 590.0}
    test_ppl |= {("uniform_kd", 1): 650.0, ("shd_kd", 0): 580.0, ("shd_kd", 1): 630.0}
    for spec in specs:
        result = {**_result(spec.setting, spec.variant, spec.seed, test_ppl[spec.variant, spec.seed])}
        curve = [(step, 1e8 if step == 0 else 1000.0 - step - spec.seed) for step in range(0, 13, 3)]
        result["curves"] = {"eval/ppl": curve, "train/grad_norm": [(step, 300.0 / step) for step in range(1, 13)]}
        quality.write_result(context.results_dir, {**result, "overrides": list(spec.overrides)})
    index = quality.write_report(context, specs, {}, [], ["the plan"])
    text = index.read_text()
    deltas = np.array([580.0 - 600.0, 630.0 - 640.0])
    assert "| shd_kd | 2 | 605 ± 35 |" in text
    assert f"{deltas.mean():+.4g} ± {deltas.std(ddof=1):.2g} | 2/2 |" in text
    assert "uniform_kd | 2 | 620 ± 42 |" in text and "| +0 ± 14 | 1/2 |" in text
    assert "Validation ppl before the first update (every variant of a seed starts there" in text
    for stem in ("val-ppl", "val-ppl-delta", "grad-norm"):
        assert f"(figures/carved3-{stem}.png)" in text
        assert (index.parent / "figures" / f"carved3-{stem}.png").is_file()
    rows = (index.parent / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(specs)
    # no MLflow store in this work dir: the comparison fails, is logged with its error, and the report stands
    assert "`compare_runs` failed: CompareError: no MLflow store" in text
    assert "distill compare of carved3 failed" in caplog.text
    assert "Teacher: smollm2 (" in text and "its config cannot be read" in text
