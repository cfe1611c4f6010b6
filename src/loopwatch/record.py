"""The record format: the one contract between capture and everything that reads it.

A record file is JSON lines. Each line is one object with a ``type``: ``meta`` (one per
process, written when that process starts recording), ``request`` (one per HTTP request),
``process`` (periodic samples) or ``stall`` (one per step that held the event loop too
long). Readers ignore unknown fields and unknown types, so
the format can grow without a version bump. This module imports the standard library
and msgspec (which encodes the request lines).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

FORMAT_VERSION = 1
# The smallest sample_rate a record may carry: one request in a million stands for the
# rest; below it the weights the report scales by would mean nothing.
MIN_SAMPLE_RATE = 1e-6

SegmentKind = Literal["cpu", "db", "pool", "loop"]
SEGMENT_KINDS: frozenset[str] = frozenset(("cpu", "db", "pool", "loop"))


class RecordError(ValueError):
    """A line or object is not a valid loopwatch record."""


@dataclass(frozen=True, slots=True)
class Meta:
    """The first line a process writes: who wrote what follows."""

    pid: int
    started: float
    version: int = FORMAT_VERSION
    loopwatch: str = ""
    python: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "meta",
            "version": self.version,
            "pid": self.pid,
            "started": self.started,
            "loopwatch": self.loopwatch,
            "python": self.python,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Meta:
        version = _int(d, "version")
        if version != FORMAT_VERSION:
            raise RecordError(
                f"record format version {version} is not supported "
                f"(this loopwatch reads version {FORMAT_VERSION})."
            )
        return cls(
            pid=_int(d, "pid"),
            started=_float(d, "started"),
            version=version,
            loopwatch=_str(d, "loopwatch", ""),
            python=_str(d, "python", ""),
        )


@dataclass(frozen=True, slots=True)
class BlockedBy:
    """What held the event loop longest while a request waited for it.

    ``id``, ``method`` and ``route`` name the request whose step it was; all three are
    None when no request owned it (a background task, a callback, a step after its
    request ended). ``held_ms`` is how much of the request's loop wait it covered,
    ``cpu_ms`` the CPU time of that step (far below its length: blocked, not computing).
    """

    id: str | None
    method: str | None
    route: str | None
    held_ms: float
    cpu_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "method": self.method,
            "route": self.route,
            "held_ms": self.held_ms,
            "cpu_ms": self.cpu_ms,
        }

    @classmethod
    def from_dict(cls, d: Any) -> BlockedBy:
        if not isinstance(d, dict):
            raise RecordError(f"field 'blocked_by' must be an object, not {type(d).__name__}.")
        return cls(
            id=_opt_str(d, "id"),
            method=_opt_str(d, "method"),
            route=_opt_str(d, "route"),
            held_ms=_ms(d, "held_ms"),
            cpu_ms=_ms(d, "cpu_ms"),
        )


@dataclass(slots=True)
class RequestRecord:
    """What loopwatch measured for one HTTP request. Times are milliseconds.

    Not frozen: a frozen dataclass costs twice as much to build, and one is built for
    every request. Treat it as a value all the same.
    """

    id: str
    pid: int
    start: float
    method: str
    path: str
    route: str | None
    status: int | None
    wall_ms: float
    cpu_ms: float
    db_ms: float
    pool_wait_ms: float
    db_queries: int
    rss_bytes: int | None
    segments: tuple[tuple[str, float, float], ...] = ()
    error: str | None = None
    segments_dropped: int = 0
    loop_wait_ms: float = 0.0
    blocked_by: BlockedBy | None = None
    # Statements the app issued (an ORM statement of several round trips is one); None
    # in files written before loopwatch counted them.
    db_statements: int | None = None
    # The share of requests recorded in full (LoopWatch's sample_rate), this one among
    # them: it stands for 1 / sample_rate requests.
    sample_rate: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": "request",
            "id": self.id,
            "pid": self.pid,
            "start": self.start,
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "status": self.status,
            "wall_ms": self.wall_ms,
            "cpu_ms": self.cpu_ms,
            "db_ms": self.db_ms,
            "pool_wait_ms": self.pool_wait_ms,
            "loop_wait_ms": self.loop_wait_ms,
            "db_queries": self.db_queries,
            "db_statements": self.db_statements,
            "rss_bytes": self.rss_bytes,
            "segments": [list(s) for s in self.segments],
        }
        if self.error is not None:
            d["error"] = self.error
        if self.segments_dropped:
            d["segments_dropped"] = self.segments_dropped
        if self.blocked_by is not None:
            d["blocked_by"] = self.blocked_by.to_dict()
        if self.db_statements is None:
            del d["db_statements"]
        if self.sample_rate != 1.0:
            d["sample_rate"] = self.sample_rate
        return d

    def to_json(self) -> str:
        """One line of the record file: the same object as :meth:`to_dict`."""
        return line_bytes(
            RequestLine(
                self.id,
                self.pid,
                self.start,
                self.method,
                self.path,
                self.route,
                self.status,
                self.wall_ms,
                self.cpu_ms,
                self.db_ms,
                self.pool_wait_ms,
                self.loop_wait_ms,
                self.db_queries,
                self.rss_bytes,
                [(k, a, b) for k, a, b in self.segments],
                self.db_statements,
                self.error,
                self.segments_dropped,
                self.blocked_by,
                None if self.sample_rate == 1.0 else self.sample_rate,
            )
        ).decode()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        blocked = d.get("blocked_by")
        return cls(
            id=_str(d, "id"),
            pid=_int(d, "pid"),
            start=_float(d, "start"),
            method=_str(d, "method"),
            path=_str(d, "path"),
            route=_opt_str(d, "route"),
            status=_opt_int(d, "status"),
            wall_ms=_ms(d, "wall_ms"),
            cpu_ms=_ms(d, "cpu_ms"),
            db_ms=_ms(d, "db_ms"),
            pool_wait_ms=_ms(d, "pool_wait_ms"),
            db_queries=_count(d, "db_queries"),
            rss_bytes=_opt_int(d, "rss_bytes"),
            segments=_segments(d.get("segments", [])),
            error=_opt_str(d, "error"),
            segments_dropped=_count(d, "segments_dropped", 0),
            loop_wait_ms=_ms(d, "loop_wait_ms") if "loop_wait_ms" in d else 0.0,
            blocked_by=None if blocked is None else BlockedBy.from_dict(blocked),
            db_statements=(None if d.get("db_statements") is None else _count(d, "db_statements")),
            sample_rate=_rate(d) if "sample_rate" in d else 1.0,
        )


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """A periodic sample of the recording process."""

    time: float
    pid: int
    rss_bytes: int | None
    uss_bytes: int | None
    in_flight: int
    loop_busy: float | None
    requests: int = 0
    dropped: int = 0
    errors: int = 0
    loop_lag_ms: float | None = None
    # The most database connections checked out of the process's instrumented pools at
    # once so far, and the pools' maximum sizes added up (None: no instrumented pool).
    db_connections_used_max: int | None = None
    db_connections_max: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "process",
            "time": self.time,
            "pid": self.pid,
            "rss_bytes": self.rss_bytes,
            "uss_bytes": self.uss_bytes,
            "in_flight": self.in_flight,
            "loop_busy": self.loop_busy,
            "requests": self.requests,
            "dropped": self.dropped,
            "errors": self.errors,
            "loop_lag_ms": self.loop_lag_ms,
            "db_connections_used_max": self.db_connections_used_max,
            "db_connections_max": self.db_connections_max,
            **self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProcessSample:
        busy = d.get("loop_busy")
        if busy is not None:
            busy = _float(d, "loop_busy")
            if not 0.0 <= busy <= 1.0:
                raise RecordError(f"field 'loop_busy' must be between 0 and 1, not {busy!r}.")
        return cls(
            time=_float(d, "time"),
            pid=_int(d, "pid"),
            rss_bytes=_opt_int(d, "rss_bytes"),
            uss_bytes=_opt_int(d, "uss_bytes"),
            in_flight=_count(d, "in_flight", 0),
            loop_busy=busy,
            requests=_count(d, "requests", 0),
            dropped=_count(d, "dropped", 0),
            errors=_count(d, "errors", 0),
            loop_lag_ms=None if d.get("loop_lag_ms") is None else _ms(d, "loop_lag_ms"),
            db_connections_used_max=_opt_count(d, "db_connections_used_max"),
            db_connections_max=_opt_count(d, "db_connections_max"),
        )


Frame = tuple[str, int, str, bool]  # file, line, function, whether it is the project's


@dataclass(frozen=True, slots=True)
class Stall:
    """One step that held the event loop longer than the stall threshold.

    ``time`` is when it started (Unix s). ``duration_ms`` is the whole step, known when it
    ended; ``cpu_ms`` the loop thread's CPU time over it: close to ``duration_ms`` when
    the step computed, far below it when it was blocked (sleep, I/O, a lock): ``cause``
    says which (``"cpu"`` or ``"blocked"``). ``id``, ``method`` and ``route`` name the
    request whose step it was, all None when none was (a background task, a callback).
    ``timed`` is False for work loopwatch does not time step by step (callbacks, tasks
    outside requests): its start and duration come from the loop's lag probe, an upper
    bound within one probe interval. ``stacks`` are the distinct stacks the watchdog took
    while the step still ran (frames innermost last, code locations only); empty when it
    ended before one could be taken.
    """

    time: float
    pid: int
    duration_ms: float
    cpu_ms: float
    id: str | None = None
    method: str | None = None
    route: str | None = None
    stacks: tuple[tuple[Frame, ...], ...] = ()
    timed: bool = True
    # "cpu" for a step that computed, "blocked" for one that slept, waited for I/O or a
    # lock. The watchdog says which from the thread's state while it stalled (on a busy
    # machine a computing thread also waits to run); else it follows the CPU share.
    cause: str = ""

    def __post_init__(self) -> None:
        if not self.cause:
            share = "cpu" if self.cpu_ms >= self.duration_ms / 2 else "blocked"
            object.__setattr__(self, "cause", share)

    @property
    def location(self) -> Frame | None:
        """Where it blocked: the innermost project frame of the first stack (the
        innermost frame when none is the project's)."""
        if not self.stacks:
            return None
        stack = self.stacks[0]
        for frame in reversed(stack):
            if frame[3]:
                return frame
        return stack[-1] if stack else None

    def to_dict(self) -> dict[str, Any]:
        stacks = [[[f, n, fn, "project" if mine else "library"] for f, n, fn, mine in s]
                  for s in self.stacks]  # fmt: skip
        return {
            "type": "stall",
            "time": self.time,
            "pid": self.pid,
            "duration_ms": self.duration_ms,
            "cpu_ms": self.cpu_ms,
            "cause": self.cause,
            "timed": self.timed,
            "id": self.id,
            "method": self.method,
            "route": self.route,
            "stack": stacks[0] if stacks else None,
            "stacks": stacks[1:],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stall:
        raw = [d["stack"]] if d.get("stack") is not None else []
        more = d.get("stacks", [])
        if not isinstance(more, list):
            raise RecordError("field 'stacks' must be a list.")
        timed = d.get("timed", True)
        if not isinstance(timed, bool):
            raise RecordError(f"field 'timed' must be true or false, not {timed!r}.")
        return cls(
            time=_float(d, "time"),
            pid=_int(d, "pid"),
            duration_ms=_ms(d, "duration_ms"),
            cpu_ms=_ms(d, "cpu_ms"),
            id=_opt_str(d, "id"),
            method=_opt_str(d, "method"),
            route=_opt_str(d, "route"),
            stacks=tuple(_stack(s) for s in raw + more),
            timed=timed,
            cause=_cause(d.get("cause")),
        )


def _cause(v: Any) -> str:
    if v is None:
        return ""
    if v not in ("cpu", "blocked"):
        raise RecordError(f'field \'cause\' must be "cpu" or "blocked", not {v!r}.')
    return str(v)


def _stack(raw: Any) -> tuple[Frame, ...]:
    if not isinstance(raw, list):
        raise RecordError("a stall's stack must be a list of frames.")
    out = []
    for f in raw:
        if not (
            isinstance(f, list)
            and len(f) == 4
            and isinstance(f[0], str)
            and isinstance(f[1], int)
            and not isinstance(f[1], bool)
            and isinstance(f[2], str)
            and f[3] in ("project", "library")
        ):
            raise RecordError(f"frame {f!r} is not [file, line, function, project|library].")
        out.append((f[0], f[1], f[2], f[3] == "project"))
    return tuple(out)


Record = Meta | RequestRecord | ProcessSample | Stall

_PARSERS: dict[str, Any] = {
    "meta": Meta.from_dict,
    "request": RequestRecord.from_dict,
    "process": ProcessSample.from_dict,
    "stall": Stall.from_dict,
}


def from_dict(d: Any) -> Record | None:
    """Parse one decoded line. Unknown types give ``None``; malformed ones raise RecordError."""
    if not isinstance(d, dict):
        raise RecordError(f"a record must be a JSON object, not {type(d).__name__}.")
    parse = _PARSERS.get(d.get("type"))  # type: ignore[arg-type]
    if parse is None:
        return None
    result: Record = parse(d)
    return result


def parse_line(line: str | bytes) -> Record | None:
    """Parse one line of a record file (see :func:`from_dict`)."""
    try:
        d = json.loads(line)
    except ValueError as exc:
        raise RecordError(f"line is not JSON: {exc}.") from None
    return from_dict(d)


class RequestLine(msgspec.Struct, tag="request", tag_field="type", omit_defaults=True, gc=False):
    """A request line of the record file, in the order its fields are written: the one
    place the line's layout is given. msgspec encodes it (``encode_line``); the fields
    with a default are left out of the line while they have it, as they always were."""

    id: str
    pid: int
    start: float
    method: str
    path: str
    route: str | None
    status: int | None
    wall_ms: float
    cpu_ms: float
    db_ms: float
    pool_wait_ms: float
    loop_wait_ms: float
    db_queries: int
    rss_bytes: int | None
    segments: list[tuple[str, float, float]]
    db_statements: int | None = None
    error: str | None = None
    segments_dropped: int = 0
    blocked_by: BlockedBy | None = None
    sample_rate: float | None = None  # (omit_defaults compares floats by identity)


_encode = msgspec.json.Encoder().encode


def line_bytes(line: RequestLine) -> bytes:
    """``line`` as JSON, in ASCII, with no newline. Text beyond ASCII (a route in another
    script, U+2028, which ``str.splitlines`` and JavaScript take for a line break) and
    text that is not valid Unicode (a lone surrogate, from a path decoded with
    ``surrogateescape``) is written as JSON escapes, as ``json.dumps`` writes it: the line
    stays one line, readable everywhere, and loses nothing."""
    try:
        data = _encode(line)
        if data.isascii():
            return data
    except UnicodeEncodeError:
        pass
    return json.dumps(msgspec.to_builtins(line), separators=(",", ":")).encode()


# --- field validation -------------------------------------------------------------------

_MAX_MS = 1e10  # ~115 days: anything larger is not a request duration


def _get(d: dict[str, Any], key: str) -> Any:
    try:
        return d[key]
    except KeyError:
        raise RecordError(f"field {key!r} is missing.") from None


def _str(d: dict[str, Any], key: str, default: str | None = None) -> str:
    v = d.get(key, default) if default is not None else _get(d, key)
    if not isinstance(v, str):
        raise RecordError(f"field {key!r} must be a string, not {type(v).__name__}.")
    return v


def _opt_str(d: dict[str, Any], key: str) -> str | None:
    v = d.get(key)
    return None if v is None else _str(d, key)


def _int(d: dict[str, Any], key: str, default: int | None = None) -> int:
    v = d.get(key, default) if default is not None else _get(d, key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise RecordError(f"field {key!r} must be an integer, not {v!r}.")
    return v


def _opt_int(d: dict[str, Any], key: str) -> int | None:
    return None if d.get(key) is None else _int(d, key)


def _opt_count(d: dict[str, Any], key: str) -> int | None:
    return None if d.get(key) is None else _count(d, key)


def _count(d: dict[str, Any], key: str, default: int | None = None) -> int:
    v = _int(d, key, default)
    if v < 0:
        raise RecordError(f"field {key!r} must not be negative, not {v}.")
    return v


def _float(d: dict[str, Any], key: str) -> float:
    return _number(_get(d, key), key)


def _short(v: Any) -> str:
    """A value for an error message: its repr, at most 40 characters."""
    try:
        text = repr(v)
    except ValueError:  # an integer of more digits than int-to-str allows
        return f"an integer of {v.bit_length()} bits"
    return text if len(text) <= 40 else text[:39] + "…"


def _number(v: Any, key: str) -> float:
    try:
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        ok = False
    if not ok:
        raise RecordError(f"field {key!r} must be a finite number, not {_short(v)}.")
    return float(v)


def _ms(d: dict[str, Any], key: str) -> float:
    v = _float(d, key)
    if not 0.0 <= v <= _MAX_MS:
        raise RecordError(f"field {key!r} must be between 0 and {_MAX_MS:.0f} ms, not {v!r}.")
    return v


def _rate(d: dict[str, Any]) -> float:
    v = _float(d, "sample_rate")
    if not MIN_SAMPLE_RATE <= v <= 1.0:
        raise RecordError(f"field 'sample_rate' must be from 1e-06 to 1, not {v!r}.")
    return v


def _segments(raw: Any) -> tuple[tuple[str, float, float], ...]:
    if not isinstance(raw, list):
        raise RecordError("field 'segments' must be a list.")
    out = []
    for seg in raw:
        if not (isinstance(seg, list) and len(seg) == 3 and isinstance(seg[0], str)):
            raise RecordError(f"segment {seg!r} is not [kind, start_ms, end_ms].")
        if seg[0] not in SEGMENT_KINDS:
            continue  # a kind a later loopwatch writes: ignored, as unknown fields are
        start, end = _number(seg[1], "segments"), _number(seg[2], "segments")
        if not 0.0 <= start <= end <= _MAX_MS:
            raise RecordError(f"segment {seg!r} does not run forwards from the request start.")
        out.append((seg[0], start, end))
    return tuple(out)


def error_type(exc: BaseException) -> str:
    """``error.type`` of an exception: its class's fully qualified name, as the conventions
    ask (``asyncpg.exceptions.PostgresSyntaxError``, ``builtins.ValueError``)."""
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__}"
