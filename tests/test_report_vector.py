"""numpy's sorts and sweeps (report/vector.py), used from VECTOR_FROM requests on, give
what the plain Python below that gives, to the last bit: each of them, and whole reports,
read by one process or two, with every kind of tie, zero and -0.0 among the times."""

from __future__ import annotations

import heapq
import json
import math
import random
from array import array
from pathlib import Path
from typing import Any

import pytest

from loopwatch.cli.main import render
from loopwatch.report import (
    ReportOptions,
    background,
    build_report,
    quantiles,
    queueing,
    split,
    vector,
)
from loopwatch.report.queueing import concurrency, sync_workers, traffic, traffic_of
from loopwatch.report.summary import Distribution
from loopwatch.report.sweep import busy, in_flight, spans

from .test_report_split import recording, write
from .test_report_sweep import times


@pytest.fixture
def plain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantiles, "VECTOR_FROM", 1 << 62)


def both_ways(monkeypatch: pytest.MonkeyPatch, work: Any) -> tuple[Any, Any]:
    """``work()`` with numpy, then without."""
    monkeypatch.setattr(quantiles, "VECTOR_FROM", 1)
    fast = work()
    monkeypatch.setattr(quantiles, "VECTOR_FROM", 1 << 62)
    return fast, work()


def signed(values: Any) -> list[tuple[float, float]]:
    """Values with their signs: -0.0 is not 0.0 here."""
    return [(v, math.copysign(1, v)) for v in values]


def zeros(rng: random.Random, n: int) -> list[float]:
    """Times with many equal values, zeros of both signs among them."""
    return [rng.choice([0.0, -0.0, 1.5, 2.0, rng.random(), rng.expovariate(0.1)]) for _ in range(n)]


@pytest.mark.parametrize("seed", range(20))
def test_sorting(seed: int) -> None:
    rng = random.Random(seed)
    values = array("d", zeros(rng, rng.choice([0, 1, 2, 50, 3000])))
    want = sorted(values)
    assert signed(vector.sorted_array(values)) == signed(want)
    assert signed(vector.sorted_array(values, nearly=True)) == signed(want)
    assert signed(vector.sort_in_place(array("d", values))) == signed(want)
    assert list(vector.argsort(values)) == sorted(range(len(values)), key=values.__getitem__)


@pytest.mark.parametrize("seed", range(20))
def test_the_largest(seed: int) -> None:
    rng = random.Random(seed)
    values = array("d", zeros(rng, rng.choice([1, 2, 50, 3000])))
    for k in (1, 2, 7, len(values), len(values) + 3):
        want = heapq.nlargest(k, range(len(values)), key=values.__getitem__)
        assert vector.nlargest(k, values) == want
    lo, hi = sorted(rng.choice(values) for _ in range(2))
    assert vector.between(values, lo, hi) == [i for i, v in enumerate(values) if lo <= v <= hi]


