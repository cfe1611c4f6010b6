"""OpenTelemetry metrics: request histograms, pool, memory and event-loop instruments.

Request histograms are recorded when a request ends (from its record), the stall
histogram by the watchdog's listener for every stall; the gauges are observed
by the SDK's metric reader, in its own thread, from what the sampler and the pool proxies
keep. Names and units: docs/opentelemetry.md. ``loopwatch.eventloop.utilization``,
``loopwatch.eventloop.lag`` and ``loopwatch.eventloop.stall.duration`` are loopwatch's
own (asyncio has no such metric anywhere yet; Node.js has ``nodejs.eventloop.utilization``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from time import monotonic
from typing import Any

from opentelemetry import metrics as metrics_api
from opentelemetry.metrics import CallbackOptions, Observation

from .._capture.process import state
from .._capture.watchdog import stall_listeners
from .._version import __version__
from ..integrations import asyncpg as _pg
from ..record import RequestRecord, Stall
from .otel import RECHECK_S

# The API's stand-ins before (or without) an SDK: recording to them does nothing, so
# loopwatch does not even build the attributes.
_NO_SDK = frozenset(("_ProxyMeterProvider", "NoOpMeterProvider"))
# For the histograms in seconds: the SDK's default buckets (0, 5, 10, ... 10000) are
# meant for milliseconds. These are the HTTP semantic conventions' duration buckets.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)


class Metrics:
    """The instruments, made once an SDK meter provider is there (default: the global one)."""

    def __init__(self, meter_provider: Any = None) -> None:
        self._provider = meter_provider
        self._made = False
        self._next_check = 0.0
        self._cpu: Any = None
        self._db: Any = None
        self._pool: Any = None
        self._loop_wait: Any = None
        self._wait: Any = None
        self._stall: Any = None

    def active(self) -> bool:
        if self._made:
            return True
        now = monotonic()  # see Spans.tracer: at most one look-up a second
        if now < self._next_check:
            return False
        self._next_check = now + RECHECK_S
        provider = self._provider or metrics_api.get_meter_provider()
        if type(provider).__name__ in _NO_SDK:
            return False
        self._make(provider.get_meter("loopwatch", __version__))
        return True

    def record(self, record: RequestRecord) -> None:
        """A finished request's figures, on the request histograms."""
        if not self.active():
            return
        attributes: dict[str, Any] = {"http.request.method": record.method}
        if record.route:
            attributes["http.route"] = record.route
        if record.status is not None:
            attributes["http.response.status_code"] = record.status
        self._cpu.record(record.cpu_ms / 1000, attributes)
        self._db.record(record.db_ms / 1000, attributes)
        self._pool.record(record.pool_wait_ms / 1000, attributes)
        self._loop_wait.record(record.loop_wait_ms / 1000, attributes)

    def _make(self, meter: Any) -> None:
        self._made = True

        def histogram(name: str, description: str) -> Any:
            return meter.create_histogram(
                name,
                unit="s",
                description=description,
                explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
            )

        self._cpu = histogram("loopwatch.request.cpu_time", "CPU time on the event loop.")
        self._db = histogram("loopwatch.request.db_time", "Time awaiting the database.")
        self._pool = histogram(
            "loopwatch.request.pool_wait_time", "Time waiting for a pooled connection."
        )
        self._loop_wait = histogram(
            "loopwatch.request.loop_wait_time",
            "Time the request could have run but the event loop was running something else.",
        )
        self._wait = histogram(
            "db.client.connection.wait_time",
            "The time it took to obtain an open connection from the pool.",
        )
        self._stall = histogram(
            "loopwatch.eventloop.stall.duration",
            "Duration of a step that held the event loop past the stall threshold.",
        )
        _instances.add(self)
        if _acquired not in _pg.acquire_listeners:
            _pg.acquire_listeners.append(_acquired)
        if _stalled not in stall_listeners:
            stall_listeners.append(_stalled)
        counter = meter.create_observable_up_down_counter
        counter(
            "db.client.connection.count",
            [_connection_count],
            unit="{connection}",
            description="Connections in the pool, by state.",
        )
        counter(
            "db.client.connection.max",
            [_connection_max],
            unit="{connection}",
            description="The maximum number of open connections allowed.",
        )
        counter(
            "db.client.connection.pending_requests",
            [_pending_requests],
            unit="{request}",
            description="Pending requests for an open connection.",
        )
        counter(
            "process.memory.usage",
            [_memory],
            unit="By",
            description="The amount of physical memory in use (RSS).",
        )
        gauge = meter.create_observable_gauge
        gauge(
            "loopwatch.eventloop.utilization",
            [_utilization],
            unit="1",
            description="Share of time the event loop's thread was on the CPU.",
        )
        gauge(
            "loopwatch.eventloop.lag",
            [_lag],
            unit="s",
            description="Worst delay in running a scheduled callback on the event loop.",
        )


_instances: weakref.WeakSet[Metrics] = weakref.WeakSet()


def _acquired(pool: _pg.InstrumentedPool, seconds: float) -> None:
    attributes = {"db.client.connection.pool.name": pool.loopwatch_name}
    for metrics in list(_instances):
        metrics._wait.record(seconds, attributes)


def _stalled(stall: Stall, trace: Any) -> None:
    """The watchdog's stall listener: on the loop thread, or the watchdog's own."""
    attributes = {"loopwatch.stall.cause": stall.cause}
    if stall.route is not None:  # a route template: bounded, unlike a path
        attributes["http.route"] = stall.route
    # A stall is the process's, not one middleware's: record it once per instrument
    # (middlewares sharing a meter provider share the instrument).
    done: set[int] = set()
    for metrics in list(_instances):
        histogram = metrics._stall
        if id(histogram) not in done:
            done.add(id(histogram))
            histogram.record(stall.duration_ms / 1000, attributes)


def _pool_facts() -> Iterable[tuple[_pg.InstrumentedPool, Any]]:
    for pool in list(_pg.pools):
        inner = pool._lw_inner
        if not inner.is_closing():
            yield pool, inner


def _connection_count(options: CallbackOptions) -> Iterable[Observation]:
    for pool, inner in _pool_facts():
        name = pool.loopwatch_name
        idle = inner.get_idle_size()
        yield Observation(
            idle, {"db.client.connection.state": "idle", "db.client.connection.pool.name": name}
        )
        yield Observation(
            inner.get_size() - idle,
            {"db.client.connection.state": "used", "db.client.connection.pool.name": name},
        )


def _connection_max(options: CallbackOptions) -> Iterable[Observation]:
    for pool, inner in _pool_facts():
        yield Observation(
            inner.get_max_size(), {"db.client.connection.pool.name": pool.loopwatch_name}
        )


def _pending_requests(options: CallbackOptions) -> Iterable[Observation]:
    for pool, _ in _pool_facts():
        yield Observation(pool._lw_pending, {"db.client.connection.pool.name": pool.loopwatch_name})


def _memory(options: CallbackOptions) -> Iterable[Observation]:
    if state.rss is not None:
        yield Observation(state.rss)


def _utilization(options: CallbackOptions) -> Iterable[Observation]:
    if state.loop_busy is not None:
        yield Observation(state.loop_busy)


def _lag(options: CallbackOptions) -> Iterable[Observation]:
    if state.loop_lag is not None:
        yield Observation(state.loop_lag)
