"""`distill study`'s pure parts (`pipeline/study/`): the `study:` layout and its errors, the grid, the search, paired
statistics, resumption, the report and its MLflow summary run, the command line.

No teacher and no training: runs are fake results, the search scores a lookup table, and every statistic is checked
against numpy written out in the test.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline import cli
from pipeline.study import grid, layout, plan, report, results, runner, search, stats, tables
from pipeline.study.layout import StudyError
from pipeline.study.workspace import Context, open_study

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
def shipped() -> tuple[Any, layout.Study]:
    study, config = layout.load_study(CONFIG)
    return config, study


def test_the_shipped_layout(shipped: tuple[Any, layout.Study]) -> None:
    config, study = shipped
    assert tuple(study.variants) == VARIANTS and study.baseline == "kd_only"
    assert tuple(study.settings) == ("carved3", "carved2", "scratch3")
    assert (study.tune_setting, study.tune_variant) == ("carved3", "shd_kd")
    assert [stage.key for stage in study.stages] == [
        "distill.attn.weight",
        "distill.attn.temperature",
        "distill.schedule",
        "distill.layer_map",
        "distill.attn.sink",
    ]
    assert [stage.name for stage in study.stages] == [
        "attn.weight",
        "attn.temperature",
        "schedule",
        "layer_map",
        "attn.sink",
    ]
    assert study.stages[0].values == (0.03, 0.1, 0.3, 1.0)
    assert study.stages[-1].values == ("keep", "drop")
    assert study.seeds == (0, 1, 2)
    assert grid.start_assignment(study, config) == {
        "distill.attn.weight": 0.1,
        "distill.attn.temperature": 1.0,
        "distill.schedule": "constant",
        "distill.layer_map": "spread",
        "distill.attn.sink": "keep",
    }
    # every stage's start value is among its candidates: 4 + 1 + 1 + 1 + 1 distinct runs
    assert search.tuning_run_count(study, grid.start_assignment(study, config)) == 8
    # the cache holds every target and the union of the spread and uniform layers of a 4-layer student
    assert config.cache.layers == sorted({0, 10, 19, 29} | {6, 14, 21, 29})
    assert config.cache.max_samples == config.train.max_steps * config.train.micro_batch_size
    assert not config.run.variants  # the grid is the study's, not `distill run`'s
    assert (study.work_dir, study.report_dir, study.budget_minutes) == ("work/quality", "reports/quality", 150)


def test_the_chat_study_runs_ten_times_the_budget_on_replies(tmp_path: Path) -> None:
    """configs/quality-chat.yaml: ShareGPT chat, 240 steps × 4 × 256 per run (ten times quality.yaml's 24), carved3 ×
    six objectives and carved2 × two, three seeds, the attention weight searched, ROUGE-L scored; --quick: two runs."""
    chat_config = REPO / "configs" / "quality-chat.yaml"
    study, config = layout.load_study(chat_config)
    _, text = layout.load_study(CONFIG)
    assert (config.data.format, config.data.sources, config.data.test_fraction > 0) == ("chat", ["sharegpt"], True)
    tokens = config.train.max_steps * config.train.micro_batch_size * config.data.seq_len
    assert tokens == 10 * text.train.max_steps * text.train.micro_batch_size * text.data.seq_len
    assert config.cache.max_samples == config.train.max_steps * config.train.micro_batch_size
    assert config.train.generations > 0
    assert [stage.key for stage in study.stages] == ["distill.attn.weight"]
    specs = grid.grid_specs(
        study, config, {}, tmp_path, settings=tuple(study.settings), variants=tuple(study.variants), seeds=study.seeds
    )
    by_setting = {setting: {spec.variant for spec in specs if spec.setting == setting} for setting in study.settings}
    assert by_setting == {
        "carved3": {"ce_only", "kd_only", "shd_kd", "uniform_kd", "selective_kd", "minilm_kd"},
        "carved2": {"kd_only", "shd_kd"},
    }
    assert len(specs) == 8 * 3
    ctx = open_study(chat_config, quick=True, work=tmp_path / "work", report=tmp_path / "report")
    assert len(plan.make_plan(ctx).specs) == 2


def test_the_grid_applies_setting_then_frozen_then_variant(shipped: tuple[Any, layout.Study], tmp_path: Path) -> None:
    config, study = shipped
    frozen = {"distill.attn.weight": 0.3, "distill.layer_map": "uniform", "distill.attn.sink": "keep"}
    specs = grid.grid_specs(
        study, config, frozen, tmp_path, settings=tuple(study.settings), variants=VARIANTS, seeds=study.seeds
    )
    assert len(specs) == 3 * 9 * 3 == len({spec.name for spec in specs})
    assert [spec.seed for spec in specs[:27]] == [0] * 27  # seed-major: an interrupted study has whole seeds
    assert specs[0].name == "carved3-ce_only-seed0"
    by_name = {spec.name: spec for spec in specs}

    def resolved(name: str) -> Any:
        return layout.derive(config, by_name[name].overrides)

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


def test_quick_grid(tmp_path: Path) -> None:
    ctx = open_study(CONFIG, quick=True, work=tmp_path / "work", report=tmp_path / "report")
    assert (ctx.settings, ctx.variants, ctx.seeds) == (("carved3",), ("kd_only", "uniform_kd", "shd_kd"), (0, 1))
    assert ctx.base.train.max_steps == 12 and ctx.base.cache.max_samples == 24
    assert ctx.base.cache.output_dir == str(tmp_path / "work" / "targets")
    assert ctx.base.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    assert (ctx.grid_experiment, ctx.tuning_experiment) == ("quality", "quality-tuning")
    laid_out = plan.make_plan(ctx)
    assert len(laid_out.specs) == 6 and laid_out.tuning_runs == 0
    assert any("6 runs, 6 left" in line for line in laid_out.lines)


def test_default_directories_and_user_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    quick = open_study(CONFIG, quick=True, overrides=["train.lr=0.001"])
    assert (quick.work, quick.report) == (Path("work/quality-quick"), Path("reports/quality-quick"))
    assert quick.other_work == Path("work/quality")  # its finished runs time the plan before this mode's do
    assert quick.base.train.lr == 0.001 and quick.base.train.max_steps == 12  # the user's overrides come last
    full = open_study(CONFIG)
    assert (full.work, full.report) == (Path("work/quality"), Path("reports/quality"))
    assert full.base.train.max_steps == 24


def test_greedy_search_keeps_the_lowest_score_per_stage() -> None:
    stages = (
        layout.Stage("a", "x.a", (1, 2, 3)),
        layout.Stage("b", "x.b", ("p", "q")),
        layout.Stage("c", "x.c", (None, 0.5)),
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

    chosen, rows = search.greedy_search(stages, {"x.a": 1, "x.b": "p", "x.c": None}, score)
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
    study = layout.Study({}, {}, stages, (0,), None, "kd_only")
    assert len(set(asked)) == search.tuning_run_count(study, {"x.a": 1, "x.b": "p", "x.c": None}) == 5


def test_tuning_runs_are_named_by_their_assignment(shipped: tuple[Any, layout.Study], tmp_path: Path) -> None:
    config, study = shipped
    start = grid.start_assignment(study, config)
    spec = grid.tuning_spec(study, start, tmp_path)
    assert spec.name == grid.tuning_spec(study, dict(start), tmp_path).name
    assert spec.name == ("tune-attn.weight=0.1,attn.temperature=1.0,schedule=constant,layer_map=spread,attn.sink=keep")
    other = grid.tuning_spec(study, {**start, "distill.attn.temperature": 2.0}, tmp_path)
    assert other.name != spec.name
    tuned = layout.derive(config, other.overrides)
    assert tuned.distill.attn.temperature == 2.0 and tuned.student.init == str(tmp_path / "carved3")
    assert tuned.distill.attn.squeeze == "shd" and tuned.train.seed == 0 and tuned.student.num_heads == 3


def _result(setting: str, variant: str, seed: int, ppl: float, stage: str = "grid") -> dict[str, Any]:
    return {
        "name": grid.run_name(setting, variant, seed),
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
    found = [_result("carved3", "kd_only", seed, value) for seed, value in enumerate(base)]
    found += [_result("carved3", "shd_kd", seed, value) for seed, value in enumerate(other[:3])]  # seed 3 missing
    found.append(_result("carved2", "shd_kd", 3, 1.0))  # another setting: never paired with carved3
    found.append(_result("carved3", "shd_kd", 3, 1.0, stage="tune"))  # a tuning run: never part of the grid
    pair = stats.paired(found, "carved3", "shd_kd", "kd_only", "test/ppl")
    deltas = other[:3] - base[:3]
    assert pair.seeds == (0, 1, 2)
    np.testing.assert_allclose(pair.deltas, deltas, rtol=0, atol=1e-12)
    mean, std, count = stats.mean_std(pair.deltas)
    assert count == 3
    assert mean == pytest.approx(deltas.sum() / 3, abs=1e-12)
    assert std == pytest.approx(np.sqrt(((deltas - deltas.mean()) ** 2).sum() / 2), abs=1e-12)
    assert pair.wins == int((deltas < 0).sum())
    assert stats.mean_std([5.0]) == (5.0, 0.0, 1)
    assert stats.mean_std([float("nan"), 2.0, 4.0])[:2] == (3.0, pytest.approx(np.sqrt(2.0)))


def test_the_setting_table_shows_mean_std_and_the_paired_comparison() -> None:
    found = [_result("carved3", "kd_only", seed, value) for seed, value in enumerate((500.0, 520.0, 540.0))]
    found += [_result("carved3", "shd_kd", seed, value) for seed, value in enumerate((510.0, 515.0, 560.0))]
    rows = tables.setting_table(found, "carved3", ("ce_only", "kd_only", "shd_kd"), "kd_only")
    assert len(rows) == 4  # header, rule, kd_only, shd_kd (ce_only has no runs)
    deltas = np.array([10.0, -5.0, 20.0])
    assert rows[2].startswith("| kd_only | 3 | 520 ± 20 |") and "(baseline)" in rows[2]
    expected = f"{deltas.mean():+.4g} ± {deltas.std(ddof=1):.2g} | 1/3 |"
    assert rows[3].startswith(f"| shd_kd | 3 | {np.mean([510, 515, 560]):.4g} ± ") and rows[3].endswith(expected)
    # another baseline: the comparison column follows it
    rows = tables.setting_table(found, "carved3", ("kd_only", "shd_kd"), "shd_kd")
    assert (
        "Δppl vs shd_kd" in rows[0]
        and "(baseline)" in rows[3]
        and rows[2].endswith(f"{-deltas.mean():+.4g} ± 13 | 2/3 |")
    )


def test_timing_estimate_from_finished_runs() -> None:
    found = [_result("carved3", "kd_only", seed, 1.0) for seed in range(3)]
    found[1]["train_seconds"] = 100.0  # overheads 70 − 48 = 22, 110 − 48 = 62, 22: median 22
    timing = stats.measured_timing(found, "here")
    assert (timing.step_s, timing.overhead_s) == (2.0, 22.0)
    assert stats.estimate_seconds(10, 24, timing) == 10 * (24 * 2.0 + 22.0)
    assert stats.measured_timing([], "here") is None
    assert stats.format_duration(3 * 3600 + 7 * 60) == "3 h 07 min"


@pytest.fixture
def context(tmp_path: Path) -> Context:
    ctx = open_study(CONFIG, quick=True, work=tmp_path / "work", report=tmp_path / "report")
    ctx.base = layout.derive(ctx.base, [f"teacher.path={tmp_path / 'no-teacher'}"])  # none of these reads it
    return ctx


def test_a_finished_run_is_skipped(context: Context) -> None:
    done, todo = grid.grid_specs(
        context.study,
        context.base,
        {},
        context.students_dir,
        settings=("carved3",),
        variants=("kd_only",),
        seeds=(0, 1),
    )
    finished = {**_result("carved3", "kd_only", 0, 700.0), "overrides": list(done.overrides)}
    results.write_result(context.results_dir, finished)
    leftover = context.runs_dir / done.name / "checkpoints"
    leftover.mkdir(parents=True)  # killed after its result was written, before the clean-up
    trained: list[str] = []

    def execute(ctx: Context, spec: grid.RunSpec) -> dict[str, Any]:
        trained.append(spec.name)
        return {**_result("carved3", "kd_only", spec.seed, 650.0), "overrides": list(spec.overrides)}

    runs = runner.Runner(context, 2, execute=execute)
    try:
        assert runs.run(done)["metrics"]["test/ppl"] == 700.0
        assert runs.run(todo)["metrics"]["test/ppl"] == 650.0
        assert runs.run(done)["metrics"]["test/ppl"] == 700.0  # the search asks for a kept value again
    finally:
        runs.close()
    assert trained == [todo.name]
    assert runs.progress.n == 2  # each run counts once
    assert not leftover.exists()


def test_a_result_of_other_overrides_is_refused(context: Context) -> None:
    (spec,) = grid.grid_specs(
        context.study, context.base, {}, context.students_dir, settings=("carved3",), variants=("shd_kd",), seeds=(0,)
    )
    path = results.write_result(context.results_dir, {**_result("carved3", "shd_kd", 0, 1.0), "overrides": ["x.y=1"]})
    before = path.read_text()
    with pytest.raises(StudyError, match=r"carved3-shd_kd-seed0\.json: made with overrides \['x\.y=1'\]"):
        results.load_result(context.results_dir, spec)
    path.write_text("{not json")
    with pytest.raises(StudyError, match=r"carved3-shd_kd-seed0\.json: not a readable result"):
        results.load_result(context.results_dir, spec)
    assert path.read_text() == "{not json" != before  # nothing rewritten behind the user's back
    assert results.load_result(context.results_dir, grid.RunSpec("other", "grid", "a", "b", 0, ())) is None


def test_an_interrupted_run_is_discarded(context: Context) -> None:
    spec = grid.RunSpec("carved3-kd_only-seed0", "grid", "carved3", "kd_only", 0, ())
    directory = context.runs_dir / spec.name
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("{}\n")
    runner.discard_unfinished(context, spec)
    assert not directory.exists()


def _section() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())["study"]


def _edit(section: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key of the study section (`tune.stages`), or delete it when `value` is `...`."""
    *parents, last = key.split(".")
    node = section
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        (
            "tune.stages",
            [{"distill.attn.weight": [0.1], "distill.attn.temperature": [2]}],
            "study.tune.stages[0]: got {",
        ),
        (
            "tune.stages",
            [{"distill.attn.weight": [0.1]}, {"distill.attn.weight": [0.5]}],
            "study.tune.stages[1]: distill.attn.weight is already",
        ),
        ("tune.stages", [{"distill.w_atn": [0.1]}], "study.tune.stages[0]: 'distill.w_atn' is no config key"),
        ("tune.stages", [{"distill.attn.sink": ["keep", "never"]}], "study.tune.stages[0].distill.attn.sink: "),
        ("tune.setting", "carved9", "study.tune.setting: got 'carved9', expected one of study.settings"),
        ("tune.steps", 3, "study.tune.steps: unknown key"),
        ("seeds", ["train.seed=1"], "study.seeds: got ['train.seed=1'], expected a list of train.seed integers"),
        ("seeds", [1, 1], "study.seeds: got [1, 1], expected distinct seeds"),
        ("variants.kd_only", ["distill.w_atn=0"], "study.variants.kd_only: unknown key 'distill.w_atn'"),
        (
            "variants.kd_only",
            "distill.attn.weight=0",
            "study.variants.kd_only: got 'distill.attn.weight=0', expected a list",
        ),
        ("settings.carved3", ["student.num_heads=two"], "study.settings.carved3: student.num_heads: got 'two'"),
        ("settings", {}, "study.settings: got {}, expected a mapping of name"),
        ("quick.variants", ["kd_only", "best_kd"], "study.quick.variants: got ['kd_only', 'best_kd'], expected names"),
        ("quick.seeds", 4, "study.quick.seeds: got 4, expected how many of the first seeds to run (1 to 3)"),
        ("quick.overrides", ["train.max_step=3"], "study.quick.overrides: unknown key 'train.max_step'"),
        ("seed", [0], "study.seed: unknown key; expected one of baseline, variants"),
        ("budget_minutes", -1, "study.budget_minutes: got -1"),
        ("setting_variants", {"carved9": ["kd_only"]}, "study.setting_variants: got 'carved9', expected a setting"),
        ("setting_variants", {"carved2": ["best_kd"]}, "study.setting_variants.carved2: got ['best_kd'], expected"),
        (
            "setting_variants",
            {"carved2": ["shd_kd"]},
            "study.setting_variants.carved2: got ['shd_kd'], expected a list that includes the baseline 'kd_only'",
        ),
    ],
)
def test_layout_errors_name_the_key(key: str, value: Any, named: str) -> None:
    section = _section()
    _edit(section, key, value)
    _, values = layout.split_study_file(CONFIG)
    with pytest.raises(StudyError) as error:
        layout.read_study(section, layout.load_base(CONFIG, values))
    assert named in str(error.value)


