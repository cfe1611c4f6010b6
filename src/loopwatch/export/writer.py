"""The record file: a background thread owns it, the request path only appends to a queue.

Each batch of whole lines goes to the file in one ``write`` on a descriptor opened with
``O_APPEND``, so several worker processes recording to the same path never interleave
inside a line. The file is created with mode 0600, never opened through a symlink, and
refused unless it is a regular file of this process's user that nobody else can read.

Before each batch the writer checks that the path still names its file, and reopens it
if not (renamed by logrotate, deleted, its directory recreated), as
``logging.handlers.WatchedFileHandler`` does. With ``max_bytes`` it rotates the file as
``logging.handlers.RotatingFileHandler`` names them (``PATH.1`` the newest). Writers hold
a shared ``flock`` on the file while they check and write (an exclusive one with
``max_bytes``: the size checked is the size written to); rotating, or cutting off what a
failed write left of a line, takes it exclusively. So processes appending to one path
never write into a file another has rotated away, nor rotate it twice.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import stat
import sys
import threading
import time
import weakref
from collections import deque
from typing import Protocol

from .. import _failures
from .._version import __version__
from ..record import Meta

try:
    import fcntl
except ImportError:  # pragma: no cover (not POSIX: no locks, one process per file)
    fcntl = None  # type: ignore[assignment]

# O_NONBLOCK: opening a FIFO nobody reads must not hang the writer; it is no regular file
# and would be refused anyway. Regular files ignore the flag.
_FLAGS = (
    os.O_WRONLY
    | os.O_APPEND
    | os.O_CREAT
    | os.O_CLOEXEC
    | os.O_NONBLOCK
    | getattr(os, "O_NOFOLLOW", 0)
)
_REOPEN_AFTER_S = 5.0
SHUTDOWN_WAIT_S = 2.0  # how long a server's shutdown waits for the queue to be written

OPEN_FAILED = "opening the record file"
REFUSED = "accepting the record file"
WRITE_FAILED = "writing the record file"
ROTATE_FAILED = "rotating the record file"
SHUTDOWN_FAILED = "writing the record file at shutdown"


class _Line(Protocol):
    """A request trace or a record: anything that makes one line of the file."""

    def to_json(self) -> str: ...


class _Marker(threading.Event):
    """Queued by :meth:`FileWriter.sync`: set once everything queued before it is done."""

    def to_json(self) -> str:  # never called: the drain sets markers, it does not write them
        raise TypeError("a marker is not a record")


class UnsafeFileError(PermissionError):
    """The record file exists but is not one loopwatch may write to."""


class FileWriter:
    """Appends records to ``path`` as JSON lines from a background thread."""

    def __init__(
        self,
        path: str,
        *,
        queue_size: int = 10_000,
        interval: float = 0.1,
        max_bytes: int | None = None,
        backup_count: int = 5,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size}.")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive number of bytes, not {max_bytes}.")
        if backup_count < 1:
            raise ValueError(f"backup_count must be at least 1, not {backup_count}.")
        self.path = os.path.abspath(path)
        self.queue_size = queue_size
        self.interval = interval
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.dropped = 0  # records lost: queue full, file unwritable or refused
        self.written = 0
        self._count_lock = threading.Lock()
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        self._queue: deque[_Line | bytes] = deque()
        self._lock = threading.Lock()  # one drain at a time
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._fd = -1
        self._file_id = (0, 0)  # st_dev, st_ino of the open file
        self._meta_written = False  # in the open file
        self._meta: bytes | None = None
        self._next_open = 0.0
        self._next_rotate = 0.0
        self._torn = False  # a failed write left part of a line at the end of the open file

    def submit(self, record: _Line | bytes) -> None:
        """Queue a record, or a line already encoded (UTF-8 JSON, no newline); never
        blocks. A full queue drops it and counts it."""
        queue = self._queue
        if len(queue) >= self.queue_size:
            self._drop(1)
            self._wake.set()
            return
        queue.append(record)
        if self._thread is None:
            self._start()

    def _drop(self, n: int) -> None:
        if n:
            with self._count_lock:
                self.dropped += n

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loopwatch-writer", daemon=True)
        self._thread.start()
        _close_at_exit()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write everything queued so far (from any thread)."""
        with self._lock:
            try:
                self._drain()
            except Exception as exc:  # a bug of ours must not kill the writer thread
                _failures.failed("record writer", exc)

    def sync(self, timeout: float = SHUTDOWN_WAIT_S) -> bool:
        """Wait up to ``timeout`` s until everything queued so far is written (or counted
        as dropped). What is still queued then is counted as dropped, and False returned.

        For a server's shutdown: the writer thread does the writing, so a file that blocks
        (a hung network mount, a lock someone holds) cannot hold the caller longer.
        """
        thread = self._thread
        if thread is None:
            return True
        if not thread.is_alive() or thread is threading.current_thread():
            if self._lock.acquire(timeout=timeout):
                try:
                    self._drain()
                except Exception as exc:
                    _failures.failed("record writer", exc)
                finally:
                    self._lock.release()
                return True
        else:
            done = _Marker()
            self._queue.append(done)  # past queue_size: a marker is not a record
            self._wake.set()
            if done.wait(timeout):
                return True
        lost = self._discard_queue()
        _failures.failed(
            SHUTDOWN_FAILED,
            TimeoutError(f"{lost} records not written within {timeout} s"),
            self.path,
        )
        return False

    def _discard_queue(self) -> int:
        lost = 0
        while True:
            try:
                rec = self._queue.popleft()
            except IndexError:
                break
            if type(rec) is _Marker:
                rec.set()
            else:
                lost += 1
        self._drop(lost)
        return lost

    def _drain(self) -> None:
        queue = self._queue
        if not queue:
            return
        lines: list[bytes] = []
        markers: list[_Marker] = []
        while queue:
            try:
                rec = queue.popleft()
            except IndexError:
                break
            if type(rec) is bytes:  # a request's line, encoded on the loop's thread
                lines.append(rec)
                continue
            if type(rec) is _Marker:
                markers.append(rec)
                continue
            try:
                lines.append(rec.to_json().encode("utf-8", "replace"))  # type: ignore[union-attr]
            except Exception as exc:
                self._drop(1)
                _failures.failed("record serialisation", exc)
        try:
            if lines:
                # JSON has no raw newline: the newlines delimit the records in the batch.
                lines.append(b"")
                self._write_batch(b"\n".join(lines), len(lines) - 1)
        finally:
            for marker in markers:
                marker.set()

    def _write_batch(self, batch: bytes, left: int) -> None:
        """Write the ``left`` lines of ``batch``, each counted as written or dropped once.
        (Counting newlines in a batch costs more than the write: only on the rare paths.)"""
        pos = 0  # where the lines not yet counted start
        # Reopens and rotations per batch: a path that keeps changing must not spin. Each
        # line may need one of each where files hold a few lines and processes contend.
        reopens = rotations = left + 2
        for _ in range(4 * left + 8):  # each turn writes, reopens or rotates
            if pos == len(batch) or not self._open():
                break
            fd = self._fd
            # Shared: appends of several processes go on side by side. With max_bytes,
            # exclusive: the size seen is the size the write lands on.
            _lock(fd, _SHARED if self.max_bytes is None else _EXCLUSIVE, self.path)
            try:
                # Under the lock: a rotation by another process cannot happen between this
                # check and the write.
                if reopens and self._stale():
                    reopens -= 1
                    step = _REOPEN
                else:
                    step = self._write_some(fd, batch, pos, left, rotations > 0)
            finally:
                _lock(fd, _UNLOCK, self.path)
            if step == _REOPEN:
                self._close_file()
            elif step == _ROTATE:
                rotations -= 1
                self._rotate(fd)
            elif step == _FAILED:
                break
            else:
                left = 0 if step == len(batch) else left - batch.count(b"\n", pos, step)
                pos = step
        else:  # short writes that kept ending inside the first line
            _failures.failed(WRITE_FAILED, OSError(0, f"{left} lines not written"), self.path)
        self._drop(left)

    def _write_some(self, fd: int, batch: bytes, pos: int, left: int, may_rotate: bool) -> int:
        """Write whole lines of ``batch`` from ``pos`` on (the meta line first in a new
        file); where the lines not yet counted start then, or _ROTATE, or _FAILED."""
        meta = None if self._meta_written else self._meta_line()
        end = len(batch)
        if self.max_bytes is not None:
            head = int(self._torn) + (len(meta) if meta is not None else 0)
            size = os.fstat(fd).st_size
            room = self.max_bytes - size - head
            if end - pos > room:
                end = batch.rfind(b"\n", pos, pos + max(room, 0)) + 1
                if end <= pos:  # not even one more line fits
                    if size == 0:  # a line longer than max_bytes goes alone into a file
                        end = batch.index(b"\n", pos) + 1
                    elif may_rotate and time.monotonic() >= self._next_rotate:
                        return _ROTATE
                    else:  # rotating failed a moment ago: over max_bytes rather than lost
                        end = len(batch)
        lines = left if end == len(batch) else batch.count(b"\n", pos, end)
        return self._write(fd, meta, batch, pos, end, lines)

    def _write(
        self, fd: int, meta: bytes | None, batch: bytes, pos: int, end: int, lines: int
    ) -> int:
        prefix = b"\n" if self._torn else b""  # ends what a failed write left behind
        if meta is not None:
            prefix += meta
        if prefix:
            data = prefix + batch[pos:end]
        else:
            data = batch if pos == 0 and end == len(batch) else batch[pos:end]
        try:
            n = os.write(fd, data)
            if n == 0:
                raise OSError(0, "write wrote nothing")
        except OSError as exc:
            _failures.failed(WRITE_FAILED, exc, self.path)
            return _FAILED
        h = len(prefix)
        if n == len(data):
            self._torn = False
            self._meta_written = True
            self.written += lines
            return end
        # A short write (the disk or the file size limit is full): whole lines before the
        # cut are in the file; what reached it of the cut line must not pass for a record.
        # The one-byte terminator is always whole (n > 0).
        whole = data.rfind(b"\n", 0, n) + 1  # bytes up to the cut line
        self._torn = False
        if n > whole and not self._cut_fragment(fd, n - whole):
            # Another writer may have appended after it: end it with a newline in the next
            # write, so that it is a malformed line a reader skips (and counts).
            self._torn = True
            if data[n] == 0x0A:
                whole = n + 1  # all but its newline: a reader takes it as it is
        if meta is not None and whole >= h:
            self._meta_written = True
        if whole <= h:
            return pos
        self.written += data.count(b"\n", h, whole)
        # The caller tries the rest in a new write: if the disk is still full it fails and
        # is counted; a line is never split over two writes, between which another
        # process could append.
        return pos + whole - h

    def _cut_fragment(self, fd: int, fragment: int) -> bool:
        """Cut ``fragment`` bytes of a torn line off the end of the file, if they are still
        its end and no other writer holds the file (whose line after them would go too).
        The caller's shared lock may be gone afterwards; it is about to let go of it."""
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no writer between check and cut
            end = os.lseek(fd, 0, os.SEEK_CUR)  # O_APPEND: just past what this write wrote
            if os.fstat(fd).st_size != end:
                return False
            os.ftruncate(fd, end - fragment)
        except OSError:
            return False
        return True

    def _meta_line(self) -> bytes:
        if self._meta is None:
            meta = Meta(
                pid=os.getpid(),
                started=time.time(),
                loopwatch=__version__,
                python=sys.version.split()[0],
            )
            self._meta = meta.to_json().encode() + b"\n"
        return self._meta

    def _open(self) -> bool:
        if self._fd >= 0:
            return True
        now = time.monotonic()
        if now < self._next_open:
            return False
        try:
            fd = os.open(self.path, _FLAGS, 0o600)
        except OSError as exc:
            self._next_open = now + _REOPEN_AFTER_S
            _failures.failed(OPEN_FAILED, exc, self.path)
            return False
        try:
            st = os.fstat(fd)
            _check_ours(st)
        except OSError as exc:
            os.close(fd)
            self._next_open = now + _REOPEN_AFTER_S
            kind = REFUSED if isinstance(exc, UnsafeFileError) else OPEN_FAILED
            _failures.failed(kind, exc, self.path)
            return False
        self._fd = fd
        self._file_id = (st.st_dev, st.st_ino)
        self._meta_written = False
        return True

    def _stale(self) -> bool:
        """The path no longer names the open file (renamed, deleted, directory recreated)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return False  # cannot tell: keep the file we have
        return (st.st_dev, st.st_ino) != self._file_id

    def _close_file(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        if self._torn:  # end the fragment in the file it is in, if there is room now
            with contextlib.suppress(OSError):
                os.write(fd, b"\n")
            self._torn = False
        with contextlib.suppress(OSError):
            os.close(fd)

    def _rotate(self, fd: int) -> None:
        """PATH.N-1 to PATH.N, ..., PATH to PATH.1, unless another process did it first;
        then the file at the path is opened afresh."""
        _lock(fd, _EXCLUSIVE, self.path)
        try:
            if not self._stale():  # else another process rotated it while this one waited
                path = self.path
                # Only as far as the first missing number: the rotated files are numbered
                # without gaps, and the last rename replaces PATH.<backup_count>, the oldest.
                top = 1
                while top < self.backup_count and os.path.lexists(f"{path}.{top}"):
                    top += 1
                for n in range(top - 1, 0, -1):
                    os.rename(f"{path}.{n}", f"{path}.{n + 1}")
                os.rename(path, f"{path}.1")
        except OSError as exc:
            # Keep writing to the file as it is (over max_bytes) rather than losing records.
            self._next_rotate = time.monotonic() + _REOPEN_AFTER_S
            _failures.failed(ROTATE_FAILED, exc, self.path)
            return
        finally:
            _lock(fd, _UNLOCK, self.path)
        self._close_file()

    def close(self, timeout: float = SHUTDOWN_WAIT_S) -> None:
        """Write what is queued, stop the thread and close the file."""
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        # The thread may be stuck in open() or write() holding the lock (a hung network
        # mount, a lock someone holds): waiting for it would hang the process's exit.
        if not self._lock.acquire(timeout=timeout):
            lost = self._discard_queue()
            _failures.failed(
                "closing the record file",
                TimeoutError(f"writer blocked; {lost} records not written"),
                self.path,
            )
            _live.discard(self)
            return
        try:
            try:
                self._drain()
            except Exception as exc:
                _failures.failed("record writer", exc)
            self._close_file()
        finally:
            self._lock.release()
        _live.discard(self)

    def _after_fork_in_child(self) -> None:
        # Threads do not survive a fork, and what the parent had queued is the parent's
        # to write. The child writes its own meta line on its own descriptor.
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self.dropped = 0
        self.written = 0
        self._count_lock = threading.Lock()
        self._reset()


_REOPEN = -1
_ROTATE = -2
_FAILED = -3
_SHARED = getattr(fcntl, "LOCK_SH", 1)
_EXCLUSIVE = getattr(fcntl, "LOCK_EX", 2)
_UNLOCK = getattr(fcntl, "LOCK_UN", 8)


def _lock(fd: int, op: int, path: str) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, op)
    except OSError as exc:  # e.g. ENOLCK on a network mount: write without the lock
        _failures.failed("locking the record file", exc, path)


def _check_ours(st: os.stat_result) -> None:
    """Raise UnsafeFileError unless the file is one this process alone may have made."""
    uid = os.geteuid()
    if not stat.S_ISREG(st.st_mode):
        why = "is not a regular file"
    elif st.st_uid != uid:
        why = f"is owned by uid {st.st_uid}, not by this process's uid {uid}"
    elif st.st_mode & 0o077:
        why = f"has mode {stat.S_IMODE(st.st_mode):04o}: group or others may read it"
    elif st.st_nlink > 1:
        why = f"has {st.st_nlink} hard links: it may be another file under another name"
    else:
        return
    raise UnsafeFileError(
        f"the record file {why}; loopwatch writes only to a regular file of its own "
        "with mode 0600 (remove it, or chmod 600 it if it is yours)"
    )


_live: weakref.WeakSet[FileWriter] = weakref.WeakSet()
_shared: dict[tuple[str, int, int | None, int], FileWriter] = {}


def writer_for(
    path: str, queue_size: int, max_bytes: int | None = None, backup_count: int = 5
) -> FileWriter:
    """One writer per path and settings in a process, shared by every middleware using it."""
    key = (os.path.abspath(path), queue_size, max_bytes, backup_count)
    writer = _shared.get(key)
    if writer is None:
        writer = _shared[key] = FileWriter(
            path, queue_size=queue_size, max_bytes=max_bytes, backup_count=backup_count
        )
    return writer


def _close_all() -> None:
    for writer in list(_live):
        try:
            writer.close()
        except Exception as exc:
            _failures.failed("closing the record file", exc)


_exit_hooked_in = 0  # the pid whose multiprocessing exit runs _close_all


def _close_at_exit() -> None:
    """Close the writers when a multiprocessing child ends (granian's workers are): it
    leaves through ``os._exit``, running multiprocessing's finalizers but not ``atexit``.
    Once per process, after any fork, since a child forgets its parent's finalizers."""
    global _exit_hooked_in
    pid = os.getpid()
    if _exit_hooked_in == pid:
        return
    _exit_hooked_in = pid
    from multiprocessing import util

    util.Finalize(None, _close_all, exitpriority=10)


def _after_fork() -> None:
    for writer in list(_live):
        writer._after_fork_in_child()


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
