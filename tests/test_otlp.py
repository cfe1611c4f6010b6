"""End to end over OTLP/HTTP: a uvicorn app with the OpenTelemetry SDK set up from the
standard environment variables, loopwatch's spans and metrics decoded off the wire by a real
receiver (tests/otlp_receiver.py), and the app unharmed when the receiver is down.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any
from urllib.parse import urlsplit

import pytest

from .conftest import serve
from .otlp_receiver import ReceivedMetric, ReceivedRequest, ReceivedSpan, receiver

APP = "tests.otel_app:app"
ROUTE = "/items/{item_id}"
ITEMS = range(1, 6)
SECRET_OFFSET = 7_345_129  # the query's parameter is item id + this: a value in no URL
PASSWORD = "s3cretpw-otlp"
TIMELINE_CHARS = set("█▓▒░·")
# uvicorn exits by re-raising the SIGTERM once its graceful shutdown (lifespan included) is
# done; a server that had to be killed would show -SIGKILL.
CLEAN_EXIT = (0, -signal.SIGTERM)


def base_env(endpoint: str, dsn: str) -> dict[str, str]:
    return {
        "LOOPWATCH_TEST_DSN": dsn,
        "SECRET_OFFSET": str(SECRET_OFFSET),
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        # The signal-specific settings spelled out (what the general one gives; an empty
        # one is not read as unset by every exporter version): shield the test from a
        # developer's own OTEL_* environment.
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint.rstrip("/") + "/v1/traces",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": endpoint.rstrip("/") + "/v1/metrics",
        # (the default; an empty one is not read as unset by every exporter version)
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "10",
        "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "10",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_SDK_DISABLED": "false",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def get(url: str) -> tuple[int, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


@dataclass
class Exported:
    service_name: str
    dsn: str
    spans: list[ReceivedSpan]
    metrics: list[ReceivedMetric]
    requests: list[ReceivedRequest]

    def item_servers(self) -> list[ReceivedSpan]:
        return [
            s for s in self.spans if s.kind == "SERVER" and s.attributes.get("http.route") == ROUTE
        ]

    def latest(self) -> dict[str, ReceivedMetric]:
        return {m.name: m for m in self.metrics}


@pytest.fixture(scope="module")
def exported(pg_dsn: str) -> Iterator[Exported]:
    """One app run against a live receiver: five item requests, then a clean shutdown."""
    dsn = pg_dsn.replace("postgres:@", f"postgres:{PASSWORD}@")  # trust auth ignores it
    service = f"loopwatch-otlp-{uuid.uuid4().hex[:8]}"
    with receiver() as rx:
        env = {
            **base_env(rx.endpoint, dsn),
            "OTEL_SERVICE_NAME": service,
            # Traces gzip-compressed, metrics plain: the receiver decodes both.
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
            "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": "none",
        }
        with serve(APP, env) as server:
            for i in ITEMS:
                assert get(f"{server.url}/items/{i}") == (
                    200,
                    {"id": i, "value": i + SECRET_OFFSET},
                )
            # Exported live by the batch processor, not only at shutdown.
            rx.wait_for(
                lambda r: (
                    len([s for s in r.spans() if s.attributes.get("http.route") == ROUTE])
                    >= len(ITEMS)
                ),
                timeout=10,
            )
            # The observed gauges come with the periodic reader's exports while the app
            # runs (the last export, at shutdown, comes after the pool has closed).
            rx.wait_for(
                lambda r: (
                    {"db.client.connection.count", "loopwatch.eventloop.utilization"}
                    <= {m.name for m in r.metrics()}
                ),
                timeout=10,
            )
            assert server.stop() in CLEAN_EXIT
        yield Exported(service, dsn, rx.spans(), rx.metrics(), rx.requests())


def test_every_export_was_accepted_and_traces_came_gzipped(exported: Exported) -> None:
    assert exported.requests
    assert all(r.status == 200 for r in exported.requests), exported.requests
    assert all(r.content_type == "application/x-protobuf" for r in exported.requests)
    traces = [r for r in exported.requests if r.path == "/v1/traces"]
    metrics = [r for r in exported.requests if r.path == "/v1/metrics"]
    assert traces
    assert metrics
    assert {r.content_encoding for r in traces} == {"gzip"}
    assert {r.content_encoding for r in metrics} == {""}


def test_server_spans_arrive_with_routes_and_loopwatch_figures(exported: Exported) -> None:
    servers = exported.item_servers()
    assert len(servers) == len(ITEMS), [s.name for s in exported.spans]
    assert sorted(s.attributes["url.path"] for s in servers) == [f"/items/{i}" for i in ITEMS]
    for span in servers:
        a = span.attributes
        assert span.name == "GET /items/{item_id}"
        assert span.scope == "loopwatch"
        assert span.parent_span_id == ""
        assert span.status != "ERROR"
        assert span.end_unix_nano > span.start_unix_nano
        assert a["http.request.method"] == "GET"
        assert a["http.response.status_code"] == 200
        # Types survive the wire: ints as int_value, figures as double_value.
        assert a["loopwatch.db_queries"] == 1
        assert isinstance(a["loopwatch.cpu_ms"], float)
        assert a["loopwatch.cpu_ms"] > 0
        assert isinstance(a["loopwatch.db_ms"], float)
        assert a["loopwatch.db_ms"] > 0
        assert isinstance(a["loopwatch.pool_wait_ms"], float)
        assert a["loopwatch.pool_wait_ms"] >= 0
        assert isinstance(a["loopwatch.loop_wait_ms"], float)
        assert a["loopwatch.loop_wait_ms"] >= 0
        assert isinstance(a["loopwatch.rss_bytes"], int)
        assert a["loopwatch.rss_bytes"] > 1_000_000
        timeline = a["loopwatch.timeline"]
        assert len(timeline) == 40
        assert set(timeline) <= TIMELINE_CHARS
        assert "█" in timeline
    ready = [s for s in exported.spans if s.kind == "SERVER" and s.name == "GET /ready"]
    assert ready  # uvicorn's readiness polls, routed too
    assert ready[0].attributes["loopwatch.db_queries"] == 0


def test_query_spans_are_children_of_their_request_with_db_attributes(
    exported: Exported,
) -> None:
    servers = {s.span_id: s for s in exported.item_servers()}
    queries = [s for s in exported.spans if s.kind == "CLIENT"]
    assert len(queries) == len(ITEMS), [s.name for s in exported.spans]
    database = urlsplit(exported.dsn).path.lstrip("/") or "postgres"
    assert {q.parent_span_id for q in queries} == set(servers)  # one query per request
    for q in queries:
        parent = servers[q.parent_span_id]
        assert q.trace_id == parent.trace_id
        assert parent.start_unix_nano <= q.start_unix_nano <= q.end_unix_nano
        assert q.end_unix_nano <= parent.end_unix_nano
        a = q.attributes
        assert a["db.system.name"] == "postgresql"
        assert a["db.query.text"] == "SELECT $1::int"
        assert a["db.operation.name"] == "SELECT"
        assert a["db.namespace"] == database
        assert a["server.address"]
        assert q.name == f"SELECT {database}"
        assert q.status != "ERROR"


def test_resource_carries_the_service_name_from_the_environment(exported: Exported) -> None:
    assert exported.spans
    assert exported.metrics
    for item in [*exported.spans, *exported.metrics]:
        assert item.resource["service.name"] == exported.service_name
        assert item.resource["telemetry.sdk.language"] == "python"


def test_no_parameter_value_or_password_is_exported(exported: Exported) -> None:
    text = repr(
        [(s.name, s.attributes, s.status_message) for s in exported.spans]
        + [(m.name, [p.attributes for p in m.data_points]) for m in exported.metrics]
    )
    for i in ITEMS:
        assert str(i + SECRET_OFFSET) not in text
    assert PASSWORD not in text
    password = urlsplit(exported.dsn).password
    if password:  # $LOOPWATCH_TEST_DSN's own password, if it has one
        assert password not in text


def test_metrics_arrive(exported: Exported) -> None:
    latest = exported.latest()
    for name in (
        "loopwatch.request.cpu_time",
        "loopwatch.request.db_time",
        "loopwatch.request.pool_wait_time",
        "loopwatch.request.loop_wait_time",
    ):
        assert name in latest, sorted(latest)
        m = latest[name]
        assert m.type == "histogram", m
        assert m.unit == "s", m
        # Cumulative: the last export counts every request (the items and /ready polls).
        assert sum(p.count or 0 for p in m.data_points) >= len(ITEMS), m
    cpu_time = latest["loopwatch.request.cpu_time"]
    by_route = [p for p in cpu_time.data_points if p.attributes.get("http.route") == ROUTE]
    if by_route:  # points keyed by route: the items' one counts exactly the item requests
        assert sum(p.count or 0 for p in by_route) == len(ITEMS), cpu_time
    db_time = latest["loopwatch.request.db_time"]
    assert sum(p.sum or 0 for p in db_time.data_points) > 0
    memory = latest.get("process.memory.usage")
    assert memory is not None, sorted(latest)
    assert memory.unit == "By"
    assert memory.data_points
    assert all((p.value or 0) > 1_000_000 for p in memory.data_points)

    required = {
        "db.client.connection.count": ("sum",),
        "db.client.connection.max": ("sum",),
        "db.client.connection.pending_requests": ("sum",),
        "db.client.connection.wait_time": ("histogram",),
        "loopwatch.eventloop.utilization": ("gauge",),
        "loopwatch.eventloop.lag": ("gauge",),
    }
    for name, types in required.items():
        assert name in latest, (name, sorted(latest))
        m = latest[name]
        assert m.type in types, m
        assert m.data_points, m
    count = latest["db.client.connection.count"]
    states = {p.attributes.get("db.client.connection.state") for p in count.data_points}
    assert states == {"idle", "used"}, count
    (busy,) = latest["loopwatch.eventloop.utilization"].data_points
    assert 0.0 <= (busy.value or 0.0) <= 1.0
    (lag,) = latest["loopwatch.eventloop.lag"].data_points
    assert (lag.value or 0.0) >= 0.0


@contextlib.contextmanager
def dead_endpoint(kind: str) -> Iterator[str]:
    """A port on 127.0.0.1 held by us: ``refused`` (bound, not listening: the kernel answers
    RST) or ``hanging`` (listening, never accepting: a request gets no response)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        if kind == "hanging":
            sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


