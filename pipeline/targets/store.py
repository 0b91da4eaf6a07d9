"""Open, check and verify a teacher-target cache directory, and read rows of its shards.

`open_cache` refuses a cache unless it is finished, whole, readable and (given what a run needs) able to serve the
run; `ShardReader` reads selected rows of selected tensors, checksumming each shard and checking the values it reads
the first time this process opens it; `verify_cache` checks everything (`distill cache verify`).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from pipeline.targets import checks
from pipeline.targets.encoding import ENCODINGS, VALUE_DTYPES, TensorSpec
from pipeline.targets.layout import LAYOUT_VERSION, expected_tensors, read_header
from pipeline.targets.manifest import MANIFEST_NAME, CacheError, Manifest, ShardEntry, read_manifest, sha256_file
from pipeline.targets.needs import TargetNeeds, check_cache

logger = logging.getLogger(__name__)

_OPEN_SHARDS = 4

ShardKey = tuple[str, str, int, int]
"""(resolved path, sha256, size, mtime) of a shard file: a rewritten file is a new key, and is checked again."""
_verified_shards: set[ShardKey] = set()
"""Shards this process has checksummed."""
_checked_targets: set[tuple[ShardKey, str]] = set()
"""(shard, tensor name) whose values this process has checked (`check_shard_targets`)."""
BAD_SHARD_FIX = (
    "these targets cannot be trained on: delete the cache split and re-run `distill cache` (`distill cache verify "
    "DIR` checks a whole cache)"
)
CRAFTED_FIX = "`distill cache` writes plain file names; re-run it into a new cache.output_dir"


def _shard_path(directory: Path, entry: ShardEntry) -> Path:
    return directory / entry.file


def _shard_key(path: Path, entry: ShardEntry) -> ShardKey:
    status = path.stat()
    return (str(path.resolve()), entry.sha256, status.st_size, status.st_mtime_ns)


def _check_readable(fingerprint: dict[str, Any], source: Path) -> None:
    """Refuse fingerprints this reader cannot decode before any shard is touched."""
    if fingerprint["layout_version"] != LAYOUT_VERSION:
        raise CacheError(
            f"{source}: fingerprint field 'layout_version' is {fingerprint['layout_version']!r}, "
            f"this reader reads layout {LAYOUT_VERSION}"
        )
    if fingerprint["encoding"] not in ENCODINGS:
        raise CacheError(
            f"{source}: fingerprint field 'encoding' is {fingerprint['encoding']!r}, expected {tuple(ENCODINGS)}"
        )
    if fingerprint["dtype"] not in VALUE_DTYPES:
        raise CacheError(
            f"{source}: fingerprint field 'dtype' is {fingerprint['dtype']!r}, expected one of {list(VALUE_DTYPES)}"
        )


def _check_coverage(manifest: Manifest, source: Path) -> None:
    """Shards must tile rows 0..N-1 exactly, or positions would map to missing or doubled samples."""
    next_sample = 0
    for entry in manifest.shards:
        if entry.first_sample != next_sample or entry.num_samples < 1:
            raise CacheError(
                f"{source}: shard {entry.file} holds samples {entry.first_sample}.."
                f"{entry.first_sample + entry.num_samples - 1}, expected the next shard to start at {next_sample} "
                f"(shards must cover samples 0..{manifest.num_samples - 1} without gaps or overlaps)"
            )
        next_sample += entry.num_samples
    if next_sample != manifest.num_samples:
        raise CacheError(
            f"{source}: shards cover {next_sample} samples, but 'num_samples' is {manifest.num_samples} "
            f"(shards must cover samples 0..{manifest.num_samples - 1})"
        )


def _check_shard_paths(directory: Path, manifest: Manifest, source: Path) -> None:
    """Every shard is a file inside the cache directory, listed once: a manifest naming an absolute path, a `..` or
    a link out of the directory would have the reader train on files the cache does not hold."""
    root = directory.resolve()
    names: dict[str, str] = {}
    files: dict[tuple[int, int], str] = {}
    for entry in manifest.shards:
        name = entry.file
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CacheError(
                f"{source}: shard path {name!r} is not a file name inside the cache directory {directory} (expected "
                f"a relative path without '..'); {CRAFTED_FIX}"
            )
        resolved = (directory / name).resolve()
        if not resolved.is_relative_to(root):
            raise CacheError(
                f"{source}: shard {name!r} resolves to {resolved}, outside the cache directory {root} (a link out "
                f"of the cache); expected the shard file itself inside the directory — {CRAFTED_FIX}"
            )
        normal = os.path.normpath(name)
        status = resolved.stat() if resolved.is_file() else None
        twin = names.get(normal) or (files.get((status.st_dev, status.st_ino)) if status else None)
        if twin is not None:
            raise CacheError(
                f"{source}: shard {name!r} is listed twice (also as {twin!r}), so its samples would be served twice "
                f"per epoch; expected each shard file once — {CRAFTED_FIX}"
            )
        names[normal] = name
        if status is not None:
            files[(status.st_dev, status.st_ino)] = name


def _check_size(path: Path, entry: ShardEntry) -> None:
    size = path.stat().st_size
    if size != entry.bytes:
        raise CacheError(
            f"{path}: {size} bytes, the manifest lists {entry.bytes} (truncated or overwritten shard; delete it and "
            "re-run `distill cache`)"
        )


def _read_sample_ids(path: Path, entry: ShardEntry) -> torch.Tensor:
    """The `sample_ids` tensor [N] of a shard alone (8 bytes a sample), after checking the file's size."""
    _check_size(path, entry)
    try:
        with safe_open(str(path), framework="pt") as handle:
            if "sample_ids" not in set(handle.keys()):
                raise CacheError(f"{path}: tensor 'sample_ids' is missing; the manifest's fingerprint needs it")
            return handle.get_slice("sample_ids")[:].long()
    except SafetensorError as error:
        raise CacheError(f"{path}: unreadable shard ({error})") from error


