"""Every user mistake is one clean error: `distill …` exits 2 with a message naming the file, key or field, the value
found and the fix — and whatever an earlier run wrote is byte-identical afterwards.

Each test runs the real command line in this process (`cli.main`) on tiny random teachers; faults (a full disk) are
simulated by replacing one write.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from pipeline import cli
from pipeline.atomic import StorageError, atomic_write_bytes, staged_directory

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")
CORPUS = REPO / "configs" / "data" / "tiny_corpus.txt"


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file below `root` with its bytes (the reference for "untouched")."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _overrides(root: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        f"teacher.path={teacher}",
        f"data.sources=[{CORPUS}]",
        f"data.output_dir={root / 'data'}",
        f"cache.output_dir={root / 'targets'}",
        f"train.output_dir={root / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        *extra,
    ]


def _fails(argv: list[str], caplog: pytest.LogCaptureFixture, *culprits: str) -> str:
    """Run `distill ARGV`: exit code 2, one error message naming every culprit, no traceback attached."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="pipeline"):
        assert cli.main(argv) == 2
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    message = errors[0].getMessage()
    for culprit in culprits:
        assert culprit in message, (culprit, message)
    return message


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`distill teacher import` of both tiny random teachers (512 positions each)."""
    root = tmp_path_factory.mktemp("teachers")
    made = {}
    for family in ("llama", "gpt2"):
        made[family] = root / family
        argv = ["teacher", "import", CONFIG, f"teacher.source=tiny-random-{family}", f"teacher.path={made[family]}"]
        assert cli.main(argv) == 0
    return made


@pytest.fixture
def prepared(teachers: dict[str, Path], tmp_path: Path) -> Path:
    """A finished `distill prepare` output (the earlier output the failing commands must not touch)."""
    assert cli.main(["prepare", CONFIG, *_overrides(tmp_path, teachers["llama"])]) == 0
    return tmp_path / "data"


# --------------------------------------------------------------------------------------------------------------------
# The teacher


@pytest.mark.parametrize("command", ["prepare", "cache"])
def test_a_missing_teacher_points_to_teacher_import(
    command: str, prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = _snapshot(tmp_path)
    missing = tmp_path / "no-teacher"
    _fails([command, CONFIG, *_overrides(tmp_path, missing)], caplog, str(missing), "distill teacher import CONFIG")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("content", "culprit"),
    [
        ("{not json", "not a readable JSON file"),
        ("[1, 2]", "expected a JSON object, found a JSON list"),
        ('{"hidden_size": 8}', "field 'model_type' is missing"),
        ('{"model_type": "bert", "hidden_size": 8}', "unsupported model_type 'bert'"),
        ('{"model_type": "no-such-family"}', "model_type 'no-such-family' cannot be read by transformers"),
    ],
)
def test_a_broken_teacher_config_is_named(
    content: str, culprit: str, teachers: dict[str, Path], prepared: Path, tmp_path: Path, caplog
) -> None:
    broken = tmp_path / "broken-teacher"
    shutil.copytree(teachers["llama"], broken)
    (broken / "config.json").write_text(content)
    before = _snapshot(tmp_path)
    for command in ("prepare", "cache"):
        _fails([command, CONFIG, *_overrides(tmp_path, broken)], caplog, str(broken / "config.json"), culprit)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(("family", "field"), [("llama", "max_position_embeddings"), ("gpt2", "n_positions")])
def test_seq_len_beyond_the_teachers_positions_is_refused_at_prepare(
    family: str, field: str, teachers: dict[str, Path], prepared: Path, tmp_path: Path, caplog
) -> None:
    limit = json.loads((teachers[family] / "config.json").read_text())[field]
    assert limit == 512  # the tiny teachers' context
    before = _snapshot(tmp_path)
    argv = ["prepare", CONFIG, *_overrides(tmp_path, teachers[family], f"data.seq_len={limit + 1}")]
    _fails(argv, caplog, f"data.seq_len = {limit + 1}", f"{field} = {limit}", f"set data.seq_len to at most {limit}")
    assert _snapshot(tmp_path) == before
    at_limit = _overrides(tmp_path / "at-limit", teachers[family], f"data.seq_len={limit}")
    assert cli.main(["prepare", CONFIG, *at_limit]) == 0  # the teacher's whole context is allowed


def test_a_tiny_teacher_of_another_family_is_replaced_only_with_overwrite(
    teachers: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(teachers["llama"], teacher)
    before = _snapshot(teacher)
    argv = ["teacher", "import", CONFIG, "teacher.source=tiny-random-gpt2", f"teacher.path={teacher}"]
    _fails(argv, caplog, f"teacher.path {str(teacher)!r} holds a 'llama' teacher", "--overwrite")
    assert _snapshot(teacher) == before
    assert cli.main([*argv, "--overwrite"]) == 0
    assert json.loads((teacher / "config.json").read_text())["model_type"] == "gpt2"


# --------------------------------------------------------------------------------------------------------------------
# Output made from other inputs, full disks


def test_prepare_refuses_output_from_other_inputs_unless_overwrite(
    teachers: dict[str, Path], prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = _snapshot(prepared)
    argv = ["prepare", CONFIG, *_overrides(tmp_path, teachers["llama"], "data.seed=1")]
    _fails(argv, caplog, str(prepared / "meta.json"), "seed (0 → 1)", "distill prepare CONFIG --overwrite")
    assert _snapshot(prepared) == before
    assert cli.main([*argv, "--overwrite"]) == 0
    assert json.loads((prepared / "meta.json").read_text())["seed"] == 1


def test_a_full_disk_during_prepare_names_the_output_and_keeps_the_old_one(
    teachers: dict[str, Path], prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    before = _snapshot(prepared)

    def full(self: Dataset, path: str, **kwargs: object) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Dataset, "save_to_disk", full)
    argv = ["prepare", CONFIG, *_overrides(tmp_path, teachers["llama"], "data.seed=1"), "--overwrite"]
    _fails(argv, caplog, f"{prepared}: no space left on the device", "MiB free there", "free some space")
    assert _snapshot(prepared) == before
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []  # no staging left


def test_atomic_writes_on_a_full_disk_keep_the_old_file_and_leave_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_bytes(target, b"the old manifest")
    real_fsync = os.fsync

    def full(descriptor: int) -> None:
        if ".tmp-" in os.readlink(f"/proc/self/fd/{descriptor}"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match=f"{target}: no space left on the device"):
        atomic_write_bytes(target, b"the new manifest")
    assert target.read_bytes() == b"the old manifest"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["manifest.json"]

    published = tmp_path / "published"
    published.mkdir()
    (published / "keep.txt").write_text("old")
    with pytest.raises(StorageError, match=f"{published}: no space left"), staged_directory(published) as staging:
        (staging / "keep.txt").write_text("new")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (published / "keep.txt").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["manifest.json", "published"]


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints: foreign pickles, an earlier run


class Payload:
    """Unpickling this creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


