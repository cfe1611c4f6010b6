"""The ``Server-Timing`` response header: a request's figures as of its response start,
for the browser's developer tools (W3C Server Timing)."""

from __future__ import annotations

from typing import Any

from .._capture.trace import Trace

NAME = b"server-timing"

# ``desc`` is what the developer tools show in place of the metric's name: "loop" alone
# says little. Metric names and the quoted descriptions are fixed, so always valid.
_METRICS = (
    b'cpu;dur=%d.%03d;desc="CPU on the loop", '
    b'db;dur=%d.%03d;desc="awaited DB", '
    b'pool;dur=%d.%03d;desc="pool wait", '
    b'loop;dur=%d.%03d;desc="loop wait"'
)


def value(trace: Trace) -> bytes:
    """The header's value for the open request ``trace``, up to now (milliseconds to the
    microsecond, truncated like the record's figures)."""
    cpu_ns, db_ns, pool_ns, loop_ns = trace.so_far()
    return _METRICS % (
        *divmod(cpu_ns // 1000, 1000),
        *divmod(db_ns // 1000, 1000),
        *divmod(pool_ns // 1000, 1000),
        *divmod(loop_ns // 1000, 1000),
    )


def with_header(message: dict[str, Any], trace: Trace) -> dict[str, Any]:
    """``message`` (an ``http.response.start``) with the header added: a new message and
    a new headers list, the app's left as they were. A message whose headers are not a
    list or tuple is returned as it is."""
    headers = message.get("headers", ())
    if type(headers) is not list and type(headers) is not tuple:
        # Any other iterable (a generator, say) would be used up by copying it.
        return message
    # Our metrics go on a header line of their own after the app's: header lines of one
    # name combine as if joined with commas (RFC 9110, 5.3), so browsers read both, and
    # the app's value reaches the client byte for byte, never parsed and rewritten.
    return {**message, "headers": [*headers, (NAME, value(trace))]}
