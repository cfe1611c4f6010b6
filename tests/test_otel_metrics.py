"""OpenTelemetry metrics through the real SDK (an in-memory reader) and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from loopwatch import InstrumentedPool, LoopWatch
from loopwatch._capture.loop import monitor
from loopwatch._capture.watchdog import stall_listeners
from loopwatch.export.otel_metrics import SECONDS_BUCKETS, Metrics
from loopwatch.record import Stall

# Past the stall threshold: the tests ask for 0.05 s, but the process's watchdog has the
# threshold of the first LoopWatch that started it (the default is 0.1 s).
BLOCK_S = 0.25


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    p = MeterProvider(metric_readers=[reader])
    yield p
    p.shutdown()


def make_app(pool: InstrumentedPool) -> Starlette:
    async def item(request: Request) -> Response:
        await pool.execute("SELECT pg_sleep(0.05)")
        return PlainTextResponse("ok")

    async def block(request: Request) -> Response:
        time.sleep(BLOCK_S)  # noqa: ASYNC251 (a stall)
        return PlainTextResponse("done")

    return Starlette(routes=[Route("/items/{item_id:int}", item), Route("/block", block)])


async def drive(app: Any, n: int) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await asyncio.gather(*(client.get(f"/items/{i}") for i in range(n)))


def collect(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Metric name -> its data points."""
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


async def test_request_histograms(
    pool: InstrumentedPool, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    await drive(LoopWatch(make_app(pool), file=None, meter_provider=provider, spans=False), 3)
    points = collect(reader)
    for name in (
        "loopwatch.request.cpu_time",
        "loopwatch.request.db_time",
        "loopwatch.request.pool_wait_time",
        "loopwatch.request.loop_wait_time",
    ):
        (point,) = points[name]
        assert point.count == 3
        assert tuple(point.explicit_bounds) == SECONDS_BUCKETS  # seconds, not the ms default
        assert point.attributes == {
            "http.request.method": "GET",
            "http.route": "/items/{item_id}",
            "http.response.status_code": 200,
        }
    (db,) = points["loopwatch.request.db_time"]
    assert db.sum >= 3 * 0.05
    (wait,) = points["loopwatch.request.pool_wait_time"]
    assert wait.sum >= 0.05, "a pool of one: the others waited"


async def test_pool_metrics_follow_the_database_conventions(
    pool: InstrumentedPool, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    await drive(LoopWatch(make_app(pool), file=None, meter_provider=provider, spans=False), 3)
    points = collect(reader)
    name = pool.loopwatch_name
    assert "/postgres" in name
    assert "@" not in name
    counts = {
        p.attributes["db.client.connection.state"]: p.value
        for p in points["db.client.connection.count"]
        if p.attributes["db.client.connection.pool.name"] == name
    }
    assert counts == {"idle": 1, "used": 0}
    assert [p.value for p in points["db.client.connection.max"]
            if p.attributes["db.client.connection.pool.name"] == name] == [1]  # fmt: skip
    assert [p.value for p in points["db.client.connection.pending_requests"]
            if p.attributes["db.client.connection.pool.name"] == name] == [0]  # fmt: skip
    (wait,) = [
        p for p in points["db.client.connection.wait_time"]
        if p.attributes["db.client.connection.pool.name"] == name
    ]  # fmt: skip
    assert wait.count == 3
    assert wait.max >= 0.05


async def test_pending_requests_while_they_wait(
    pool: InstrumentedPool, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    app = LoopWatch(make_app(pool), file=None, meter_provider=provider, spans=False)
    run = asyncio.ensure_future(drive(app, 4))
    await asyncio.sleep(0.02)  # one holds the connection, three wait
    pending = [
        p.value
        for p in collect(reader)["db.client.connection.pending_requests"]
        if p.attributes["db.client.connection.pool.name"] == pool.loopwatch_name
    ]
    await run
    assert pending == [3]


async def test_memory_and_event_loop_metrics(
    pool: InstrumentedPool, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    app = LoopWatch(make_app(pool), file=None, meter_provider=provider, spans=False)
    await drive(app, 2)
    await asyncio.sleep(1.2)  # let the sampler take its samples
    points = collect(reader)
    (memory,) = points["process.memory.usage"]
    assert memory.value > 10_000_000
    (busy,) = points["loopwatch.eventloop.utilization"]
    assert 0.0 <= busy.value <= 1.0
    (lag,) = points["loopwatch.eventloop.lag"]
    assert 0.0 <= lag.value < 1.0


async def test_a_stall_in_a_request_is_recorded_with_its_route(
    pool: InstrumentedPool, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    app = LoopWatch(
        make_app(pool), file=None, meter_provider=provider, spans=False, stall_threshold=0.05
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/block")).status_code == 200
    assert monitor.watchdog is not None
    assert monitor.watchdog.threshold_ns <= BLOCK_S * 1e9 / 2, "the test cannot stall"
    (stall,) = [
        p for p in collect(reader)["loopwatch.eventloop.stall.duration"]
        if p.attributes.get("http.route") == "/block"
    ]  # fmt: skip
    assert stall.attributes == {"http.route": "/block", "loopwatch.stall.cause": "blocked"}
    assert stall.count == 1
    assert stall.sum >= BLOCK_S


async def test_a_stall_outside_requests_is_recorded_without_a_route(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    metrics = Metrics(provider)
    assert metrics.active()
    stall = Stall(time=time.time(), pid=os.getpid(), duration_ms=300.0, cpu_ms=290.0)
    for listener in list(stall_listeners):  # as the watchdog thread calls them
        listener(stall, None)
    (point,) = collect(reader)["loopwatch.eventloop.stall.duration"]
    assert point.attributes == {"loopwatch.stall.cause": "cpu"}
    assert point.sum == 0.3


async def test_two_middlewares_on_one_provider_record_a_stall_once(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    both = [Metrics(provider), Metrics(provider)]
    assert all(m.active() for m in both)
    stall = Stall(time=time.time(), pid=os.getpid(), duration_ms=300.0, cpu_ms=0.0)
    for listener in list(stall_listeners):
        listener(stall, None)
    (point,) = collect(reader)["loopwatch.eventloop.stall.duration"]
    assert point.count == 1


def test_without_an_sdk_meter_provider_metrics_cost_nothing() -> None:
    assert Metrics(None).active() is False


async def test_metrics_off(
    pool: InstrumentedPool, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    app = LoopWatch(make_app(pool), file=None, meter_provider=provider, metrics=False)
    await drive(app, 1)
    data = reader.get_metrics_data()
    names = {
        m.name
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert not {n for n in names if n.startswith("loopwatch.request")}