def test_a_setting_runs_only_its_setting_variants(tmp_path: Path) -> None:
    """`study.setting_variants` narrows one setting's variants; the others keep every variant; the plan counts the
    runs that remain."""
    section = _section()
    section["setting_variants"] = {"carved2": ["kd_only", "shd_kd"]}
    _, values = layout.split_study_file(CONFIG)
    base = layout.load_base(CONFIG, values)
    study = layout.read_study(section, base)
    specs = grid.grid_specs(
        study, base, {}, tmp_path, settings=tuple(study.settings), variants=VARIANTS, seeds=study.seeds
    )
    assert len(specs) == (9 + 2 + 9) * 3
    assert {spec.variant for spec in specs if spec.setting == "carved2"} == {"kd_only", "shd_kd"}
    assert {spec.variant for spec in specs if spec.setting == "carved3"} == set(VARIANTS)


def test_the_setting_table_shows_rouge_l_where_runs_scored_it() -> None:
    found = [_result("carved3", "kd_only", seed, 500.0 + seed) for seed in range(2)]
    for result, rouge in zip(found, (0.2, 0.3), strict=True):
        result["metrics"]["test/rougeL"] = rouge
    rows = tables.setting_table(found, "carved3", ("kd_only",), "kd_only")
    assert "| ROUGE-L (test) |" in rows[0] and rows[1].count("|") == rows[0].count("|")
    assert f"| {np.mean([0.2, 0.3]):.3g} ± {np.std([0.2, 0.3], ddof=1):.2g} |" in rows[2]
    assert (
        "ROUGE-L"
        not in tables.setting_table([_result("carved3", "kd_only", 0, 500.0)], "carved3", ("kd_only",), "kd_only")[0]
    )


