"""The HTML report: one self-contained page, ``loopwatch report FILES --html OUT``.

The page carries its data, script and styles inline and loads nothing when opened: no
network, no fonts, no other file (its Content-Security-Policy forbids every fetch and
lets only its own script and style run). The data is what the other renderers use:
``report.to_json()`` (the figures of ``--json`` and the terminal report), the series
over the whole recording, and the window's requests for the timeline. The page's script
(``html_assets/``) lays them out, formats them as the terminal does and draws the
timeline and the charts on canvases of its own. See docs/report.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from .._version import __version__
from .text import clean
from .timeline import IDLE, OTHER, _own_row_states, _row_states

if TYPE_CHECKING:
    from ..record import RequestRecord
    from ..report import Report

# The script's parts, in the order they run.
_SCRIPTS = ("format.js", "dom.js", "view.js", "timeline.js", "charts.js", "routes.js", "page.js")
# A segment's kind as the timeline's state number (renderers/timeline.py: CPU, LOOP, ...).
_STATE = {"cpu": 0, "loop": 1, "pool": 2, "db": 3}
_TEXT_LIMIT = 200  # as the terminal's timeline cleans its row text
# The segments a page carries at most (~20 bytes each): 2,000 requests of 512 segments
# would make a 20 MB page. Past it, the requests with the most are drawn from their own
# timeline (see _coarse) at the resolution their share of it allows.
SEGMENT_BUDGET = 150_000


def html_report(report: Report) -> bytes:
    """The report as one HTML page (UTF-8), ready to be written to a file."""
    data = {
        "loopwatch": __version__,
        "report": report.to_json(),
        "series": None if report.series is None else report.series.to_json(),
        "window": _window(report.window),
    }
    head, tail = _page()
    return head + _script_json(data).encode() + tail


def _window(rows: list[RequestRecord]) -> dict[str, Any]:
    """The timeline's requests as rows of plain values (the fields of ``R`` in
    timeline.js, in that order), their starts in ms after the first one's."""
    t0 = min((r.start for r in rows), default=0.0)
    cap = _cap([len(r.segments) for r in rows], SEGMENT_BUDGET)
    out = []
    for r in rows:
        segs: list[float] = []
        coarse = 0
        if len(r.segments) > cap:
            coarse = cap
            segs = _coarse(r, cap)
        else:
            for kind, a, b in r.segments:
                k = _STATE.get(kind)
                if k is not None:
                    segs += (k, round(a, 3), round(b, 3))
        blocked = r.blocked_by
        out.append(
            [
                round((r.start - t0) * 1000, 3),
                round(r.wall_ms, 3),
                round(r.cpu_ms, 3),
                round(r.db_ms, 3),
                round(r.pool_wait_ms, 3),
                round(r.loop_wait_ms, 3),
                r.status,
                _text(r.method),
                None if r.route is None else _text(r.route),
                _text(r.path),
                None if r.error is None else _text(r.error),
                r.pid,
                _text(r.id),
                segs,
                r.segments_dropped,
                None
                if blocked is None
                else [
                    None if blocked.id is None else _text(blocked.id),
                    None if blocked.method is None else _text(blocked.method),
                    None if blocked.route is None else _text(blocked.route),
                    round(blocked.held_ms, 3),
                    round(blocked.cpu_ms, 3),
                ],
                r.db_queries,
                r.db_statements,
                coarse,
            ]
        )
    return {"t0": t0, "rows": out}


def _cap(counts: list[int], budget: int) -> int:
    """The most segments a request may bring so that all of them come to at most
    ``budget``, those with fewer bringing all theirs (no cap: their largest count)."""
    if sum(counts) <= budget:
        return max(counts, default=0)
    lo, hi = 1, max(counts)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in counts) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _coarse(r: RequestRecord, columns: int) -> list[float]:
    """``r``'s segments as the terminal draws the request alone over ``columns``
    columns (render_bar): a segment per run of one state, none for other waiting."""
    wall = r.wall_ms
    if not (wall > 0 and math.isfinite(wall)):
        return []
    states = _own_row_states(r.segments, wall, columns)
    if states is None:
        states = _row_states(r, 0.0, wall, columns)
    col = wall / columns
    out: list[float] = []
    start = 0
    for c in range(1, columns + 1):
        if c < columns and states[c] == states[start]:
            continue
        if states[start] not in (OTHER, IDLE):
            out += (states[start], round(start * col, 3), round(c * col, 3))
        start = c
    return out


def _text(s: str) -> str:
    # clean() costs a regular expression a call: most strings need none of it.
    return s if len(s) <= _TEXT_LIMIT and s.isprintable() else clean(s, _TEXT_LIMIT)


def _script_json(data: dict[str, Any]) -> str:
    """``data`` as JSON that cannot end its <script> element or start markup inside it:
    every ``<``, ``>`` and ``&`` is written as a JSON escape (only strings hold them)."""
    try:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    except ValueError:  # an infinity or a NaN somewhere: JSON has none, the page gets null
        text = json.dumps(_finite(data), separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


@lru_cache(maxsize=1)
def _page() -> tuple[bytes, bytes]:
    """The page before and after its data, with the hashes of its script and style in
    its Content-Security-Policy: nothing else may run or style it."""
    assets = resources.files(__package__).joinpath("html_assets")
    template = assets.joinpath("report.html").read_text(encoding="utf-8")
    style = assets.joinpath("report.css").read_text(encoding="utf-8")
    script = "\n".join(assets.joinpath(name).read_text(encoding="utf-8") for name in _SCRIPTS)
    if "</" in script or "</" in style:  # (either would end its element early)
        raise RuntimeError("loopwatch's HTML assets must not contain '</'.")
    head, tail = template.split("@DATA@")
    head = (
        head.replace("@SCRIPT_HASH@", _csp_hash(script))
        .replace("@STYLE_HASH@", _csp_hash(style))
        .replace("@VERSION@", __version__)
        .replace("@STYLE@", style)
    )
    return head.encode(), tail.replace("@SCRIPT@", script).encode()


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"
