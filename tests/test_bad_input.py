"""Every user mistake is one clean error: `distill …` exits 2 with a message naming the file, key or field, the value
found and the fix — and whatever an earlier run wrote is byte-identical afterwards.

Each test runs the real command line in this process (`cli.main`) on tiny random teachers; faults (a full disk) are
simulated by replacing one write.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from pipeline import cli
from pipeline.data.prepare import load_prepared
from pipeline.infra.atomic import StorageError, atomic_write_bytes, staged_directory
from pipeline.targets import store, writer
from pipeline.targets.layout import read_header, shard_bytes
from pipeline.targets.manifest import read_manifest, sha256_bytes, write_manifest
from pipeline.targets.needs import TargetNeeds
from pipeline.targets.stream import TargetStream

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


def test_a_publish_killed_mid_way_is_recovered_by_the_next_one(tmp_path: Path) -> None:
    """A kill between the two renames leaves only `.x.retired` (the old output): the next publish puts it back
    before staging; a kill inside the block leaves `.x.staging-*`: it is removed."""
    published = tmp_path / "published"
    published.mkdir()
    (published / "keep.txt").write_text("old")
    published.rename(tmp_path / ".published.retired")
    (tmp_path / ".published.staging-0000beef").mkdir()
    with pytest.raises(RuntimeError, match="stop"), staged_directory(published):
        assert (published / "keep.txt").read_text() == "old"  # put back before anything else
        raise RuntimeError("stop")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["published"]
    assert (published / "keep.txt").read_text() == "old"


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


# --------------------------------------------------------------------------------------------------------------------
# Cache contents: bad values behind matching checksums, crafted manifests, other sizes


def _plant(split_dir: Path, sample_id: int, name: str, index: tuple[int, ...], value: float) -> str:
    """Put `value` at `index` of tensor `name` of sample `sample_id` and list the shard's new size and sha256 in the
    manifest, so that only the values are wrong (as a buggy writer or a crafted copy would leave them). Returns the
    shard's file name."""
    manifest = read_manifest(split_dir)
    for position, entry in enumerate(manifest.shards):
        path = split_dir / entry.file
        tensors = {key: tensor.clone() for key, tensor in load_file(path).items()}
        rows = (tensors["sample_ids"] == sample_id).nonzero()
        if len(rows):
            tensors[name][(int(rows[0]), *index)] = value
            data = shard_bytes(tensors, read_header(str(path))[1])
            path.write_bytes(data)
            manifest.shards[position] = dataclasses.replace(entry, bytes=len(data), sha256=sha256_bytes(data))
            write_manifest(split_dir, manifest)
            return entry.file
    raise AssertionError(f"sample id {sample_id} is in no shard of {split_dir}")


def _copy_cache(tiny_cache: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_cache / "targets", tmp_path / "targets")
    return tmp_path / "targets"


def _attention_map(split_dir: Path, heads: int = 3) -> str:
    """The first cached layer's SHD map for `heads` student heads (what the tiny student's attention term reads)."""
    return f"attn.L{read_manifest(split_dir).fingerprint['cached_layers'][0]}.H{heads}.shd"


