"""The trace's interval arithmetic: db and pool time less loop wait, and what is drawn."""

from __future__ import annotations

import random

from loopwatch._capture.loop import SEGMENT_NS
from loopwatch._capture.trace import MAX_INTERVALS, Trace
from loopwatch.record import RequestRecord

MS = 1_000_000


def _trace(end_ms: float) -> Trace:
    trace = Trace(0.0, 0, "GET", "/")
    trace.end_ns = int(end_ms * MS)
    return trace


def test_a_short_loop_wait_is_taken_out_of_db_time_but_not_drawn() -> None:
    trace = _trace(12)
    trace.add(trace.db, 1 * MS, 11 * MS)
    trace.waited(2 * MS, int(2.3 * MS))  # 0.3 ms: counted, not drawn
    trace.waited(5 * MS, 7 * MS)  # 2 ms: counted and drawn
    db_ns, pool_ns, spans, _ = trace.spans()
    assert trace.loop_ns == int(2.3 * MS)
    assert db_ns == 10 * MS - int(2.3 * MS)
    assert pool_ns == 0
    # the short wait shortens the piece it falls in; the pieces add up to db_ns
    short = int(0.3 * MS)
    assert spans == [
        (1 * MS, "db", 5 * MS - short),
        (5 * MS, "loop", 7 * MS),
        (7 * MS, "db", 11 * MS),
    ]


def test_loop_waits_outside_db_time_are_drawn_from_segment_ns() -> None:
    trace = _trace(10)
    trace.waited(1 * MS, 1 * MS + SEGMENT_NS - 1)
    trace.waited(4 * MS, 4 * MS + SEGMENT_NS)
    assert trace.spans() == (0, 0, [(4 * MS, "loop", 4 * MS + SEGMENT_NS)], 0)
    assert trace.loop_ns == 2 * SEGMENT_NS - 1


def test_overlapping_queries_count_once_and_lose_each_wait_once() -> None:
    trace = _trace(20)
    trace.add(trace.db, 1 * MS, 9 * MS)
    trace.add(trace.db, 3 * MS, 12 * MS)  # gather: overlaps the first
    trace.add(trace.pool, 0, 1 * MS)
    trace.waited(int(0.5 * MS), int(0.6 * MS))  # in the pool wait, short
    trace.waited(8 * MS, int(8.5 * MS))  # in both queries, short
    db_ns, pool_ns, spans, _ = trace.spans()
    assert db_ns == 11 * MS - int(0.5 * MS)
    assert pool_ns == 1 * MS - int(0.1 * MS)
    assert spans == [(0, "pool", int(0.9 * MS)), (1 * MS, "db", int(11.5 * MS))]
    record = trace_record(trace)
    assert (record.db_ms, record.pool_wait_ms, record.loop_wait_ms) == (10.5, 0.9, 0.6)


def trace_record(trace: Trace) -> RequestRecord:
    trace.id_prefix, trace.seq, trace.pid = "t", 1, 1
    trace.route = trace.error = None
    trace.rss = None
    return trace.to_record()


def test_db_and_pool_segments_add_up_to_their_totals() -> None:
    rng = random.Random(5)
    for _ in range(500):
        trace = _trace(100)
        now = 0
        for _ in range(rng.randint(0, 30)):  # loop waits: disjoint, in time order
            now += rng.randint(0, 10 * MS)
            length = rng.choice([rng.randint(50_000, SEGMENT_NS - 1), rng.randint(0, 5 * MS)])
            trace.waited(now, now + length)
            now += length
        for kind in (trace.db, trace.pool):
            for _ in range(rng.randint(1, 4)):
                a = rng.randint(0, 90 * MS)
                trace.add(kind, a, a + rng.randint(0, 20 * MS))
        db_ns, pool_ns, spans, _ = trace.spans()
        assert sum(b - a for a, k, b in spans if k == "db") == db_ns
        assert sum(b - a for a, k, b in spans if k == "pool") == pool_ns
        assert all(b > a for a, _, b in spans)