def _has_range(entry: ShardEntry) -> bool:
    return entry.sample_id_min is not None and entry.sample_id_max is not None


def check_sample_id_ranges(directory: Path, manifest: Manifest, source: Path) -> None:
    """No sample id is held by two shards — proved from the manifest without reading the shards where it can.

    The writer records each shard's smallest and largest id (`ShardEntry.sample_id_min/max`; `distill prepare` gives
    every split ascending ids, so the ranges of a cache's shards are disjoint). Disjoint ranges cannot share an id,
    and each shard's ids are checked against its range and for repeats on first use (`check_shard_targets`). Only
    shards without a range (manifests written before the ranges), or whose range overlaps another's, have their
    ids read here, together with any shard whose range holds one of those ids.
    """
    ranged = sorted((entry for entry in manifest.shards if _has_range(entry)), key=lambda e: e.sample_id_min)
    suspects = {id(entry): entry for entry in manifest.shards if not _has_range(entry)}
    reach: ShardEntry | None = None
    for entry in ranged:
        if entry.sample_id_max - entry.sample_id_min + 1 < entry.num_samples:
            raise CacheError(
                f"{source}: shard {entry.file!r} holds {entry.num_samples} samples but its sample id range "
                f"[{entry.sample_id_min}, {entry.sample_id_max}] has room for fewer distinct ids; {CRAFTED_FIX}"
            )
        if reach is not None and entry.sample_id_min <= reach.sample_id_max:
            suspects.update({id(entry): entry, id(reach): reach})
        if reach is None or entry.sample_id_max > reach.sample_id_max:
            reach = entry
    if not suspects:
        return
    clean = [entry for entry in ranged if id(entry) not in suspects]
    starts = torch.tensor([entry.sample_id_min for entry in clean], dtype=torch.long)
    ends = torch.tensor([entry.sample_id_max for entry in clean], dtype=torch.long)
    ids = {id(entry): _read_sample_ids(_shard_path(directory, entry), entry) for entry in suspects.values()}
    for values in list(ids.values()):
        slots = (torch.searchsorted(starts, values, right=True) - 1).clamp_min(0)
        inside = (slots < len(clean)) & (values >= starts[slots]) & (values <= ends[slots]) if clean else values < 0
        for slot in slots[inside].unique().tolist():
            if id(clean[slot]) not in ids:
                ids[id(clean[slot])] = _read_sample_ids(_shard_path(directory, clean[slot]), clean[slot])
    order = [entry for entry in manifest.shards if id(entry) in ids]
    values = torch.cat([ids[id(entry)] for entry in order])
    owners = torch.cat([torch.full_like(ids[id(entry)], slot) for slot, entry in enumerate(order)])
    sorted_values, permutation = values.sort(stable=True)
    repeats = (sorted_values[1:] == sorted_values[:-1]).nonzero()
    if len(repeats):
        first, second = permutation[repeats[0, 0]], permutation[repeats[0, 0] + 1]
        holder, repeater = order[int(owners[first])], order[int(owners[second])]
        where = "this shard" if holder is repeater else f"shard {holder.file!r}"
        raise CacheError(
            f"{_shard_path(directory, repeater)}: sample id {int(values[second])} is already held by {where}, so "
            f"it would be trained on twice per epoch; expected every sample id once in a cache — {BAD_SHARD_FIX}"
        )


