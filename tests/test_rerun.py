"""`stages.done`: when `distill run` may skip a stage before importing it. On a finished pipeline's outputs (laid
out here by hand, as the stages write them): every stage is done; a changed key the stage reads, a touched or
missing output file, an incomplete manifest or a world of several ranks makes it run again (and a key it does not
read does not). The end-to-end re-run of the tiny pipeline is in tests/test_run.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.config import Config, load_config
from pipeline.stages import done

ROOT = Path(__file__).resolve().parents[1]


def _config(root: Path, *extra: str) -> Config:
    return load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"teacher.path={root}/teacher",
            f"data.output_dir={root}/data",
            f"cache.output_dir={root}/targets",
            f"train.output_dir={root}/runs",
            f"data.sources=[{root}/corpus.txt]",
            "run.variants={}",
            *extra,
        ],
    )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def finished(tmp_path: Path) -> Config:
    """The outputs of a finished tiny run (train at step 10 = train.max_steps), each stage recorded done."""
    _write(tmp_path / "corpus.txt", "to be or not to be\n")
    _write(tmp_path / "teacher" / "config.json", "{}")
    _write(tmp_path / "teacher" / "model.safetensors", "weights")
    _write(tmp_path / "teacher" / "tokenizer.json", "{}")
    splits = {"train": {"samples": 8, "tokens": 256}, "validation": {"samples": 1, "tokens": 32}}
    _write(tmp_path / "data" / "meta.json", json.dumps({"splits": splits}))
    for split in splits:
        _write(tmp_path / "data" / split / "state.json", "{}")
        _write(tmp_path / "targets" / split / "shard-00000.safetensors", "x" * 10)
        shards = [{"file": "shard-00000.safetensors", "bytes": 10}]
        _write(tmp_path / "targets" / split / "manifest.json", json.dumps({"complete": True, "shards": shards}))
    checkpoints = tmp_path / "runs" / "checkpoints"
    _write(checkpoints / "latest", "step-00000010")
    _write(checkpoints / "step-00000010" / "trainer_state.json", json.dumps({"step": 10}))
    _write(tmp_path / "runs" / "student" / "config.json", "{}")
    config = _config(tmp_path)
    for stage in done.STAGES:
        done.mark_done(stage, config)
    return config


def _done(config: Config) -> dict[str, bool]:
    return {stage: done.is_done(stage, config) for stage in done.STAGES}


def test_a_finished_pipeline_is_done_and_its_records_lie_outside_the_outputs(finished: Config) -> None:
    assert _done(finished) == dict.fromkeys(done.STAGES, True)
    for stage in done.STAGES:
        output = done.stage_output(stage, finished)
        assert done.record_path(output).is_file() and done.record_path(output).parent == output.parent
        assert not any(path.name.endswith(done.RECORD_SUFFIX) for path in output.rglob("*"))


@pytest.mark.parametrize(
    ("override", "reruns"),
    [
        ("teacher.source=tiny-random-gpt2", {"teacher", "prepare", "cache", "train"}),
        ("data.seq_len=16", {"prepare", "cache", "train"}),
        ("cache.shard_size=4", {"cache", "train"}),
        ("distill.kd.top_k=8", {"cache", "train"}),
        ("train.lr=0.01", {"train"}),
        ("train.max_steps=12", {"train"}),
        ("mlflow.experiment=other", {"train"}),
        ("run.report_dir=elsewhere", set()),
    ],
)
def test_a_changed_key_reruns_the_stages_that_read_it(finished: Config, tmp_path: Path, override: str, reruns) -> None:
    changed = _config(tmp_path, override)
    assert {stage for stage, is_done in _done(changed).items() if not is_done} == reruns


def _rewrite(path: Path) -> None:
    """The same bytes written again (a stage that ran, or was killed, after the record)."""
    data = path.read_bytes()
    os.unlink(path)
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("change", "stage"),
    [
        (lambda root: _rewrite(root / "teacher" / "model.safetensors"), "teacher"),
        (lambda root: _rewrite(root / "corpus.txt"), "prepare"),
        (lambda root: (root / "data" / "validation" / "state.json").unlink(), "prepare"),
        (lambda root: _rewrite(root / "targets" / "train" / "shard-00000.safetensors"), "cache"),
        (lambda root: _write(root / "targets" / "train" / "shard-00000.safetensors", "x" * 4), "cache"),
        (lambda root: _write(root / "targets" / "train" / "shard-00001.safetensors", "x"), "cache"),
        (lambda root: _rewrite(root / "runs" / "checkpoints" / "latest"), "train"),
        (lambda root: (root / "runs" / "student" / "config.json").unlink(), "train"),
    ],
)
def test_a_touched_output_or_input_is_not_done(finished: Config, tmp_path: Path, change, stage: str) -> None:
    change(tmp_path)
    assert not done.is_done(stage, finished)
    earlier = done.STAGES[: done.STAGES.index(stage)]
    assert all(done.is_done(before, finished) for before in earlier)


def test_incomplete_outputs_are_never_recorded_nor_done(finished: Config, tmp_path: Path) -> None:
    """An output incomplete by its own manifest is not done, even with a record of exactly this state."""
    manifest = tmp_path / "targets" / "validation" / "manifest.json"
    manifest.write_text(json.dumps({"complete": False, "shards": []}))
    checkpoints = tmp_path / "runs" / "checkpoints"
    _write(checkpoints / "step-00000005" / "trainer_state.json", json.dumps({"step": 5}))
    _write(checkpoints / "latest", "step-00000005")
    for stage in ("cache", "train"):
        assert done.output_problem(stage, finished) is not None
        done.mark_done(stage, finished)
        assert not done.is_done(stage, finished)


def test_several_ranks_or_another_resume_always_run(finished: Config, tmp_path: Path, monkeypatch) -> None:
    assert not done.is_done("train", _config(tmp_path, "train.resume=never"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _done(finished) == dict.fromkeys(done.STAGES, False)


def test_a_hub_source_leaves_prepare_to_decide(finished: Config, tmp_path: Path) -> None:
    assert not done.is_done("prepare", _config(tmp_path, "data.sources=[some/hub-dataset]"))


def test_the_names_read_agree_with_the_modules_that_write_them() -> None:
    from pipeline.data.prepare import META_NAME
    from pipeline.training import checkpoints

    assert done.DATA_META == META_NAME
    assert (done.CHECKPOINTS, done.LATEST, done.TRAINER_STATE, done.STUDENT) == (
        checkpoints.CHECKPOINTS,
        checkpoints.LATEST,
        checkpoints.TRAINER_STATE,
        checkpoints.STUDENT,
    )
