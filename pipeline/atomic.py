"""Publishing outputs atomically: a reader sees the old file or directory, or the complete new one, never a part.

Every stage writes this way, so a job killed at any moment leaves nothing half-written under a final name.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either nothing/the old file or the whole new file."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """An empty directory next to `target` that replaces `target` only when the `with` block completes.

    Readers see the old `target` or the complete new one, never a half-written one; an exception removes the
    staging directory and leaves `target` untouched. The staging directory sits in `target`'s parent so the final
    rename stays on one filesystem and is atomic.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir()  # not mkdtemp: its 0700 mode would become the published directory's mode
    try:
        yield staging
        _replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_directory(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing `target` is moved aside first and restored if the rename fails."""
    if not target.exists():
        os.rename(staging, target)
        return
    retired = target.with_name(f".{target.name}.retired-{uuid.uuid4().hex[:8]}")
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
