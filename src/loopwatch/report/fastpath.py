"""Typed decoding of record lines: the first pass's fast path.

msgspec decodes a request line straight into :class:`Request`, checking on the way every
type and range the reference parser (``RequestRecord.from_dict``) checks, but one: that a
segment runs forwards (:func:`segments_run_forwards`). It is stricter than the reference
in a few corners (integers past 64 bits, counts past ``MAX_COUNT``, ``NaN`` and other
literals the standard ``json`` module allows, a byte-order mark, unknown segment kinds,
escaped lone surrogates): such a line fails here and is decided by the slow path, which
also gives the reason a line is malformed. So a line this module accepts is one the
reference accepts, with the same values.

Lines of the other types decode to field-less markers, which only say the line is a JSON
object of that type: the slow path reads them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from ..record import MIN_SAMPLE_RATE

MAX_MS = 1e10  # as record._MAX_MS
MAX_START = 1e11  # Unix seconds in year 5138: anything later is not a start time
MAX_COUNT = 2**40  # queries or statements of one request, for the route means

_Ms = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_MS)]
# A larger count is valid, but the route means clamp it: the slow path does that.
_Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
_Kind = Literal["cpu", "db", "pool", "loop"]  # record.SEGMENT_KINDS


class _BlockedBy(msgspec.Struct, gc=False):
    held_ms: _Ms
    cpu_ms: _Ms
    id: str | None = None
    method: str | None = None
    route: str | None = None


class Request(msgspec.Struct, tag="request", tag_field="type", gc=False):
    """The fields of a request line the first pass checks or keeps."""

    id: str
    pid: Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
    start: Annotated[float, msgspec.Meta(ge=0.0, lt=MAX_START)]
    method: str
    path: str
    wall_ms: _Ms
    cpu_ms: _Ms
    db_ms: _Ms
    pool_wait_ms: _Ms
    db_queries: _Count
    loop_wait_ms: _Ms = 0.0
    route: str | None = None
    status: int | None = None
    error: str | None = None
    rss_bytes: int | None = None
    db_statements: _Count | None = None
    segments_dropped: Annotated[int, msgspec.Meta(ge=0)] = 0
    segments: list[tuple[_Kind, _Ms, _Ms]] = []
    blocked_by: _BlockedBy | None = None
    sample_rate: Annotated[float, msgspec.Meta(ge=MIN_SAMPLE_RATE, le=1.0)] = 1.0


class Meta(msgspec.Struct, tag="meta", tag_field="type", gc=False):
    pass


class Process(msgspec.Struct, tag="process", tag_field="type", gc=False):
    pass


class Stall(msgspec.Struct, tag="stall", tag_field="type", gc=False):
    pass


# A union, so that a line without "type" fails rather than being taken for a request.
_Line = Request | Meta | Process | Stall
_decode_line = msgspec.json.Decoder(_Line).decode
_decode_lines = msgspec.json.Decoder(list[_Line]).decode


def decode_block(data: bytes, lines: int) -> list[Any] | None:
    """The ``lines`` lines of ``data`` (each ending in a newline) decoded in one call, or
    None unless every one of them is one object of a known type.

    The lines are decoded as one JSON array, newlines made commas: a value spread over
    two lines then reads as invalid JSON (JSON allows a newline only where a comma makes
    it invalid: after ``{ [ : ,`` or before ``} ] : ,``), so an array of exactly
    ``lines`` items is exactly one value a line. msgspec checks UTF-8 only in the strings
    it decodes, the reference everywhere (with surrogates allowed, as ``json.loads`` of
    bytes does)."""
    if not data.isascii():
        try:
            data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return None
    try:
        values: list[Any] = _decode_lines(b"[" + data[:-1].replace(b"\n", b",") + b"]")
    except (msgspec.DecodeError, RecursionError):
        return None
    return values if len(values) == lines else None


def decode_line(line: bytes) -> Any:
    """One line (without its newline) as decode_block would decode it, or None."""
    if not line.isascii():
        try:
            line.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return None
    try:
        return _decode_line(line)
    except (msgspec.DecodeError, RecursionError):
        return None


def segments_run_forwards(requests: list[Request]) -> bool:
    """Whether every segment of ``requests`` ends at or after its start: the one check
    of the reference parser's that :class:`Request` leaves out."""
    # (a plain loop: twice as fast as chaining them through map() and all())
    for q in requests:
        for _, a, b in q.segments:
            if a > b:
                return False
    return True
