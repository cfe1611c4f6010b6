"""Opening the inputs of a report, and cutting them into lines, in bounded time and memory.

A regular file is read up to its size when it was opened: a file still being appended to
(or ``/dev/zero``-like, endless) cannot keep the report from ending. A pipe has no size,
so it is read until its writer closes it, within the limits below. Anything else (a
directory, a device, a socket) is refused with a reason. A path with rotated siblings
(``PATH.1`` … ``PATH.N``, as ``logging.handlers.RotatingFileHandler`` names them) stands
for the whole set, read oldest first.
"""

from __future__ import annotations

import errno
import json
import os
import select
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

MAX_LINE = 1 << 20  # longer lines are skipped, and never held in memory whole
CHUNK = 1 << 18  # read from a pipe at a time
BLOCK = 1 << 16  # read from a regular file, and decoded, at a time
# A pipe is read until its writer closes it, but never more than this much, nor longer
# than this in all, and it is given up once nothing has arrived for PIPE_IDLE_S (also
# when no process ever opens a FIFO for writing).
PIPE_MAX_BYTES = 1 << 30
PIPE_MAX_S = 600.0
PIPE_IDLE_S = 10.0
_NO_WRITER_POLL_S = 0.05

_raw_decode = json.JSONDecoder().raw_decode


def decode(line: bytes) -> Any:
    """``json.loads(line)``, faster for the usual line: one UTF-8 JSON value, nothing around it.

    Raises ValueError (or RecursionError) exactly when ``json.loads`` would."""
    try:
        text = line.decode()
        value, end = _raw_decode(text)
        if end == len(text):
            return value
    except ValueError:
        pass
    # Anything unusual (surrounding space, a BOM, lone surrogates, trailing data,
    # non-ASCII text): the standard parser decides, and its error is the one reported.
    return json.loads(line)


@dataclass
class Source:
    """One input, opened: ``fd`` is None when it could not be (``error`` says why) or
    when it is the same file as an earlier input (``duplicate``)."""

    path: str
    fd: int | None = None
    error: str | None = None
    duplicate: bool = False
    pipe: bool = False
    size: int = 0  # a regular file's size when it was opened
    ident: tuple[int, int] | None = None  # (st_dev, st_ino)
    stopped: str | None = None  # why a pipe was not read to its end

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def detach(self) -> int | None:
        """The open descriptor, now the caller's to close."""
        fd, self.fd = self.fd, None
        return fd


def open_sources(paths: list[str]) -> Iterator[Source]:
    """Each path as a Source, in reading order. A Source is closed once the next one is
    asked for, unless the caller has detached its descriptor.

    A rotated set is opened newest first, so that a rotation while it is being opened
    moves files towards names still to come (the same file twice is then read once),
    and is yielded oldest first. A name is read once: given again, or as part of a set,
    it is not listed twice."""
    seen: set[tuple[int, int]] = set()  # (st_dev, st_ino) of every file opened
    named: set[str] = set()  # every name read so far
    rotated: set[str] = set()  # ... of which members of rotated sets
    for path in paths:
        if _name(path) in rotated:
            continue  # `loopwatch report app.jsonl*`: read once, in its set's order
        named.add(_name(path))
        head = _open(path, seen)
        members = []
        for member in rotated_members(path):
            if _name(member) not in named:
                named.add(_name(member))
                rotated.add(_name(member))
                members.append(_open(member, seen))
        try:
            for source in [*reversed(members), head]:
                yield source
                source.close()
        finally:
            for source in [head, *members]:
                source.close()


def rotated_members(path: str) -> list[str]:
    """The rotated siblings a report of ``path`` reads with it: ``PATH.1`` … ``PATH.N``,
    each that exists (a dangling link too, to be refused when opened), newest first."""
    members = []
    n = 1
    while os.path.lexists(member := f"{path}.{n}"):
        members.append(member)
        n += 1
    return members


