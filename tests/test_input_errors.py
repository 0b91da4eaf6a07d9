"""Input a user can fix is one clean error (issue 25): `distill …` exits 2 with one line naming the file or key, what
was found and the fix, and writes nothing — a config key given twice, a section that is not a mapping, a directory
key that names a file, settings the teacher cannot serve, a broken pretrained student, a forged shard header, a
micro-batch larger than the data, a binary file named `.txt`.

The helpers (`_fails`: exit 2, one message, no traceback) are `test_bad_input`'s; the runs use its tiny teachers.
"""

from __future__ import annotations

import dataclasses
import gzip
import shutil
import struct
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.data.prepare import TOKENIZER_FILES
from pipeline.models.loading import build_student, load_teacher_config
from pipeline.targets import layout
from pipeline.targets.layout import read_header
from pipeline.targets.manifest import read_manifest, sha256_bytes, write_manifest
from tests.test_bad_input import CONFIG, CORPUS, _fails, _overrides, _snapshot

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`distill teacher import` of the tiny random LLaMA teacher (6 heads, a vocabulary of 384 tokens)."""
    path = tmp_path_factory.mktemp("teacher") / "llama"
    assert cli.main(["teacher", "import", CONFIG, "teacher.source=tiny-random-llama", f"teacher.path={path}"]) == 0
    return path


@pytest.fixture(scope="module")
def tiny_cache(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared data (77 train samples) and a dense cache of the tiny teacher."""
    root = tmp_path_factory.mktemp("tiny_cache")
    for command in ("prepare", "cache"):
        assert cli.main([command, CONFIG, *_overrides(root, teacher)]) == 0
    return root


def _on_cache(cache: Path, teacher: Path, runs: Path, *extra: str) -> list[str]:
    """Overrides that read `cache`'s data and targets and write a run into `runs`."""
    return [*_overrides(cache, teacher, "mlflow.enabled=false", *extra), f"train.output_dir={runs}"]


# --------------------------------------------------------------------------------------------------------------------
# The config file


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        (
            "train:\n  lr: 0.5\n  output_dir: mine\nstudent:\n  num_heads: 3\ntrain:\n  max_steps: 3\n",
            "key 'train' appears twice (line 1 and line 6)",
        ),
        ("train:\n  lr: 0.5\n  max_steps: 3\n  lr: 0.1\n", "key 'train.lr' appears twice (line 2 and line 4)"),
        ("teacher: 5\n", "teacher: got an int (5), expected a mapping of its keys (dtype, path, source)"),
        ("- train\n- student\n", "the document is a list (['train', 'student']), expected a mapping of sections"),
    ],
    ids=["second-section", "nested-key", "section-not-a-mapping", "top-level-list"],
)
def test_a_config_of_the_wrong_shape_exits_2_naming_the_file_and_the_key(
    text: str, culprit: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second `train:` block used to drop the first one's `lr` and `output_dir` silently."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    message = _fails(["config", str(path)], caplog, f"{path}: {culprit}")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("command", "key", "under"),
    [
        ("prepare", "data.output_dir", False),
        ("prepare", "data.output_dir", True),
        ("cache", "cache.output_dir", False),
        ("train", "train.output_dir", False),
        ("train", "train.output_dir", True),
    ],
)
def test_a_directory_key_that_names_a_file_is_refused_before_anything_runs(
    command: str, key: str, under: bool, tiny_cache: Path, teacher: Path, tmp_path: Path, caplog
) -> None:
    """On the tiny cache's data and targets: without the check, cache and train stopped with a traceback
    (NotADirectoryError, FileExistsError)."""
    occupied = tmp_path / "occupied"
    occupied.write_text("a file, not a directory")
    value = occupied / "run" if under else occupied
    before = _snapshot(tmp_path)
    found = f"lies under {str(occupied)!r}, which is a file" if under else "is a file"
    argv = [command, CONFIG, *_on_cache(tiny_cache, teacher, tmp_path / "runs"), f"{key}={value}"]
    _fails(argv, caplog, f"{key}: {str(value)!r} {found}", f"move the file away or set {key} to another path")
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------------
# Settings the teacher cannot serve (checked with the resolved student, before the teacher's weights are loaded)


