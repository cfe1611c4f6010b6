"""Pass 2: the window's few records, read again in full through the reference parser.

Pass 1 kept each request's line number, and where blocks of lines begin (FileInfo's
marks): a line is found from the mark before it. A pipe is read from the lines pass 1
spooled.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import replace
from typing import IO, Any

from ..record import RequestRecord
from ..renderers.text import clean
from .reading import FileInfo, Reading
from .sources import MAX_LINE, decode


def read_records(reading: Reading, indices: list[int]) -> tuple[list[RequestRecord], int]:
    """Pass 2: the full records at ``indices``, strings clean()ed; and how many failed."""
    by_file: dict[int, list[int]] = {}
    for i in indices:
        by_file.setdefault(reading.file[i], []).append(reading.line[i])
    out: list[RequestRecord] = []
    failed = 0
    for index, wanted in by_file.items():
        info = reading.files[index]
        try:
            with _again(info) as f:
                for text in _lines_at(f, info, sorted(wanted)):
                    record = _record(text)
                    if record is None:
                        failed += 1
                    else:
                        out.append(record)
        except OSError:
            failed += len(wanted)
    reading.close()
    return out, failed


def _lines_at(f: IO[bytes], info: FileInfo, wanted: list[int]) -> Iterator[bytes]:
    """The lines numbered ``wanted`` (in order) of the file pass 1 read as ``info``."""
    at = -1  # the number of the line f reads next, once known
    for n in wanted:
        k = bisect_right(info.marks_line, n) - 1
        if k < 0:
            yield b""
            continue
        if not info.marks_line[k] <= at <= n:
            f.seek(info.marks_at[k])
            at = info.marks_line[k]
        while at < n:  # (within one block: no line is longer than MAX_LINE)
            f.readline(MAX_LINE + 1)
            at += 1
        at += 1
        yield f.readline(MAX_LINE + 1)


def _again(info: FileInfo) -> Any:
    """The file pass 1 read, to be read again (and closed) by the caller."""
    if info.spool is not None:
        return info.spool
    if info.fd is not None:
        fd, info.fd = info.fd, None
        return open(fd, "rb")
    # Past MAX_KEPT_OPEN: by name, and only if it is still the same file.
    f = open(info.path, "rb")  # noqa: SIM115 (returned to the caller's `with`)
    st = os.fstat(f.fileno())
    if (st.st_dev, st.st_ino) != info.ident:
        f.close()
        raise FileNotFoundError(f"{info.path} is no longer the file first read")
    return f


def _record(line: bytes) -> RequestRecord | None:
    if line.endswith(b"\n"):
        line = line[:-1]  # as pass 1 saw it
    try:
        d = decode(line)
        if type(d) is not dict or d.get("type") != "request":
            return None
        r = RequestRecord.from_dict(d)
    except (ValueError, RecursionError, OverflowError):  # RecordError is a ValueError
        return None
    return replace(
        r,
        id=clean(r.id),
        method=clean(r.method),
        path=clean(r.path),
        route=None if r.route is None else clean(r.route),
        error=None if r.error is None else clean(r.error),
    )
