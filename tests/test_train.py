"""`distill train` / `distill eval`: DeepSpeed on CPU (gloo) with the tiny teacher's real cache.

Every 2-rank run shares one DeepSpeed launch (`two_rank_runs`); 1-rank runs happen in this process. Figures the
tests check: losses fall, resumed runs repeat the uninterrupted run's losses, the loss and gradients do not depend
on how the global batch is split over ranks and micro-batches, and online targets give the cached losses.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed import DeepSpeedEngine
from safetensors.torch import load_file

from pipeline.errors import PipelineError
from pipeline.stages.train import train_stage as train
from pipeline.training.deepspeed_config import deepspeed_config, merge
from pipeline.training.schedule import lr_factor
from tests.train_fixtures import (
    BIN,
    FAST_TRAIN,
    TINY_CONFIG,
    TinyCache,
    build_tiny_cache,
    free_port,
    read_metrics,
    run_two_ranks,
    start_launcher,
    wait_ok,
)

SGD = (
    "deepspeed.overrides={optimizer: {type: SGD, params: {torch_adam: null, weight_decay: null}},"
    " zero_allow_untested_optimizer: true}"
)
"""Plain SGD: parameters after one step are linear in the gradient, so they show any error in its scale (Adam's
first step is nearly sign(g) and would hide one)."""
NORMALISATION = (
    SGD,
    "train.lr=1.0",
    "train.max_steps=1",
    "train.grad_clip=0.0",
    "train.warmup_steps=0",
    "mlflow.enabled=false",
)
"""One SGD step at LR 1: the weight change is the gradient itself, far above the fp32 resolution of the weights."""
TRAIN_METRICS = (
    "train/loss",
    "train/loss_ce",
    "train/loss_kd",
    "train/loss_attn",
    "train/lr",
    "train/tokens_per_s",
    "train/loader_wait_frac",
)
EVAL_METRICS = ("eval/ppl", "eval/top1_agreement", "eval/attn_kl", "eval/loss_ce", "eval/loss_kd", "eval/loss_attn")
MODES = {
    "global": ("distill.attn.match=global",),
    "selective": ("distill.attn.match=selective",),
    "pairwise": ("distill.attn.squeeze=shd_pairwise",),
    "relations": ("distill.rel.weight=1.0", "distill.attn.loss=mse"),
    "tau2": ("distill.kd.temperature=2.0", "distill.attn.temperature=2.0", "distill.schedule=linear"),
}
"""Matching modes and objective settings, each checked for the same loss and update on 1 rank and on 2."""


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> TinyCache:
    return build_tiny_cache(tmp_path_factory.mktemp("train_cache"))


@pytest.fixture(scope="session")
def two_rank_runs(tiny_cache: TinyCache, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every 2-rank training of these tests, in one launch (ZeRO-2 unless named otherwise)."""
    root = tmp_path_factory.mktemp("two_ranks")
    long = (*FAST_TRAIN, "train.max_steps=12", "train.save_every=6", "train.eval_every=6")
    runs = {
        "zero2": [*long, "mlflow.run_name=zero2"],
        "resume_first_half": [*long, "train.max_steps=6", "mlflow.enabled=false"],
        "resume_second_half": [*long, "mlflow.enabled=false"],
        "zero3": [*long, "deepspeed.zero_stage=3", "mlflow.run_name=zero3", "train.heatmaps=final"],
        "norm_ga1": [*FAST_TRAIN, *NORMALISATION, "train.micro_batch_size=4", "train.grad_accum=1"],
        "norm_ga2": [*FAST_TRAIN, *NORMALISATION, "train.micro_batch_size=2", "train.grad_accum=2"],
        **{
            f"mode_{mode}": [*FAST_TRAIN, *NORMALISATION, "train.micro_batch_size=2", "train.grad_accum=2", *extra]
            for mode, extra in MODES.items()
        },
    }
    directories = {name: root / name for name in runs}
    directories["resume_second_half"] = directories["resume_first_half"]  # the second half resumes the first
    spec = [{"overrides": tiny_cache.overrides(directories[name], *extra)} for name, extra in runs.items()]
    (root / "runs.json").write_text(json.dumps(spec))
    run_two_ranks(root / "runs.json")
    return directories


