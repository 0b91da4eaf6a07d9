"""`distill prepare` with `data.format: chat | prompt_response`: every record of the sources read, checked and
encoded into one padded sequence per conversation (`pipeline.data.chat`), with the counts meta.json records.

Malformed records (not an object, a missing field, an unknown role, an empty response, no response turn, a record
the template refuses, a file cut off mid-record) are skipped, counted by kind and the first few named; with
`data.strict: true` the first one is refused instead, naming the file and the record.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Features, List, Value

from pipeline.data import DataError
from pipeline.data.chat import (
    OUTCOMES,
    ChatFormat,
    MalformedRecord,
    TemplateNotTurnByTurn,
    conversation_of,
    encode_conversation,
    record_name,
)
from pipeline.data.records import BadRecord, iter_records
from pipeline.data.sources import Source

logger = logging.getLogger(__name__)

NAMED_PROBLEMS = 5
"""Malformed records named in the log and in meta.json (all are counted)."""


@dataclass
class ChatCounts:
    """What became of the records: kept, malformed (by kind, the first few named), conversations whose leading
    assistant turns were dropped, truncated and dropped sequences."""

    records: int = 0
    malformed: Counter = field(default_factory=Counter)
    first_malformed: list[str] = field(default_factory=list)
    leading_responses_dropped: int = 0
    outcomes: Counter = field(default_factory=Counter)

    def skip(self, where: str, error: MalformedRecord, strict: bool) -> None:
        """Count a malformed record, or refuse it under `data.strict`."""
        if strict:
            raise DataError(
                f"data.strict: {where}: {error}; fix the record, or set data.strict: false to skip malformed "
                "records (they are counted in meta.json)"
            )
        self.malformed[error.kind] += 1
        if len(self.first_malformed) < NAMED_PROBLEMS:
            self.first_malformed.append(f"{where}: {error}")

    def to_meta(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "malformed": sum(self.malformed.values()),
            "malformed_by_kind": dict(sorted(self.malformed.items())),
            "first_malformed": self.first_malformed,
            "leading_responses_dropped": self.leading_responses_dropped,
            **{outcome: self.outcomes[outcome] for outcome in OUTCOMES if outcome != "template_refused"},
        }


def chat_features(seq_len: int) -> Features:
    """The packed columns of a chat-format output."""
    return Features(
        {
            "sample_id": Value("int64"),
            "input_ids": List(Value("int32"), length=seq_len),
            "response_mask": List(Value("int8"), length=seq_len),
            "length": Value("int32"),
        }
    )


def read_conversations(sources: list[Source], chat_format: ChatFormat, strict: bool, counts: ChatCounts) -> Dataset:
    """Every well-formed record of `sources` in order as a row (`where`: file and record, `messages`)."""
    wheres, conversations = [], []
    for source in sources:
        if not source.files:
            raise DataError(
                f"data source {source.name!r}: data.format={chat_format.kind!r} reads local .json/.jsonl/.parquet "
                "files or `sharegpt`, not hub datasets; download the records to a file first"
            )
        for file in source.files:
            for index, record in iter_records(Path(file)):
                counts.records += 1
                where = f"data source {str(file)!r} {record_name(record, index)}"
                try:
                    if isinstance(record, BadRecord):
                        kind = "cut_off" if record.reason.startswith("cut off") else "invalid_json"
                        raise MalformedRecord(kind, f"{record.reason} (byte {record.offset})")
                    messages, leading = conversation_of(record, chat_format)
                except MalformedRecord as error:
                    counts.skip(where, error, strict)
                    continue
                counts.leading_responses_dropped += leading > 0
                wheres.append(where)
                conversations.append(messages)
    message = List({"role": Value("string"), "content": Value("string")})
    return Dataset.from_dict(
        {"where": wheres, "messages": conversations}, features=Features({"where": Value("string"), "messages": message})
    )


def encode_conversations(
    conversations: Dataset,
    tokenizer: Any,
    *,
    seq_len: int,
    num_proc: int,
    strict: bool,
    counts: ChatCounts,
    teacher_dir: Path,
) -> tuple[Dataset, int]:
    """Encode every conversation (`num_proc` processes) and keep the sequences with response tokens, numbered
    0..N-1 in record order; returns them and the tokens of the conversations before any cut."""
    if len(conversations) == 0:  # `map` would not add its columns to an empty dataset
        return Dataset.from_dict({name: [] for name in chat_features(seq_len)}, features=chat_features(seq_len)), 0
    try:
        encoded = conversations.map(
            _encode_batch,
            batched=True,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=["messages"],
            features=Features(
                {
                    "where": Value("string"),
                    "input_ids": List(Value("int32"), length=seq_len),
                    "response_mask": List(Value("int8"), length=seq_len),
                    "length": Value("int32"),
                    "full_length": Value("int64"),
                    "outcome": Value("int8"),
                    "problem": Value("string"),
                }
            ),
            fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len, "pad_token_id": tokenizer.pad_token_id},
            desc="rendering and tokenizing conversations",
        )
    except TemplateNotTurnByTurn as error:
        raise DataError(
            f"data.format: the chat template of the teacher in {str(teacher_dir)!r} does not render turn by turn "
            f"({error}); the response mask is found from those prefixes, so this template cannot be used"
        ) from error
    outcomes = np.asarray(encoded["outcome"], dtype=np.int8)
    refused = OUTCOMES.index("template_refused")
    for row in np.flatnonzero(outcomes == refused):
        refusal = encoded[int(row)]
        counts.skip(refusal["where"], MalformedRecord("template_refused", refusal["problem"]), strict)
    for code, outcome in enumerate(OUTCOMES):
        if outcome != "template_refused":
            counts.outcomes[outcome] = int(np.count_nonzero(outcomes == code))
    kept = np.flatnonzero((outcomes != refused) & (outcomes != OUTCOMES.index("dropped_no_response")))
    full_tokens = int(np.asarray(encoded["full_length"], dtype=np.int64)[outcomes != refused].sum())
    packed = encoded.select(kept).remove_columns(["where", "full_length", "outcome", "problem"])
    packed = packed.add_column("sample_id", np.arange(len(kept), dtype=np.int64))
    return packed.select_columns(list(chat_features(seq_len))).cast(chat_features(seq_len)), full_tokens


def _encode_batch(batch: dict[str, list[Any]], tokenizer: Any, seq_len: int, pad_token_id: int) -> dict[str, list]:
    columns: dict[str, list] = {
        name: [] for name in ("input_ids", "response_mask", "length", "full_length", "outcome", "problem")
    }
    for messages in batch["messages"]:
        try:
            encoded = encode_conversation(messages, tokenizer, seq_len, pad_token_id)
            values = (encoded.input_ids, encoded.response_mask, encoded.length, encoded.full_length, encoded.outcome)
            problem = ""
        except MalformedRecord as error:
            values = (np.zeros(seq_len, np.int32), np.zeros(seq_len, np.int8), 0, 0, OUTCOMES.index("template_refused"))
            problem = str(error)
        for name, value in zip(("input_ids", "response_mask", "length", "full_length", "outcome"), values, strict=True):
            columns[name].append(value)
        columns["problem"].append(problem)
    return columns
