"""A helper process: the report's second core.

The helper is forked, so it shares this process's code and open files, and runs jobs
(a module-level function and its arguments) one after the other. Jobs and results go
pickled through pipes, their arrays as their bytes after the pickle, so that neither
side ever holds a pickled copy of them, and a receiver can read an array straight into
the array it is to extend (:meth:`Incoming.into`).

It is not forked on macOS, whose system libraries may not survive a fork without exec.
Elsewhere it is, even while other threads run (an app's executor, loopwatch's own
sampler): a lock one of them held at the fork stays held in the helper, but the helper
takes none. It reads files with ``os.pread``, decodes, computes, pickles into memory
and writes to pipes of its own; CPython renews its own locks (the GIL, the import lock)
in a forked child, glibc its allocator's. Its other inherited descriptors (an app's
sockets) it closes at once, so that it keeps none of them open, and it leaves with
``os._exit``: none of this process's cleanup runs twice.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import pickle
import signal
import sys
import warnings
from array import array
from collections.abc import Callable, Iterable
from typing import IO, Any


def can_fork() -> bool:
    return hasattr(os, "fork") and sys.platform != "darwin"


class Helper:
    """A forked process that runs the jobs :meth:`submit` sends it, in order."""

    def __init__(self, pid: int, jobs: IO[bytes], results: IO[bytes]) -> None:
        self.pid: int | None = pid  # None once closed
        self.jobs, self.results = jobs, results

    @classmethod
    def start(cls, keep: Iterable[int] = ()) -> Helper | None:
        """A new helper, or None where none can be forked. It keeps open, of this
        process's file descriptors, only the standard streams and ``keep``."""
        if not can_fork():
            return None
        job_r, job_w = os.pipe()
        result_r, result_w = os.pipe()
        gc.freeze()  # the helper's collections then leave the pages it shares alone
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns of any fork while threads run: see the module's doc.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError:
            gc.unfreeze()
            for fd in (job_r, job_w, result_r, result_w):
                os.close(fd)
            return None
        if pid == 0:
            code = 1
            try:
                _close_all_but(job_r, result_w, *keep)
                _serve(job_r, result_w)
                code = 0
            finally:
                os._exit(code)  # none of this process's cleanup: its files, atexit
        gc.unfreeze()
        os.close(job_r)
        os.close(result_w)
        return cls(pid, open(job_w, "wb"), open(result_r, "rb"))

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        """Send a job. Its result is read with :meth:`receive` or :meth:`result`, in the
        order sent; a job with a big result is best sent when none is pending."""
        _write(self.jobs, (job, args))
        self.jobs.flush()

    def receive(self) -> Incoming | None:
        """The next job's result, its arrays still to be read; None if it failed."""
        incoming = _read(self.results)
        if incoming is None:
            return None
        ok, value = incoming.value
        if not ok:
            return None
        incoming.value = value
        return incoming

    def result(self) -> Any:
        """The next job's result; raises HelperError if the job or the helper failed."""
        try:
            incoming = self.receive()
            if incoming is not None:
                incoming.take_all()
                return incoming.value
        except (EOFError, OSError):
            pass
        raise HelperError("The report's helper process failed.")

    def close(self) -> None:
        if self.pid is None:
            return
        for f in (self.jobs, self.results):
            with contextlib.suppress(OSError):
                f.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)  # (its jobs are done or no longer wanted)
        os.waitpid(self.pid, 0)
        self.pid = None


def _close_all_but(*fds: int) -> None:
    start = 3  # (the standard streams stay)
    for fd in sorted(set(fds)):
        if fd >= start:
            os.closerange(start, fd)
            start = fd + 1
    try:
        end = max(256, os.sysconf("SC_OPEN_MAX"))
    except (AttributeError, ValueError, OSError):
        end = 1 << 16
    os.closerange(start, end)


class HelperError(Exception):
    """The helper process failed: what it was to do has to be done here."""


def _serve(job_fd: int, result_fd: int) -> None:
    with open(job_fd, "rb") as jobs, open(result_fd, "wb") as results:
        while (incoming := _read(jobs)) is not None:
            incoming.take_all()
            job, args = incoming.value
            del incoming
            try:
                value: Any = (True, job(*args))
            except Exception:
                value = (False, None)
            del args
            _write(results, value)
            results.flush()
            del value  # (not held while the next job runs)


class Incoming:
    """A value read from a pipe, and the arrays after it: each read when it is wanted,
    into the array it is to extend where it can."""

    def __init__(self, value: Any, pipe: IO[bytes], pending: list[tuple[array[Any], int]]):
        self.value = value
        self.pipe = pipe
        self.pending = pending[::-1]  # the next one last
        self.count = {id(a): n for a, n in pending}

    def into(self, dest: array[Any], src: array[Any]) -> None:
        """``dest += src``, without holding ``src`` when it is the next to arrive."""
        if self.pending and self.pending[-1][0] is src:
            self.pending.pop()
            dest.fromfile(self.pipe, self.count[id(src)])
        else:
            dest += self.take(src)
            del src[:]

    def take(self, src: array[Any]) -> array[Any]:
        """``src``, read (with any before it that were not wanted yet)."""
        while any(a is src for a, _ in self.pending):
            a, n = self.pending.pop()
            a.fromfile(self.pipe, n)
        return src

    def take_all(self) -> None:
        while self.pending:
            a, n = self.pending.pop()
            a.fromfile(self.pipe, n)


class _Pickler(pickle.Pickler):
    """Pickles arrays as placeholders: their bytes follow the pickle."""

    def __init__(self, file: IO[bytes], arrays: list[array[Any]]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.arrays = arrays

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is array:
            self.arrays.append(obj)
            return (obj.typecode, len(obj))
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.arrays: list[tuple[array[Any], int]] = []

    def persistent_load(self, pid: Any) -> Any:
        typecode, n = pid
        a: array[Any] = array(typecode)
        self.arrays.append((a, n))
        return a


def _write(pipe: IO[bytes], value: Any) -> None:
    arrays: list[array[Any]] = []
    head = io.BytesIO()
    _Pickler(head, arrays).dump(value)
    pipe.write(len(head.getbuffer()).to_bytes(8, "little"))
    pipe.write(head.getbuffer())
    for a in arrays:
        a.tofile(pipe)


def _read(pipe: IO[bytes]) -> Incoming | None:
    size = pipe.read(8)
    if len(size) < 8:
        return None
    try:
        # From this process's own fork, through its own pipe: no one else's pickle.
        unpickler = _Unpickler(io.BytesIO(pipe.read(int.from_bytes(size, "little"))))
        value = unpickler.load()
    except (EOFError, pickle.UnpicklingError, ValueError):
        return None
    return Incoming(value, pipe, unpickler.arrays)