def _losses(train_records: dict[int, dict], steps) -> list[float]:
    return [train_records[step]["train/loss"] for step in steps]


# --------------------------------------------------------------------------------------------------------------------
# Pure pieces


def test_deepspeed_config_is_generated_from_the_config(tiny_cache: TinyCache, tmp_path: Path) -> None:
    config = tiny_cache.config(
        tmp_path,
        "train.micro_batch_size=3",
        "train.grad_accum=2",
        "train.grad_clip=0.5",
        "train.lr=0.002",
        "deepspeed.overrides={zero_optimization: {overlap_comm: true}, wall_clock_breakdown: null}",
    )
    generated = deepspeed_config(config, torch.float32)
    assert generated["train_micro_batch_size_per_gpu"] == 3
    assert generated["gradient_accumulation_steps"] == 2
    assert generated["gradient_clipping"] == 0.5
    assert generated["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}
    assert generated["optimizer"] == {
        "type": "AdamW",
        "params": {"torch_adam": True, "lr": 0.002, "weight_decay": 0.01},
    }
    assert generated["bf16"] == {"enabled": False}
    assert "wall_clock_breakdown" not in generated  # null in the overrides deletes a preset key
    assert deepspeed_config(config, torch.bfloat16)["bf16"] == {"enabled": True}
    staged = tiny_cache.config(tmp_path, "deepspeed.zero_stage=3")
    assert deepspeed_config(staged, torch.float32)["zero_optimization"]["stage"] == 3
    assert deepspeed_config(staged, torch.float32, load_universal=True)["checkpoint"] == {"load_universal": True}
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}) == {"a": {"c": 2, "d": 3}}


def test_lr_schedule_warms_up_then_decays_to_min_lr() -> None:
    cosine = [lr_factor(step, warmup_steps=2, max_steps=10, schedule="cosine", min_ratio=0.1) for step in range(12)]
    assert cosine[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(cosine[2:]))
    assert cosine[9] == pytest.approx(0.1) and cosine[11] == pytest.approx(0.1)
    linear = [lr_factor(step, warmup_steps=0, max_steps=5, schedule="linear", min_ratio=0.0) for step in range(5)]
    assert linear == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert lr_factor(7, warmup_steps=2, max_steps=10, schedule="constant", min_ratio=0.1) == 1.0


# --------------------------------------------------------------------------------------------------------------------
# Cache compatibility, head counts, online targets (one rank, in this process)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distill.layer_map=[0,3]", "needs teacher layer 0"),
        ("student.num_heads=4", "the student has 4 heads"),
        ("distill.kd.top_k=8", "fingerprint field 'top_k'"),
        ("distill.kd.temperature=3.0", r"distill\.kd\.temperature is 3, .* τ in \[1\.0, 2\.0\]"),
        ("distill.rel.heads=3 distill.rel.weight=1", "fingerprint field 'rel_heads'"),
    ],
)
def test_incompatible_cache_is_refused_naming_the_field(
    tiny_cache: TinyCache, tmp_path: Path, override: str, message: str
) -> None:
    with pytest.raises(PipelineError, match=message):
        train(tiny_cache.config(tmp_path, *override.split(), "mlflow.enabled=false"))


@pytest.mark.slow
def test_students_with_three_and_two_heads_train_from_one_cache(tiny_cache: TinyCache, tmp_path: Path) -> None:
    common = (*FAST_TRAIN, "train.max_steps=2", "train.eval_every=0", "mlflow.enabled=false")
    for heads in (3, 2):
        output = tmp_path / f"heads{heads}"
        final = train(tiny_cache.config(output, *common, f"student.num_heads={heads}", "student.num_kv_heads=1"))
        records, evaluation = read_metrics(output)
        assert sorted(records) == [1, 2]
        for record in records.values():
            assert all(math.isfinite(record[key]) for key in TRAIN_METRICS)
            assert record["train/loss_attn"] > 0
        assert set(EVAL_METRICS) <= set(evaluation[2]) and math.isfinite(final["eval/attn_kl"])
        exported = json.loads((output / "student" / "config.json").read_text())
        assert exported["num_attention_heads"] == heads