def test_the_baseline_must_be_a_variant() -> None:
    section = _section()
    del section["variants"]["kd_only"]
    _, values = layout.split_study_file(CONFIG)
    with pytest.raises(StudyError, match=r"study\.baseline: no variant 'kd_only'"):
        layout.read_study(section, layout.load_base(CONFIG, values))


def test_a_study_without_search_or_quick(tmp_path: Path) -> None:
    document = yaml.safe_load(CONFIG.read_text())
    for key in ("tune", "quick", "work_dir", "report_dir", "budget_minutes"):
        del document["study"][key]
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(document))
    study, _ = layout.load_study(path)
    assert (study.stages, study.tune_setting, study.quick) == ((), None, None)
    ctx = open_study(path, work=tmp_path / "work")
    assert search.frozen_choice(ctx, None) == ({}, [])
    assert any("tuning: none (no study.tune.stages" in line for line in plan.make_plan(ctx).lines)
    with pytest.raises(StudyError, match=r"mine\.yaml: study\.quick: missing; --quick needs"):
        open_study(path, quick=True)


def test_a_mistake_exits_2_naming_the_file_and_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.study import stage

    monkeypatch.setattr(stage, "configure_logs", lambda *args: None)  # the study's log levels outlive a test
    document = yaml.safe_load(CONFIG.read_text())
    document["study"]["tune"]["variant"] = "shd"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(document))
    with caplog.at_level(logging.ERROR):
        assert cli.main(["study", str(path), "--plan"]) == 2
    assert "broken.yaml: study.tune.variant: got 'shd', expected one of study.variants" in caplog.text
    del document["study"]
    path.write_text(yaml.safe_dump(document))
    assert cli.main(["study", str(path), "--plan"]) == 2
    assert "broken.yaml: study: got None, expected a mapping" in caplog.text