@pytest.mark.parametrize(
    ("extra", "culprit"),
    [
        (
            ["distill.kd.top_k=1000"],
            "distill.kd.top_k: got 1000, expected at most the teacher's vocabulary of 384 tokens",
        ),
        (
            ["distill.attn.match=selective", "student.num_heads=8", "student.hidden_size=64"],
            "student.num_heads: got 8, expected at most the teacher's 6 heads with distill.attn.match: selective",
        ),
        (
            ["cache.attn_targets=[shd, selective]", "cache.head_counts=[3, 8]"],
            "cache.head_counts: got [3, 8], expected head counts of at most the teacher's 6 heads",
        ),
    ],
    ids=["top-k-beyond-vocabulary", "selective-student-heads", "selective-cache-head-counts"],
)
@pytest.mark.parametrize("command", ["cache", "train"])
def test_settings_beyond_the_teachers_vocabulary_or_heads_are_refused(
    command: str, extra: list[str], culprit: str, tiny_cache: Path, teacher: Path, tmp_path: Path, caplog
) -> None:
    """On prepared data (train: and the tiny cache), so that nothing but the setting stands in the way; without the
    check `distill cache` stopped with a ValueError traceback from the logits' top k."""
    targets = tiny_cache / "targets" if command == "train" else tmp_path / "targets"
    overrides = _on_cache(tiny_cache, teacher, tmp_path / "runs", *extra, f"cache.output_dir={targets}")
    before = _snapshot(tmp_path)
    _fails([command, CONFIG, *overrides], caplog, culprit)
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------------
# A pretrained student (`student.init: DIR`, `distill eval --model DIR`) that cannot be loaded


