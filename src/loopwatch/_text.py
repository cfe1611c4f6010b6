"""Text helpers shared by the renderers: cleaning untrusted strings, formatting quantities."""

from __future__ import annotations

import re

# Terminal escape sequences (CSI, OSC, and two-character ESC sequences), then any other
# C0/C1 control character. A record file is untrusted input: what it says is printed,
# never interpreted by the terminal.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI ... final byte
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC ... BEL or ST
    r"|\x1b[@-Z\\-_]"  # other two-character escapes
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # remaining control characters
    r"|[\u202a-\u202e\u2066-\u2069]"  # bidirectional overrides
)


def clean(text: str, limit: int = 200) -> str:
    """``text`` without control characters or escape sequences, at most ``limit`` long."""
    text = _ESCAPES.sub("", text).replace("\t", " ").replace("\n", " ")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def fmt_ms(ms: float) -> str:
    """A duration given in milliseconds, in the unit that reads best: 850µs, 12.3ms, 4.20s."""
    if ms < 1:
        return f"{ms * 1000:.0f}µs"
    if ms < 10:
        return f"{ms:.2f}ms"
    if ms < 1000:
        return f"{ms:.1f}ms"
    return f"{ms / 1000:.2f}s"


def fmt_bytes(n: float) -> str:
    """A size in bytes: 52 MB, 3.0 GB (decimal units, as `ps` and cloud pricing use)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"
