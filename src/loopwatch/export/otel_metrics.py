"""OpenTelemetry metrics: request histograms, pool, memory and event-loop instruments.

Request histograms are recorded when a request ends (from its record), the stall
histogram by the watchdog's listener for every stall; the gauges are observed
by the SDK's metric reader, in its own thread, from what the sampler and the pool proxies
keep. Names and units: docs/opentelemetry.md. ``loopwatch.eventloop.utilization``,
``loopwatch.eventloop.lag`` and ``loopwatch.eventloop.stall.duration`` are loopwatch's
own (asyncio has no such metric anywhere yet; Node.js has ``nodejs.eventloop.utilization``).

Every attribute value is bounded, as a metric attribute must be (each value set is a
series the SDK and the backend keep): unknown methods are ``_OTHER`` as on the spans,
status codes outside 100-599 and routes that do not match their request's path are left
off, and past a limit of distinct routes, error types or pool names the rest are
``_OTHER``.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from opentelemetry import metrics as metrics_api
from opentelemetry.metrics import CallbackOptions, Observation

from .._capture.process import state
from .._capture.watchdog import stall_listeners
from .._version import __version__
from ..integrations import asyncpg as _pg
from ..record import RequestRecord, Stall
from .otel import _method

# The API's stand-ins before (or without) an SDK: recording to them does nothing, so
# loopwatch does not even build the attributes.
_NO_SDK = frozenset(("_ProxyMeterProvider", "NoOpMeterProvider"))
# For the histograms in seconds: the SDK's default buckets (0, 5, 10, ... 10000) are
# meant for milliseconds. These are the HTTP semantic conventions' duration buckets.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
# Distinct values kept apart, per middleware (pool names: per process); later ones are
# OTHER. Routes are templates and error types classes, so an app has a fixed few: the
# limits only stop a bug or an attacker from growing series without end.
MAX_ROUTES = 1000
MAX_ERROR_TYPES = 100
MAX_POOL_NAMES = 100
OTHER = "_OTHER"  # the conventions' value for an unknown method or error type


class _Bounded:
    """The first ``limit`` distinct values pass; any other is :data:`OTHER`. Thread-safe
    enough: at worst a racing thread lets one more value in."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        seen = self._seen
        if value in seen:
            return value
        if len(seen) < self._limit:
            seen.add(value)
            return value
        return OTHER


class Metrics:
    """The instruments, made once an SDK meter provider is there (default: the global one)."""

    def __init__(self, meter_provider: Any = None) -> None:
        self._provider = meter_provider
        self._made = False
        self._cpu: Any = None
        self._db: Any = None
        self._pool: Any = None
        self._loop_wait: Any = None
        self._wait: Any = None
        self._stall: Any = None
        self._routes = _Bounded(MAX_ROUTES)
        self._errors = _Bounded(MAX_ERROR_TYPES)

    def active(self) -> bool:
        """Whether the instruments are made: an SDK meter provider is there (see
        Spans.tracer for how often LoopWatch asks while there is none)."""
        if self._made:
            return True
        provider = self._provider or metrics_api.get_meter_provider()
        if type(provider).__name__ in _NO_SDK:
            return False
        self._make(provider.get_meter("loopwatch", __version__))
        return True

    def record(self, record: RequestRecord, error_type: str | None = None) -> None:
        """A finished request's figures, on the request histograms. ``error_type`` is
        what was raised, fully qualified as on the server span (else the record's short
        class name)."""
        if not self.active():
            return
        attributes: dict[str, Any] = {"http.request.method": _method(record.method)}
        route = record.route
        if route and _route_matches(route, record.path):
            attributes["http.route"] = self._routes(route)
        status = record.status
        if status is not None and not 100 <= status <= 599:
            status = None  # not an HTTP status code: any int can be sent through ASGI
        if status is not None:
            attributes["http.response.status_code"] = status
        # What was raised (its class name, as recorded), or a 5xx status.
        error = (
            error_type
            or record.error
            or (str(status) if status is not None and status >= 500 else None)
        )
        if error is not None:
            attributes["error.type"] = self._errors(error)
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