@pytest.fixture(scope="module")
def pretrained(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A student of tiny.yaml's shape saved with save_pretrained, with the teacher's tokenizer files."""
    directory = tmp_path_factory.mktemp("pretrained") / "student"
    config = load_teacher_config(teacher)
    student = build_student(config, num_layers=2, hidden_size=48, num_heads=3, num_kv_heads=1, intermediate_size=96)
    student.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        if (teacher / name).is_file():
            shutil.copy(teacher / name, directory / name)
    return directory


def _break_config(directory: Path, content: str) -> None:
    (directory / "config.json").write_text(content)


def _truncate_weights(directory: Path, size: int = 5000) -> None:
    with open(directory / "model.safetensors", "r+b") as handle:
        handle.truncate(size)


BREAKAGES = {
    "config-not-json": (lambda d: _break_config(d, "{not json"), "config.json: not a readable JSON file"),
    "config-without-model-type": (lambda d: _break_config(d, "{}"), "config.json: field 'model_type' is missing"),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), "cannot load its weights (Error no file named"),
    "truncated-weights": (_truncate_weights, "cannot load its weights (Error while deserializing header"),
}


@pytest.mark.slow
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_pretrained_student_is_named_by_train_and_eval(
    breakage: str, pretrained: Path, tiny_cache: Path, teacher: Path, tmp_path: Path, caplog
) -> None:
    broken = tmp_path / "student"
    shutil.copytree(pretrained, broken)
    damage, culprit = BREAKAGES[breakage]
    damage(broken)
    runs = tmp_path / "runs"
    before = _snapshot(tmp_path)
    train = ["train", CONFIG, *_on_cache(tiny_cache, teacher, runs, f"student.init={broken}", "train.max_steps=1")]
    _fails(train, caplog, str(broken), culprit, "student.init must be 'scratch', 'teacher' or a directory")
    _fails(
        ["eval", CONFIG, *_on_cache(tiny_cache, teacher, runs), "--model", str(broken)],
        caplog,
        str(broken),
        culprit,
        "pass --model a directory written by `distill train`",
    )
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------------
# A forged safetensors header


def _forge_header_length(path: Path, length: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", length)
    path.write_bytes(data)
    return bytes(data)


def test_verify_refuses_a_forged_header_length_before_reading_it(
    tiny_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 1 TiB header length behind a manifest that lists the forged bytes (a cache received from elsewhere): read
    as declared it was a MemoryError."""
    cache = tmp_path / "targets"
    shutil.copytree(tiny_cache / "targets", cache)
    split = cache / "train"
    manifest = read_manifest(split)
    entry = manifest.shards[1]
    data = _forge_header_length(split / entry.file, 1 << 40)
    manifest.shards[1] = dataclasses.replace(entry, bytes=len(data), sha256=sha256_bytes(data))
    write_manifest(split, manifest)
    before = _snapshot(tmp_path)
    culprit = f"{split / entry.file}: corrupt or forged safetensors file: its header length {1 << 40} exceeds the file"
    _fails(["cache", "verify", str(cache)], caplog, culprit, "delete the shard and re-run `distill cache`")
    assert _snapshot(tmp_path) == before


def _header_of(text: bytes) -> bytes:
    """A safetensors file that is only a header: its length, then `text`."""
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize(
    ("forge", "culprit"),
    [
        (lambda raw: struct.pack("<Q", len(raw) - 7) + raw[8:], "exceeds the file"),
        (lambda raw: raw, "exceeds the limit (16 bytes after the length)"),
        (lambda raw: raw[:5], "truncated safetensors file (5 bytes, no header)"),
        (lambda raw: _header_of(b"[]"), "(a JSON list, expected an object)"),
        (lambda raw: _header_of(b'{"x": {"a": 1}}'), "(entry 'x' has dtype None, expected a string)"),
        (
            lambda raw: _header_of(b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}'),
            "(entry 'x' has data_offsets [4, 0], expected [begin, end] with 0 ≤ begin ≤ end)",
        ),
    ],
    ids=["length-beyond-file", "length-beyond-limit", "no-header", "not-an-object", "entry-without-dtype", "offsets"],
)
def test_read_header_checks_the_length_and_the_entries(
    forge, culprit: str, tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every reader of a shard's header (verify, the writer's resume) gets a ValueError naming the file, never a
    MemoryError or a KeyError; a real shard's header is a few KB, far below safetensors' 100 MB limit."""
    shard = tiny_cache / "targets" / "train" / "shard-00000.safetensors"
    raw = shard.read_bytes()
    assert struct.unpack("<Q", raw[:8])[0] < 100_000
    if "limit" in culprit:
        monkeypatch.setattr(layout, "MAX_HEADER_BYTES", 16)
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(forge(raw))
    with pytest.raises(ValueError, match=f"^{forged}: ") as error:
        read_header(str(forged))
    assert culprit in str(error.value)


# --------------------------------------------------------------------------------------------------------------------
# Data: a micro-batch larger than the split, a binary file named .txt


@pytest.mark.parametrize(("extra", "largest"), [(["train.micro_batch_size=78"], 77), (["cache.max_samples=20"], 20)])
def test_a_micro_batch_larger_than_the_train_split_is_refused(
    extra: list[str], largest: int, tiny_cache: Path, teacher: Path, tmp_path: Path, caplog
) -> None:
    """78 of 77 samples would serve one sample twice in every micro-batch (1000 of them: each 13 times)."""
    micro = f"train.micro_batch_size={largest + 1}"
    argv = ["train", CONFIG, *_on_cache(tiny_cache, teacher, tmp_path / "runs", *extra, micro)]
    before = _snapshot(tmp_path)
    culprits = (f"train.micro_batch_size: got {largest + 1}, expected at most {largest}", f"holds {largest} samples")
    _fails(argv, caplog, *culprits, "raise train.grad_accum for the same global batch")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("compressed", [False, True], ids=["txt", "txt.gz"])
def test_a_binary_file_named_txt_is_named_with_the_byte_offset(
    compressed: bool, teacher: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = CORPUS.read_bytes()[:3000]
    assert b"\xff" not in text
    content = text + b"\xff\xfe\x00\x81 binary"
    binary = tmp_path / ("data.txt.gz" if compressed else "data.txt")
    binary.write_bytes(gzip.compress(content) if compressed else content)
    argv = ["prepare", CONFIG, *_overrides(tmp_path, teacher), f"data.sources=[{CORPUS}, {binary}]"]
    _fails(argv, caplog, f"data source {str(binary)!r} (as text): byte 3000 (0xff) is not UTF-8", "data.sources")
    assert not (tmp_path / "data").exists()