def test_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.study import stage

    calls: list[tuple] = []
    monkeypatch.setattr(stage, "study_stage", lambda *args, **kwargs: calls.append((args, kwargs)))
    argv = ["study", "C", "--quick", "--work-dir", "W", "train.lr=1", "--report", "R", "--log-level", "DEBUG"]
    assert cli.main(argv) == 0
    [(args, kwargs)] = calls
    assert args == (Path("C"), ["train.lr=1"])
    assert kwargs == {
        "quick": True,
        "plan": False,
        "report_only": False,
        "work": Path("W"),
        "report": Path("R"),
        "keep_models": False,
        "run_logs": False,
        "log_level": "DEBUG",
    }
    command = stage.study_command(
        Path("C"), ["train.lr=1"], quick=True, report_only=False, work=Path("W"), report=None, keep_models=False
    )
    assert command == "distill study C train.lr=1 --quick --work W"


def test_overrides_round_trip() -> None:
    for key, value in (("distill.attn.sink", "keep"), ("distill.attn.weight", 0.03), ("distill.layer_map", "uniform")):
        assert layout.parse_override(layout.format_override(key, value)) == (key, value)
    assert layout.parse_override("cache.layers=[0, 10]") == ("cache.layers", [0, 10])
    with pytest.raises(StudyError, match=r"'w_attn': expected section\.key=value"):
        layout.parse_override("w_attn")
    with pytest.raises(StudyError, match=r"'distill\.layer_map=\[0, 10': value is not valid YAML"):
        layout.parse_override("distill.layer_map=[0, 10")