def test_verify_names_a_bad_value_and_files_the_manifest_does_not_list(
    tiny_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = _copy_cache(tiny_cache, tmp_path)
    name = _attention_map(cache / "train")
    sample_id = int(load_file(cache / "train" / "shard-00002.safetensors")["sample_ids"][5])
    shard = _plant(cache / "train", sample_id, name, (1, 7), float("nan"))
    before = _snapshot(tmp_path)
    culprits = (str(cache / "train" / shard), f"tensor '{name}'", f"nan at sample id {sample_id} (shard row 5), head 1")
    _fails(["cache", "verify", str(cache)], caplog, *culprits, "query row 3, key 1; expected a finite value")
    assert _snapshot(tmp_path) == before

    clean = _copy_cache(tiny_cache, tmp_path / "clean")
    (clean / "validation" / "shard-00007.safetensors").write_bytes(b"left by a larger cache")
    before = _snapshot(tmp_path)
    _fails(["cache", "verify", str(clean)], caplog, f"{clean / 'validation'}: 1 file(s) the manifest does not list")
    _fails(["cache", "verify", str(clean / "validation")], caplog, "shard-00007.safetensors; expected only manifest")
    assert _snapshot(tmp_path) == before


def _craft_listed_twice(split_dir: Path) -> str:
    manifest = read_manifest(split_dir)
    manifest.shards[2] = dataclasses.replace(manifest.shards[2], file=manifest.shards[1].file)
    write_manifest(split_dir, manifest)
    return f"shard '{manifest.shards[1].file}' is listed twice"


def _craft_absolute_path(split_dir: Path) -> str:
    outside = split_dir.parent.parent / "elsewhere.safetensors"
    shutil.copy(split_dir / "shard-00001.safetensors", outside)
    manifest = read_manifest(split_dir)
    manifest.shards[1] = dataclasses.replace(manifest.shards[1], file=str(outside))
    write_manifest(split_dir, manifest)
    return f"shard path {str(outside)!r} is not a file name inside the cache directory"


def _craft_link_out(split_dir: Path) -> str:
    outside = split_dir.parent.parent / "elsewhere.safetensors"
    shutil.copy(split_dir / "shard-00001.safetensors", outside)
    (split_dir / "linked.safetensors").symlink_to(outside)
    manifest = read_manifest(split_dir)
    manifest.shards[1] = dataclasses.replace(manifest.shards[1], file="linked.safetensors")
    write_manifest(split_dir, manifest)
    return f"resolves to {outside}, outside the cache directory"


def _craft_duplicate_sample_ids(split_dir: Path) -> str:
    """Shard 2 holding shard 1's samples again: new bytes, listed with their checksum and id range."""
    first = {key: tensor.clone() for key, tensor in load_file(split_dir / "shard-00001.safetensors").items()}
    path = split_dir / "shard-00002.safetensors"
    data = shard_bytes(first, read_header(str(path))[1])
    path.write_bytes(data)
    manifest = read_manifest(split_dir)
    ids = first["sample_ids"]
    manifest.shards[2] = dataclasses.replace(
        manifest.shards[2],
        bytes=len(data),
        sha256=sha256_bytes(data),
        sample_id_min=int(ids.min()),
        sample_id_max=int(ids.max()),
    )
    write_manifest(split_dir, manifest)
    return f"shard-00002.safetensors: sample id {int(ids.min())} is already held by shard 'shard-00001.safetensors'"


@pytest.mark.parametrize(
    "craft", [_craft_listed_twice, _craft_absolute_path, _craft_link_out, _craft_duplicate_sample_ids]
)
def test_train_and_verify_refuse_a_crafted_manifest_before_reading_a_shard(
    craft: Any, tiny_cache: Path, teachers: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = _copy_cache(tiny_cache, tmp_path)
    culprit = craft(cache / "train")
    before = _snapshot(tmp_path)
    runs = tmp_path / "runs"
    train = ["train", CONFIG, *_run_overrides(tiny_cache, teachers, runs, f"cache.output_dir={cache}")]
    _fails(train, caplog, culprit)
    _fails(["cache", "verify", str(cache / "train")], caplog, culprit)
    assert _snapshot(tmp_path) == before


def test_a_cache_of_other_sizes_or_inputs_is_replaced_only_with_overwrite(
    prepared: Path, teachers: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = _overrides(tmp_path, teachers["llama"])
    assert cli.main(["cache", CONFIG, *overrides]) == 0
    before = _snapshot(tmp_path)
    manifest = str(tmp_path / "targets" / "train" / "manifest.json")
    refusals = {
        "cache.max_samples=20": "num_samples (cache.max_samples) = 77, the config asks for 20",
        "cache.shard_size=16": "shard_size (cache.shard_size) = 8, the config asks for 16",
        "distill.kd.top_k=8": "fingerprint field 'top_k' = 16, the config asks for 8",
    }
    for override, culprit in refusals.items():
        _fails(["cache", CONFIG, *overrides, override], caplog, manifest, culprit, "distill cache CONFIG --overwrite")
        assert _snapshot(tmp_path) == before
    assert cli.main(["cache", "--overwrite", CONFIG, *overrides, *refusals]) == 0
    replaced = read_manifest(tmp_path / "targets" / "train")
    assert (replaced.num_samples, replaced.shard_size, replaced.fingerprint["top_k"]) == (20, 16, 8)
    assert sorted(path.name for path in (tmp_path / "targets" / "train").iterdir()) == [
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert cli.main(["cache", "verify", str(tmp_path / "targets")]) == 0


def test_the_writer_refuses_non_finite_targets_naming_them(
    prepared: Path, teachers: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """A teacher batch with a NaN (an overflowing teacher) is not written: the error names the shard, the tensor and
    its layer, the sample id; the shards before it stay, and a re-run without the fault resumes after them."""
    real_compute = writer.compute_targets
    calls = 0

    def overflowing(teacher: Any, input_ids: torch.Tensor, sample_ids: torch.Tensor, settings: Any, *rest: Any) -> dict:
        nonlocal calls
        calls += 1
        targets = real_compute(teacher, input_ids, sample_ids, settings, *rest)
        if calls == 4:  # shard 1 (8 samples in batches of 4), its second batch
            targets[f"attn.L{settings.layers[-1]}.H2.shd"][1, 0, 2] = float("inf")
        return targets

    monkeypatch.setattr(writer, "compute_targets", overflowing)
    before = _snapshot(prepared)
    shard = tmp_path / "targets" / "train" / "shard-00001.safetensors"
    sample_id = int(load_prepared(prepared)[0]["train"][13]["sample_id"])
    culprits = (f"{shard}: not written", "(teacher layer 3)", f"inf at sample id {sample_id} (shard row 5)", "dtype")
    _fails(["cache", CONFIG, *_overrides(tmp_path, teachers["llama"])], caplog, *culprits)
    assert _snapshot(prepared) == before
    assert sorted(path.name for path in shard.parent.iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    kept = (shard.parent / "shard-00000.safetensors").read_bytes()
    monkeypatch.undo()
    assert cli.main(["cache", CONFIG, *_overrides(tmp_path, teachers["llama"])]) == 0
    assert (shard.parent / "shard-00000.safetensors").read_bytes() == kept
    assert cli.main(["cache", "verify", str(tmp_path / "targets")]) == 0


@pytest.mark.slow
def test_a_non_finite_target_is_refused_by_the_reader_and_without_that_check_stops_training_at_its_step(
    tiny_cache: Path, teachers: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Three clean steps (checkpoint at 3), then an inf (what an overflowing fp16 teacher writes) planted in an
    attention target of a sample of step 6 (a save step) and a resume to step 8. With the reader's value check
    bypassed the attention loss of step 6 is inf and the run stops there naming step, term and sample ids, having
    saved nothing: the newest checkpoint is still step 3. With the check, the reader refuses the shard on first use,
    naming file, tensor and sample id — also for a NaN, which the map losses would otherwise treat as a zero
    probability (`map_losses._soften_dense`), so the loss would stay finite. Either way the earlier run's output is
    byte-identical (its metrics log keeps every line up to the checkpoint: a resume drops
    the lines after it)."""
    cache = _copy_cache(tiny_cache, tmp_path)
    runs = tmp_path / "runs"
    extra = ("train.save_every=3", "train.eval_every=0", "train.keep_checkpoints=0")
    train = ["train", CONFIG, *_run_overrides(tiny_cache, teachers, runs, f"cache.output_dir={cache}", *extra)]
    assert cli.main([*train, "train.max_steps=3"]) == 0
    needs = TargetNeeds((), 1.0, read_manifest(cache / "train").fingerprint["top_k"])
    stream = TargetStream(directory=cache / "train", needs=needs, batch_size=4, seed=0, num_batches=6, prefetch=False)
    step_six = list(stream)[5]["sample_ids"].tolist()
    name = _attention_map(cache / "train")
    log = "runs/metrics.jsonl"

    def assert_earlier_output_kept(before: dict[str, bytes]) -> None:
        after = _snapshot(tmp_path)
        checkpointed = [line for line in before.pop(log).splitlines() if json.loads(line)["step"] <= 3]
        assert after.pop(log).splitlines()[: len(checkpointed)] == checkpointed
        assert after == before
        assert (runs / "checkpoints" / "latest").read_text() == "step-00000003"
        assert sorted(path.name for path in (runs / "checkpoints").glob("step-*")) == ["step-00000003"]

    shard = _plant(cache / "train", step_six[1], name, (0, 7), float("inf"))
    before = _snapshot(tmp_path)
    monkeypatch.setattr(store, "check_shard_targets", lambda *args: None)
    message = _fails([*train, "train.max_steps=8"], caplog, "step 6: loss term attn is not finite", str(step_six))
    assert "nothing was updated or saved after the last checkpoint" in message
    assert_earlier_output_kept(before)
    monkeypatch.undo()

    for value in (float("inf"), float("nan")):
        _plant(cache / "train", step_six[1], name, (0, 7), value)
        before = _snapshot(tmp_path)
        culprits = (str(cache / "train" / shard), f"tensor '{name}'", f"{value} at sample id {step_six[1]}")
        _fails([*train, "train.max_steps=8"], caplog, *culprits, "head 0, query row 3, key 1; expected a finite")
        assert_earlier_output_kept(before)