def test_totals_stay_exact_past_the_drawn_intervals() -> None:
    # 5,000 queries one after the other, 40 µs apart, each 100 µs, with a 2 ms loop
    # wait inside every tenth: far past MAX_INTERVALS of each kind.
    trace = _trace(5000 * 0.14 + 1)
    for i in range(5000):
        a = int(i * 0.14 * MS)
        if i % 10 == 0:
            trace.waited(a + 10_000, a + 60_000)  # 50 µs: under SEGMENT_NS
        trace.add(trace.db, a, a + 100_000)
    db_ns, _, spans, dropped = trace.spans()
    assert db_ns == 5000 * 100_000 - 500 * 50_000
    assert trace.loop_ns == 500 * 50_000
    assert sum(1 for s in spans if s[1] == "db") == MAX_INTERVALS
    assert dropped == 5000 - MAX_INTERVALS
    record = trace_record(trace)
    assert record.db_ms == 475.0
    assert record.segments_dropped == dropped


def test_overlapping_queries_past_the_cap_count_once() -> None:
    trace = _trace(10)
    for i in range(MAX_INTERVALS + 100):  # gathered: all of them at once, nested
        trace.add(trace.db, i * 1000, 9 * MS - i * 1000)
    db_ns, _, spans, _ = trace.spans()
    assert db_ns == 9 * MS
    assert spans == [(0, "db", 9 * MS)]


def _reference_spans(trace: Trace) -> list[tuple[int, str, int]]:
    """What is drawn, computed the generic way only: every kind's intervals sorted and
    merged, each piece walked past every hole (the record's shortcuts take none of this
    for one interval or two, or for a piece no hole touches)."""
    start, end, loop = trace.start_ns, trace.end_ns, trace.loop
    holes = list(zip(loop[::2], loop[1::2], strict=True))
    out = [(a, "cpu", b) for a, b in zip(trace.cpu[::2], trace.cpu[1::2], strict=True)]
    out += [(a, "loop", b) for a, b in holes if b - a >= SEGMENT_NS]
    for kind, flat in (("db", trace.db), ("pool", trace.pool)):
        merged: list[list[int]] = []
        for a, b in sorted(zip(flat[::2], flat[1::2], strict=True)):
            a, b = max(a, start), min(b, end)
            if b <= a:
                continue
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        for a, b in merged:
            cut = 0
            for h0, h1 in holes:
                if h1 <= a or h0 >= b:
                    continue
                if h1 - h0 < SEGMENT_NS:
                    cut += min(h1, b) - max(h0, a)
                    continue
                if h0 - cut > a:
                    out.append((a, kind, h0 - cut))
                cut, a = 0, max(a, h1)
                if a >= b:
                    break
            if b - cut > a:
                out.append((a, kind, b - cut))
    return sorted(out)


def test_the_record_draws_what_the_generic_computation_draws() -> None:
    rng = random.Random(11)
    for _ in range(3000):
        trace = _trace(rng.choice([0.5, 5, 40]))
        end = trace.end_ns
        now = 0
        for _ in range(rng.choice([0, 1, 2, 3, 12])):  # loop waits: disjoint, in order
            now += rng.randint(0, end // 4)
            length = rng.choice([rng.randint(1, SEGMENT_NS - 1), rng.randint(0, 3 * MS)])
            trace.waited(now, now + length)
            now += length
        trace.cpu = sorted(rng.sample(range(end), 2 * rng.randint(0, 3)))
        for kind in (trace.db, trace.pool):
            for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 5])):
                a = rng.randint(-MS, end + 100_000)
                if kind and rng.random() < 0.3:
                    a = rng.choice(kind)  # touching another interval, or sharing its end
                trace.add(kind, a, a + rng.choice([rng.randint(0, 50_000), rng.randint(0, 5 * MS)]))
        db_ns, pool_ns, spans, _ = trace.spans()
        assert spans == _reference_spans(trace), trace
        assert sum(b - a for a, k, b in spans if k == "db") == db_ns
        assert sum(b - a for a, k, b in spans if k == "pool") == pool_ns
