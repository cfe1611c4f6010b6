"""The report's sorts and sweeps over a million numbers, a whole array at a time (numpy).

Each function here gives exactly what the plain Python it stands in for gives, to the
last bit: the same values, in the same order, of the same sign (the one float value with
two forms, -0.0 and 0.0, sorts as Python's stable sort leaves it), and the same floats
from the same operations (numpy adds, subtracts and divides two doubles as Python does;
a sum of many is left to Python, whose ``sum()`` adds otherwise from 3.12 on). It is used
for many requests only (:func:`.quantiles.vectorised`): for a few, importing numpy would
take longer than the work.
"""

from __future__ import annotations

import heapq
import math
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from functools import reduce
from operator import add
from typing import Any

import numpy as np
import numpy.typing as npt

from .sweep import InFlight, Spans

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


def of(values: Any) -> Floats:
    """An array('d') (or anything of doubles) as a numpy array, sharing its memory."""
    if isinstance(values, np.ndarray):
        return values
    if isinstance(values, array) and values.typecode == "d":
        return np.frombuffer(values, dtype=np.float64) if len(values) else np.empty(0)
    return np.asarray(values, dtype=np.float64)


def to_array(values: Floats) -> array[float]:
    out: array[float] = array("d")
    out.frombytes(np.ascontiguousarray(values, dtype=np.float64).data.cast("B"))
    return out


def negative_zero(values: Floats) -> bool:
    """Whether a -0.0 is among ``values`` (of which none is negative or NaN, as no
    record's time is): then the order of equal values shows."""
    return bool(np.signbit(values).any())


def sort(values: Floats, *, nearly: bool = False) -> Floats:
    """``sorted(values)``: a stable sort, fastest on values ``nearly`` in order (times);
    on values in no order, an unstable one where equal values cannot be told apart."""
    stable = nearly or negative_zero(values)
    return np.sort(values, kind="stable" if stable else "quicksort")


def sorted_array(values: Any, *, nearly: bool = False) -> array[float]:
    """``array("d", sorted(values))``."""
    return to_array(sort(of(values), nearly=nearly))


def sort_in_place(values: array[float]) -> array[float]:
    """``values`` sorted (as sorted() sorts them), in their own memory."""
    if len(values):
        view = np.frombuffer(values, dtype=np.float64)
        view.sort(kind="stable" if negative_zero(view) else "quicksort")
        del view  # (the array can change size again)
    return values


def kth(values: Floats, ks: Sequence[int]) -> list[float] | None:
    """The ``ks``-th smallest of ``values`` (from 0), or None where a -0.0 is among them
    (which of two equal values a percentile is then shows: see quantiles.kth). It
    reorders ``values``."""
    if negative_zero(values):
        return None
    values.partition(list(ks))  # (in place)
    return [float(values[k]) for k in ks]


def taken_at(values: Any, order: Ints) -> array[float]:
    """``array("d", map(values.__getitem__, order))``, written straight into the array."""
    out: array[float] = array("d", [0.0]) * len(order)
    if len(order):
        np.take(of(values), order, out=np.frombuffer(out, dtype=np.float64))
    return out


def argsort(keys: Any) -> Ints:
    """``sorted(range(len(keys)), key=keys.__getitem__)``."""
    return np.argsort(of(keys), kind="stable").astype(np.int64, copy=False)


def nlargest(k: int, keys: Any) -> list[int]:
    """``heapq.nlargest(k, range(len(keys)), key=keys.__getitem__)``: the indices of the
    ``k`` largest keys, largest first, of equal keys the first first."""
    x = of(keys)
    if k >= len(x):
        picked = np.arange(len(x))
    else:
        # Those above the k-th largest, and of those equal to it the first ones.
        bound = np.partition(x, len(x) - k)[len(x) - k]
        above = np.flatnonzero(x > bound)
        equal = np.flatnonzero(x == bound)[: k - len(above)]
        picked = np.concatenate((above, equal))
    order = np.argsort(-x[picked], kind="stable")  # (-x: equal keys keep their order)
    return [int(i) for i in picked[order]]


def ends(starts: Floats, walls: Floats) -> Floats:
    """``start + wall / 1000`` of each request (s)."""
    return starts + walls / 1000


