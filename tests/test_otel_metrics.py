"""OpenTelemetry metrics through the real SDK (an in-memory reader) and a real PostgreSQL."""

from __future__ import annotations

import asyncio
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
from loopwatch.export.otel_metrics import Metrics


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

    return Starlette(routes=[Route("/items/{item_id:int}", item)])


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
    ):
        (point,) = points[name]
        assert point.count == 3
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
