"""The summary's sweeps, worked out a whole array at a time, give what the plain loops
they replace gave: in flight at once, percentiles, the sync workers."""

from __future__ import annotations

import heapq
import math
import random
from array import array
from bisect import bisect_right

import pytest

from loopwatch.report import quantiles, queueing
from loopwatch.report.quantiles import kth, sorted_parts
from loopwatch.report.queueing import Traffic, replay, sync_workers, traffic
from loopwatch.report.summary import percentile
from loopwatch.report.sweep import InFlight, in_flight

T0 = 1_800_000_000.0


def times(rng: random.Random, n: int) -> tuple[list[float], list[float]]:
    """Starts (some at the same instant, not in order) and walls (some 0, some tiny)."""
    starts, walls = [], []
    t = T0
    for _ in range(n):
        t += rng.choice([0.0, 0.0005, rng.expovariate(50)])
        starts.append(round(t, rng.choice([3, 6])))
        walls.append(rng.choice([0.0, 1e-9, 1.0, rng.expovariate(0.05)]))
    order = list(range(n))
    for i in range(0, n - 5, 5):  # written as they end: a little out of order
        rng.shuffle(order[i : i + 5])
    return [starts[i] for i in order], [walls[i] for i in order]


def reference_in_flight(starts: list[float], walls: list[float]) -> InFlight:
    """in_flight() as it was: one loop over the starts; the longest peak as the window
    worked it out."""
    s = sorted(starts)
    e = sorted(a + w / 1000 for a, w in zip(starts, walls, strict=True))
    n = len(s)
    counts = []
    peak, at, j = 0, 0.0, 0
    busy, since, ended = 0.0, s[0], 0
    for i, x in enumerate(s):
        while j < n and e[j] <= x:
            j += 1
        while ended < n and e[ended] < x:
            ended += 1
        if ended == i and i:
            busy += e[i - 1] - since
            since = x
        k = i + 1 if i + 1 == n or s[i + 1] != x else bisect_right(s, x, i)
        c = max(k - j, 1)
        counts.append(c)
        if c > peak:
            peak, at = c, x
    busy += e[n - 1] - since
    lasting = sorted(end for a, w in zip(starts, walls, strict=True) if (end := a + w / 1000) > a)
    best, longest, moments = 0.0, -1.0, 0
    i, j = 0, 0
    while peak > 1 and i < n:
        x = s[i]
        k = bisect_right(s, x, i)
        while j < n and e[j] <= x:
            j += 1
        if k - j == peak:
            moments += 1
            lasted = lasting[bisect_right(lasting, x)] - x
            if lasted > longest:
                best, longest = x, lasted
        i = k
    p95 = int(percentile(sorted(counts), 95))
    return InFlight(peak, p95, at, busy, moments, best, longest, s[0], e[n - 1])


@pytest.mark.parametrize(
    ("starts", "walls"),
    [
        # Peaks of two at 1 and 20 ms; a request of no length at 5 ms does not end them.
        ([0.0, 0.001, 0.005, 0.019, 0.020], [10.0, 9.0, 0.0, 10.0, 5.0]),
        # The same instant, twice at the peak; the one in flight at none.
        ([0.0, 0.0, 0.004, 0.004, 0.004], [3.0, 3.0, 0.0, 2.0, 1.0]),
    ],
)
def test_in_flight_on_known_spans(starts: list[float], walls: list[float]) -> None:
    starts = [T0 + a for a in starts]
    assert in_flight(starts, walls) == reference_in_flight(starts, walls)


@pytest.mark.parametrize("seed", range(20))
def test_in_flight_is_what_the_loop_over_the_starts_gave(seed: int) -> None:
    rng = random.Random(seed)
    starts, walls = times(rng, rng.choice([1, 2, 50, 2000]))
    assert in_flight(starts, walls) == reference_in_flight(starts, walls)


def reference_concurrency(t: Traffic) -> tuple[int, list[int]]:
    ends: list[float] = []
    seen = [0]
    for a, s in zip(t.arrivals, t.services, strict=True):
        while ends and ends[0] <= a:
            heapq.heappop(ends)
        heapq.heappush(ends, a + s)
        seen += [0] * (len(ends) + 1 - len(seen))
        seen[len(ends)] += 1
    return len(seen) - 1, seen


