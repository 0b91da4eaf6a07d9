"""`distill prepare`: tokenize a corpus with the teacher's tokenizer and pack it into fixed-length sequences.

Output (`output_dir`): `train/` and `validation/` (and `test/` with `test_fraction` > 0; datasets Arrow,
`save_to_disk`) with columns `sample_id` (int64)
and `input_ids` (int32, exactly `seq_len` tokens), plus `meta.json` (fingerprints, counts, settings). Labels are not
stored: they are the next-token targets of `input_ids`, derived by the trainer. With `data_format` `chat` or
`prompt_response` each sequence is one conversation, right-padded, with two more columns: `response_mask` (int8,
`seq_len`; 1 marks a response token) and `length` (int32, the real tokens); see `pipeline.data.chat`.

- Text documents come in source order (`data.sources` reads them); each one is tokenized without special tokens and
  followed by the tokenizer's eos token; the concatenated stream is cut into `seq_len` chunks and the remainder
  dropped. Sample ids are 0..N-1 in stream order, so they do not depend on `num_proc`.
- The split is by sample id: each id gets a fixed hash of (seed, id) and the `round(N·val_fraction)` smallest
  hashes are validation, the next `round(N·test_fraction)` the held-out test split (for a final table that no
  tuning has seen). The hash is ours (splitmix64), so the split survives numpy and datasets upgrades.
- Re-running on the same inputs is a no-op ("up to date"). Different inputs never silently reuse old output: the
  run refuses with an error naming the fields that differ, unless `overwrite=True` (`distill prepare --overwrite`),
  and then rebuilds in a staging directory that atomically replaces the old one. A full disk leaves the old output
  as it was and names the directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict, Features, List, Value
from datasets.table import InMemoryTable
from torch import Tensor

from pipeline.config.validation import require_directory_path
from pipeline.data import DataError
from pipeline.data.chat import ChatFormat
from pipeline.data.chat_corpus import ChatCounts, chat_features, encode_conversations, read_conversations
from pipeline.data.sources import (
    BUILDERS,
    describe_source,
    file_sha256,
    load_documents,
    resolve_source,
    source_fingerprint,
)
from pipeline.infra.atomic import staged_directory
from pipeline.models.loading import load_tokenizer

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
META_NAME = "meta.json"
SPLITS = ("train", "validation")
"""The splits every prepared output has; `test` is there too when `test_fraction` > 0."""
FINGERPRINT_FIELDS = (
    "schema_version",
    "source_fingerprint",
    "tokenizer_fingerprint",
    "seq_len",
    "val_fraction",
    "seed",
    "text_field",
    "file_format",
    "data_format",
    "prompt_field",
    "response_field",
    "system_field",
    "chat_template_fingerprint",
)
"""Everything that changes the packed output; `num_proc` does not, by construction. The last five are in the
settings of chat formats only, so a text output keeps the fingerprint it had before chat formats existed. `strict`
is not here: it refuses inputs, it never changes the output of those it accepts."""
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
"""Files beside the tokenizer's that hold its chat template (else it is in tokenizer_config.json)."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""Files that decide how text becomes ids; their bytes make the tokenizer fingerprint."""


