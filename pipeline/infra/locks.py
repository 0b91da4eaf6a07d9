"""One writing job per output directory: a stage takes an exclusive lock on its output before it writes anything, so
that a second job started on the same directory is refused at once (exit 2, naming the holder) instead of
interleaving its writes with the first one's.

The lock is an advisory `flock` on `.<name>.lock` beside the output directory — not inside it, because stages swap
whole directories into place (`infra.atomic`) and a lock file inside would leave with the old directory. The kernel
releases a flock when its holder exits, however it exits, so a killed job never leaves a directory locked. The file
records the holder (pid, host, command, start) only to name it: a clean release removes the file, so a record found
by the next job is that of a holder that died without releasing. The next job takes it over with a warning naming
that pid rather than refusing: the lock itself is already free, and refusing would make every re-run after a kill
wait for someone to delete a file by hand.

Only the standard library: a re-run of a finished stage pays a few system calls for its lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.infra.atomic import storage_error

logger = logging.getLogger(__name__)

_HOLDER_WAIT_S = 0.2
"""How long a refused job waits for the holder to record itself (it locks first, then writes its record)."""


_UNWRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
"""A parent directory this job cannot add a file to: a stage that finds its output complete still runs there."""


class OutputLockedError(PipelineError):
    """Another job is writing the output directory; the message names it, the holder and the lock file."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock, as recorded in the lock file."""

    pid: int
    host: str
    command: str
    since: str

    @classmethod
    def this_process(cls, command: str) -> Holder:
        return cls(os.getpid(), socket.gethostname(), command, time.strftime("%Y-%m-%d %H:%M:%S"))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} ({self.command}, since {self.since})"

    def is_running(self) -> bool | None:
        """Whether the pid is alive on this host; None for a holder on another host (which cannot be checked)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def lock_path(directory: Path | str) -> Path:
    """`.<name>.lock` beside `directory` (made absolute first, so `.` and `runs/` name the directory itself)."""
    directory = Path(os.path.abspath(directory))
    return directory.with_name(f".{directory.name}.lock")


def _read_holder(descriptor: int) -> Holder | None:
    try:
        record = json.loads(os.pread(descriptor, 4096, 0).decode())
        return Holder(**record)
    except (OSError, ValueError, TypeError):
        return None


def _is_same_file(descriptor: int, path: Path) -> bool:
    """Whether `path` still names the file open as `descriptor` (a releasing holder removes it)."""
    try:
        return os.stat(path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        return False


class OutputLock:
    """A held lock on an output directory; `release` (or the end of `output_lock`'s block) gives it up."""

    def __init__(self, path: Path, descriptor: int | None) -> None:
        self.path = path
        self._descriptor = descriptor

    @classmethod
    def acquire(cls, directory: Path | str, key: str, command: str) -> OutputLock:
        """Lock `directory` (named by config `key` in errors) for `command`, or raise `OutputLockedError` naming the
        holder at once. A record left by a holder that died is named in a warning and replaced."""
        path = lock_path(directory)
        while True:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                if error.errno not in _UNWRITABLE:
                    raise storage_error(error, path) from error
                logger.warning("%s: cannot create this lock file (%s); the job runs unlocked", path, error.strerror)
                return cls(path, None)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_of_held(descriptor)
                os.close(descriptor)
                who = holder.describe() if holder is not None else "another job (it has not recorded its pid yet)"
                raise OutputLockedError(
                    f"{key} {str(directory)!r} is in use: {who} is writing it and holds its lock {path}; wait for "
                    f"that job to end (or stop it), or point {key} at another directory"
                ) from None
            except OSError as error:
                os.close(descriptor)
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                logger.warning(
                    "%s: this filesystem cannot lock files (%s); nothing stops a second job writing %s beside this one",
                    path,
                    error.strerror,
                    directory,
                )
                return cls(path, None)
            if _is_same_file(descriptor, path):
                break
            os.close(descriptor)  # locked a file its holder removed on release: lock the one at the path now
        _name_stale_holder(path, _read_holder(descriptor))
        record = json.dumps(asdict(Holder.this_process(command))).encode()
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, record, 0)
        return cls(path, descriptor)

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one can be between its lock and its check) and
        unlock; explicitly, so that a forked child sharing the descriptor does not keep the lock."""
        if self._descriptor is None:
            return
        if _is_same_file(self._descriptor, self.path):
            with suppress(OSError):
                os.unlink(self.path)
        fcntl.flock(self._descriptor, fcntl.LOCK_UN)
        os.close(self._descriptor)
        self._descriptor = None


def _holder_of_held(descriptor: int) -> Holder | None:
    """The record of the job that holds the lock (it writes it just after locking: wait a moment for it)."""
    deadline = time.monotonic() + _HOLDER_WAIT_S
    while (holder := _read_holder(descriptor)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return holder


def _name_stale_holder(path: Path, holder: Holder | None) -> None:
    """Warn about the record a holder left without releasing (killed or crashed): the lock is free, so it is taken."""
    if holder is None:
        return
    running = holder.is_running()
    state = {
        False: "which is no longer running (killed or crashed before releasing it)",
        True: "whose pid now belongs to another process (the holder ended without releasing it)",
        None: "on another host, which cannot be checked from here; the lock was free, so that job has ended",
    }[running]
    logger.warning("%s: taking over the lock left by %s, %s", path, holder.describe(), state)


@contextmanager
def output_lock(directory: Path | str, key: str, command: str) -> Iterator[OutputLock]:
    """Hold the lock of `directory` for the block (one process: `prepare`, `teacher import`)."""
    lock = OutputLock.acquire(directory, key, command)
    try:
        yield lock
    finally:
        lock.release()


@contextmanager
def rank_zero_output_lock(directory: Path | str, key: str, command: str) -> Iterator[None]:
    """Hold the lock of `directory` for the block, taken once by rank 0 before any rank writes; a refusal is raised
    on every rank, so that the whole job stops with it."""
    # here, not at the top: torch.distributed is heavy, and only the multi-rank stages (which load it anyway) call this
    from pipeline.infra import dist

    lock, refusal = None, None
    if dist.is_main():
        try:
            lock = OutputLock.acquire(directory, key, command)
        except PipelineError as error:
            refusal = error
    refusal = dist.broadcast_value(refusal)
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
