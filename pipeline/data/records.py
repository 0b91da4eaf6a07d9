"""Chat records read one at a time from local files (`iter_records`): a JSON array (`.json`, streamed, so a file cut
off mid-record still yields every complete record before the cut), JSON Lines (`.jsonl`, `.ndjson`, or a `.json` that
does not start with `[`) and Parquet; `.gz`/`.bz2`/`.xz` compressed JSON too.

A record that cannot be read is yielded as a `BadRecord` (the caller counts, names or refuses it) instead of stopping
the file: a JSON Lines line that is not JSON, or the tail of a file cut off mid-record. A JSON array with a syntax
error before its end cannot be resynchronised: the rest of the file is one `BadRecord` at that byte.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pyarrow.parquet as pq

from pipeline.data import DataError
from pipeline.data.sources import COMPRESSION_SUFFIXES, OPENERS

logger = logging.getLogger(__name__)

_CHUNK_CHARS = 1 << 22
"""Characters read at a time from a JSON array; a record longer than this is read in several chunks."""
_WHITESPACE = " \t\n\r"


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be read: where it starts (`index`: its position in the file, `offset`: its byte)
    and why."""

    index: int
    offset: int
    reason: str


def iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(index, record) for every record of `path` in file order; a record that cannot be read comes as a `BadRecord`.

    The index counts records from 0 in the file, good and bad alike, so it names a record in messages.
    """
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind == ".parquet":
        yield from _parquet_records(path)
        return
    if kind not in (".json", ".jsonl", ".ndjson"):
        raise DataError(
            f"data source {str(path)!r}: chat records are read from .json, .jsonl, .ndjson or .parquet files, "
            f"not {kind or 'a file without extension'!r}"
        )
    opener = OPENERS.get(path.suffix.lower(), open)
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            first = _first_character(handle)
            if first == "[":
                yield from _array_records(handle, path)
            else:
                yield from _line_records(handle)
    except UnicodeDecodeError as error:
        raise DataError(f"data source {str(path)!r}: not UTF-8 ({error}); expected a UTF-8 JSON file") from error
    except OSError as error:
        raise DataError(f"data source {str(path)!r}: cannot be read ({error})") from error


def _first_character(handle: TextIO) -> str:
    """The first non-whitespace character (the handle is rewound to the start)."""
    while chunk := handle.read(4096):
        stripped = chunk.lstrip(_WHITESPACE)
        if stripped:
            handle.seek(0)
            return stripped[0]
    handle.seek(0)
    return ""


def _line_records(handle: TextIO) -> Iterator[tuple[int, Any]]:
    """JSON Lines: one record per non-blank line; a line that is not JSON (the last one of a cut-off file) is bad."""
    offset = 0
    index = 0
    for line in handle:
        start = offset
        offset += len(line.encode("utf-8"))
        if not line.strip():
            continue
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as error:
            complete = line.endswith("\n")
            reason = f"not valid JSON ({error.msg})" if complete else "cut off mid-record (the file ends inside it)"
            yield index, BadRecord(index, start, reason)
        index += 1


def _array_records(handle: TextIO, path: Path) -> Iterator[tuple[int, Any]]:
    """The elements of one top-level JSON array, decoded one at a time with `raw_decode` over a buffer of chunks.

    A decode error with more of the file unread may only mean the record is longer than the buffer: read more and
    retry. At the end of the file it is either a record cut off by the end (the warning names the file, the byte
    where the record starts and how many complete records came before) or a syntax error inside the array.
    """
    decoder = json.JSONDecoder()
    stream = _Stream(handle)
    stream.next_character()
    stream.position += 1  # the opening '[' (`iter_records` saw it)
    index = 0
    while True:
        character = stream.next_character()
        if character == "]" and index == 0:
            return
        if character == "":
            logger.warning("%s: the file ends after record %d without the closing ']'", path, index - 1)
            return
        try:
            record, end = decoder.raw_decode(stream.buffer, stream.position)
        except json.JSONDecodeError as error:
            if stream.read_more():
                continue
            offset = stream.offset()
            if _is_cut_off(stream.buffer[stream.position :]):
                logger.warning(
                    "%s: the file ends inside record %d (from byte %d): it was cut off mid-record; the %d complete "
                    "records before it are read",
                    path,
                    index,
                    offset,
                    index,
                )
                yield index, BadRecord(index, offset, "cut off mid-record (the file ends inside it)")
            else:
                reason = f"not valid JSON ({error.msg}); the rest of the file from this byte cannot be read"
                yield index, BadRecord(index, offset, reason)
            return
        yield index, record
        index += 1
        stream.position = end
        separator = stream.next_character()
        if separator == "]":
            return
        if separator != ",":
            found = repr(separator) if separator else "the end of the file"
            logger.warning(
                "%s: %s after record %d (byte %d), expected ',' or ']'", path, found, index - 1, stream.offset()
            )
            if separator:
                reason = f"expected ',' or ']' between records, found {separator!r}; the rest of the file is unread"
                yield index, BadRecord(index, stream.offset(), reason)
            return
        stream.position += 1


class _Stream:
    """A text handle read in chunks into `buffer`; `position` indexes the buffer, `consumed_bytes` counts the
    UTF-8 bytes of the file that were dropped before the buffer's start."""

    def __init__(self, handle: TextIO) -> None:
        self.handle = handle
        self.buffer = ""
        self.position = 0
        self.consumed_bytes = 0

    def read_more(self) -> bool:
        """Append the next chunk (dropping what lies before `position`); False at the end of the file."""
        if self.position > 0:
            self.consumed_bytes += len(self.buffer[: self.position].encode("utf-8"))
            self.buffer, self.position = self.buffer[self.position :], 0
        chunk = self.handle.read(_CHUNK_CHARS)
        self.buffer += chunk
        return chunk != ""

    def next_character(self) -> str:
        """Skip whitespace and return the character at `position` (reading on as needed); '' at the end."""
        while True:
            while self.position < len(self.buffer) and self.buffer[self.position] in _WHITESPACE:
                self.position += 1
            if self.position < len(self.buffer):
                return self.buffer[self.position]
            if not self.read_more():
                return ""

    def offset(self) -> int:
        """The byte offset in the file of `position`."""
        return self.consumed_bytes + len(self.buffer[: self.position].encode("utf-8"))


def _is_cut_off(text: str) -> bool:
    """Whether `text` (the file from a record's start to its end) is a JSON value cut short: it ends inside a
    string or with a container still open. A value with a syntax error before the end is not."""
    open_containers = 0
    in_string = escaped = False
    for character in text:
        if in_string:
            if escaped:
                escaped = False
            elif character == "\\":
                escaped = True
            elif character == '"':
                in_string = False
        elif character == '"':
            in_string = True
        elif character in "[{":
            open_containers += 1
        elif character in "]}":
            open_containers -= 1
            if open_containers < 0:
                return False
    return in_string or open_containers > 0


def _parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet file as dicts, a batch at a time."""
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"data source {str(path)!r}: not a readable Parquet file ({error})") from error
    index = 0
    for batch in parquet.iter_batches():
        for row in batch.to_pylist():
            yield index, row
            index += 1