@lru_cache(maxsize=1024)
def _literals(route: str) -> tuple[str, ...]:
    """The text of a route template around its ``{parameters}``."""
    return tuple(re.split(r"\{[^{}]*\}", route))


def _route_matches(route: str, path: str) -> bool:
    """Whether ``path`` ends as ``route`` would have it, a parameter standing for any text
    (the path may start with a root path). A route that could not have served its path
    holds text that is not the app's (a mount's matched path, say): no template to put on
    a metric. Placing each literal as far right as it goes decides it in linear time,
    which a regular expression with a ``.*`` per parameter would not on a crafted path."""
    *rest, last = _literals(route)
    if not path.endswith(last):
        return False
    end = len(path) - len(last)
    for literal in reversed(rest):
        end = path.rfind(literal, 0, end)
        if end < 0:
            return False
    return True


_pool_names = _Bounded(MAX_POOL_NAMES)


def _acquired(pool: _pg.InstrumentedPool, seconds: float) -> None:
    attributes = {"db.client.connection.pool.name": _pool_names(pool.loopwatch_name)}
    for metrics in list(_instances):
        metrics._wait.record(seconds, attributes)


def _stalled(stall: Stall, trace: Any) -> None:
    """The watchdog's stall listener: on the loop thread, or the watchdog's own."""
    # A stall is the process's, not one middleware's: record it once per instrument
    # (middlewares sharing a meter provider share the instrument).
    done: set[int] = set()
    for metrics in list(_instances):
        histogram = metrics._stall
        if id(histogram) not in done:
            done.add(id(histogram))
            attributes = {"loopwatch.stall.cause": stall.cause}
            if stall.route is not None:  # a route template: bounded, unlike a path
                attributes["http.route"] = metrics._routes(stall.route)
            histogram.record(stall.duration_ms / 1000, attributes)


def _pool_facts() -> Iterable[tuple[str, _pg.InstrumentedPool, Any]]:
    for pool in _pg.pool_snapshot():
        inner = pool._lw_inner
        # (asyncpg before 0.28 has no is_closing: its flags, then)
        closing = getattr(inner, "is_closing", None)
        if closing is not None:
            done = closing()
        else:
            done = getattr(inner, "_closing", False) or getattr(inner, "_closed", False)
        if not done:
            yield _pool_names(pool.loopwatch_name), pool, inner


def _by_pool(
    values: Iterable[tuple[str, int]], attributes: dict[str, str] | None = None
) -> list[Observation]:
    """One observation per pool name: the pools that share one (OTHER) added up."""
    sums: dict[str, int] = {}
    for name, value in values:
        sums[name] = sums.get(name, 0) + value
    return [
        Observation(value, {**(attributes or {}), "db.client.connection.pool.name": name})
        for name, value in sums.items()
    ]


def _connection_count(options: CallbackOptions) -> Iterable[Observation]:
    facts = [(name, inner.get_idle_size(), inner.get_size()) for name, _, inner in _pool_facts()]
    idle = _by_pool(((n, i) for n, i, _ in facts), {"db.client.connection.state": "idle"})
    used = _by_pool(((n, s - i) for n, i, s in facts), {"db.client.connection.state": "used"})
    return idle + used


def _connection_max(options: CallbackOptions) -> Iterable[Observation]:
    return _by_pool((name, inner.get_max_size()) for name, _, inner in _pool_facts())


def _pending_requests(options: CallbackOptions) -> Iterable[Observation]:
    return _by_pool((name, pool._lw_pending) for name, pool, _ in _pool_facts())


def _memory(options: CallbackOptions) -> Iterable[Observation]:
    if state.rss is not None:
        yield Observation(state.rss)


def _utilization(options: CallbackOptions) -> Iterable[Observation]:
    if state.loop_busy is not None:
        yield Observation(state.loop_busy)


def _lag(options: CallbackOptions) -> Iterable[Observation]:
    if state.loop_lag is not None:
        yield Observation(state.loop_lag)