def test_a_finished_run_leaves_no_engine_behind(tiny_cache: TinyCache, tmp_path: Path) -> None:
    """`distill run` and the quality study train run after run in one process: DeepSpeed's hooks would keep every
    finished run's engine, model and optimizer state alive (400 MB a run for the demo's student) unless the trainer
    destroys the engine."""

    def live_engines() -> int:
        gc.collect()
        return sum(issubclass(type(found), DeepSpeedEngine) for found in gc.get_objects())

    before = live_engines()
    train(tiny_cache.config(tmp_path / "run", *FAST_TRAIN, "train.max_steps=1", "train.eval_every=0"))
    assert live_engines() == before


def test_a_finished_run_with_other_settings_is_refused_not_reported_trained(
    tiny_cache: TinyCache, tmp_path: Path
) -> None:
    """A finished run is "already trained" only for the settings it was trained with: another learning rate or
    loss weight names the change instead of leaving the old weights in place silently; the same settings (and a
    change of what is only logged or saved) are a no-op."""
    common = (*FAST_TRAIN, "train.max_steps=1", "train.eval_every=0", "mlflow.enabled=false")
    train(tiny_cache.config(tmp_path, *common))
    student = tmp_path / "student" / "model.safetensors"
    written = student.stat().st_mtime_ns
    assert train(tiny_cache.config(tmp_path, *common, "train.save_every=5")) == {}
    for change, named in [("train.lr=0.5", r"train\.lr: .* → 0\.5"), ("distill.kd.weight=0", r"distill\.kd\.weight")]:
        with pytest.raises(PipelineError, match=rf"holds a run finished at step 1 with other settings \(.*{named}"):
            train(tiny_cache.config(tmp_path, *common, change))
    assert student.stat().st_mtime_ns == written


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_losses(tiny_cache: TinyCache, tmp_path: Path) -> None:
    common = (*FAST_TRAIN, "train.max_steps=2", "train.eval_every=0", "mlflow.enabled=false")
    train(tiny_cache.config(tmp_path / "plain", *common))
    train(tiny_cache.config(tmp_path / "checkpointed", *common, "train.gradient_checkpointing=true"))
    plain, _ = read_metrics(tmp_path / "plain")
    checkpointed, _ = read_metrics(tmp_path / "checkpointed")
    for step in (1, 2):
        for key in ("train/loss_ce", "train/loss_kd", "train/loss_attn"):
            assert checkpointed[step][key] == pytest.approx(plain[step][key], rel=1e-6)


@pytest.mark.slow
def test_online_targets_come_in_the_cache_order_and_form(tiny_cache: TinyCache) -> None:
    """Rank 1 of 2 from position 5: the live teacher's batch is the cached batch, up to the cache's fp16 — for the
    attention maps, the selective heads (chosen alike) and the relation maps, with tail sums at τ = 2."""
    from pipeline.models.loading import load_teacher
    from pipeline.objective.loss import build_objective
    from pipeline.stages.context import open_run

    config = tiny_cache.config(
        tiny_cache.root / "unused", "distill.attn.match=selective", "distill.rel.weight=1", "distill.kd.temperature=2"
    )
    context = open_run(config)
    teacher = load_teacher(config.teacher.path)
    needs = build_objective(context.config, [1, 3]).needs()
    assert needs.kd_temperature == 2.0 and len(needs.reads()) == 2 + 2 * 3
    options = {"batch_size": 4, "seed": config.train.seed, "start_position": 5, "rank": 1, "world_size": 2}
    online = context.live_source(teacher, needs).batches(**options)
    stream = context.cached("train", needs).batches(**options)
    for live, cached in zip(online, stream, strict=False):
        assert live.keys() == cached.keys() and live["maps"].keys() == cached["maps"].keys()
        for key in ("sample_ids", "positions", "input_ids", "labels"):
            assert torch.equal(live[key], cached[key]), key
        assert torch.allclose(live["topk_values"], cached["topk_values"], atol=1e-2)
        assert torch.allclose(live["topk_tail"], cached["topk_tail"], rtol=1e-4, atol=1e-6)
        assert (live["topk_indices"] == cached["topk_indices"]).float().mean() > 0.99
        for name in live["maps"]:
            assert torch.allclose(live["maps"][name].packed, cached["maps"][name].packed, atol=2e-3), name
        if live["positions"][0] > 40:
            break