def random_traffic(rng: random.Random, n: int) -> Traffic:
    starts, walls = times(rng, n)
    waits = [rng.choice([0.0, w / 2]) for w in walls]
    return traffic(starts, walls, waits, [0.0] * n, busy_s=n / 40, p95_s=0.05)


@pytest.mark.parametrize("seed", range(20))
def test_concurrency_is_what_the_heap_gave(seed: int) -> None:
    rng = random.Random(seed)
    t = random_traffic(rng, rng.choice([1, 3, 300, 3000]))
    assert queueing.concurrency(t) == reference_concurrency(t)


@pytest.mark.parametrize("seed", range(30))
def test_the_tests_of_a_replay_are_the_replay_s(seed: int) -> None:
    rng = random.Random(seed)
    t = random_traffic(rng, 500)
    w = rng.randint(1, 12)
    limit, late = rng.choice([0.001, 0.05, math.inf]), rng.randint(0, 50)
    busy = rng.uniform(1, 20)
    on_time = replay(t, w, limit_s=limit, max_late=late).complete
    assert queueing._on_time(t, w, limit, late) == on_time
    assert queueing._busy_within(t, w, busy) == replay(t, w, max_busy_s=busy).complete


def reference_sync_workers(t: Traffic) -> tuple[int, int]:
    """sync_workers() as it was: the latency searched from the throughput's answer."""
    n = len(t.arrivals)
    top = reference_concurrency(t)[0]
    allowed = n - max(1, (95 * n + 99) // 100)
    max_busy = t.busy_s * (1 + queueing.THROUGHPUT_SLACK)
    guess = math.ceil(sum(t.services) / max_busy) if max_busy > 0 else 1
    throughput = queueing._smallest(
        lambda w: replay(t, w, max_busy_s=max_busy).complete, guess, top
    )
    latency = queueing._smallest(
        lambda w: replay(t, w, limit_s=t.p95_s, max_late=allowed).complete, throughput, top
    )
    return throughput, latency


@pytest.mark.parametrize("seed", range(25))
def test_the_sync_workers_are_those_the_search_found_before(seed: int) -> None:
    rng = random.Random(seed)
    t = random_traffic(rng, rng.choice([20, 400, 2000]))
    t = Traffic(t.arrivals, t.services, rng.uniform(0.2, 2) * t.busy_s, rng.uniform(0.001, 0.2))
    found = sync_workers(t)
    assert (found.same_throughput, found.same_latency) == reference_sync_workers(t)


@pytest.mark.parametrize("seed", range(20))
def test_percentiles_of_sorted_parts_are_those_of_the_sorted_whole(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([1, 2, 9, 1000, 5000])
    values = [rng.choice([0.0, 1.5, rng.random(), rng.expovariate(1)]) for _ in range(n)]
    parts = sorted_parts(array("d", values), n)
    whole = sorted(values)
    for k in {0, n // 2, (95 * n + 99) // 100 - 1, n - 1, rng.randrange(n)}:
        assert kth(parts, k) == whole[k]


@pytest.mark.parametrize("seed", range(20))
def test_sorting_part_after_part_is_sorting(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nearly in order (a file's times), in order by runs (files one after the other), or
    # not at all; with ties, -0.0 and 0.0 among them, whose order sorting keeps.
    monkeypatch.setattr(quantiles, "RUN", 16)
    rng = random.Random(seed)
    n = rng.choice([0, 1, 15, 16, 17, 500, 3000])
    kind = rng.choice(["nearly", "runs", "random"])
    if kind == "nearly":
        values = [i + rng.choice([-0.0, 0.0, 0.5, rng.uniform(-8, 8)]) for i in range(n)]
        values = [round(v) if rng.random() < 0.3 else v for v in values]
    elif kind == "runs":
        values = sorted(rng.random() for _ in range(n // 2)) + sorted(
            rng.random() for _ in range(n - n // 2)
        )
    else:
        values = [rng.choice([0.0, -0.0, rng.random()]) for _ in range(n)]
    got = quantiles.sorted_array(array("d", values))
    assert [(v, math.copysign(1, v)) for v in got] == [
        (v, math.copysign(1, v)) for v in sorted(values)
    ]
    assert list(quantiles.argsort(values)) == sorted(range(n), key=values.__getitem__)