EXPORT_TIMEOUT = 2  # seconds (OTEL_EXPORTER_OTLP_TIMEOUT; whole: older exporters read an int)


# Before 1.36 the OTLP exporter went on retrying through the processor's shutdown
# (opentelemetry-python #4638): a receiver that hangs held the process for ~30 s, however
# little loopwatch waits.
_EXPORTER = tuple(int(x) for x in version("opentelemetry-exporter-otlp-proto-http").split(".")[:2])


@pytest.mark.parametrize(
    "kind",
    [
        "refused",
        pytest.param(
            "hanging",
            marks=pytest.mark.skipif(
                _EXPORTER < (1, 36), reason="this exporter's shutdown is unbounded (< 1.36)"
            ),
        ),
    ],
)
def test_a_receiver_down_costs_requests_nothing_and_shutdown_is_bounded(
    pg_dsn: str, kind: str
) -> None:
    with dead_endpoint(kind) as endpoint:
        env = {
            **base_env(endpoint, pg_dsn),
            "OTEL_SERVICE_NAME": "loopwatch-otlp-down",
            "OTEL_EXPORTER_OTLP_TIMEOUT": str(EXPORT_TIMEOUT),
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": str(EXPORT_TIMEOUT),
            "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": str(EXPORT_TIMEOUT),
        }
        with serve(APP, env) as server:
            slowest = 0.0
            for n in range(50):
                i = n % 7 + 1
                t0 = time.monotonic()
                assert get(f"{server.url}/items/{i}") == (
                    200,
                    {"id": i, "value": i + SECRET_OFFSET},
                )
                slowest = max(slowest, time.monotonic() - t0)
                if n % 10 == 9:
                    time.sleep(0.25)  # let the batch processor and metric reader try to export
            assert slowest < 1.0, f"slowest request {slowest:.3f} s"
            t0 = time.monotonic()
            assert server.stop(timeout=30) in CLEAN_EXIT
            took = time.monotonic() - t0
        # Shutdown flushes spans then metrics, each export bounded by the timeout (plus
        # an export the background thread may be in): well under the default 10 s each.
        assert took < 4 * EXPORT_TIMEOUT + 3, f"shutdown took {took:.1f} s"


def test_the_receiver_answers_like_a_collector() -> None:
    def post(url: str, body: bytes, content_type: str) -> int:
        req = urllib.request.Request(url, body, {"Content-Type": content_type}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    with receiver() as rx:
        assert post(rx.endpoint + "/v1/traces", b"", "application/x-protobuf") == 200
        assert post(rx.endpoint + "/v1/traces", b"{}", "application/json") == 415
        assert post(rx.endpoint + "/v1/logs", b"", "application/x-protobuf") == 404
        assert post(rx.endpoint + "/v1/metrics", b"\xff\xff", "application/x-protobuf") == 400
        assert [r.status for r in rx.requests()] == [200, 415, 404, 400]
        assert rx.spans() == []
        assert rx.metrics() == []