@pytest.mark.slow
def test_online_and_cached_training_give_the_same_losses(tiny_cache: TinyCache, tmp_path: Path) -> None:
    common = (*FAST_TRAIN, "train.max_steps=2", "train.eval_every=0", "mlflow.enabled=false")
    train(tiny_cache.config(tmp_path / "cached", *common))
    train(tiny_cache.config(tmp_path / "online", *common, "train.mode=online"))
    cached, _ = read_metrics(tmp_path / "cached")
    online, _ = read_metrics(tmp_path / "online")
    for step in (1, 2):
        for key in ("train/loss_ce", "train/loss_kd", "train/loss_attn"):
            assert online[step][key] == pytest.approx(cached[step][key], rel=2e-3, abs=2e-3), (step, key)
        assert online[step]["position"] == cached[step]["position"]


@pytest.mark.slow
def test_topk_targets_with_m_equal_to_seq_len_give_the_dense_attention_loss(tiny_cache: TinyCache) -> None:
    """A top-m cache (m = T keeps every key) next to the dense one: same attention loss, through the sparse KL."""
    from pipeline.stages.cache import cache_stage

    topk = ("cache.encoding=topk", "cache.attn_top_m=32", f"cache.output_dir={tiny_cache.root}/targets_topk")
    cache_stage(tiny_cache.config(tiny_cache.root / "unused", *topk))
    common = (*FAST_TRAIN, "train.max_steps=2", "train.eval_every=0", "mlflow.enabled=false")
    train(tiny_cache.config(tiny_cache.root / "runs_dense", *common))
    train(tiny_cache.config(tiny_cache.root / "runs_topk", *common, *topk))
    dense, dense_eval = read_metrics(tiny_cache.root / "runs_dense")
    sparse, sparse_eval = read_metrics(tiny_cache.root / "runs_topk")
    for step in (1, 2):
        for key in ("train/loss_ce", "train/loss_kd", "train/loss_attn"):
            assert sparse[step][key] == pytest.approx(dense[step][key], rel=1e-4), (step, key)
    assert sparse_eval[2]["eval/attn_kl"] == pytest.approx(dense_eval[2]["eval/attn_kl"], rel=1e-4)


@pytest.mark.slow
def test_a_compact_cache_trains_like_the_live_teacher_at_the_same_rows(tiny_cache: TinyCache) -> None:
    """Top-m 8 at half the query rows with 8-bit values and logits: training reads it (the attention loss over the
    stored rows only), and the live teacher — the same rows, unquantised — gives the same losses up to the codes'
    error; the evaluation's attention KL is measured over the stored rows."""
    from pipeline.stages.cache import cache_stage

    compact = (
        "cache.encoding=topk",
        "cache.attn_top_m=8",
        "cache.attn_row_fraction=0.5",
        "cache.attn_value_bits=8",
        "cache.logit_value_bits=8",
        f"cache.output_dir={tiny_cache.root}/targets_compact",
    )
    cache_stage(tiny_cache.config(tiny_cache.root / "unused", *compact))
    common = (*FAST_TRAIN, *compact, "train.max_steps=2", "train.eval_every=2", "mlflow.enabled=false")
    train(tiny_cache.config(tiny_cache.root / "runs_compact", *common))
    train(tiny_cache.config(tiny_cache.root / "runs_compact_online", *common, "train.mode=online"))
    cached, cached_eval = read_metrics(tiny_cache.root / "runs_compact")
    online, _ = read_metrics(tiny_cache.root / "runs_compact_online")
    for step in (1, 2):
        for key in ("train/loss_ce", "train/loss_kd", "train/loss_attn"):
            assert cached[step][key] > 0 and math.isfinite(cached[step][key])
            assert online[step][key] == pytest.approx(cached[step][key], rel=2e-2), (step, key)
    assert cached_eval[2]["eval/attn_kl"] > 0 and math.isfinite(cached_eval[2]["eval/attn_kl"])


