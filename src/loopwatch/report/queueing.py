"""Sync workers for the recorded traffic: a trace-driven replay through W FIFO workers.

A sync worker serves one request at a time and holds it for its *service time*: the
request's wall time less its pool wait and its loop wait (its CPU, its database time and
whatever else it awaited, which a sync worker would block on too). Requests that find
every worker busy queue, first come first served, for the first free one: an M/G/c
queue, except that the arrivals and service times are the recorded ones, not a
distribution's. :func:`sync_workers` finds the fewest workers that match the async
processes' throughput, and their p95 latency. docs/capacity.md has the model and where
it breaks.
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from operator import add, eq, le

from .quantiles import argsort, sorted_array, vectorised
from .sweep import counts

# Same throughput: the replay's busy time (any request queued or in service) may exceed
# the busy time measured by this share, the noise of a throughput measurement.
THROUGHPUT_SLACK = 0.03


@dataclass(frozen=True)
class Traffic:
    """Requests by arrival: ``arrivals`` (s, sorted) and ``services`` (s), and what the
    async processes achieved with them: their busy time ``busy_s`` (the union of the
    requests' time in flight, s) and ``p95_s``, the p95 of their wall times (s)."""

    arrivals: Sequence[float]
    services: Sequence[float]
    busy_s: float
    p95_s: float


@dataclass(frozen=True)
class Replay:
    """One replay through ``workers`` workers, as far as it went (``complete``)."""

    workers: int
    late: int  # requests whose latency (queueing + service) exceeded the limit
    busy_s: float  # time any request was queued or in service
    complete: bool


def traffic(
    starts: Sequence[float],
    walls: Sequence[float],
    pool_waits: Sequence[float],
    loop_waits: Sequence[float],
    busy_s: float,
    p95_s: float,
) -> Traffic:
    """A :class:`Traffic` from per-request ``starts`` (Unix s), ``walls``,
    ``pool_waits`` and ``loop_waits`` (ms; a sync worker would not spend the waits),
    with the async side's busy time and p95 wall time (s)."""
    services = array(
        "d",
        (max(0.0, w - p - x) / 1000 for w, p, x in zip(walls, pool_waits, loop_waits, strict=True)),
    )
    return traffic_of(starts, services, busy_s, p95_s)


def traffic_of(
    starts: Sequence[float], services: Sequence[float], busy_s: float, p95_s: float
) -> Traffic:
    """:func:`traffic` from each request's service time (s) already worked out."""
    if vectorised(len(starts)):
        from . import vector

        st = vector.of(starts)
        if not vector.in_order(st):
            ranks = vector.argsort(st)
            arrivals, sv = vector.taken_at(st, ranks), vector.taken_at(services, ranks)
            return Traffic(arrivals, sv, busy_s, p95_s)
        if isinstance(starts, array) and isinstance(services, array):
            return Traffic(starts, services, busy_s, p95_s)  # (as they are: not copied)
    elif not all(map(le, starts, islice(starts, 1, None))):
        order = argsort(starts)
        traffic = Traffic(
            array("d", map(starts.__getitem__, order)),
            array("d", map(services.__getitem__, order)),
            busy_s,
            p95_s,
        )
        del order
        return traffic
    return Traffic(array("d", starts), array("d", services), busy_s, p95_s)  # in order already


def replay(
    t: Traffic, workers: int, limit_s: float = math.inf, max_late: int | None = None,
    max_busy_s: float = math.inf,
) -> Replay:  # fmt: skip
    """Replay ``t`` through ``workers`` FIFO workers. It stops early (``complete``
    False) once more than ``max_late`` requests took longer than ``limit_s`` or the
    busy time passed ``max_busy_s``: the answer is known by then."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers!r}.")
    n = len(t.arrivals)
    if max_late is None:
        max_late = n
    free = [-math.inf] * workers  # a heap: when each worker is next free
    replace = heapq.heapreplace
    late = 0
    busy = 0.0
    b0 = b1 = t.arrivals[0] if n else 0.0  # the busy period being replayed
    for a, s in zip(t.arrivals, t.services, strict=True):
        f = free[0]
        end = (a if a > f else f) + s
        replace(free, end)
        if end - a > limit_s:
            late += 1
            if late > max_late:
                return Replay(workers, late, busy + b1 - b0, False)
        if a > b1:
            busy += b1 - b0
            b0 = a
            b1 = end
        elif end > b1:
            b1 = end
            if busy + b1 - b0 > max_busy_s:
                return Replay(workers, late, busy + b1 - b0, False)
    return Replay(workers, late, busy + b1 - b0, True)


def most_concurrent(t: Traffic) -> int:
    """The most requests in service at once with a worker each: no queueing at all."""
    return concurrency(t)[0]


def concurrency(t: Traffic) -> tuple[int, list[int]]:
    """most_concurrent(), and how many requests found each number in service (with
    themselves) when they arrived."""
    if not len(t.arrivals):
        return 0, [0]
    if vectorised(len(t.arrivals)):
        from . import vector

        found = vector.concurrency(t.arrivals, t.services)
        if found is not None:
            return found
    ends = array("d", map(add, t.arrivals, t.services))
    if any(map(eq, ends, t.arrivals)):  # a request that ends as it arrives
        return _concurrency(t)
    # With no such request, those ended by an arrival are among those before it.
    ends = sorted_array(ends)
    seen = Counter(counts(t.arrivals, ends, ties=False))
    del ends
    top = max(seen)
    return top, [seen.get(c, 0) for c in range(top + 1)]


def _concurrency(t: Traffic) -> tuple[int, list[int]]:
    ends: list[float] = []
    seen = [0]
    pop, push = heapq.heappop, heapq.heappush
    for a, s in zip(t.arrivals, t.services, strict=True):
        while ends and ends[0] <= a:
            pop(ends)
        push(ends, a + s)
        c = len(ends)
        if c < len(seen):
            seen[c] += 1
        else:
            seen.append(1)
    return len(seen) - 1, seen


@dataclass(frozen=True)
class SyncWorkers:
    """The fewest sync workers that serve the traffic at the async side's throughput
    and at its p95 latency (``None``: no requests)."""

    same_throughput: int | None
    same_latency: int | None


def sync_workers(t: Traffic, crowd: tuple[int, list[int]] | None = None) -> SyncWorkers:
    """The smallest W whose replay meets each figure (``crowd``: concurrency(t), if
    already worked out).

    With a worker for every request in service at once no request queues, so the
    latencies are the service times, none longer than the wall time it came from, and
    the busy time is within the one measured: that W meets both. Fewer workers only
    queue more (FIFO, the same arrivals), so each test is monotonic in W. Each search
    starts near where its answer lies and brackets the edge from there.
    """
    if not len(t.arrivals):
        return SyncWorkers(None, None)
    crowd = concurrency(t) if crowd is None else crowd
    return SyncWorkers(same_throughput(t, crowd), same_latency(t, crowd))


def same_throughput(t: Traffic, crowd: tuple[int, list[int]]) -> int:
    """sync_workers()' same_throughput, searched from the work-conserving bound: total
    service over busy time (``t.p95_s`` is not used)."""
    max_busy = t.busy_s * (1 + THROUGHPUT_SLACK)

    def test(w: int) -> bool:
        return _busy_within(t, w, max_busy)

    return _smallest(test, math.ceil(sum(t.services) / max_busy) if max_busy > 0 else 1, crowd[0])


def same_latency(t: Traffic, crowd: tuple[int, list[int]]) -> int:
    """sync_workers()' same_latency, searched from the fewest workers that no more
    requests than may be late would find all busy if none queued (``t.busy_s`` is not
    used)."""
    n = len(t.arrivals)
    allowed_late = n - max(1, (95 * n + 99) // 100)
    fast = None
    if vectorised(n):
        from . import vector

        fast = vector.OnTime(t.arrivals, t.services, t.p95_s)

    def test(w: int) -> bool:
        on_time = None if fast is None or not fast.usable else fast.test(w, allowed_late)
        return _on_time(t, w, t.p95_s, allowed_late) if on_time is None else on_time

    # If none queued, a request would find all of W workers busy if it were the W+1-th
    # in service (or later).
    top, seen = crowd
    crowded, w = 0, top
    while w > 1 and crowded + seen[w] <= allowed_late:
        crowded += seen[w]
        w -= 1
    return _smallest(test, w, top)


def _on_time(t: Traffic, workers: int, limit_s: float, max_late: int) -> bool:
    """``replay(t, workers, limit_s, max_late).complete``, for less."""
    free = [-math.inf] * workers
    replace = heapq.heapreplace
    late = 0
    for a, s in zip(t.arrivals, t.services, strict=True):
        f = free[0]
        end = (a if a > f else f) + s
        replace(free, end)
        if end - a > limit_s:
            late += 1
            if late > max_late:
                return False
    return True


def _busy_within(t: Traffic, workers: int, max_busy_s: float) -> bool:
    """``replay(t, workers, max_busy_s=max_busy_s).complete``, for less."""
    free = [-math.inf] * workers
    replace = heapq.heapreplace
    busy = 0.0
    b0 = b1 = t.arrivals[0] if len(t.arrivals) else 0.0
    for a, s in zip(t.arrivals, t.services, strict=True):
        f = free[0]
        end = (a if a > f else f) + s
        replace(free, end)
        if a > b1:
            busy += b1 - b0
            b0 = a
            b1 = end
        elif end > b1:
            b1 = end
            if busy + b1 - b0 > max_busy_s:
                return False
    return True


def _smallest(test: Callable[[int], bool], guess: int, top: int) -> int:
    """The smallest W in 1..top for which ``test(W)`` holds (it holds at ``top``, and
    for every W above one where it holds), searched outwards from ``guess``."""
    guess = min(max(1, guess), top)
    step = 1
    if test(guess):  # the edge is at or below the guess
        hi, lo = guess, guess - step
        while lo >= 1 and test(lo):
            hi, step = lo, step * 2
            lo = hi - step
        lo = max(lo, 0) + 1  # test(lo - 1) failed, or lo - 1 is 0
    else:
        lo, hi = guess + 1, guess + step
        while hi < top and not test(hi):
            lo, step = hi + 1, step * 2
            hi = min(top, hi + step)
        hi = min(hi, top)
    while lo < hi:  # test(hi) holds; everything below lo fails
        mid = (lo + hi) // 2
        if test(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi
