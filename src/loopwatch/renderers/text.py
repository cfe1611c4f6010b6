"""Text helpers shared by the renderers: cleaning untrusted strings, formatting quantities."""

from __future__ import annotations

import re
import textwrap
import unicodedata
from datetime import datetime, timezone

# Terminal escape sequences (CSI, OSC, and two-character ESC sequences), then any other
# C0/C1 control character. A record file is untrusted input: what it says is printed,
# never interpreted by the terminal.
_SURROGATES = re.compile("[\ud800-\udfff]")
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
    text = _SURROGATES.sub("\ufffd", text)  # a lone one cannot be written out
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


# --- layout ------------------------------------------------------------------------------


def width_of(text: str) -> int:
    """Terminal columns ``text`` takes: wide East Asian characters take two, marks none."""
    if text.isascii():
        return len(text)
    return sum(_char_width(c) for c in text)


def _char_width(c: str) -> int:
    if unicodedata.combining(c):
        return 0
    return 2 if unicodedata.east_asian_width(c) in "WF" else 1


def fit(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` columns, with an ellipsis where it was cut."""
    if width_of(text) <= width:
        return text
    out, used = [], 0
    for c in text:
        w = _char_width(c)
        if used + w > width - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + "…" if width >= 1 else ""


def pad(text: str, width: int) -> str:
    return text + " " * max(0, width - width_of(text))


def wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    """Prose wrapped at spaces to ``width`` columns, indented; words too long are cut."""
    text = _UNIT.sub("\\1\0", text)  # keep "52 MB" on one line
    lines = textwrap.wrap(
        text, max(1, width), initial_indent=first, subsequent_indent=rest, break_on_hyphens=False
    )
    return [fit(line.replace("\0", " "), width) for line in lines]


_UNIT = re.compile(r"(\d) (?=[kMG]?B\b)")


def paint(text: str, sgr: str, color: bool) -> str:
    """``text`` in an SGR colour or style (``"1"`` bold, ``"32"`` green) when ``color``."""
    return f"\x1b[{sgr}m{text}\x1b[0m" if color and text else text


def fmt_count(n: int, noun: str) -> str:
    plural = noun + ("es" if noun.endswith("s") else "s")
    return f"{n:,} {noun if n == 1 else plural}"


def fmt_time(t: float, ms: bool = False) -> str:
    """Unix seconds as a UTC date and time: 2026-11-24 20:41:03(.512)."""
    try:
        moment = datetime.fromtimestamp(t, timezone.utc)
    except (OverflowError, ValueError, OSError):
        return f"{t:.0f} (Unix s)"
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{moment.microsecond // 1000:03d}" if ms else text


def fmt_span(seconds: float) -> str:
    if seconds < 60:
        return fmt_ms(seconds * 1000)
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes}m"
    return f"{hours // 24}d {hours % 24}h"


# What --ascii writes for the report's few non-ASCII characters (the timeline draws its
# own ASCII glyphs); anything else becomes "?".
_ASCII = str.maketrans(
    {
        "\u00b5": "u",  # micro sign
        "\u2026": "...",  # ellipsis
        "\u00d7": "x",  # multiplication sign
        "\u00b7": ".",  # middle dot
        "\u2013": "-",  # en dash
        "\u2014": "-",  # em dash
        "\u2212": "-",  # minus sign
        "\u2192": "->",
        "\u2265": ">=",
        "\u2264": "<=",
        "\u00b1": "+/-",
        "\u2588": "#",  # the timeline's glyphs, where text carries them
        "\u2591": ".",
        "\u2593": "=",
    }
)


def to_ascii(text: str) -> str:
    """``text`` in ASCII only: the report's symbols spelled out, the rest as ``?``."""
    return text.translate(_ASCII).encode("ascii", "replace").decode("ascii")
