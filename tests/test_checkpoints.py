"""Checkpoints as a trust boundary: a sha256 manifest after every save, verified before any file is unpickled;
publishing (`latest` moves last), pruning, a full disk during a save, and `train.resume=never` on an earlier run.

DeepSpeed is replaced by a fake engine that writes files the way `engine.save_checkpoint` does (one process, no
process group), so these tests run in a fraction of a second; the real engine is exercised by tests/test_train.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.training import checkpoints
from pipeline.training.checkpoints import (
    CHECKPOINT_MANIFEST,
    CHECKPOINTS,
    CheckpointError,
    TrainState,
    claim_fresh_run,
    find_checkpoint,
    load_checkpoint_weights,
    plan_resume,
    publish_run,
    recover_run_directory,
    save_checkpoint,
    verify_checkpoint,
)

WEIGHTS = {"weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "bias": torch.ones(2)}
DISK_FULL = (
    "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"
)
SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 238336 vs 238224"
"""What `torch.save` under DeepSpeed raised when a checkpoint filled a 1.5 MB tmpfs (no errno, no file name)."""


class FakeEngine:
    """Writes what DeepSpeed's ZeRO-0 save writes: `mp_rank_00_model_states.pt` with `module` and the client state,
    plus a second file like a ZeRO shard; `fail` makes the second write stop half-way with torch's write error."""

    def __init__(self, fail: bool = False, error: str = DISK_FULL) -> None:
        self.fail = fail
        self.error = error

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool = True) -> None:
        assert not save_latest  # `latest` is ours to move, after the manifest
        directory = Path(save_dir) / tag
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"module": WEIGHTS, **client_state}, directory / "mp_rank_00_model_states.pt")
        if self.fail:
            (directory / "zero_shard.pt").write_bytes(b"half a shard")
            raise RuntimeError(self.error)
        (directory / "zero_shard.pt").write_bytes(b"a shard of optimizer state" * 100)


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file below `root` with its bytes: the reference for "untouched"."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _config(output_dir: Path, resume: str = "auto") -> Any:
    return config_from_dict({"train": {"output_dir": str(output_dir), "resume": resume}})


def _save(output_dir: Path, step: int, keep: int = 0, engine: FakeEngine | None = None) -> Path:
    save_checkpoint(engine or FakeEngine(), output_dir / CHECKPOINTS, TrainState(step=step, position=4 * step), keep)
    return output_dir / CHECKPOINTS / checkpoints.checkpoint_tag(step)