def in_order(values: Floats) -> bool:
    """``all(map(le, values, values[1:]))``."""
    return bool((values[:-1] <= values[1:]).all())


def counts(starts: Floats, ends_sorted: Floats, *, ties: bool) -> Ints:
    """sweep.counts(): for each of the sorted ``starts``, the requests started by then
    (with ``ties``, all of those starting at that instant) less those ended by then."""
    c = np.searchsorted(starts, starts, side="right") if ties else np.arange(1, len(starts) + 1)
    c -= np.searchsorted(ends_sorted, starts, side="right")
    return c.astype(np.int64, copy=False)


def busy(starts: Floats, ends_sorted: Floats) -> float:
    """sweep.busy(): the length of the union of the spans, added up as it adds them."""
    gaps = np.flatnonzero(ends_sorted[:-1] < starts[1:]) + 1  # the starts after a gap
    since = np.concatenate((starts[:1], starts[gaps]))
    periods = (ends_sorted[gaps - 1] - since[:-1]).tolist()
    total: float = reduce(add, periods, 0.0)
    return total + float(ends_sorted[-1]) - float(since[-1])


def count_percentile(seen: Ints, n: int, pct: int) -> int:
    """sweep._count_percentile() of counts (``seen[c]`` of which are c)."""
    rank = max(1, (pct * n + 99) // 100)
    total = np.cumsum(seen)
    return int(np.searchsorted(total, rank, side="left"))


def peak_moments(s: Floats, c: Ints, peak: int, lasting: Floats) -> tuple[int, float, float]:
    """Of the instants (starts) the count was ``peak``: how many, the first of those it
    lasted longest from, and how long (until the first end in ``lasting`` after it)."""
    at = s[c == peak]
    if len(at) > 1:
        at = at[np.concatenate(([True], at[1:] != at[:-1]))]  # (the first of equals)
    lasted = lasting[np.searchsorted(lasting, at, side="right")] - at
    i = int(np.argmax(lasted))
    return len(at), float(at[i]), float(lasted[i])


def spans(starts: Any, walls: Any, sorted_starts: Any = ()) -> Spans:
    """sweep.spans(): the requests' starts and ends, each sorted (``sorted_starts``: the
    starts, if sorted already, as an array)."""
    st = of(starts)
    e = ends(st, of(walls))
    empty = bool((e == st).any())
    s = sorted_starts if isinstance(sorted_starts, array) else sorted_array(st, nearly=True)
    return Spans(s, sorted_array(e, nearly=True), empty)


def in_flight(starts: Any, walls: Any, sorted_spans: Spans | None) -> InFlight:
    """sweep.in_flight() of at least one request."""
    st, w = of(starts), of(walls)
    n = len(st)
    if sorted_spans is None:
        e_file = ends(st, w)
        s, e = sort(st, nearly=True), sort(e_file, nearly=True)
        zero = bool((e_file == st).any())
        del e_file
    else:
        s, e, zero = of(sorted_spans.starts), of(sorted_spans.ends), sorted_spans.empty
    c = counts(s, e, ties=True)
    np.maximum(c, 1, out=c)
    peak = int(c.max())
    p95 = count_percentile(np.bincount(c), n, 95)
    moments, longest_at, longest = 0, 0.0, -1.0
    if peak > 1:
        if zero:
            e_file = ends(st, w)
            lasting = sort(e_file[e_file > st], nearly=True)
            del e_file
        else:
            lasting = e
        moments, longest_at, longest = peak_moments(s, c, peak, lasting)
    at = float(s[int(np.argmax(c == peak))])
    return InFlight(
        peak, p95, at, busy(s, e), moments, longest_at, longest, float(s[0]), float(e[n - 1])
    )


def concurrency(arrivals: Any, services: Any) -> tuple[int, list[int]] | None:
    """queueing.concurrency() of requests none of which ends as it arrives (else None)."""
    a = of(arrivals)
    e = a + of(services)
    if (e == a).any():
        return None
    c = counts(a, sort(e, nearly=True), ties=False)
    if c.min() < 1:  # (not for services of no less than 0)
        return None
    seen = np.bincount(c)
    return len(seen) - 1, [int(k) for k in seen]


def joined(parts: Sequence[Any]) -> Floats:
    """The values of ``parts``, one after the other, in a new array."""
    if not parts:
        return np.empty(0)
    return np.concatenate([of(p) for p in parts])


def taken(parts: list[array[float]]) -> Floats:
    """joined() ``parts``, each emptied once copied (and so freed, if it is the only
    reference to its values)."""
    out = np.empty(sum(map(len, parts)))
    at = 0
    for p in parts:
        out[at : at + len(p)] = of(p)
        at += len(p)
        del p[:]
    return out


def between(values: Any, lo: float, hi: float) -> list[int]:
    """The indices of ``values`` from ``lo`` to ``hi`` (both included), in order."""
    x = of(values)
    return np.flatnonzero((x >= lo) & (x <= hi)).tolist()  # type: ignore[no-any-return]


class OnTime:
    """queueing._on_time() of one traffic and limit, for any number of workers.

    A request that finds a worker free ends at its arrival plus its service time, as if
    there were a worker for every request; so, until some request finds ``workers``
    others in service, do all, and how many are late is counted a whole array at a
    time. From there the loop's heap replays them one by one, starting from the
    workers' latest ends (which, when every request so far found a worker free, are
    those of the requests still in service), until every request that queued has ended
    and the next finds fewer than ``workers`` in service: from then on it is the same
    again. Where a request ends as it arrives (``usable`` False), the loop decides."""

    def __init__(self, arrivals: Sequence[float], services: Sequence[float], limit_s: float):
        self.arrivals, self.services = _doubles(arrivals), _doubles(services)
        self.limit_s = limit_s
        a, s = of(self.arrivals), of(self.services)
        e = a + s
        n = len(a)
        self.usable = bool(n) and not (e == a).any()
        if not self.usable:
            return
        self.late_by = np.zeros(n + 1, dtype=np.int32)  # (n < 2**31: 40 bytes a request)
        np.cumsum((e - a) > limit_s, out=self.late_by[1:])
        # How many requests are in service when each arrives, with a worker for every
        # request (none of them ends as it arrives: those before it only).
        e.sort(kind="stable")
        ended = np.searchsorted(e, a, side="right").astype(np.int32)
        del e
        self.before = np.arange(n, dtype=np.int32) - ended
        del ended
        self.reach = 2 * float(s.max()) + 1.0  # (s: the longest request's span, and more)

    def test(self, workers: int, max_late: int) -> bool | None:
        """Whether no more than ``max_late`` requests are late through ``workers``
        workers; None where replaying them all one by one is quicker."""
        arrivals, limit_s, late_by = self.arrivals, self.limit_s, self.late_by
        a, s = of(arrivals), of(self.services)
        n = len(a)
        crowding = self.before >= workers
        crowded = np.flatnonzero(crowding).tolist()
        crowded_at = crowding.tobytes()
        del crowding
        at, takes = memoryview(arrivals), memoryview(self.services)  # (sliced, not copied)
        replace = heapq.heapreplace
        late, i, k, budget = 0, 0, 0, 8 * n
        while True:
            k = bisect_left(crowded, i, k)
            p = crowded[k] if k < len(crowded) else n
            late += int(late_by[p] - late_by[i])
            if late > max_late:
                return False
            if p == n:
                return True
            # The workers' latest ends: of the requests before p still in service then.
            lo = int(np.searchsorted(a, a[p] - self.reach, side="left"))
            budget -= p - lo
            if budget < 0:
                return None  # (long requests, often crowded)
            busy = a[lo:p] + s[lo:p]
            busy = busy[busy > a[p]]
            free = np.partition(busy, len(busy) - workers)[len(busy) - workers :].tolist()
            heapq.heapify(free)
            queued = -math.inf  # the latest end of a request that queued
            i = n
            for j, x, y in zip(range(p, n), at[p:], takes[p:]):  # noqa: B905
                f = free[0]
                if x > f:
                    end = x + y
                else:
                    end = f + y
                    if f > x and end > queued:
                        queued = end
                replace(free, end)
                if end - x > limit_s:
                    late += 1
                    if late > max_late:
                        return False
                if j + 1 < n and queued <= at[j + 1] and not crowded_at[j + 1]:
                    i = j + 1
                    break
            if i == n:
                return True


def _doubles(values: Sequence[float]) -> array[float]:
    return values if isinstance(values, array) and values.typecode == "d" else array("d", values)