def open_cache(
    directory: Path | str, provenance: dict[str, Any] | None = None, needs: TargetNeeds | None = None
) -> Manifest:
    """Read a cache's manifest and refuse it unless it is finished, whole, readable and (given the run's
    `provenance` and `needs`) able to serve the run (`needs.check_cache`):
    complete, shards tiling the samples, every shard path inside the directory and listed once, every shard file
    there, no sample id in two shards (`check_sample_id_ranges`).

    The returned manifest lists its shards by `first_sample`: shard index j below always means that order.
    """
    directory = Path(directory)
    source = directory / MANIFEST_NAME
    manifest = read_manifest(directory)
    if not manifest.complete:
        raise CacheError(
            f"{source}: 'complete' is false: the cache run did not finish; re-run `distill cache` with the same "
            "config to resume it"
        )
    _check_readable(manifest.fingerprint, source)
    manifest.shards.sort(key=lambda entry: entry.first_sample)
    _check_coverage(manifest, source)
    _check_shard_paths(directory, manifest, source)
    if provenance or needs is not None:
        check_cache(manifest.fingerprint, needs, provenance or {}, source)
    for entry in manifest.shards:
        path = _shard_path(directory, entry)
        if not path.is_file():
            raise CacheError(
                f"{path}: shard file is missing (listed in {source}); re-run `distill cache` to rewrite it"
            )
    check_sample_id_ranges(directory, manifest, source)
    return manifest


def _check_tensor(path: Path, name: str, dtype: str, shape: list[int], spec: TensorSpec) -> None:
    wanted_dtype, wanted_shape = spec.dtype, spec.shape
    shape_fits = len(shape) == len(wanted_shape) and all(
        wanted in (None, extent) for extent, wanted in zip(shape, wanted_shape, strict=True)
    )
    if dtype != wanted_dtype or not shape_fits:
        wanted = [extent if extent is not None else "*" for extent in wanted_shape]
        raise CacheError(
            f"{path}: tensor '{name}' is {dtype} {list(shape)}, "
            f"the manifest's fingerprint needs {wanted_dtype} {wanted}"
        )


def _check_shard_bytes(path: Path, entry: ShardEntry) -> None:
    """Refuse a shard whose size or sha256 differs from the manifest: truncated, overwritten or bit-rotted."""
    _check_size(path, entry)
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise CacheError(
            f"{path}: sha256 {digest}, the manifest lists {entry.sha256} (corrupt shard; delete it and re-run "
            "`distill cache`)"
        )


def _verify_once(path: Path, entry: ShardEntry) -> None:
    """Checksum a shard the first time this process touches it; hashing every epoch would cost a full re-read."""
    key = _shard_key(path, entry)
    if key not in _verified_shards:
        _check_shard_bytes(path, entry)
        _verified_shards.add(key)


