"""The record file: a background thread owns it, the request path only appends to a queue.

Each batch of whole lines goes to the file in one ``write`` on a descriptor opened with
``O_APPEND``, so several worker processes recording to the same path never interleave
inside a line. The file is created with mode 0600 and never through a symlink.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
import weakref
from collections import deque
from typing import Protocol

from .. import _failures
from .._version import __version__
from ..record import Meta

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
_REOPEN_AFTER_S = 5.0


class _Line(Protocol):
    """A request trace or a record: anything that makes one line of the file."""

    def to_json(self) -> str: ...


class FileWriter:
    """Appends records to ``path`` as JSON lines from a background thread."""

    def __init__(self, path: str, *, queue_size: int = 10_000, interval: float = 0.1) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size}.")
        self.path = os.path.abspath(path)
        self.queue_size = queue_size
        self.interval = interval
        self.dropped = 0  # records lost: queue full, file unwritable
        self.written = 0
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        self._queue: deque[_Line] = deque()
        self._lock = threading.Lock()  # one drain at a time
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._fd = -1
        self._meta_written = False
        self._next_open = 0.0
        self._torn = False  # a failed write left part of a line at the end of the file

    def submit(self, record: _Line) -> None:
        """Queue a record; never blocks. A full queue drops the record and counts it."""
        queue = self._queue
        if len(queue) >= self.queue_size:
            self.dropped += 1
            self._wake.set()
            return
        queue.append(record)
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loopwatch-writer", daemon=True)
        self._thread.start()

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

    def _drain(self) -> None:
        queue = self._queue
        if not queue:
            return
        lines = []
        while queue:
            try:
                rec = queue.popleft()
            except IndexError:
                break
            try:
                lines.append(rec.to_json())
            except Exception as exc:
                self.dropped += 1
                _failures.failed("record serialisation", exc)
        if not lines or not self._open():
            self.dropped += len(lines)
            return
        if not self._meta_written:
            meta = Meta(
                pid=os.getpid(),
                started=time.time(),
                loopwatch=__version__,
                python=sys.version.split()[0],
            )
            lines.insert(0, meta.to_json())
        data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        if self._torn:
            # End the fragment a failed write left behind, or it swallows our first line.
            data = b"\n" + data
        try:
            done = _write_all(self._fd, data)
        except _ShortWrite as exc:
            done = exc.done
            if done:
                self._torn = data[done - 1] != 0x0A
            _failures.failed("writing the record file", exc, self.path)
            self.dropped += len(lines) - (0 if self._meta_written else 1)
            return
        self._torn = False
        self.written += len(lines) - (0 if self._meta_written else 1)
        self._meta_written = True

    def _open(self) -> bool:
        if self._fd >= 0:
            return True
        now = time.monotonic()
        if now < self._next_open:
            return False
        try:
            self._fd = os.open(self.path, _FLAGS, 0o600)
        except OSError as exc:
            self._next_open = now + _REOPEN_AFTER_S
            _failures.failed("opening the record file", exc, self.path)
            return False
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued, stop the thread and close the file."""
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        # The thread may be stuck in open() or write() holding the lock (a FIFO nobody
        # reads, a hung network mount): waiting for it would hang the process's exit.
        if not self._lock.acquire(timeout=timeout):
            self.dropped += len(self._queue)
            self._queue.clear()
            _failures.failed("closing the record file", TimeoutError("writer blocked"), self.path)
            _live.discard(self)
            return
        try:
            try:
                self._drain()
            except Exception as exc:
                _failures.failed("record writer", exc)
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
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
        self._reset()


class _ShortWrite(OSError):
    """A write failed after ``done`` bytes of the batch reached the file."""

    def __init__(self, exc: OSError, done: int) -> None:
        super().__init__(exc.errno, exc.strerror)
        self.done = done


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    done = 0
    while view:
        try:
            n = os.write(fd, view)
        except OSError as exc:
            raise _ShortWrite(exc, done) from exc
        done += n
        view = view[n:]
    return done


_live: weakref.WeakSet[FileWriter] = weakref.WeakSet()
_shared: dict[tuple[str, int], FileWriter] = {}


def writer_for(path: str, queue_size: int) -> FileWriter:
    """One writer per path and queue size in a process, shared by every middleware using it."""
    key = (os.path.abspath(path), queue_size)
    writer = _shared.get(key)
    if writer is None:
        writer = _shared[key] = FileWriter(path, queue_size=queue_size)
    return writer


def _close_all() -> None:
    for writer in list(_live):
        try:
            writer.close()
        except Exception as exc:
            _failures.failed("closing the record file", exc)


def _after_fork() -> None:
    for writer in list(_live):
        writer._after_fork_in_child()


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
