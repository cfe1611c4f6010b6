"""The timeline: one row per request on a shared time axis, showing what each one waited on.

A pure renderer: records and a width in, text out. See docs/timeline.md for how to read it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from itertools import groupby

from ..record import RequestRecord
from .text import clean, fmt_ms

# Column states, in order of precedence: where segments overlap, or two states fill a
# column equally, the lower index wins. Loop wait comes right after CPU: a request the
# loop could have resumed is not waiting on the pool or the database any more.
CPU, LOOP, POOL, DB, OTHER, IDLE = range(6)
_KINDS = {"cpu": CPU, "loop": LOOP, "pool": POOL, "db": DB}
_IN_FLIGHT = 5  # the states a request is in while in flight: CPU to OTHER

# ▓ is the darkest shade short of █: the loop was running, but for someone else. In
# ASCII, = is as dense as # at a glance without being mistaken for it.
_GLYPHS = ("█", "▓", "▒", "░", "·", " ")
_ASCII_GLYPHS = ("#", "=", "%", ".", " ", " ")
# Loop wait is red: it is the state that means "something held the loop".
_COLORS = ("\x1b[1;33m", "\x1b[31m", "\x1b[35m", "\x1b[34m", "\x1b[2m", "")
_RESET = "\x1b[0m"
_LEGEND = (
    (CPU, "CPU on the event loop"),
    (DB, "awaiting the database"),
    (POOL, "waiting for a pool connection"),
    (LOOP, "waiting for the event loop"),
    (OTHER, "other waiting"),
)

# Said under the legend when time was cut (see _groups).
_CUT_NOTE = (
    "Time cut: a line +T starts a new axis, with its own scale, T after the first; "
    "none of these requests was in flight in between."
)

_MIN_BAR = 8  # below this many bar columns, labels and annotations give way
_MIN_ANNOTATION = 6  # an annotation column narrower than this says nothing useful
_EMPTY_SPAN_MS = 1.0  # the window drawn when every request is a single instant


def render_timeline(
    requests: Sequence[RequestRecord],
    width: int,
    *,
    ascii: bool = False,
    color: bool = False,
    start: float | None = None,
    end: float | None = None,
) -> str:
    """Draw ``requests`` as one row each on a shared time axis, in at most ``width`` columns.

    ``start`` and ``end`` (unix seconds) set the window; by default it runs from the
    earliest request start to the latest request end, and where none of the requests is
    in flight for longer than the median of their wall times, that time is cut: the rows
    after it get an axis of their own, labelled with how long after the first axis's start
    theirs starts. ``ascii`` draws with ASCII only; ``color`` adds ANSI colours without
    changing the layout.
    """
    if width < 1:
        raise ValueError(f"The timeline needs a width of at least 1 column, not {width}.")
    glyphs = _ASCII_GLYPHS if ascii else _GLYPHS
    ell = "..." if ascii else "…"
    rows = sorted(
        (r for r in requests if math.isfinite(r.start) and math.isfinite(r.wall_ms)),
        key=lambda r: r.start,
    )
    if not rows:
        return _fit("No requests to draw.", width, ell)

    if start is None and end is None:
        groups = _groups(rows)
    else:
        t0 = min(r.start for r in rows) if start is None else start
        t1 = max(_end(r) for r in rows) if end is None else end
        groups = [(t0, t1, rows)]
    first = groups[0][0]
    cuts = [_ascii(f"+{fmt_ms((a - first) * 1000)}", ascii) for a, _, _ in groups[1:]]

    title = "time -->" if ascii else "time ──▶"
    labels = [f"Req {i}:" for i in range(1, len(rows) + 1)]
    indent = 2 if width >= 40 else 0
    label_w = max(len(title), len(labels[-1]), *map(len, cuts))
    prefix = indent + label_w + 2
    avail = width - prefix
    if avail < _MIN_BAR:  # too narrow for labels: bars only
        indent = label_w = prefix = 0
        avail = width
    parts = [_annotation_parts(r, ascii) for r in rows]
    ann_room = 0
    if prefix:
        natural = _natural_width(parts)
        ann_room = min(natural, avail - max(_MIN_BAR, avail // 2) - 2)
        if ann_room < _MIN_ANNOTATION:
            ann_room = 0
    bar_w = avail - (ann_room + 2 if ann_room else 0)
    notes = iter(_annotations(parts, ann_room, ell) if ann_room else [""] * len(rows))
    numbered = iter(labels)

    def head(text: str) -> str:
        return " " * indent + text.ljust(label_w) + "  " if prefix else ""

    lines = []
    for g, (t0, t1, members) in enumerate(groups):
        span = (t1 - t0) * 1000
        if not (math.isfinite(span) and span > 0):
            span = _EMPTY_SPAN_MS
        axis = _axis(span, bar_w, avail, ascii)
        if g == 0:
            if axis.strip():
                lines.append((head(title) + axis).rstrip())
        elif prefix:
            lines.append((head(cuts[g - 1]) + axis).rstrip())
        else:  # no label column: the cut gets a line of its own
            lines.append(_fit(cuts[g - 1], width, ell))
            if axis.strip():
                lines.append(axis.rstrip())
        for rec in members:
            states = _row_states(rec, (rec.start - t0) * 1000, span, bar_w)
            bar = _paint(states, glyphs, color)
            note = next(notes)
            lines.append((head(next(numbered)) + bar + ("  " + note if note else "")).rstrip())
    lines.append("")
    lines.extend(_legend(width, indent, glyphs, color, ascii, ell))
    if len(groups) > 1:
        lines.extend(" " * indent + line for line in textwrap.wrap(_CUT_NOTE, width - indent))
    return "\n".join(lines)


def _end(rec: RequestRecord) -> float:
    return rec.start + max(rec.wall_ms, 0.0) / 1000


def _groups(rows: list[RequestRecord]) -> list[tuple[float, float, list[RequestRecord]]]:
    """``rows`` (in start order) as (start, end, rows) groups, split where none of them is
    in flight for longer than their median wall time: on one scale with such a gap, the
    requests themselves would shrink to a few columns."""
    walls = sorted(max(r.wall_ms, 0.0) for r in rows)
    longest_gap = walls[len(walls) // 2] / 1000
    groups = [(rows[0].start, _end(rows[0]), [rows[0]])]
    for rec in rows[1:]:
        t0, t1, members = groups[-1]
        if rec.start - t1 > longest_gap:
            groups.append((rec.start, _end(rec), [rec]))
        else:
            members.append(rec)
            groups[-1] = (t0, max(t1, _end(rec)), members)
    return groups


def render_bar(rec: RequestRecord, columns: int = 40, *, ascii: bool = False) -> str:
    """One request's row alone, its whole wall time over ``columns`` columns, no colour
    (what a trace viewer shows as the ``loopwatch.timeline`` span attribute)."""
    if columns < 1:
        raise ValueError(f"columns must be at least 1, not {columns}.")
    wall = rec.wall_ms
    states = None
    if 1e-3 <= wall < math.inf:
        states = _own_row_states(rec.segments, wall, columns)
    if states is None:
        states = _row_states(rec, 0.0, max(wall, 1e-3), columns)
    return _paint(states, _ASCII_GLYPHS if ascii else _GLYPHS, False)


def _own_row_states(
    segments: tuple[tuple[str, float, float], ...], wall: float, n: int
) -> list[int] | None:
    """:func:`_row_states` for a row drawn over its own wall time, the same columns
    faster (every span's ``loopwatch.timeline`` is drawn here, in the request path).

    The intervals of :func:`_intervals` are disjoint and cover the whole row, so a column
    inside one interval is that interval's state; only the columns where intervals meet
    are weighed. Returns None where the general renderer is needed.
    """
    col = wall / n
    intervals, cpu_segs = _intervals(segments, wall)
    states = [IDLE] * n
    # The intervals come in time order: weigh one meeting column at a time.
    cur, times = -1, [0.0] * _IN_FLIGHT
    for k, a, b in intervals:
        c0, c1 = int(a / col), int(b / col)
        if c1 >= n:
            c1 = n - 1
            if c0 > c1:
                c0 = c1
        if c0 != cur:
            if cur >= 0 and not _settle(states, cur, times, col):
                return None
            cur, times = c0, [0.0] * _IN_FLIGHT
        if c0 == c1:
            times[k] += b - a
            continue
        times[k] += (c0 + 1) * col - a
        if not _settle(states, c0, times, col):
            return None
        if c1 > c0 + 1:
            states[c0 + 1 : c1] = [k] * (c1 - c0 - 1)
        cur, times = c1, [0.0] * _IN_FLIGHT
        times[k] = b - c1 * col
    if cur >= 0 and not _settle(states, cur, times, col):
        return None
    end = col * n
    for a, b in cpu_segs:  # as in _row_states: a short CPU step still shows
        mid = int((a + b) / 2 / col)  # the segments lie in [0, wall]: never negative
        if mid >= n:
            mid = n - 1
        if states[mid] == CPU or a > end:
            continue
        c0, c1 = int(a / col), int(b / col)  # _cols, inlined
        if c0 >= n:
            c0 = n - 1
        if c1 >= n:
            c1 = n - 1
        if b > a and c1 > c0 and c1 * col >= b:
            c1 -= 1
        if CPU not in states[c0 : c1 + 1]:
            states[mid] = CPU
    return states if IDLE not in states else None


def _settle(states: list[int], c: int, times: list[float], col: float) -> bool:
    """Give column ``c`` the state it spent most time in, as :func:`_row_states` does;
    False if the column is not covered."""
    cpu, loop, pool, db, other = times
    best, s = cpu, CPU
    if loop > best:
        best, s = loop, LOOP
    if pool > best:
        best, s = pool, POOL
    if db > best:
        best, s = db, DB
    if other > best:
        best, s = other, OTHER
    if col - (cpu + loop + pool + db + other) > best:
        return False
    states[c] = s
    return True


def _row_states(rec: RequestRecord, offset: float, span: float, n: int) -> list[int]:
    """The state of each of ``n`` columns for one request starting ``offset`` ms into the window."""
    col = span / n
    wall = max(rec.wall_ms, 0.0)
    states = [IDLE] * n
    lo, hi = _cols(offset, offset + wall, col, n)
    if lo < 0:
        return states  # not in flight inside the window
    acc = [[0.0] * n for _ in range(_IN_FLIGHT)]
    intervals, cpu_segs = _intervals(rec.segments, wall)
    for k, a, b in intervals:  # inlined: this loop is most of the renderer's time
        a += offset
        b += offset
        if a < 0.0:
            a = 0.0
        if b > span:
            b = span
        if b <= a:
            continue
        times = acc[k]
        c0, c1 = int(a / col), int(b / col)
        if c1 >= n:
            c1 = n - 1
            c0 = min(c0, c1)
        if c0 == c1:
            times[c0] += b - a
            continue
        times[c0] += (c0 + 1) * col - a
        for c in range(c0 + 1, c1):
            times[c] += col
        times[c1] += b - c1 * col
    cpu, loop, pool, db, other = acc
    for c in range(lo, hi + 1):
        best, s = cpu[c], CPU
        if loop[c] > best:
            best, s = loop[c], LOOP
        if pool[c] > best:
            best, s = pool[c], POOL
        if db[c] > best:
            best, s = db[c], DB
        if other[c] > best:
            best, s = other[c], OTHER
        if col - (cpu[c] + loop[c] + pool[c] + db[c] + other[c]) > best:
            s = IDLE
        states[c] = s
    # A step shorter than a column still shows: short CPU is what a timeline is for.
    for a, b in cpu_segs:
        mid = int((offset + (a + b) / 2) / col)
        mid = 0 if mid < 0 else n - 1 if mid >= n else mid
        if states[mid] != CPU:
            c0, c1 = _cols(offset + a, offset + b, col, n)
            if c0 >= 0 and CPU not in states[c0 : c1 + 1]:
                states[mid] = CPU
    # So does a request shorter than a column, in the state it spent most time in.
    if all(s == IDLE for s in states[lo : hi + 1]):
        totals = [sum(acc[k][lo : hi + 1]) for k in range(_IN_FLIGHT)]
        state = max(range(_IN_FLIGHT), key=totals.__getitem__) if any(totals) else OTHER
        states[_col_of(offset + wall / 2, col, n)] = state
    return states


def _intervals(
    segments: tuple[tuple[str, float, float], ...], wall: float
) -> tuple[list[tuple[int, float, float]], list[tuple[float, float]]]:
    """Disjoint (state, start, end) intervals covering [0, wall], overlaps resolved by
    precedence; and the cpu segments, clipped to the request."""
    events: list[tuple[float, int, int]] = []
    cpu_segs: list[tuple[float, float]] = []
    for kind, a, b in segments:
        k = _KINDS.get(kind)
        if k is None or not a <= wall:  # also drops NaN
            continue
        if a < 0.0:
            a = 0.0
        if b > wall:
            b = wall
        if k == CPU and b >= a:
            cpu_segs.append((a, b))
        if b > a:
            events.append((a, k, 1))
            events.append((b, k, -1))
    events.sort()
    out: list[tuple[int, float, float]] = []
    counts = [0, 0, 0, 0]
    pos, last = 0.0, -1
    for t, k, d in events:
        if t > pos:
            top = (
                CPU if counts[CPU]
                else LOOP if counts[LOOP]
                else POOL if counts[POOL]
                else DB if counts[DB]
                else OTHER
            )  # fmt: skip
            if top == last:  # extend the previous interval
                out[-1] = (top, out[-1][1], t)
            else:
                out.append((top, pos, t))
            pos, last = t, top
        counts[k] += d
    if wall > pos:
        out.append((OTHER, pos, wall))
    return out, cpu_segs


def _col_of(t: float, col: float, n: int) -> int:
    return min(max(int(t / col), 0), n - 1)


def _cols(a: float, b: float, col: float, n: int) -> tuple[int, int]:
    """The first and last column that [a, b] covers, or (-1, -1) if it is outside the window.

    A non-empty interval ending exactly on a column boundary does not touch the next column.
    """
    if b < 0 or a > col * n:
        return -1, -1
    c0, c1 = _col_of(a, col, n), _col_of(b, col, n)
    if b > a and c1 > c0 and c1 * col >= b:
        c1 -= 1
    return c0, c1


def _paint(states: list[int], glyphs: tuple[str, ...], color: bool) -> str:
    if not color:
        return "".join([glyphs[s] for s in states])
    out = []
    for s, run in groupby(states):
        text = glyphs[s] * len(list(run))
        # Spaces stay uncoloured, so stripping the codes gives back the plain layout.
        out.append(f"{_COLORS[s]}{text}{_RESET}" if _COLORS[s] and text.strip() else text)
    return "".join(out)


def _axis(span: float, bar_w: int, room: int, ascii: bool) -> str:
    """Tick labels at a 1-2-5 step, as close together as they fit without touching."""
    col = span / bar_w
    for exp in range(-3, 13):
        for m in (1, 2, 5):
            step = m * 10.0**exp
            if span / step > bar_w:
                continue
            ticks = [k * step for k in range(int(span / step + 1e-9) + 1)]
            texts = [_tick_label(t, step, ascii) for t in ticks]
            pos = [round(t / col) for t in ticks]
            if all(pos[i + 1] - pos[i] >= len(texts[i]) + 2 for i in range(len(ticks) - 1)):
                line = ""
                for p, text in zip(pos, texts, strict=True):
                    if p + len(text) <= room:
                        line = line.ljust(p) + text
                return line
    return ""  # unreachable: the largest step leaves a single tick


def _tick_label(ms: float, step: float, ascii: bool) -> str:
    if step < 1:
        value, unit = ms * 1000, "us" if ascii else "µs"
    elif step < 1000:
        value, unit = ms, "ms"
    else:
        value, unit = ms / 1000, "s"
    return f"{round(value)}{unit}"


def _annotation_parts(rec: RequestRecord, ascii: bool) -> tuple[str, str, str, str]:
    where = rec.route if rec.route is not None else rec.path
    outcome = clean(rec.error or "-").strip() if rec.status is None else str(rec.status)
    method, route = clean(rec.method).strip(), clean(where).strip()
    return (
        _ascii(method, ascii),
        _ascii(route, ascii),
        _ascii(outcome, ascii),
        _ascii(fmt_ms(rec.wall_ms), ascii),
    )


def _ascii(text: str, ascii: bool) -> str:
    if not ascii:
        return text
    return text.replace("µ", "u").replace("…", "...").encode("ascii", "replace").decode()


def _natural_width(parts: list[tuple[str, str, str, str]]) -> int:
    return sum(max(len(p[i]) for p in parts) for i in range(4)) + 4


def _annotations(parts: list[tuple[str, str, str, str]], room: int, ell: str) -> list[str]:
    """Aligned "METHOD route status  wall" columns in ``room``: the route column gives way
    first, then the whole left part; the wall time is kept longest."""
    wm, wr, ws, ww = (max(len(p[i]) for p in parts) for i in range(4))
    excess = _natural_width(parts) - room
    if excess <= 0 or wr - excess >= 4:
        wr -= max(excess, 0)
        return [f"{m:<{wm}} {_fit(r, wr, ell):<{wr}} {s:<{ws}}  {w:>{ww}}" for m, r, s, w in parts]
    left = room - ww - 2
    if left < 4:
        return [_fit(w, room, ell).rjust(room) for *_, w in parts]
    return [f"{_fit(f'{m} {r} {s}', left, ell):<{left}}  {w:>{ww}}" for m, r, s, w in parts]


def _legend(
    width: int, indent: int, glyphs: tuple[str, ...], color: bool, ascii: bool, ell: str
) -> list[str]:
    """The legend entries, wrapped to ``width``; an entry too long for a line is shortened."""
    lines: list[str] = []
    plain, painted = "", ""
    room = width - indent
    for state, text in _LEGEND:
        mark = "(space)" if ascii and glyphs[state] == " " else glyphs[state]
        entry = _fit(f"{mark} {text}", room, ell)
        shown = entry
        if color and _COLORS[state] and entry.startswith(mark) and mark.strip():
            shown = f"{_COLORS[state]}{mark}{_RESET}{entry[len(mark) :]}"
        if plain and len(plain) + 3 + len(entry) <= room:
            plain, painted = plain + "   " + entry, painted + "   " + shown
        else:
            if plain:
                lines.append(" " * indent + painted)
            plain, painted = entry, shown
    lines.append(" " * indent + painted)
    return lines


def _fit(text: str, n: int, ell: str) -> str:
    """``text``, shortened with ``ell`` to at most ``n`` characters."""
    if len(text) <= n:
        return text
    if n < len(ell):
        return text[:n]
    return text[: n - len(ell)] + ell