def prepare_dataset(
    sources: list[str],
    tokenizer_dir: Path,
    output_dir: Path,
    *,
    seq_len: int,
    val_fraction: float,
    num_proc: int,
    seed: int,
    text_field: str = "text",
    file_format: str | None = None,
    overwrite: bool = False,
    test_fraction: float = 0.0,
    data_format: str = "text",
    prompt_field: str = "prompt",
    response_field: str = "response",
    system_field: str | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Tokenize and pack `sources` into `output_dir` (see the module docstring) and return its meta dict.

    `file_format` forces one builder (`text`, `json`, `parquet`, `csv`) for every local file instead of inferring
    it from extensions. With `overwrite=False`, an existing output prepared from other inputs is an error.
    `data_format` `chat` or `prompt_response` (with its field names) renders records with the tokenizer's chat
    template; `strict` refuses the first malformed record instead of skipping it.
    """
    _check_settings(sources, seq_len, val_fraction, num_proc, file_format)
    if data_format not in ("text", "chat", "prompt_response"):
        raise DataError(f"data.format={data_format!r}: expected 'text', 'chat' or 'prompt_response'")
    if not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"data.test_fraction={test_fraction!r}: expected a fraction in [0, 1) with val_fraction + test_fraction < 1"
        )
    output_dir = Path(output_dir)
    resolved = [resolve_source(source, file_format) for source in sources]
    settings = {
        "schema_version": SCHEMA_VERSION,
        "source_fingerprint": source_fingerprint(resolved),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_dir),
        "seq_len": seq_len,
        "val_fraction": val_fraction,
        "seed": seed,
        "text_field": text_field,
        "file_format": file_format,
        # Only when used: outputs prepared without a test split keep their fingerprint.
        **({"test_fraction": test_fraction} if test_fraction > 0 else {}),
    }
    chat_format = None
    if data_format != "text":
        chat_format = ChatFormat(data_format, prompt_field, response_field, system_field)  # type: ignore[arg-type]
        settings["data_format"] = data_format
        settings["chat_template_fingerprint"] = chat_template_fingerprint(tokenizer_dir)
        if data_format == "prompt_response":
            settings.update(prompt_field=prompt_field, response_field=response_field, system_field=system_field)
    fingerprint = _digest(settings)
    existing = _existing_meta(output_dir, overwrite)
    if existing is not None and existing.get("fingerprint") == fingerprint and _splits_present(output_dir):
        logger.info("%s: up to date (fingerprint %s)", output_dir, fingerprint[:12])
        return existing
    if existing is not None and not overwrite:
        changed = [
            f"{key} ({_short(existing.get(key))} → {_short(settings.get(key))})"
            for key in (*FINGERPRINT_FIELDS, "test_fraction")
            if existing.get(key) != settings.get(key)
        ] or ["the train/validation directories are incomplete"]
        raise DataError(
            f"{output_dir / META_NAME} was prepared from different inputs: {', '.join(changed)}; "
            "rebuild it with `distill prepare CONFIG --overwrite`, or choose another data.output_dir"
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer in {str(tokenizer_dir)!r} has no eos_token to separate documents with")
    if chat_format is not None and not tokenizer.chat_template:
        raise DataError(
            f"data.format={data_format!r} renders conversations with the teacher's chat template, but the tokenizer "
            f"in {str(tokenizer_dir)!r} has none (no {' or '.join(CHAT_TEMPLATE_FILES)}, no chat_template in "
            "tokenizer_config.json); use data.format: text, or a teacher with a chat template"
        )
    with staged_directory(output_dir) as staging:
        cache_dir = staging / ".load-cache"
        if chat_format is None:
            documents = load_documents(resolved, text_field, cache_dir)
            tokenized = _tokenize(documents, tokenizer, num_proc)
            packed, stream_tokens = _pack(tokenized, seq_len)
            if len(packed) == 0:
                raise DataError(
                    f"data.sources hold {stream_tokens} tokens (eos included), fewer than one sequence of seq_len="
                    f"{seq_len}; add text or lower seq_len"
                )
            num_documents = len(documents)
        else:
            counts = ChatCounts()
            conversations = read_conversations(resolved, chat_format, strict, counts)
            packed, stream_tokens = encode_conversations(
                conversations,
                tokenizer,
                seq_len=seq_len,
                num_proc=num_proc,
                strict=strict,
                counts=counts,
                teacher_dir=Path(tokenizer_dir),
            )
            num_documents = len(conversations)
        held_out = split_validation_ids(len(packed), val_fraction + test_fraction, seed)
        validation_count = len(split_validation_ids(len(packed), val_fraction, seed))
        split_of = np.zeros(len(packed), dtype=np.int8)  # 0 train, 1 validation, 2 test
        split_of[_by_key(held_out, seed)[:validation_count]] = 1
        split_of[_by_key(held_out, seed)[validation_count:]] = 2
        split_rows = {"train": np.flatnonzero(split_of == 0), "validation": np.flatnonzero(split_of == 1)}
        if test_fraction > 0:
            split_rows["test"] = np.flatnonzero(split_of == 2)
        if chat_format is not None:
            _refuse_empty_splits(split_rows, counts, val_fraction, test_fraction)
        for split, rows in split_rows.items():
            # An empty split still needs one (empty) shard, or load_from_disk cannot open it.
            packed.select(rows).save_to_disk(str(staging / split), num_shards=1 if len(rows) == 0 else None)
        shutil.rmtree(cache_dir, ignore_errors=True)
        meta = {
            **settings,
            "fingerprint": fingerprint,
            "sources": [describe_source(source) for source in resolved],
            "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
            "eos_token_id": tokenizer.eos_token_id,
            "num_documents": num_documents,
            "stream_tokens": stream_tokens,
            "dropped_tokens": stream_tokens - len(packed) * seq_len,
            "num_samples": len(packed),
            "splits": {
                split: {"samples": len(rows), "tokens": len(rows) * seq_len} for split, rows in split_rows.items()
            },
        }
        if chat_format is not None:
            meta.update(_chat_meta(packed, split_rows, counts, tokenizer, stream_tokens, strict))
            _log_chat(output_dir, meta)
        (staging / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    logger.info(
        "%s: %d documents → %d sequences of %d tokens (%s; %d tail tokens dropped)",
        output_dir,
        meta["num_documents"],
        meta["num_samples"],
        seq_len,
        ", ".join(f"{split} {counts['samples']}" for split, counts in meta["splits"].items()),
        meta["dropped_tokens"],
    )
    return meta


def _refuse_empty_splits(
    split_rows: dict[str, np.ndarray], counts: ChatCounts, val_fraction: float, test_fraction: float
) -> None:
    """A split that should hold conversations but holds none after the malformed and dropped ones left is refused,
    named (a text corpus cannot get here: it has at least one sequence, and each split gets one when it can)."""
    wanted = {"train": True, "validation": val_fraction > 0, "test": test_fraction > 0}
    for split, rows in split_rows.items():
        if wanted[split] and len(rows) == 0:
            kept = sum(len(other) for other in split_rows.values())
            raise DataError(
                f"the {split} split is empty: of {counts.records} records, {kept} became sequences "
                f"({sum(counts.malformed.values())} malformed, {counts.outcomes['dropped_no_response']} without a "
                "response token within data.seq_len); add conversations"
                + (", or set data.val_fraction / data.test_fraction to 0" if split != "train" else "")
            )


def _chat_meta(
    packed: Dataset,
    split_rows: dict[str, np.ndarray],
    counts: ChatCounts,
    tokenizer: Any,
    stream_tokens: int,
    strict: bool,
) -> dict[str, Any]:
    """meta.json's chat fields: the record counts, real and response tokens (overall and per split: `tokens` stays
    the positions, as for text), the fill ratio (real tokens ÷ positions) and the padding token."""
    columns = packed.with_format("numpy", columns=["length", "response_mask"])
    lengths = np.asarray(columns["length"], dtype=np.int64)
    response = np.asarray(columns["response_mask"], dtype=np.int64).reshape(len(packed), -1).sum(axis=1)
    positions = max(len(packed) * packed.features["input_ids"].length, 1)
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "strict": strict,
        "dropped_tokens": stream_tokens - int(lengths.sum()),
        "chat": {
            **counts.to_meta(),
            "sequences": len(packed),
            "real_tokens": int(lengths.sum()),
            "response_tokens": int(response.sum()),
            "fill_ratio": round(float(lengths.sum()) / positions, 4),
            "response_share": round(float(response.sum()) / max(int(lengths.sum()), 1), 4),
        },
        "splits": {
            split: {
                "samples": len(rows),
                "tokens": len(rows) * packed.features["input_ids"].length,
                "real_tokens": int(lengths[rows].sum()),
                "response_tokens": int(response[rows].sum()),
            }
            for split, rows in split_rows.items()
        },
    }


def _log_chat(output_dir: Path, meta: dict[str, Any]) -> None:
    """The chat counts in one line, and a warning naming the first malformed records when some were skipped."""
    chat = meta["chat"]
    logger.info(
        "%s: %d records → %d conversations → %d sequences (%d truncated at a turn boundary, %d inside their first "
        "response, %d dropped without a response token within seq_len); fill ratio %.3f, response share %.3f",
        output_dir,
        chat["records"],
        meta["num_documents"],
        chat["sequences"],
        chat["truncated_at_turn"],
        chat["truncated_in_response"],
        chat["dropped_no_response"],
        chat["fill_ratio"],
        chat["response_share"],
    )
    if chat["malformed"]:
        logger.warning(
            "%d malformed records skipped (%s); the first: %s",
            chat["malformed"],
            ", ".join(f"{kind} {count}" for kind, count in chat["malformed_by_kind"].items()),
            "; ".join(chat["first_malformed"]),
        )


def data_format(meta: dict[str, Any]) -> str:
    """The format of prepared data from its meta.json: `text`, `chat` or `prompt_response` (data prepared before the
    chat formats existed has no field and is text)."""
    return meta.get("data_format", "text")


def load_prepared(output_dir: Path) -> tuple[DatasetDict, dict[str, Any]]:
    """Open a `prepare` output: its `train`/`validation` (and `test`) datasets and its validated `meta.json`."""
    output_dir = Path(output_dir)
    meta = _read_meta(output_dir / META_NAME)
    splits = {}
    for split in meta["splits"]:
        path = output_dir / split
        try:
            dataset = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as error:
            raise DataError(f"{path}: not a saved dataset ({error}); run `distill prepare` again") from error
        expected_rows = meta["splits"][split]["samples"]
        if not isinstance(dataset, Dataset) or dataset.num_rows != expected_rows:
            found = dataset.num_rows if isinstance(dataset, Dataset) else type(dataset).__name__
            raise DataError(f"{path}: {found} rows, but meta.json field splits.{split}.samples says {expected_rows}")
        chat = meta.get("data_format", "text") != "text"
        expected_features = chat_features(meta["seq_len"]) if chat else _features(meta["seq_len"])
        if dataset.features != expected_features:
            raise DataError(f"{path}: columns {dataset.features}, expected {expected_features} (meta.json seq_len)")
        splits[split] = dataset
    return DatasetDict(splits), meta


def calibration_sequences(rows: Dataset, count: int) -> Tensor:
    """The first `count` sequences [N, T] int64 of a prepared split for teacher statistics (what a carve keeps, which
    heads `selective` picks): text rows as they are; chat rows' real tokens (`length`) packed back to back into rows
    of T, so that no right padding — a tenth of a chat split at T 256 — enters the statistics. Fewer than `count`
    rows when the split runs out."""
    if "length" not in rows.column_names:
        chosen = rows.select(range(min(count, len(rows)))).with_format("torch", columns=["input_ids"])
        return torch.stack(list(chosen["input_ids"])).long() if len(chosen) else torch.zeros(0, 0, dtype=torch.long)
    seq_len = len(rows[0]["input_ids"])
    wanted, pieces, total = count * seq_len, [], 0
    for start in range(0, len(rows), 256):
        chunk = rows[start : start + 256]
        for tokens, length in zip(chunk["input_ids"], chunk["length"], strict=True):
            pieces.append(torch.as_tensor(tokens[:length], dtype=torch.long))
            total += length
        if total >= wanted:
            break
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    usable = min(len(stream) // seq_len, count) * seq_len
    return stream[:usable].reshape(-1, seq_len)


def chat_template_fingerprint(tokenizer_dir: Path) -> str:
    """sha256 over the chat template files beside the tokenizer (`CHAT_TEMPLATE_FILES`, `additional_chat_templates/`);
    a template inside tokenizer_config.json is already in the tokenizer fingerprint."""
    directory = Path(tokenizer_dir)
    present = [directory / name for name in CHAT_TEMPLATE_FILES if (directory / name).is_file()]
    present += sorted((directory / "additional_chat_templates").glob("*.jinja"))
    digest = hashlib.sha256()
    for path in present:
        digest.update(f"{path.relative_to(directory)}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """sha256 over the names and bytes of the tokenizer files in `tokenizer_dir` (see `TOKENIZER_FILES`)."""
    directory = Path(tokenizer_dir)
    present = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not present:
        raise DataError(
            f"tokenizer directory {str(directory)!r} holds none of {', '.join(TOKENIZER_FILES)}; "
            "expected the teacher directory written by `distill teacher import`"
        )
    digest = hashlib.sha256()
    for path in present:
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def split_validation_ids(num_samples: int, val_fraction: float, seed: int) -> np.ndarray:
    """Sorted sample ids of the validation split: the `round(num_samples·val_fraction)` smallest split keys.

    At least one sample goes to each side when `val_fraction > 0` and there are two or more samples, so a tiny
    corpus still has something to validate on.
    """
    if val_fraction <= 0 or num_samples < 2:
        return np.zeros(0, dtype=np.int64)
    count = min(max(round(num_samples * val_fraction), 1), num_samples - 1)
    sample_ids = np.arange(num_samples, dtype=np.int64)
    order = np.lexsort((sample_ids, _split_keys(sample_ids, seed)))
    return np.sort(sample_ids[order[:count]])


def _by_key(sample_ids: np.ndarray, seed: int) -> np.ndarray:
    """`sample_ids` ordered by their split key (ties by id): the validation ids come first among the held-out ones."""
    return sample_ids[np.lexsort((sample_ids, _split_keys(sample_ids, seed)))]


def _split_keys(sample_ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (seed, sample_id): a fixed hash, so the split never depends on a library's RNG stream."""
    mask = (1 << 64) - 1
    offset = np.uint64(((seed + 1) * 0x9E3779B97F4A7C15) & mask)
    with np.errstate(over="ignore"):
        z = sample_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + offset
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _check_settings(
    sources: list[str], seq_len: int, val_fraction: float, num_proc: int, file_format: str | None
) -> None:
    """Reject impossible settings before any work, naming the setting."""
    if not sources:
        raise DataError("data.sources is empty; expected at least one file, directory or hub dataset name")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"data.seq_len={seq_len!r}: expected an integer ≥ 2")
    if not 0 <= val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction!r}: expected a fraction in [0, 1)")
    if num_proc < 1:
        raise DataError(f"data.num_proc={num_proc!r}: expected an integer ≥ 1")
    if file_format is not None and file_format not in set(BUILDERS.values()):
        raise DataError(f"file_format={file_format!r}: expected one of {sorted(set(BUILDERS.values()))} or None")


