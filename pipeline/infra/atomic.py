"""Publishing outputs atomically: a reader sees the old file or directory, or the complete new one, never a part.

Every stage writes this way, so a job killed at any moment leaves nothing half-written under a final name. A write
that fails (full disk, quota, permissions) removes its temporary and raises a `StorageError` naming the file.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from pipeline.errors import PipelineError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
"""What libraries that drop the errno (pyarrow, torch's stream writer) still put in their messages."""
_WRITE_FAILURES = ("file write failed", "basic_ios::clear", "PytorchStreamWriter failed", "inline_container.cc")
"""What torch's C++ stream and zip writers raise (a RuntimeError without an errno) when a write fails; on a full disk
the zip writer stops with `[enforce fail at inline_container.cc:…] unexpected pos 238336 vs 238224`."""


class StorageError(PipelineError):
    """An output could not be written (full disk, quota, permissions); the message names the file and the fix."""


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is ENOSPC or EDQUOT, by errno or, where a library kept only the text, by its message."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    return any(text in str(error) for text in _DISK_FULL_TEXTS)


def is_write_failure(error: BaseException) -> bool:
    """Whether `error` is a failed write: an OSError, or torch's C++ writer failing (a RuntimeError, no errno)."""
    return isinstance(error, OSError) or is_disk_full(error) or any(text in str(error) for text in _WRITE_FAILURES)


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent); None if unknown."""
    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            with suppress(OSError):
                return shutil.disk_usage(candidate).free
            return None
    return None


def storage_error(error: BaseException, path: Path) -> StorageError:
    """The user-facing error for a failed write of `path`: disk full (with the free space found), the OS reason, or
    a library's write failure (with the free space, since a full disk is its usual cause)."""
    free = free_bytes(path)
    found = "unknown" if free is None else f"{free / 2**20:.1f} MiB"
    if is_disk_full(error):
        return StorageError(
            f"{path}: no space left on the device while writing it ({found} free there); free some space (delete "
            "old runs or caches, lower train.keep_checkpoints) or point the output directory at another disk, then "
            "run the command again"
        )
    if isinstance(error, OSError):
        return StorageError(
            f"{path}: cannot write it ({error.strerror or error}); expected a writable directory — check the path and "
            "its permissions, then run the command again"
        )
    return StorageError(
        f"{path}: writing it failed ({str(error).strip().splitlines()[-1]}; {found} free there); a full disk or "
        "quota is the usual cause — free some space or point the output directory at another disk, then run the "
        "command again"
    )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either nothing/the old file or the whole new file.

    On failure the temporary is removed, the old file stays as it was, and a `StorageError` names `path`.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        with suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise storage_error(error, path) from error
    fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode())


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable; filesystems that cannot fsync a directory are left alone."""
    with suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """An empty directory next to `target` that replaces `target` only when the `with` block completes.

    Readers see the old `target` or the complete new one, never a half-written one; an exception removes the
    staging directory and leaves `target` untouched (a full disk inside the block becomes a `StorageError` naming
    `target`). The staging directory sits in `target`'s parent so the final rename stays on one filesystem and is
    atomic.
    """
    target = Path(target)
    staging = target.with_name(f".{target.name}.staging-{uuid.uuid4().hex[:8]}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_directory(target)
        staging.mkdir()  # not mkdtemp: its 0700 mode would become the published directory's mode
    except OSError as error:
        raise storage_error(error, target) from error
    try:
        yield staging
        swap_directory(staging, target)
    except OSError as error:
        if is_disk_full(error):
            raise storage_error(error, target) from error
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replacement_directory(target: Path) -> Path:
    """Where a resumable replacement of `target` is built (a cache `--overwrite`): beside it under a fixed name, so
    that a killed build continues where it stopped, and `recover_directory` can finish its swap."""
    return target.with_name(f".{target.name}.overwrite")


def _retired_directory(target: Path) -> Path:
    return target.with_name(f".{target.name}.retired")


def swap_directory(staging: Path, target: Path) -> None:
    """Rename the complete `staging` to `target`. An existing `target` is renamed aside first, put back if the
    rename fails, and removed after it: readers see the old directory, none for an instant, or the new one — never a
    mixture. A kill between the renames is finished by the next writer's `recover_directory`."""
    if not target.exists():
        os.rename(staging, target)
        fsync_directory(target.parent)
        return
    retired = _retired_directory(target)
    shutil.rmtree(retired, ignore_errors=True)
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    fsync_directory(target.parent)
    shutil.rmtree(retired, ignore_errors=True)


def recover_directory(target: Path, is_complete: Callable[[Path], bool] | None = None) -> None:
    """Tidy what a writer of `target` killed mid-way left beside it (one writer per target at a time): a swap killed
    between its renames is finished — the resumable replacement moved into place when `is_complete` says it is
    whole, else the old `target` put back — a retired `target` still present is removed, and half-written staging
    directories are removed. A resumable replacement that is not complete stays, to be continued."""
    retired, replacement = _retired_directory(target), replacement_directory(target)
    if not target.exists() and retired.exists():
        complete = is_complete is not None and replacement.exists() and is_complete(replacement)
        os.rename(replacement if complete else retired, target)
        fsync_directory(target.parent)
    if target.exists() and retired.exists():
        shutil.rmtree(retired)
    for leftover in target.parent.glob(f".{target.name}.staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