@pytest.mark.parametrize("seed", range(30))
def test_distributions(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows of times, more or fewer than PARTS, with and without -0.0 (then which zero a
    # percentile is shows, and comes from the same parts as without numpy).
    from loopwatch.report.summary import _distribution

    rng = random.Random(seed)
    rows = [
        array("d", zeros(rng, rng.choice([0, 1, 40, 500])) if rng.random() < 0.5 else [])
        + array("d", [rng.expovariate(1) for _ in range(rng.choice([1, 30, 300]))])
        for _ in range(rng.choice([1, 3, 8, 9, 20]))
    ]
    n = sum(map(len, rows))

    def work() -> Distribution:
        return _distribution([array("d", r) for r in rows], n, consume=True)

    fast, slow = both_ways(monkeypatch, work)
    assert signed(vars(fast).values()) == signed(vars(slow).values())
    assert fast == Distribution.of(v for r in rows for v in r)


@pytest.mark.parametrize("seed", range(25))
def test_in_flight_and_the_spans(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    starts, walls = times(rng, rng.choice([1, 2, 50, 2000]))
    if rng.random() < 0.3:
        starts = [-0.0 if s == starts[0] else s for s in starts]
    fast, slow = both_ways(monkeypatch, lambda: in_flight(starts, walls))
    assert fast == slow
    assert signed(vars(fast).values()) == signed(vars(slow).values())
    fast_sp, slow_sp = both_ways(monkeypatch, lambda: spans(starts, walls))
    assert fast_sp.empty == slow_sp.empty
    assert signed(fast_sp.starts) == signed(slow_sp.starts)
    assert signed(fast_sp.ends) == signed(slow_sp.ends)
    fast_b, slow_b = both_ways(monkeypatch, lambda: busy(slow_sp.starts, slow_sp.ends))
    assert signed([fast_b]) == signed([slow_b])
    # ... and given the spans
    fast, slow = both_ways(monkeypatch, lambda: in_flight(starts, walls, slow_sp))
    assert fast == slow


@pytest.mark.parametrize("seed", range(10))
def test_the_busy_time(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    starts = sorted(rng.uniform(0, 100) for _ in range(5000))
    ends = sorted(a + rng.expovariate(100) for a in starts)
    fast, slow = both_ways(monkeypatch, lambda: busy(array("d", starts), array("d", ends)))
    assert signed([fast]) == signed([slow])


@pytest.mark.parametrize("seed", range(25))
def test_the_traffic_and_its_sync_workers(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    starts, walls = times(rng, rng.choice([1, 3, 400, 2000]))
    waits = [rng.choice([0.0, w / 2, w]) for w in walls]  # (some served in no time)
    t = traffic(starts, walls, waits, [0.0] * len(walls), busy_s=len(walls) / 40, p95_s=0.05)
    if rng.random() < 0.5:  # none served in no time
        t = traffic_of(starts, [s + 0.001 for s in t.services], t.busy_s, t.p95_s)

    def work() -> tuple[Any, ...]:
        again = traffic_of(starts, array("d", t.services), t.busy_s, t.p95_s)
        return (list(again.arrivals), list(again.services), concurrency(t), sync_workers(t))

    fast, slow = both_ways(monkeypatch, work)
    assert fast == slow


@pytest.mark.parametrize("seed", range(200))
def test_a_replay_worked_out_where_none_queue_is_the_replay(seed: int) -> None:
    # Few workers (most requests queue) or many (few do), limits none or all meet, and
    # up to every request allowed to be late (then the replay goes to the end).
    rng = random.Random(seed)
    n = rng.choice([1, 2, 5, 50, 500, 3000])
    starts, walls = times(rng, n)
    waits = [rng.choice([0.0, w / 2]) for w in walls]
    t = traffic(starts, walls, waits, [0.0] * n, busy_s=1.0, p95_s=0.05)
    if rng.random() < 0.7:  # (else some are served in no time: the loop decides)
        services = [x + rng.choice([1e-3, 1e-4, 0.02]) for x in t.services]
        t = traffic_of(sorted(starts), services, 1.0, 0.05)
    for limit in (0.0, 0.001, 0.01, 0.05, math.inf):
        fast = vector.OnTime(t.arrivals, t.services, limit)
        for _ in range(6):
            w, late = rng.randint(1, 15), rng.choice([0, rng.randint(0, n), n])
            got = fast.test(w, late) if fast.usable else None
            if got is not None:
                assert got == queueing._on_time(t, w, limit, late)


# --- whole reports ------------------------------------------------------------------------


def odd_times(lines: list[str], seed: int) -> list[str]:
    """Requests starting at the same instant, of no length, of -0.0 pool waits, in no
    order."""
    rng = random.Random(seed)
    out = []
    for line in lines:
        d = json.loads(line) if '"request"' in line and '"start"' in line else None
        if d is not None:
            d["start"] = round(d["start"], 1)
            r = rng.random()
            if r < 0.05:
                d.update(wall_ms=0.0, cpu_ms=0.0, db_ms=0.0, loop_wait_ms=0.0, segments=[])
                d["pool_wait_ms"] = 0.0
            elif r < 0.1:
                d["pool_wait_ms"] = -0.0
            line = json.dumps(d)
        out.append(line)
    rng.shuffle(out[len(out) // 3 :])
    return out


def outputs(paths: list[Path], **options: Any) -> tuple[str, str, list[Any]]:
    report = build_report([str(p) for p in paths], ReportOptions(**options))
    return render(report, 100), json.dumps(report.to_json()), report.window


CASES = [
    ("plain", {}),
    ("odd", {}),
    ("odd", {"slowest": 30}),
    ("routes", {"last": 25}),
    ("plain", {"route": "/search"}),
]


@pytest.mark.parametrize(("kind", "options"), CASES)
@pytest.mark.parametrize("split_bytes", [1000, 1 << 62])
def test_a_report_worked_out_with_numpy_is_the_report_without(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    options: dict[str, Any],
    split_bytes: int,
) -> None:
    routes = [f"/r{i}" for i in range(12)] if kind == "routes" else None
    lines = list(recording(5000, seed=7, **({"routes": routes} if routes else {})))
    if kind == "odd":
        lines = odd_times(lines, 8)
    path = write(tmp_path / "r.jsonl", lines)
    monkeypatch.setattr(split, "SPLIT_BYTES", split_bytes)
    fast, slow = both_ways(monkeypatch, lambda: outputs([path], **options))
    assert fast == slow
    assert fast[0] == slow[0]  # (the text)
    assert fast[1] == slow[1]  # (the JSON)


@pytest.mark.parametrize("job", ["prepare", "crowding", "throughput"])
def test_if_the_helper_fails_the_report_with_numpy_is_worked_out_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, job: str
) -> None:
    from .test_report_split import killed

    path = write(tmp_path / "r.jsonl", recording(6000, seed=3))
    monkeypatch.setattr(quantiles, "VECTOR_FROM", 1)
    monkeypatch.setattr(split, "SPLIT_BYTES", 1 << 62)
    one = outputs([path])
    monkeypatch.setattr(split, "SPLIT_BYTES", 1000)
    monkeypatch.setattr(background, job, killed)
    assert outputs([path]) == one


def test_numpy_is_used_from_vector_from_requests_on(plain: None) -> None:
    assert not quantiles.vectorised(10**9)
    quantiles.VECTOR_FROM = 50  # (the fixture puts it back)
    assert not quantiles.vectorised(49)
    assert quantiles.vectorised(50)