def _finished_quick_grid(context: Context) -> list[grid.RunSpec]:
    specs = grid.grid_specs(
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
        results.write_result(context.results_dir, {**result, "overrides": list(spec.overrides)})
    return specs


def test_the_report_from_finished_results(context: Context, caplog: pytest.LogCaptureFixture) -> None:
    specs = _finished_quick_grid(context)
    index = report.write_report(context, specs, {}, [], ["the plan"])
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


def test_the_report_is_logged_to_a_summary_run(context: Context) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.reports.runs import SUMMARY_TAG

    context.work.mkdir(parents=True)
    client = MlflowClient(tracking_uri=context.tracking_uri)
    artifacts = (context.work / "artifacts").as_uri()  # not ./mlruns of the working directory
    experiment_id = client.create_experiment(context.grid_experiment, artifact_location=artifacts)
    specs = _finished_quick_grid(context)
    index = report.write_report(context, specs, {}, [], ["the plan"])
    [summary] = client.search_runs([experiment_id], f"tags.`{SUMMARY_TAG}` = 'true'")
    assert summary.info.run_name.startswith("study-quick-") and summary.data.tags["distill.study"] == "quick"
    metrics = summary.data.metrics
    assert metrics["test_ppl/carved3/shd_kd"] == pytest.approx(605.0)
    assert metrics["delta_ppl/carved3/shd_kd"] == pytest.approx(-15.0)
    assert metrics["delta_ppl/carved3/uniform_kd"] == pytest.approx(0.0)
    assert "delta_ppl/carved3/kd_only" not in metrics  # the baseline has no Δ from itself
    assert "| shd_kd | 2 | 605 ± 35 |" in summary.data.tags["mlflow.note.content"]
    logged = {entry.path for entry in client.list_artifacts(summary.info.run_id)}
    assert {"index.md", "results.csv", "figures"} <= logged
    assert index.is_file()


def test_every_module_has_one_job() -> None:
    """Issue 22: no module of the study over ~450 lines."""
    package = REPO / "pipeline" / "study"
    sizes = {path.name: len(path.read_text().splitlines()) for path in package.glob("*.py")}
    assert max(sizes.values()) <= 450, sizes


def _tiny_study(root: Path) -> Path:
    """configs/tiny.yaml as a study: one carved setting, KD with and without SHD, two seeds, a one-stage search."""
    document = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    del document["run"]
    document["teacher"]["path"] = str(root / "teacher")
    document["data"].update(output_dir=str(root / "data"), test_fraction=0.1)
    document["cache"]["head_counts"] = [3]
    document["train"].update(max_steps=4, eval_every=2, save_every=0)
    document["study"] = {
        "baseline": "kd_only",
        "variants": {"kd_only": ["distill.attn.weight=0"], "shd_kd": []},
        "settings": {"carved3": ["student.init=teacher", "student.num_heads=3", "student.carve.heads=merge"]},
        "seeds": [0, 1],
        "tune": {"setting": "carved3", "variant": "shd_kd", "stages": [{"distill.attn.weight": [0.5, 1.0]}]},
        "work_dir": str(root / "work"),
        "report_dir": str(root / "report"),
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _distill_study(config: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "pipeline.cli", "study", str(config)]
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_a_tiny_study_end_to_end_then_resumed(tmp_path: Path) -> None:
    config = _tiny_study(tmp_path)
    first = _distill_study(config)
    assert "1 stages, 2 runs on carved3/shd_kd/seed 0 (validation split), 2 left" in first.stdout
    names = {path.stem for path in (tmp_path / "work" / "results").glob("*.json")}
    grid_names = {f"carved3-{variant}-seed{seed}" for variant in ("kd_only", "shd_kd") for seed in (0, 1)}
    assert names == grid_names | {"tune-attn.weight=0.5", "tune-attn.weight=1.0"}
    frozen = json.loads((tmp_path / "work" / "frozen.json").read_text())
    assert frozen["values"]["distill.attn.weight"] in (0.5, 1.0) and len(frozen["rows"]) == 2
    grid_result = json.loads((tmp_path / "work" / "results" / "carved3-shd_kd-seed1.json").read_text())
    assert grid_result["stage"] == "grid" and grid_result["steps"] == 4 and grid_result["metrics"]["test/ppl"] > 1
    assert f"distill.attn.weight={json.dumps(frozen['values']['distill.attn.weight'])}" in grid_result["overrides"]
    assert not (tmp_path / "work" / "runs" / "carved3-shd_kd-seed1" / "student").exists()  # no --keep-models
    index = (tmp_path / "report" / "index.md").read_text()
    assert "## carved3: test split, mean ± std over seeds" in index and "| shd_kd | 2 |" in index
    assert "(compare/carved3/tiny/index.md) (4 runs" in index  # `distill compare` of the setting's 4 runs

    before = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "work" / "results").glob("*.json")}
    second = _distill_study(config)
    after = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "work" / "results").glob("*.json")}
    assert after == before  # every run was finished: nothing trained again
    assert f"frozen in {tmp_path / 'work' / 'frozen.json'}" in second.stdout and "4 runs, 0 left" in second.stdout
    assert "] carved3-" not in second.stderr  # the runner logs a line per run it trains
