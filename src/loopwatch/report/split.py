"""A big file read by two processes at once, each half on a core of its own.

The file is cut where a line starts near its middle. A helper process (:mod:`.helper`)
reads the second part while this one reads the first, then sends what it kept, which is
added as if this process had read on. It is, wherever the first part cannot have changed
how the second is read: the helper starts as if no process's meta line had declared a
version this reader does not read, and starts rows of its own for routes, processes and
stall locations, added in the order they first appeared. Where that does not hold (a
meta line of another version in the first part; more rows than are told apart), or the
helper fails, this process reads the second part itself, with what it knows by then.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from . import reading as _reading
from .firstpass import FirstPass
from .helper import Helper, Incoming
from .quantiles import VECTOR_FROM, vectorised
from .sources import BLOCK, Blocks, pread

if TYPE_CHECKING:
    from .firstpass import Scope
    from .reading import FileInfo, ProcessAcc, Reading, RouteAcc
    from .sources import Source

SPLIT_BYTES = 20 << 20  # regular files at least this big are read by two processes
_SEEK_LINE = 4 << 20  # how far from the middle a line must start for the file to be cut


def read_in_two(source: Source, r: Reading, index: int, info: FileInfo, scope: Scope) -> bool:
    """Pass 1 over ``source`` by this process and a helper; False, having read nothing,
    where the file is too small to be worth it, or cannot be cut, or no helper can be
    forked. The first file's helper is kept (``r.helper``) for the report's later work:
    it holds little besides what it is sent."""
    if source.pipe or source.fd is None or source.size < SPLIT_BYTES:
        return False
    middle = _line_start(source.fd, source.size // 2, source.size)
    if middle is None:
        return False
    # A file this big holds more requests than are worked out without numpy: imported
    # once, before the fork, it is imported in both processes.
    vectorised(VECTOR_FROM)
    # A helper forked before this file was opened cannot read it: a new one can.
    helper = Helper.start(keep=[source.fd])
    if helper is None:
        return False
    try:
        helper.submit(read_part, source, middle, scope, info.path, info.name)
    except OSError:  # it died already
        helper.close()
        return False
    if r.helper is None:
        r.helper = helper
    first = FirstPass(r, index, info, scope)
    merged = usable = False
    try:
        first.read(Blocks(source, 0, middle))
        incoming = helper.receive()
        if incoming is not None:
            part, got = incoming.value
            merged = not first.unsupported and _merge(r, index, info, part, got, incoming)
            usable = merged or _drain(incoming)
    finally:
        if r.helper is not helper or not usable:  # (then it may still be reading)
            r.helper = None if r.helper is helper else r.helper
            helper.close()
    if merged:
        info.parts = 2
    else:
        blocks = Blocks(source, middle)
        first.read(blocks)
        info.incomplete_tail = blocks.incomplete_tail
    return True


def _drain(incoming: Incoming) -> bool:
    """Read what is left of ``incoming`` (not wanted, but it must leave the pipe); False
    if it is cut short."""
    try:
        incoming.take_all()
    except (EOFError, OSError):
        return False
    return True


def read_part(
    source: Source, middle: int, scope: Scope, path: str, name: str
) -> tuple[Reading, FileInfo]:
    """The helper's job: pass 1 over ``source`` from ``middle`` on, as if from its start."""
    part = _reading.Reading()
    got = _reading.FileInfo(path=path, name=name)
    blocks = Blocks(source, middle)
    try:
        FirstPass(part, 0, got, scope).read(blocks)
    except OSError as exc:  # EIO: reading would have stopped there
        got.error = exc.strerror or type(exc).__name__
    got.incomplete_tail = blocks.incomplete_tail
    part.file = array("I")  # (the file's index is this process's to give)
    return part, got


def _line_start(fd: int, at: int, end: int) -> int | None:
    """Where the first line starting at or after ``at`` starts, if not too far on."""
    pos = at - 1
    while pos < min(end, at + _SEEK_LINE):
        chunk = pread(fd, BLOCK, pos)
        i = chunk.find(b"\n")
        if i >= 0:
            return pos + i + 1 if pos + i + 1 < end else None
        if not chunk:
            return None
        pos += len(chunk)
    return None