class Payload:
    """Unpickling this creates `marker`: the code a crafted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


def craft_checkpoint(directory: Path, marker: Path) -> Path:
    """A directory that looks like a ZeRO-0 checkpoint of step 1 whose model-states pickle runs code."""
    directory.mkdir(parents=True)
    (directory / checkpoints.TRAINER_STATE).write_text(json.dumps({"step": 1, "position": 4}))
    torch.save({"module": Payload(marker)}, directory / "mp_rank_00_model_states.pt")
    return directory


def test_the_payload_really_runs_when_unpickled(tmp_path: Path) -> None:
    """The crafted file is a real threat: without the manifest check, torch.load(weights_only=False) runs it."""
    crafted = craft_checkpoint(tmp_path / "step-00000001", tmp_path / "marker")
    torch.load(crafted / "mp_rank_00_model_states.pt", weights_only=False)
    assert (tmp_path / "marker").is_dir()


def test_a_save_writes_a_manifest_of_every_file_then_moves_latest(tmp_path: Path) -> None:
    directory = _save(tmp_path, 3)
    manifest = json.loads((directory / CHECKPOINT_MANIFEST).read_text())
    files = sorted(path.name for path in directory.iterdir() if path.name != CHECKPOINT_MANIFEST)
    assert files == ["mp_rank_00_model_states.pt", "trainer_state.json", "zero_shard.pt"]
    assert manifest["files"] == {
        name: {
            "bytes": (directory / name).stat().st_size,
            "sha256": hashlib.sha256((directory / name).read_bytes()).hexdigest(),
        }
        for name in files
    }
    assert (tmp_path / CHECKPOINTS / "latest").read_text() == "step-00000003"
    assert json.loads((directory / "trainer_state.json").read_text())["position"] == 12
    verify_checkpoint(directory)
    assert find_checkpoint(_config(tmp_path)) == (tmp_path / CHECKPOINTS, "step-00000003")
    weights = load_checkpoint_weights(tmp_path / CHECKPOINTS, "step-00000003")
    assert weights.keys() == WEIGHTS.keys() and all(torch.equal(weights[key], WEIGHTS[key]) for key in WEIGHTS)


@pytest.mark.parametrize("tamper", ["changed", "same_size_changed", "added", "removed", "symlink", "no_manifest"])
def test_a_tampered_checkpoint_is_refused_naming_the_file(tmp_path: Path, tamper: str) -> None:
    directory = _save(tmp_path, 2)
    states = directory / "mp_rank_00_model_states.pt"
    if tamper == "changed":
        states.write_bytes(states.read_bytes() + b"\0")
        culprit, why = states, "bytes, the manifest says"
    elif tamper == "same_size_changed":
        data = bytearray(states.read_bytes())
        data[len(data) // 2] ^= 0xFF
        states.write_bytes(bytes(data))
        culprit, why = states, "sha256"
    elif tamper == "added":
        culprit, why = directory / "extra" / "zero_pp_rank_1_optim_states.pt", "not in the checkpoint's manifest"
        culprit.parent.mkdir()
        culprit.write_bytes(b"x")
    elif tamper == "removed":
        (directory / "zero_shard.pt").unlink()
        culprit, why = directory / "zero_shard.pt", "listed in checkpoint.sha256.json but missing"
    elif tamper == "symlink":
        outside = tmp_path / "outside.pt"
        outside.write_bytes((directory / "zero_shard.pt").read_bytes())
        (directory / "zero_shard.pt").unlink()
        (directory / "zero_shard.pt").symlink_to(outside)
        culprit, why = directory / "zero_shard.pt", "not a regular file"
    else:
        (directory / CHECKPOINT_MANIFEST).unlink()
        culprit, why = directory / CHECKPOINT_MANIFEST, "missing"
    before = _snapshot(tmp_path)
    for attempt in (
        lambda: verify_checkpoint(directory),
        lambda: load_checkpoint_weights(tmp_path / CHECKPOINTS, "step-00000002"),
        lambda: plan_resume(_config(tmp_path), 1, 0, False),
    ):
        with pytest.raises(CheckpointError) as error:
            attempt()
        assert str(culprit) in str(error.value) and why in str(error.value)
        assert "your own runs" in str(error.value)
    assert _snapshot(tmp_path) == before


def test_a_crafted_pickle_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    output = tmp_path / "run"
    crafted = craft_checkpoint(output / CHECKPOINTS / "step-00000001", marker)
    (output / CHECKPOINTS / "latest").write_text("step-00000001")
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=str(crafted / CHECKPOINT_MANIFEST)):
        load_checkpoint_weights(output / CHECKPOINTS, "step-00000001")
    with pytest.raises(CheckpointError, match=str(crafted / CHECKPOINT_MANIFEST)):
        plan_resume(_config(output), 1, 0, False)
    with pytest.raises(CheckpointError, match=str(crafted / CHECKPOINT_MANIFEST)):
        checkpoints.convert_to_universal(output / CHECKPOINTS, "step-00000001")
    assert not marker.exists()
    assert _snapshot(tmp_path) == before


def test_a_manifest_covering_a_crafted_pickle_still_only_loads_weights(tmp_path: Path) -> None:
    """Our own torch.load is weights_only: even a consistent manifest does not make a payload run there."""
    marker = tmp_path / "marker"
    crafted = craft_checkpoint(tmp_path / CHECKPOINTS / "step-00000001", marker)
    checkpoints.write_checkpoint_manifest(crafted)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint_weights(tmp_path / CHECKPOINTS, "step-00000001")
    assert not marker.exists()


@pytest.mark.parametrize("tag", ["../elsewhere", "/tmp/step-00000001", ".."])
def test_latest_naming_a_path_outside_the_checkpoints_is_refused(tmp_path: Path, tag: str) -> None:
    (tmp_path / CHECKPOINTS).mkdir()
    (tmp_path / CHECKPOINTS / "latest").write_text(tag)
    with pytest.raises(CheckpointError, match=f"names {tag!r}, expected the name of a checkpoint directory"):
        find_checkpoint(_config(tmp_path))


def test_pruning_keeps_the_newest_complete_checkpoints_and_drops_an_abandoned_future(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    save_dir = tmp_path / CHECKPOINTS
    assert sorted(path.name for path in save_dir.glob("step-*")) == ["step-00000003", "step-00000004"]
    legacy = save_dir / "step-00000000"  # no manifest (an older version's checkpoint): never pruned
    legacy.mkdir()
    (legacy / "trainer_state.json").write_text("{}")
    (save_dir / "latest").write_text("step-00000003")  # resumed from step 3: step 4 is an abandoned future
    _save(tmp_path, 4, keep=2)  # the resumed run saves step 4 again, from scratch
    _save(tmp_path, 5, keep=2)
    assert sorted(path.name for path in save_dir.glob("step-*")) == ["step-00000000", "step-00000004", "step-00000005"]
    verify_checkpoint(save_dir / "step-00000004")


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_names_the_directory(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError) as error:
        _save(tmp_path, 2, engine=FakeEngine(fail=True))
    message = str(error.value)
    assert str(tmp_path / CHECKPOINTS / "step-00000002") in message and "file write failed" in message
    assert "MiB free there); a full disk or quota is the usual cause" in message
    assert str(tmp_path / CHECKPOINTS / "step-00000001") in message  # where the run resumes from
    assert _snapshot(tmp_path) == before  # the partial checkpoint is gone, latest and step 1 untouched


def test_a_short_write_of_torchs_zip_writer_names_the_file_its_disk_and_the_fix(tmp_path: Path) -> None:
    """On a full disk `torch.save` may fail with only "unexpected pos …": still a storage error (exit 2) naming the
    file being written, the disk, and the checkpoint the run resumes from."""
    _save(tmp_path, 1)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError) as error:
        _save(tmp_path, 2, engine=FakeEngine(fail=True, error=SHORT_WRITE))
    message = str(error.value)
    assert f"{tmp_path / CHECKPOINTS / 'step-00000002' / 'zero_shard.pt'}: writing it failed" in message
    assert "unexpected pos 238336 vs 238224" in message and "free some space" in message
    assert "the disk is the one mounted at /" in message and "\n" not in message
    assert str(tmp_path / CHECKPOINTS / "step-00000001") in message
    assert _snapshot(tmp_path) == before


def test_a_full_disk_while_writing_the_manifest_is_named_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, 1)
    before = _snapshot(tmp_path)
    real_fsync = os.fsync

    def full_for_the_manifest(descriptor: int) -> None:
        if CHECKPOINT_MANIFEST in os.readlink(f"/proc/self/fd/{descriptor}"):  # the manifest's temporary
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(checkpoints.os, "fsync", full_for_the_manifest)
    with pytest.raises(CheckpointError, match="no space left") as error:
        _save(tmp_path, 2)
    assert str(tmp_path / CHECKPOINTS / "step-00000002" / CHECKPOINT_MANIFEST) in str(error.value)
    assert _snapshot(tmp_path) == before


def test_resume_never_refuses_an_earlier_run_unless_overwrite_which_builds_the_new_one_aside(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _save(runs, 1)
    (runs / "student").mkdir()
    (runs / "student" / "config.json").write_text("{}")
    before = _snapshot(runs)
    with pytest.raises(CheckpointError) as error:
        claim_fresh_run(_config(runs, resume="never"), overwrite=False)
    message = str(error.value)
    assert f"train.output_dir {str(runs)!r}" in message and "train.resume is 'never'" in message
    assert "step-00000001" in message and "student" in message and "--overwrite" in message
    assert _snapshot(runs) == before
    assert plan_resume(_config(runs, resume="never"), 1, 0, False) is None  # never resumes, and never deletes

    aside = tmp_path / ".runs.overwrite"
    (aside / "checkpoints").mkdir(parents=True)  # an earlier --overwrite attempt, killed: started over, not continued
    assert claim_fresh_run(_config(runs, resume="never"), overwrite=True) == aside
    assert _snapshot(runs) == before and list(aside.iterdir()) == []
    assert claim_fresh_run(_config(tmp_path / "fresh", resume="never"), overwrite=False) == tmp_path / "fresh"

    (aside / "student").mkdir()
    (aside / "student" / "config.json").write_text('{"new": true}')
    publish_run(aside, runs)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["runs"]
    assert _snapshot(runs) == {"student/config.json": b'{"new": true}'}


def test_a_swap_killed_between_its_renames_is_finished_by_the_next_job(tmp_path: Path) -> None:
    """`publish_run` renames the earlier run to `.runs.retired`, then the new one into place: a kill between the two
    leaves no `runs`; the next job's recovery moves the complete new run in (an incomplete one: the old back)."""
    runs, retired, aside = tmp_path / "runs", tmp_path / ".runs.retired", tmp_path / ".runs.overwrite"
    for directory, text in ((retired, "old"), (aside, "new")):
        (directory / "student").mkdir(parents=True)
        (directory / "student" / "config.json").write_text(text)
    recover_run_directory(runs, starting_over=False)
    assert (runs / "student" / "config.json").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["runs"]

    runs.rename(retired)
    (aside / "checkpoints").mkdir(parents=True)  # killed before its export: not complete
    recover_run_directory(runs, starting_over=False)
    assert (runs / "student" / "config.json").read_text() == "new"  # the earlier run, put back
    assert sorted(path.name for path in tmp_path.iterdir()) == [".runs.overwrite", "runs"]