def _read_with_companions(
    handle: Any, name: str, fingerprint: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    companions = checks.companion_names(fingerprint, name)
    return handle.get_slice(name)[:], {key: handle.get_slice(key)[:] for key in companions}


def check_shard_targets(
    path: Path, entry: ShardEntry, handle: Any, fingerprint: dict[str, Any], names: list[str]
) -> None:
    """The values of tensors `names` of an open shard pass `checks` (finite, rows summing to 1, indices in range),
    and its sample ids are distinct and inside the manifest's range — once per shard and tensor in this process.

    A bad value is a CacheError naming the file, the tensor, the sample id and what was expected. Top-k log-probs and
    top-m values are checked with their τ = 1 tail sums, read for the check if the run does not request them.
    """
    key = _shard_key(path, entry)
    todo = [name for name in ("sample_ids", *names) if (key, name) not in _checked_targets]
    if not todo:
        return
    sample_ids = handle.get_slice("sample_ids")[:]
    for name in todo:
        if name == "sample_ids":
            problem = checks.sample_id_problem(sample_ids, entry.sample_id_min, entry.sample_id_max)
        else:
            tensor, companions = _read_with_companions(handle, name, fingerprint)
            problem = checks.tensor_problem(name, tensor, fingerprint, sample_ids, companions)
        if problem is not None:
            raise CacheError(f"{path}: {problem}; {BAD_SHARD_FIX}")
        _checked_targets.add((key, name))


def stray_files(directory: Path, manifest: Manifest) -> list[str]:
    """Names in a cache directory that its manifest does not list (the manifest itself aside), sorted."""
    listed = {Path(os.path.normpath(entry.file)).parts[0] for entry in manifest.shards} | {MANIFEST_NAME}
    return sorted(path.name for path in directory.iterdir() if path.name not in listed)


def verify_cache(directory: Path | str) -> Manifest:
    """Check a cache in full: every shard's size, sha256, header (tensor names, shapes and dtypes), the values of
    every tensor (`checks`: finite, rows summing to 1, indices in range), sample ids (distinct across the cache,
    inside each shard's range), and that the directory holds nothing the manifest does not list.

    The first problem stops the check with a CacheError naming the file and what is wrong. Files the manifest does
    not list are an error, not a warning: no reader uses them, but a directory that passes `verify` holds exactly
    one cache, so nothing left by another run (a larger cache's shards, a crashed copy) can be mistaken for it.
    """
    directory = Path(directory)
    manifest = open_cache(directory)
    holders: dict[int, str] = {}
    for entry in tqdm(manifest.shards, desc=f"verify {directory}", unit="shard"):
        path = _shard_path(directory, entry)
        _check_shard_bytes(path, entry)
        try:
            header, _ = read_header(str(path))
        except ValueError as error:
            raise CacheError(f"{error}; delete the shard and re-run `distill cache`") from error
        specs = expected_tensors(manifest.fingerprint, entry.num_samples)
        for name, spec in specs.items():
            if name not in header:
                raise CacheError(f"{path}: tensor '{name}' is missing; the manifest's fingerprint needs it")
            _check_tensor(path, name, header[name]["dtype"], header[name]["shape"], spec)
        unexpected = sorted(set(header) - set(specs))
        if unexpected:
            raise CacheError(f"{path}: tensor '{unexpected[0]}' is not part of the manifest's fingerprint")
        try:
            with safe_open(str(path), framework="pt") as handle:
                check_shard_targets(path, entry, handle, manifest.fingerprint, sorted(set(specs) - {"sample_ids"}))
                sample_ids = handle.get_slice("sample_ids")[:].tolist()
        except SafetensorError as error:
            raise CacheError(f"{path}: unreadable shard ({error})") from error
        for sample_id in sample_ids:
            if sample_id in holders:
                raise CacheError(f"{path}: sample id {sample_id} is already held by shard {holders[sample_id]!r}")
            holders[sample_id] = entry.file
    strays = stray_files(directory, manifest)
    if strays:
        raise CacheError(
            f"{directory}: {len(strays)} file(s) the manifest does not list: {', '.join(strays[:10])}"
            f"{' …' if len(strays) > 10 else ''}; expected only {MANIFEST_NAME} and its shards — no reader uses "
            "them, but remove them (or move the cache to a clean directory) so that the directory holds one cache"
        )
    logger.info("%s: %d shards, %d samples verified", directory, len(manifest.shards), manifest.num_samples)
    return manifest


def _row_runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct rows → [start, stop) runs, so neighbouring rows cost one slice read."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


class ShardReader:
    """The open shard handles of one iteration: reads selected rows of selected tensors, nothing else."""

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        tensor_specs: Callable[[int], dict[str, TensorSpec]],
        verify: bool,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.tensor_specs = tensor_specs
        self.verify = verify
        self._handles: OrderedDict[int, Any] = OrderedDict()

    def _open(self, shard: int) -> Any:
        if shard in self._handles:
            self._handles.move_to_end(shard)
            return self._handles[shard]
        entry = self.manifest.shards[shard]
        path = _shard_path(self.directory, entry)
        if not path.is_file():
            raise CacheError(f"{path}: shard file is missing (listed in {self.directory / MANIFEST_NAME})")
        if self.verify:
            _verify_once(path, entry)
        try:
            handle = safe_open(str(path), framework="pt")
            names = set(handle.keys())
            specs = self.tensor_specs(entry.num_samples)
            for name, spec in specs.items():
                if name not in names:
                    raise CacheError(f"{path}: tensor '{name}' is missing; the manifest's fingerprint needs it")
                tensor_slice = handle.get_slice(name)
                _check_tensor(path, name, tensor_slice.get_dtype(), tensor_slice.get_shape(), spec)
            check_shard_targets(path, entry, handle, self.manifest.fingerprint, list(specs))
        except SafetensorError as error:
            raise CacheError(f"{path}: unreadable shard ({error})") from error
        self._handles[shard] = handle
        if len(self._handles) > _OPEN_SHARDS:
            self._handles.popitem(last=False)
        return handle

    def read(self, shard: int, rows: list[int], names: list[str]) -> dict[str, torch.Tensor]:
        """Tensor name → its `rows` of shard `shard`, in the order asked (rows may repeat)."""
        handle = self._open(shard)
        distinct = sorted(set(rows))
        where = {row: index for index, row in enumerate(distinct)}
        pick = torch.tensor([where[row] for row in rows])
        runs = _row_runs(distinct)
        tensors = {}
        for name in names:
            tensor_slice = handle.get_slice(name)
            tensors[name] = torch.cat([tensor_slice[start:stop] for start, stop in runs])[pick]
        return tensors