@pytest.fixture(scope="module")
def tiny_cache(teachers: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared data and a dense cache of the tiny LLaMA teacher (what train and eval read before any checkpoint)."""
    root = tmp_path_factory.mktemp("tiny_cache")
    for command in ("prepare", "cache"):
        assert cli.main([command, CONFIG, *_overrides(root, teachers["llama"])]) == 0
    return root


def _run_overrides(cache: Path, teachers: dict[str, Path], runs: Path, *extra: str) -> list[str]:
    return [*_overrides(cache, teachers["llama"], "mlflow.enabled=false", *extra), f"train.output_dir={runs}"]


@pytest.mark.slow
def test_a_crafted_checkpoint_is_refused_by_eval_and_resume_and_never_unpickled(
    tiny_cache: Path, teachers: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "marker"
    runs = tmp_path / "runs"
    crafted = runs / "checkpoints" / "step-00000001"
    crafted.mkdir(parents=True)
    (crafted / "trainer_state.json").write_text(json.dumps({"step": 1, "position": 4}))
    torch.save({"module": Payload(marker)}, crafted / "mp_rank_00_model_states.pt")
    (runs / "checkpoints" / "latest").write_text("step-00000001")
    before = _snapshot(tmp_path)
    overrides = _run_overrides(tiny_cache, teachers, runs)
    manifest = str(crafted / "checkpoint.sha256.json")
    _fails(["eval", CONFIG, "--checkpoint", str(crafted), *overrides], caplog, manifest, "your own runs")
    _fails(["eval", "--checkpoint", str(crafted), CONFIG, *overrides], caplog, manifest)
    _fails(["train", CONFIG, *overrides], caplog, manifest, "your own runs")  # resume=auto finds it
    assert not marker.exists()
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_resume_never_on_an_earlier_run_is_refused(
    tiny_cache: Path, teachers: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs = tmp_path / "runs"
    (runs / "checkpoints" / "step-00000004").mkdir(parents=True)
    (runs / "checkpoints" / "step-00000004" / "trainer_state.json").write_text("{}")
    (runs / "student").mkdir()
    (runs / "student" / "model.safetensors").write_bytes(b"weights")
    before = _snapshot(tmp_path)
    argv = ["train", CONFIG, *_run_overrides(tiny_cache, teachers, runs, "train.resume=never")]
    _fails(argv, caplog, f"train.output_dir {str(runs)!r} already holds a run", "step-00000004", "train.resume")
    assert _snapshot(tmp_path) == before