def _digest(settings: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `settings`."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _short(value: Any) -> str:
    """A fingerprint shortened for an error message; other values as they are."""
    return f"{value[:12]}…" if isinstance(value, str) and len(value) == 64 else repr(value)


def _existing_meta(output_dir: Path, overwrite: bool) -> dict[str, Any] | None:
    """The meta dict of an earlier run in `output_dir`, None for a fresh or empty directory.

    A non-empty directory without meta.json is never replaced (it is not ours); a damaged meta.json is replaced
    only with `overwrite=True`.
    """
    require_directory_path(output_dir, "data.output_dir")
    if not output_dir.exists():
        return None
    meta_path = output_dir / META_NAME
    if not meta_path.is_file():
        if any(output_dir.iterdir()):
            raise DataError(
                f"data.output_dir {str(output_dir)!r} is not empty and holds no {META_NAME}: it is not a prepared "
                "dataset; remove it or choose another data.output_dir"
            )
        return None
    try:
        return _read_meta(meta_path)
    except DataError:
        if overwrite:
            return {}
        raise


def _splits_present(output_dir: Path) -> bool:
    """Whether every split directory was saved completely (its `state.json` is written last)."""
    meta = output_dir / META_NAME
    splits = json.loads(meta.read_text()).get("splits", {}) if meta.is_file() else {}
    return all((output_dir / split / "state.json").is_file() for split in (*SPLITS, *splits))


def _read_meta(path: Path) -> dict[str, Any]:
    """Parse and check meta.json, naming the file and the field when something is missing or malformed."""
    if not path.is_file():
        raise DataError(f"{path}: missing; run `distill prepare` to create the packed data")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    expected_types: dict[str, type | tuple[type, ...]] = {
        "schema_version": int,
        "fingerprint": str,
        "source_fingerprint": str,
        "tokenizer_fingerprint": str,
        "seq_len": int,
        "val_fraction": (int, float),
        "seed": int,
        "text_field": str,
        "num_samples": int,
        "splits": dict,
    }
    for key, expected in expected_types.items():
        if key not in meta:
            raise DataError(f"{path}: field {key!r} is missing")
        if not isinstance(meta[key], expected) or isinstance(meta[key], bool):
            raise DataError(f"{path}: field {key!r} is {meta[key]!r}, expected {_type_names(expected)}")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise DataError(
            f"{path}: field 'schema_version' is {meta['schema_version']}, this version reads {SCHEMA_VERSION}; "
            "run `distill prepare CONFIG --overwrite`"
        )
    for split in SPLITS:
        counts = meta["splits"].get(split)
        if not isinstance(counts, dict) or not all(isinstance(counts.get(key), int) for key in ("samples", "tokens")):
            raise DataError(f"{path}: field 'splits.{split}' is {counts!r}, expected {{'samples': int, 'tokens': int}}")
    return meta


def _type_names(expected: type | tuple[type, ...]) -> str:
    """'int' or 'int or float', for error messages."""
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(kind.__name__ for kind in types)


def _tokenize_batch(batch: dict[str, list[Any]], tokenizer: Any, eos_token_id: int) -> dict[str, list[list[int]]]:
    """Token ids of each document followed by eos; empty documents contribute nothing (not even an eos)."""
    texts = [text or "" for text in batch["text"]]
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return {"input_ids": [[*ids, eos_token_id] if text else [] for text, ids in zip(texts, encoded, strict=True)]}


def _tokenize(documents: Dataset, tokenizer: Any, num_proc: int) -> Dataset:
    """Tokenize every document (batched, `num_proc` processes); rows stay in document order."""
    return documents.map(
        _tokenize_batch,
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["text"],
        features=Features({"input_ids": List(Value("int32"))}),
        fn_kwargs={"tokenizer": tokenizer, "eos_token_id": tokenizer.eos_token_id},
        desc="tokenizing",
    )


def _features(seq_len: int) -> Features:
    """The packed columns."""
    return Features({"sample_id": Value("int64"), "input_ids": List(Value("int32"), length=seq_len)})


def _pack(tokenized: Dataset, seq_len: int) -> tuple[Dataset, int]:
    """Concatenate every document's ids and cut the stream into rows of `seq_len`; returns the rows and the stream
    length. Works on the Arrow buffers directly: one int32 copy of the stream in memory (4 bytes per token)."""
    column = tokenized.data.column("input_ids")
    chunks = [chunk.flatten() for chunk in column.chunks]
    stream = pa.concat_arrays(chunks) if chunks else pa.array([], type=pa.int32())
    num_samples = len(stream) // seq_len
    values = stream.slice(0, num_samples * seq_len)
    table = pa.table(
        {
            "sample_id": pa.array(np.arange(num_samples, dtype=np.int64)),
            "input_ids": pa.FixedSizeListArray.from_arrays(values, seq_len),
        }
    )
    packed = Dataset(InMemoryTable(table))
    return packed.cast(_features(seq_len)) if packed.features != _features(seq_len) else packed, len(stream)