def _name(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _open(path: str, seen: set[tuple[int, int]]) -> Source:
    source = Source(path)
    try:
        # Refuse before opening: opening a device can have effects of its own.
        refused = _refused(os.stat(path).st_mode)
        if refused is None:
            # O_NONBLOCK: opening a FIFO that no process writes to would block forever.
            flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
            source.fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(source.fd)
            refused = _refused(st.st_mode)  # it may have been replaced in between
    except OSError as exc:
        source.close()
        source.error = exc.strerror or type(exc).__name__
        return source
    if refused is not None:
        source.close()
        source.error = refused
        return source
    key = (st.st_dev, st.st_ino)
    if key in seen:
        source.close()
        source.duplicate = True
        return source
    seen.add(key)
    source.ident = key
    source.pipe = stat.S_ISFIFO(st.st_mode)
    source.size = st.st_size
    return source


def _refused(mode: int) -> str | None:
    if stat.S_ISREG(mode) or stat.S_ISFIFO(mode):
        return None
    if stat.S_ISDIR(mode):
        return os.strerror(errno.EISDIR)
    kind = (
        "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a special file"
    )
    return f"{kind}, not a regular file or a pipe"


class Blocks:
    """The lines of a Source, many at a time: ``(offset, data)`` with ``data`` whole lines,
    each ending in a newline, or ``(offset, None)`` for one line longer than MAX_LINE
    (skipped as it is scanned, never held whole).

    A regular file is read from ``start`` (a line's start) up to ``end`` (its size when it
    was opened, unless given). A last line without a newline is a line when it is whole
    JSON (it is then given one); otherwise it is a record still being written, left out and
    flagged in ``incomplete_tail``."""

    def __init__(self, source: Source, start: int = 0, end: int | None = None) -> None:
        self.source = source
        self.start = start
        self.end = source.size if end is None else end
        self.incomplete_tail = False

    def __iter__(self) -> Iterator[tuple[int, bytes | None]]:
        src = self.source
        if src.fd is None:
            return
        if src.pipe:
            chunks = _pipe_chunks(src, src.fd)
        else:
            chunks = _file_chunks(src.fd, self.start, self.end)
        pos = self.start  # where the unfinished line starts
        carry = b""  # its bytes so far, or
        over = 0  # its length so far once past MAX_LINE (carry is then dropped)
        for chunk in chunks:  # (never longer than MAX_LINE)
            last = chunk.rfind(b"\n")
            if last < 0:
                if over:
                    over += len(chunk)
                else:
                    carry += chunk
                    if len(carry) > MAX_LINE:
                        over, carry = len(carry), b""
                continue
            first = chunk.find(b"\n")
            if over or len(carry) + first > MAX_LINE:
                yield pos, None
                pos += over + len(carry) + first + 1
                data = chunk[first + 1 : last + 1]
            else:
                data = carry + chunk[: last + 1] if carry else chunk[: last + 1]
            carry, over = chunk[last + 1 :], 0
            if data:
                yield pos, data
                pos += len(data)
        if over:
            yield pos, None
        elif carry:
            try:
                decode(carry)
            except (ValueError, RecursionError):
                self.incomplete_tail = True  # a writer is mid-line: not an error
            else:
                yield pos, carry + b"\n"


def _file_chunks(fd: int, start: int, end: int) -> Iterator[bytes]:
    at = start
    while at < end:
        # pread: the descriptor may be shared with a process reading another part.
        chunk = pread(fd, min(BLOCK, MAX_LINE, end - at), at)
        if not chunk:  # truncated since it was opened
            return
        at += len(chunk)
        yield chunk


def pread(fd: int, n: int, at: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, n, at)
    os.lseek(fd, at, os.SEEK_SET)  # (Windows)
    return os.read(fd, n)


def _pipe_chunks(src: Source, fd: int) -> Iterator[bytes]:
    wait = _waiter(fd)
    begun = idle_since = time.monotonic()
    total = 0
    writer = False  # a writer has been seen: an empty read is then the end
    while True:
        try:
            chunk: bytes | None = os.read(fd, min(CHUNK, MAX_LINE, PIPE_MAX_BYTES - total))
        except BlockingIOError:
            chunk, writer = None, True
        now = time.monotonic()
        if chunk:
            writer = True
            total += len(chunk)
            yield chunk
            idle_since = time.monotonic()  # the time spent on the chunk was not idle
            if total >= PIPE_MAX_BYTES:
                src.stopped = f"stopped after {_size(PIPE_MAX_BYTES)}, before the writer finished"
                return
            if now - begun >= PIPE_MAX_S:
                src.stopped = f"stopped after {PIPE_MAX_S:g} s, before the writer finished"
                return
            continue
        if chunk == b"" and writer:
            return
        if now - idle_since >= PIPE_IDLE_S:
            if writer:
                src.stopped = f"stopped after {PIPE_IDLE_S:g} s without data from its writer"
            else:
                src.error = f"no process wrote to it within {PIPE_IDLE_S:g} s"
            return
        # Wait for data, or for the writer to close (or, on a FIFO, for one to open).
        if wait(idle_since + PIPE_IDLE_S - now) and not writer:
            return  # hung up without a writer seen: an anonymous pipe already closed


def _waiter(fd: int) -> Callable[[float], bool]:
    """A wait of at most so many seconds for the pipe to be readable; True on a hang-up.

    On Linux a FIFO opened with O_NONBLOCK reports a hang-up only once a writer has come
    and gone, so the wait lasts while none has opened it; elsewhere it may not, and an
    unwritten FIFO then reads as empty rather than hanging."""
    if not hasattr(select, "poll"):

        def nap(seconds: float) -> bool:
            time.sleep(min(seconds, _NO_WRITER_POLL_S))
            return False

        return nap
    poller = select.poll()
    poller.register(fd, select.POLLIN)

    def wait(seconds: float) -> bool:
        events = poller.poll(max(1, int(seconds * 1000)))
        return any(e & select.POLLHUP and not e & select.POLLIN for _, e in events)

    return wait


def _size(n: int) -> str:
    return f"{n >> 30} GiB" if n >= 1 << 30 else f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"