@pytest.mark.slow
def test_resumed_job_continues_its_mlflow_run_and_keeps_the_newest_checkpoints(
    tiny_cache: TinyCache, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    common = (*FAST_TRAIN, "train.save_every=1", "train.eval_every=0", "train.keep_checkpoints=2")
    train(tiny_cache.config(tmp_path, *common, "train.max_steps=3", "mlflow.run_name=resumed"))
    assert sorted(path.name for path in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000003"]
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    train(tiny_cache.config(tmp_path, *common, "train.max_steps=5", "mlflow.run_name=resumed"))
    assert (tmp_path / "mlflow_run_id").read_text().strip() == run_id
    client = MlflowClient(tracking_uri=tiny_cache.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [point.step for point in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4, 5]
    assert run.data.tags["param_changed.train.max_steps"] == "3 -> 5"
    records, _ = read_metrics(tmp_path)
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert sorted(path.name for path in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000005"]
    with pytest.raises(PipelineError, match=r"trained with student\.hidden_size = 48, the config has 24"):
        train(tiny_cache.config(tmp_path, *common, "train.max_steps=6", "student.hidden_size=24"))


# --------------------------------------------------------------------------------------------------------------------
# Two ranks


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_two_ranks_train_and_track_in_mlflow(two_rank_runs: dict[str, Path], tiny_cache: TinyCache, run: str) -> None:
    from mlflow.tracking import MlflowClient

    records, evaluation = read_metrics(two_rank_runs[run])
    assert sorted(records) == list(range(1, 13)) and sorted(evaluation) == [0, 6, 12]
    losses = _losses(records, range(1, 13))
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses  # about 10.8 → 8.3 on the tiny data
    assert evaluation[12]["eval/ppl"] < evaluation[6]["eval/ppl"]

    client = MlflowClient(tracking_uri=tiny_cache.tracking_uri)
    (found,) = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], filter_string=f"attributes.run_name = '{run}'"
    )
    assert found.info.status == "FINISHED"
    for key in TRAIN_METRICS:
        history = client.get_metric_history(found.info.run_id, key)
        assert sorted(point.step for point in history) == list(range(1, 13)), key
    assert client.get_metric_history(found.info.run_id, "train/loss")[0].value == pytest.approx(losses[0])
    for key in EVAL_METRICS:
        assert {point.step for point in client.get_metric_history(found.info.run_id, key)} >= {6, 12}, key
    assert found.data.params["student.num_heads"] == "3"
    assert found.data.tags["cache.teacher_weights_sha256"]
    assert found.data.tags["world_size"] == "2"
    artifacts = {item.path for item in client.list_artifacts(found.info.run_id)}
    assert {"config.yaml", "deepspeed.json", "alpha_histograms.png", "cache", "heatmaps"} <= artifacts
    heatmaps = {item.path for item in client.list_artifacts(found.info.run_id, "heatmaps")}
    drawn = ["heatmaps/step-00000012"] if run == "zero3" else [f"heatmaps/step-{step:08d}" for step in (0, 6, 12)]
    assert heatmaps == set(drawn)  # train.heatmaps: every (zero2), final (zero3)
    layers = {item.path for item in client.list_artifacts(found.info.run_id, "heatmaps/step-00000012")}
    assert layers == {"heatmaps/step-00000012/layer-0.png", "heatmaps/step-00000012/layer-1.png"}
    assert client.get_metric_history(found.info.run_id, "eval/ppl")[0].step == 0  # where the run started


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_repeats_the_uninterrupted_losses(two_rank_runs: dict[str, Path]) -> None:
    """fp32, 2 ranks: 6 steps, a new launch resuming for 6 more = 12 uninterrupted steps, step by step."""
    uninterrupted, _ = read_metrics(two_rank_runs["zero2"])
    resumed, _ = read_metrics(two_rank_runs["resume_second_half"])
    for step in range(1, 13):
        for key in ("train/loss", "train/loss_ce", "train/loss_kd", "train/loss_attn", "train/lr"):
            assert resumed[step][key] == pytest.approx(uninterrupted[step][key], rel=1e-6, abs=1e-6), (step, key)
        assert resumed[step]["position"] == uninterrupted[step]["position"] == 8 * (step - 1)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_at_one_rank_continues_the_global_sample_position(
    two_rank_runs: dict[str, Path], tiny_cache: TinyCache, tmp_path: Path
) -> None:
    """Saved by 2 ZeRO-2 ranks at step 6, continued by 1 rank with twice the accumulation (same global batch): the
    optimizer state is re-partitioned via a universal checkpoint and steps 7-8 read the samples 2 ranks would."""
    saved = two_rank_runs["resume_first_half"] / "checkpoints" / "step-00000006"
    config = tiny_cache.config(
        tmp_path,
        *FAST_TRAIN,
        "train.max_steps=8",
        "train.grad_accum=2",
        "train.eval_every=0",
        f"train.resume={saved}",
        "mlflow.enabled=false",
    )
    train(config)
    assert (saved.parent / "step-00000006_universal").is_dir()
    uninterrupted, _ = read_metrics(two_rank_runs["zero2"])
    continued, _ = read_metrics(tmp_path)
    assert sorted(continued) == [7, 8]
    for step in (7, 8):
        assert continued[step]["position"] == uninterrupted[step]["position"] == 8 * (step - 1)
        assert continued[step]["train/loss"] == pytest.approx(uninterrupted[step]["train/loss"], rel=1e-5)
    state = json.loads((tmp_path / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert state["position"] == 64 and state["world_size"] == 1


@pytest.mark.slow
@pytest.mark.multiprocess
def test_loss_is_normalised_once_over_ranks_and_micro_batches(
    two_rank_runs: dict[str, Path], tiny_cache: TinyCache, tmp_path: Path
) -> None:
    """One SGD step on the same 8 samples split as 1×8, 1×(2×4), 2×4 and 2×(2×2): same loss, gradient, weights."""
    for name, micro, accumulation in (("ws1_ga1", 8, 1), ("ws1_ga2", 4, 2)):
        train(
            tiny_cache.config(
                tmp_path / name,
                *FAST_TRAIN,
                *NORMALISATION,
                f"train.micro_batch_size={micro}",
                f"train.grad_accum={accumulation}",
            )
        )
    directories = {
        "ws1_ga1": tmp_path / "ws1_ga1",
        "ws1_ga2": tmp_path / "ws1_ga2",
        "ws2_ga1": two_rank_runs["norm_ga1"],
        "ws2_ga2": two_rank_runs["norm_ga2"],
    }
    records = {name: read_metrics(directory)[0][1] for name, directory in directories.items()}
    weights = {name: load_file(directory / "student" / "model.safetensors") for name, directory in directories.items()}
    reference = records["ws1_ga1"]
    initial = _initial_weights(tiny_cache)
    for name in directories:
        for key in ("train/loss", "train/loss_ce", "train/loss_kd", "train/loss_attn"):
            assert records[name][key] == pytest.approx(reference[key], rel=1e-6), (name, key)
        assert records[name]["train/grad_norm"] == pytest.approx(reference["train/grad_norm"], rel=1e-5), name
        for tensor_name, tensor in weights[name].items():
            update = tensor - initial[tensor_name]
            expected = weights["ws1_ga1"][tensor_name] - initial[tensor_name]
            assert (update - expected).abs().max() <= 1e-4 * expected.abs().max(), (name, tensor_name)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", list(MODES))
def test_every_matching_mode_gives_one_rank_the_loss_and_update_of_two(
    two_rank_runs: dict[str, Path], tiny_cache: TinyCache, tmp_path: Path, mode: str
) -> None:
    """global, selective, pairwise-squeezed, relation (with MSE attention) and τ = 2 (sparse logits softened
    exactly, linear attention schedule) objectives: one SGD step on 8 samples as 1 × 8 and as 2 × (2 × 2)."""
    train(tiny_cache.config(tmp_path, *FAST_TRAIN, *NORMALISATION, "train.micro_batch_size=8", *MODES[mode]))
    one, _ = read_metrics(tmp_path)
    two, _ = read_metrics(two_rank_runs[f"mode_{mode}"])
    terms = [key for key in one[1] if key.startswith("train/loss_")]
    assert len(terms) >= 3 and all(one[1][key] > 0 for key in terms), one[1]
    for key in ("train/loss", *terms):
        assert two[1][key] == pytest.approx(one[1][key], rel=1e-6), key
    if mode == "relations":
        assert "train/loss_rel" in terms
    single = load_file(tmp_path / "student" / "model.safetensors")
    double = load_file(two_rank_runs[f"mode_{mode}"] / "student" / "model.safetensors")
    initial = _initial_weights(tiny_cache)
    for name, tensor in single.items():
        expected = tensor - initial[name]
        assert (double[name] - initial[name] - expected).abs().max() <= 1e-4 * expected.abs().max(), name


def _initial_weights(tiny_cache: TinyCache) -> dict[str, torch.Tensor]:
    """The student's weights before training (same seed as every run)."""
    from transformers import AutoConfig

    from pipeline.models.loading import build_student

    config = tiny_cache.config(tiny_cache.root / "unused")
    student = build_student(
        AutoConfig.from_pretrained(config.teacher.path),
        num_layers=config.student.num_layers,
        hidden_size=config.student.hidden_size,
        num_heads=config.student.num_heads,
        num_kv_heads=config.student.num_kv_heads,
        intermediate_size=config.student.intermediate_size,
        seed=config.train.seed,
    )
    return {key: value.detach().clone() for key, value in student.state_dict().items()}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_exported_students_load_with_plain_transformers_and_generate(two_rank_runs: dict[str, Path]) -> None:
    """The ZeRO-2 and the ZeRO-3 (gathered) exports, in a process that never imports `pipeline`."""
    script = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "for directory in sys.argv[1:]:\n"
        "    model = AutoModelForCausalLM.from_pretrained(directory)\n"
        "    tokenizer = AutoTokenizer.from_pretrained(directory)\n"
        "    prompt = tokenizer('The quick brown fox', return_tensors='pt')\n"
        "    output = model.generate(**prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)\n"
        "    assert output.shape[1] == prompt['input_ids'].shape[1] + 8, output.shape\n"
        "    print('generated:', repr(tokenizer.decode(output[0])))\n"
    )
    exports = [str(two_rank_runs[name] / "student") for name in ("zero2", "zero3")]
    result = subprocess.run([sys.executable, "-c", script, *exports], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("generated:") == 2
    zero2 = load_file(Path(exports[0]) / "model.safetensors")
    zero3 = load_file(Path(exports[1]) / "model.safetensors")
    assert zero2.keys() == zero3.keys()
    assert all(torch.allclose(zero2[key], zero3[key], atol=1e-4) for key in zero2)  # same run, other ZeRO stage


@pytest.mark.slow
@pytest.mark.multiprocess
def test_eval_command_on_the_export_and_on_a_checkpoint(two_rank_runs: dict[str, Path], tiny_cache: TinyCache) -> None:
    from pipeline.stages.evaluate import eval_stage

    output = two_rank_runs["zero2"]
    config = tiny_cache.config(output, "mlflow.enabled=false")
    exported = eval_stage(config)
    assert set(EVAL_METRICS) <= set(exported)
    written = json.loads((output / "eval.json").read_text())
    assert written["step"] == 12 and written["eval/ppl"] == pytest.approx(exported["eval/ppl"])
    from_checkpoint = eval_stage(config, checkpoint=output / "checkpoints" / "step-00000012")
    for key, value in exported.items():
        assert from_checkpoint[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_nodes_on_loopback_train_to_completion(tiny_cache: TinyCache, tmp_path: Path) -> None:
    """A DeepSpeed hostfile with two names and one launcher per "node" (`--no_ssh --node_rank`), both here."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    overrides = tiny_cache.overrides(
        tmp_path / "run", *FAST_TRAIN, "train.max_steps=4", "train.eval_every=0", "mlflow.enabled=false"
    )
    launchers = [
        start_launcher(
            [
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                str(BIN / "distill"),
                "train",
                str(TINY_CONFIG),
                *overrides,
            ]
        )
        for node in (0, 1)
    ]
    for launcher in launchers:
        wait_ok(launcher)
    records, _ = read_metrics(tmp_path / "run")
    assert sorted(records) == [1, 2, 3, 4]
    assert all(math.isfinite(record["train/loss"]) for record in records.values())
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["position"] == 32
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "run" / "checkpoints")