def _merge(
    r: Reading, index: int, info: FileInfo, part: Reading, got: FileInfo, arrays: Incoming
) -> bool:
    """Add the child's part to ``r`` as if read on; False (``r`` unchanged) where that
    would not give the same rows, or the child's part is cut short."""
    new_routes = [k for k in part.routes if k not in r.routes]
    new_pids = [p for p in part.processes if p not in r.processes]
    if (
        part.other_routes is not None
        or (new_routes and len(r.routes) + len(new_routes) > _reading.MAX_ROUTES)
        or len(r.processes) + len(new_pids) > _reading.MAX_PIDS
        or not r.loops.can_extend(part.loops)
    ):
        return False
    # The request arrays go straight into this process's, in the order the child sent
    # them; the rest is added once everything has arrived.
    extended = [(a, len(a)) for a in (r.start, r.wall, r.service)]
    for key in part.routes:
        if key in r.routes:
            extended += [(a, len(a)) for a in _times(r.routes[key])]
    try:
        arrays.into(r.start, part.start)
        arrays.into(r.wall, part.wall)
        arrays.into(r.service, part.service)
        arrays.take(part.line)
        for key, acc in part.routes.items():
            mine = r.routes.get(key)
            if mine is None:
                for a in _times(acc):
                    arrays.take(a)
            else:
                for dest, src in zip(_times(mine), _times(acc), strict=True):
                    arrays.into(dest, src)
        arrays.take_all()
    except (EOFError, OSError):
        for a, n in extended:
            del a[n:]
        return False
    base = info.lines
    r.line.extend(map(base.__add__, part.line))
    r.file.extend(array("I", [index]) * len(part.line))
    for key, acc in part.routes.items():
        mine = r.routes.get(key)
        if mine is None:
            r.routes[key] = acc
        else:
            acc.walls = acc.cpus = acc.dbs = acc.pools = acc.loops = array("d")
            mine.extend(acc)  # the counts
    for pid, proc in part.processes.items():
        mine_p = r.processes.get(pid)
        if mine_p is None:
            r.processes[pid] = proc
        else:
            _merge_process(mine_p, proc)
    r.errors += part.errors
    r.loops.extend(part.loops)
    _merge_info(info, got, base)
    return True


def _times(acc: RouteAcc) -> list[array[float]]:
    return [acc.walls, acc.cpus, acc.dbs, acc.pools, acc.loops]


def _merge_process(p: ProcessAcc, q: ProcessAcc) -> None:
    p.requests += q.requests
    p.samples += q.samples
    p.dropped = max(p.dropped, q.dropped)
    for name, pick in _EXTREMES:
        a, b = getattr(p, name), getattr(q, name)
        if b is not None:
            setattr(p, name, b if a is None else pick(a, b))


_EXTREMES = [(f"{k}_max", max) for k in ("rss", "uss", "req_rss")]
_EXTREMES += [(f"{k}_min", min) for k in ("rss", "uss", "req_rss")]
_EXTREMES += [("busy_max", max), ("connections_used", max), ("connections_max", max)]


def _merge_info(info: FileInfo, got: FileInfo, base: int) -> None:
    info.lines += got.lines
    info.requests += got.requests
    info.matched += got.matched
    info.other += got.other
    info.malformed += got.malformed
    if got.first_malformed and not info.first_malformed:
        why = got.first_malformed.partition(": ")[2]
        info.first_malformed_line = got.first_malformed_line + base
        info.first_malformed = f"line {info.first_malformed_line}: {why}"
    info.overlong += got.overlong
    info.unknown += got.unknown
    for v, k in got.versions.items():
        info.versions[v] = info.versions.get(v, 0) + k
    info.incomplete_tail = got.incomplete_tail
    info.error = info.error or got.error
    info.marks_line.extend(map(base.__add__, got.marks_line))
    info.marks_at += got.marks_at
