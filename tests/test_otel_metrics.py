"""OpenTelemetry metrics through the real SDK (an in-memory reader) and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import random
import string
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
from starlette.routing import Mount, Route

from loopwatch import InstrumentedPool, LoopWatch
from loopwatch._capture.loop import monitor
from loopwatch._capture.watchdog import stall_listeners
from loopwatch.export import otel_metrics
from loopwatch.export.otel_metrics import SECONDS_BUCKETS, Metrics
from loopwatch.record import RequestRecord, Stall

KNOWN_METHODS = {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
REQUEST_HISTOGRAMS = (
    "loopwatch.request.cpu_time",
    "loopwatch.request.db_time",
    "loopwatch.request.pool_wait_time",
    "loopwatch.request.loop_wait_time",
)
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


# --- bounded attributes -------------------------------------------------------------------


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def token(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=12))


def attribute_values(reader: InMemoryMetricReader) -> dict[str, set[Any]]:
    """Attribute name -> every value it has on any point of any metric."""
    out: dict[str, set[Any]] = {}
    for points in collect(reader).values():
        for point in points:
            for key, value in point.attributes.items():
                out.setdefault(key, set()).add(value)
    return out


def record(**fields: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "id": "p-1", "pid": 1, "start": 0.0, "method": "GET", "path": "/items/1",
        "route": "/items/{item_id}", "status": 200, "wall_ms": 1.0, "cpu_ms": 1.0,
        "db_ms": 0.0, "pool_wait_ms": 0.0, "db_queries": 0, "rss_bytes": None,
    }  # fmt: skip
    return RequestRecord(**{**base, **fields})


async def test_unknown_methods_are_recorded_as_other(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    rng = random.Random(3)
    methods = ["".join(rng.choices(string.ascii_uppercase, k=10)) for _ in range(100)]
    app = LoopWatch(
        Starlette(routes=[Route("/items/{item_id:int}", ok, methods=sorted(KNOWN_METHODS))]),
        file=None, meter_provider=provider, spans=False,
    )  # fmt: skip
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for method in [*sorted(KNOWN_METHODS), *methods]:
            await client.request(method, "/items/1")
    points = collect(reader)
    for name in REQUEST_HISTOGRAMS:
        values = {p.attributes["http.request.method"] for p in points[name]}
        assert values == KNOWN_METHODS | {"_OTHER"}, name
        (other,) = [p for p in points[name] if p.attributes["http.request.method"] == "_OTHER"]
        assert other.count == 100
        assert other.attributes == {
            "http.request.method": "_OTHER",
            "http.route": "/items/{item_id}",
            "http.response.status_code": 405,
        }


async def test_unmatched_paths_never_reach_an_attribute(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    # Plain 404s, and 404s under a mount and under a mount with a parameter: for those
    # the router has matched the mount, not a route in it.
    app = Starlette(
        routes=[
            Route("/items/{item_id:int}", ok),
            Mount("/api", routes=[Route("/articles", ok)]),
            Mount("/org/{org}", routes=[Route("/members", ok)]),
        ]
    )
    rng = random.Random(7)
    tokens = [token(rng) for _ in range(1000)]
    shapes = ("/{}", "/items/{}", "/api/{}", "/org/{}/nothing")
    transport = httpx.ASGITransport(
        app=LoopWatch(app, file=None, meter_provider=provider, spans=False)
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for i, t in enumerate(tokens):
            assert (await client.get(shapes[i % 4].format(t))).status_code == 404
        assert (await client.get("/org/acme/members")).status_code == 200
    values = attribute_values(reader)
    text = repr(values)
    assert not [t for t in tokens if t in text]
    assert len(values.get("http.route", ())) <= 4, values["http.route"]
    (point,) = [
        p for p in collect(reader)["loopwatch.request.cpu_time"]
        if p.attributes["http.response.status_code"] == 404
    ]  # fmt: skip
    assert point.count == 1000


def test_a_route_that_does_not_match_its_path_is_left_off(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    metrics = Metrics(provider)
    metrics.record(record(path="/org/a1b2/x", route="/org/a1b2/org/{org}/{path}", status=404))
    metrics.record(record(path="/v1/users/7", route="/users/{user_id}"))  # behind a root_path
    metrics.record(record(path="/files/a/b.txt", route="/files/{path}"))
    (*_, files, users, wrong) = sorted(
        collect(reader)["loopwatch.request.cpu_time"],
        key=lambda p: p.attributes.get("http.route", "~"),
    )
    assert "http.route" not in wrong.attributes
    assert users.attributes["http.route"] == "/users/{user_id}"
    assert files.attributes["http.route"] == "/files/{path}"


def test_routes_past_the_limit_are_other(
    provider: MeterProvider, reader: InMemoryMetricReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(otel_metrics, "MAX_ROUTES", 10)
    metrics = Metrics(provider)
    for i in range(30):
        metrics.record(record(path=f"/r{i}", route=f"/r{i}"))
    metrics.record(record(path="/r0", route="/r0"))  # one seen before the limit: still its own
    points = collect(reader)["loopwatch.request.cpu_time"]
    counts = {p.attributes["http.route"]: p.count for p in points}
    assert counts == {**{f"/r{i}": 1 for i in range(10)}, "/r0": 2, "_OTHER": 20}


def test_stall_routes_past_the_limit_are_other(
    provider: MeterProvider, reader: InMemoryMetricReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(otel_metrics, "MAX_ROUTES", 1)
    metrics = Metrics(provider)
    assert metrics.active()
    for route in ("/a", "/b", "/c"):
        stall = Stall(time=time.time(), pid=os.getpid(), duration_ms=300.0, cpu_ms=0.0,
                      route=route)  # fmt: skip
        for listener in list(stall_listeners):
            listener(stall, None)
    points = collect(reader)["loopwatch.eventloop.stall.duration"]
    assert {p.attributes["http.route"]: p.count for p in points} == {"/a": 1, "_OTHER": 2}


def test_errors_are_typed_and_bounded(
    provider: MeterProvider, reader: InMemoryMetricReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(otel_metrics, "MAX_ERROR_TYPES", 3)
    metrics = Metrics(provider)
    metrics.record(record(status=503))
    metrics.record(record(status=404))  # a client error is not the server's
    for i in range(10):
        metrics.record(record(status=500, error=f"app.errors.Error{i}"))
    points = collect(reader)["loopwatch.request.cpu_time"]
    counts = {
        (p.attributes["http.response.status_code"], p.attributes.get("error.type")): p.count
        for p in points
    }
    assert counts == {
        (503, "503"): 1,
        (404, None): 1,
        (500, "app.errors.Error0"): 1,
        (500, "app.errors.Error1"): 1,
        (500, "_OTHER"): 8,
    }


def test_a_status_code_outside_http_is_left_off(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    metrics = Metrics(provider)
    for status in (99, 600, 123456):
        metrics.record(record(status=status))
    (point,) = collect(reader)["loopwatch.request.cpu_time"]
    assert point.attributes == {"http.request.method": "GET", "http.route": "/items/{item_id}"}
    assert point.count == 3


class FakePool:
    """What the pool callbacks read of an asyncpg pool."""

    def is_closing(self) -> bool:
        return False

    def get_idle_size(self) -> int:
        return 1

    def get_size(self) -> int:
        return 2

    def get_max_size(self) -> int:
        return 3


def test_pool_names_past_the_limit_are_other(
    provider: MeterProvider, reader: InMemoryMetricReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(otel_metrics, "_pool_names", otel_metrics._Bounded(5))
    metrics = Metrics(provider)
    assert metrics.active()
    pools = [InstrumentedPool(FakePool()) for _ in range(8)]  # asyncpg-N: a new N each
    for p in pools:
        otel_metrics._acquired(p, 0.01)
    points = collect(reader)
    waits = {p.attributes["db.client.connection.pool.name"]: p.count
             for p in points["db.client.connection.wait_time"]}  # fmt: skip
    assert len(waits) == 6
    assert waits["_OTHER"] == 3
    maxes = {p.attributes["db.client.connection.pool.name"]: p.value
             for p in points["db.client.connection.max"]}  # fmt: skip
    assert len(maxes) == 6
    assert maxes["_OTHER"] == 9  # three pools of 3, added up
    used = {
        p.attributes["db.client.connection.pool.name"]: p.value
        for p in points["db.client.connection.count"]
        if p.attributes["db.client.connection.state"] == "used"
    }
    assert used["_OTHER"] == 3
    del pools


async def test_a_raised_error_has_one_error_type_on_metrics_and_span(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def boom(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":  # raised before any response: the error is the app's
            raise ValueError("no")

    app = LoopWatch(
        boom,
        file=None,
        meter_provider=provider,
        tracer_provider=tracer_provider,
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/boom")).status_code == 500
    (point,) = collect(reader)["loopwatch.request.cpu_time"]
    (span,) = exporter.get_finished_spans()
    assert point.attributes["error.type"] == "builtins.ValueError"
    assert (span.attributes or {})["error.type"] == "builtins.ValueError"
