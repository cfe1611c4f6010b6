"""The sync-worker model on synthetic traffic whose answers are known."""

from __future__ import annotations

import math
import random

import pytest

from loopwatch.report.queueing import Traffic, most_concurrent, replay, sync_workers, traffic


def _traffic(arrivals: list[float], services_ms: list[float], waits_ms: list[float]) -> Traffic:
    """What the async side recorded: walls are service plus wait; busy is their union."""
    walls = [s + w for s, w in zip(services_ms, waits_ms, strict=True)]
    spans = sorted((a, a + w / 1000) for a, w in zip(arrivals, walls, strict=True))
    busy, (b0, b1) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > b1:
            busy, b0, b1 = busy + b1 - b0, a, b
        else:
            b1 = max(b1, b)
    busy += b1 - b0
    ranked = sorted(walls)
    p95 = ranked[max(1, (95 * len(ranked) + 99) // 100) - 1]
    return traffic(arrivals, walls, waits_ms, [0.0] * len(walls), busy, p95 / 1000)


def test_a_burst_on_a_fixed_pool() -> None:
    # 100 requests at once, 50 ms each in the database, a pool of 15: the k-th (from 0)
    # waited k // 15 rounds of 50 ms for a connection. Its p95 wall is the 95th: 350 ms;
    # it was busy 7 rounds, 350 ms.
    n, pool = 100, 15
    t = _traffic([0.0] * n, [50.0] * n, [50.0 * (k // pool) for k in range(n)])
    assert t.p95_s == pytest.approx(0.35)
    assert t.busy_s == pytest.approx(0.35)
    # W workers: the 95th request waits ceil(95 / W) - 1 rounds, so p95 <= 350 ms from
    # W = 14 (13 workers take 8 rounds); all 100 done in 7 rounds (360 ms with the 3 %
    # slack) from W = 15 (14 workers take 8 rounds).
    assert sync_workers(t).same_latency == 14
    assert sync_workers(t).same_throughput == 15
    assert most_concurrent(t) == 100


def test_a_steady_rate_with_no_queueing() -> None:
    # a request every 100 ms, each 50 ms of work and no wait: one worker does it all
    n = 50
    t = _traffic([i / 10 for i in range(n)], [50.0] * n, [0.0] * n)
    assert most_concurrent(t) == 1
    assert sync_workers(t).same_latency == 1
    assert sync_workers(t).same_throughput == 1
    assert replay(t, 1).late == 0


def test_waits_are_not_service_time() -> None:
    # the same steady rate, but each request also waited 500 ms for the pool: the sync
    # worker never has that wait, so one still serves it; the old model counted 6
    n = 50
    t = _traffic([i / 10 for i in range(n)], [50.0] * n, [500.0] * n)
    assert sync_workers(t) == sync_workers(
        _traffic([i / 10 for i in range(n)], [50.0] * n, [0.0] * n)
    )


def _mmc_late(lam: float, mu: float, c: int, t: float) -> float:
    """M/M/c: P(response time > t), from the Erlang C formula."""
    a = lam / mu
    top = a**c / math.factorial(c) * c / (c - a)
    erlang_c = top / (sum(a**k / math.factorial(k) for k in range(c)) + top)
    theta = c * mu - lam  # the rate of a queued request's wait
    if theta == mu:  # the limit of the expression below
        queued = (1 + mu * t) * math.exp(-mu * t)
    else:
        queued = (theta * math.exp(-mu * t) - mu * math.exp(-theta * t)) / (theta - mu)
    return (1 - erlang_c) * math.exp(-mu * t) + erlang_c * queued


def _poisson(lam: float, mu: float, n: int, seed: int) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    now, arrivals, services = 0.0, [], []
    for _ in range(n):
        now += rng.expovariate(lam)
        arrivals.append(now)
        services.append(rng.expovariate(mu) * 1000)
    return arrivals, services


@pytest.mark.parametrize(("c", "t"), [(10, 0.1), (10, 0.3), (12, 0.2), (9, 0.4)])
def test_poisson_arrivals_replay_as_m_m_c(c: int, t: float) -> None:
    lam, mu, n = 80.0, 10.0, 200_000  # 8 erlangs of work
    arrivals, services = _poisson(lam, mu, n, seed=c)
    tr = _traffic(arrivals, services, [0.0] * n)
    late = replay(tr, c, limit_s=t).late / n
    assert late == pytest.approx(_mmc_late(lam, mu, c, t), abs=0.01)


def test_same_latency_on_poisson_arrivals_matches_m_m_c() -> None:
    # The async side's p95 is set between the M/M/c p95 with 10 workers (0.33 s) and
    # with 9 (0.43 s): the model must find the 10 back.
    lam, mu, n = 80.0, 10.0, 100_000
    target = (_mmc_p95(lam, mu, 10) + _mmc_p95(lam, mu, 9)) / 2
    arrivals, services = _poisson(lam, mu, n, seed=7)
    tr = _traffic(arrivals, services, [0.0] * n)
    assert sync_workers(Traffic(tr.arrivals, tr.services, tr.busy_s, target)).same_latency == 10


def _mmc_p95(lam: float, mu: float, c: int) -> float:
    lo, hi = 0.0, 10.0
    for _ in range(60):  # bisect P(T > t) = 5 %
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _mmc_late(lam, mu, c, mid) > 0.05 else (lo, mid)
    return hi


def test_a_replay_stops_once_its_answer_is_known() -> None:
    n = 1000
    t = _traffic([0.0] * n, [10.0] * n, [0.0] * n)
    r = replay(t, 1, limit_s=0.05, max_late=10)
    assert not r.complete
    assert r.late == 11
    with pytest.raises(ValueError, match="at least 1"):
        replay(t, 0)


def test_no_requests() -> None:
    t = traffic([], [], [], [], 0.0, 0.0)
    assert sync_workers(t).same_latency is None
    assert most_concurrent(t) == 0
