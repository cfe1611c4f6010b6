"""Sweeps over a million sorted times: how many requests are in flight at each start
(:func:`in_flight`).

A loop over a million times, with a heap or a while loop or two in its body, takes half
a second in Python. So the one loop here does no more than walk two sorted arrays side
by side (:func:`counts`), and what is worked out from its result is worked out a whole
array at a time, by builtins.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import compress, islice, repeat
from math import inf
from operator import add, eq, lt, truediv

from .quantiles import sorted_array, vectorised


def counts(starts: Sequence[float], ends: Sequence[float], *, ties: bool) -> array[int]:
    """For each of the sorted ``starts``, how many requests started by then have not
    ended by then (``ends`` sorted): those starting at the same instant all count at
    each of them (``ties``), or just those before it in ``starts`` and itself."""
    n = len(starts)
    c = array("q")
    append = c.append
    it = iter(ends)
    ended, upcoming = 0, next(it, inf)
    for started, x in enumerate(starts, 1):
        while upcoming <= x:
            ended += 1
            upcoming = next(it, inf)
        append(started - ended)
    if ties:
        # (the few starts equal to the one after them)
        run = -1
        for i in compress(range(n - 1), map(eq, starts, islice(starts, 1, None))):
            if i > run:  # the first of a run of equal starts: find its end
                run = i + 1
                while run + 1 < n and starts[run + 1] == starts[i]:
                    run += 1
            c[i] += run - i
    return c


def busy(starts: Sequence[float], ends: Sequence[float]) -> float:
    """The length of the union of the spans [start, end), ``starts`` and ``ends`` each
    sorted."""
    if vectorised(len(starts)):
        from . import vector

        return vector.busy(vector.of(starts), vector.of(ends))
    total, since = 0.0, starts[0]
    # A busy period ends before the i-th start when i requests have ended before it:
    # the i-th end is before it (only the requests started before it can have ended).
    for i in compress(range(1, len(starts)), map(lt, ends, islice(starts, 1, None))):
        total += ends[i - 1] - since
        since = starts[i]
    return total + ends[len(ends) - 1] - since


@dataclass(frozen=True)
class InFlight:
    peak: int
    p95: int
    at: float  # Unix s: the first instant the peak was reached
    busy_s: float = 0.0  # how long any request was in flight (the union of their spans)
    # Of the instants the peak was reached, how many there were, the one it lasted
    # longest from (the first of equals) and how long (until the first of them ended).
    moments: int = 0
    longest_at: float = 0.0
    longest_s: float = 0.0
    first_start: float = 0.0
    last_end: float = 0.0


@dataclass(frozen=True)
class Spans:
    """Requests' spans [start, start + wall / 1000) (s): their starts sorted, their ends
    sorted, and whether one of them is empty (ends where it starts)."""

    starts: array[float]
    ends: array[float]
    empty: bool


def spans(
    starts: Sequence[float], walls: Sequence[float], sorted_starts: Sequence[float] = ()
) -> Spans:
    """The Spans of requests (``sorted_starts``: the starts sorted, if they already are)."""
    if vectorised(len(starts)):
        from . import vector

        return vector.spans(starts, walls, sorted_starts)
    s = sorted_starts if isinstance(sorted_starts, array) else sorted_array(starts)
    ends = array("d", map(add, starts, map(truediv, walls, repeat(1000))))  # start + wall / 1000
    empty = any(map(eq, ends, starts))
    return Spans(s, sorted_array(ends), empty)


def in_flight(
    starts: Sequence[float], walls: Sequence[float], sorted_spans: Spans | None = None
) -> InFlight:
    """Requests in flight at once across every process, seen at each request's start
    (``sorted_spans``: their spans(), if already worked out).

    A request is in flight over [start, start + wall): one that ends exactly when another
    starts does not overlap it. The count seen at a start includes the request itself.
    """
    n = len(starts)
    if not n:
        return InFlight(0, 0, 0.0)
    if vectorised(n):
        from . import vector

        return vector.in_flight(starts, walls, sorted_spans)
    sp = spans(starts, walls) if sorted_spans is None else sorted_spans
    s, e, zero = sp.starts, sp.ends, sp.empty
    c = counts(s, e, ties=True)  # (as many as there are starts: at least 1 each)
    if min(c) < 1:
        c = array("q", map(max, c, repeat(1)))
    peak = max(c)
    seen = Counter(c)
    p95 = _count_percentile(seen, n, 95)
    longest_at, longest, moments = 0.0, -1.0, 0
    if peak > 1:
        # The instants the count was the peak (the starts at one instant count once).
        peaks = sorted(set(compress(s, map(eq, c, repeat(peak)))))
        lasting = (
            e if not zero else array("d", sorted(e for e, a in _spans(starts, walls) if e > a))
        )
        moments = len(peaks)
        for x in peaks:
            lasted = lasting[bisect_right(lasting, x)] - x
            if lasted > longest:
                longest_at, longest = x, lasted
    at = s[c.index(peak)]
    return InFlight(peak, p95, at, busy(s, e), moments, longest_at, longest, s[0], e[n - 1])


def _spans(starts: Sequence[float], walls: Sequence[float]) -> Iterable[tuple[float, float]]:
    return ((a + w / 1000, a) for a, w in zip(starts, walls, strict=True))


def _count_percentile(seen: Counter[int], n: int, pct: int) -> int:
    """percentile() of counts, ``seen[c]`` of which are c."""
    rank = max(1, (pct * n + 99) // 100)
    total = 0
    for c in sorted(seen):
        total += seen[c]
        if total >= rank:
            return c
    return max(seen)
