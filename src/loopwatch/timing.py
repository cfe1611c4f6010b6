"""The public timing API: report an awaited call into the current request's record.

loopwatch's own integrations (SQLAlchemy, psycopg, Tortoise) are built on it, and any
other driver, ORM or the app's own code can use it the same way::

    async with loopwatch.timed("db", "SELECT * FROM items WHERE id = $1"):
        row = await conn.fetchrow(...)

    @loopwatch.timed("db", "GET", system="redis")
    async def cached(key): ...

    async with loopwatch.timed("pool"):
        connection = await my_pool.get()

``kind`` is ``"db"`` (the request awaited a database or another service: ``db_ms``, and
one statement in ``db_statements``) or ``"pool"`` (it waited for a connection:
``pool_wait_ms``). As everywhere in loopwatch, an interval is recorded only when the
block really suspended the request (a cached result never waited for anything), and
the part of it spent waiting for the event loop is loop wait, not database time.

Blocks nest. Inside a ``"db"`` block (a *statement*), a driver loopwatch instruments
still records its round trips (``db_queries``) but neither counts another statement nor
makes another span: an ORM statement that costs its driver a prepare and an execute is
one statement, two queries and one span. Inside a ``"pool"`` block, nothing below is
recorded at all: a new connection's setup queries are part of the checkout.

Outside a request (or after it ended) a block costs one context-variable read and
records nothing. Errors in use (an unknown kind) raise at once; nothing else a block
does can fail the code it wraps.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from time import perf_counter_ns
from types import TracebackType
from typing import Any, Literal, TypeVar

from . import _failures
from ._capture.trace import Trace, current

Kind = Literal["db", "pool"]
F = TypeVar("F", bound=Callable[..., Any])

# The outermost timed block running in this context: a "db" statement, or a "pool"
# checkout. The asyncpg proxies read it to stay quiet below a statement or a checkout.
scope: ContextVar[Timed | None] = ContextVar("loopwatch_scope", default=None)

_IDLE: Any = None  # not started
_OFF: Any = False  # started outside a request: records nothing


class Timed:
    """One timed block: an async (or plain) context manager, a decorator of coroutine
    functions, or :meth:`start`/:meth:`stop` called by hand (from event hooks that see
    the start and the end of a call separately, as SQLAlchemy's do).

    An object times one block at a time; the decorator makes a fresh one per call.
    """

    __slots__ = (
        "_step",
        "_t0",
        "_token",
        "_trace",
        "attributes",
        "kind",
        "operation",
        "outermost",
        "queries",
        "query",
        "running",
        "span",
        "statement",
        "system",
    )

    def __init__(
        self,
        kind: Kind = "db",
        query: str | Callable[[], str | None] | None = None,
        *,
        operation: str | None = None,
        system: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        statement: bool = True,
    ) -> None:
        if kind not in ("db", "pool"):
            raise ValueError(f"timed() kind must be 'db' or 'pool', not {kind!r}.")
        if query is not None and not isinstance(query, str) and not callable(query):
            raise TypeError(
                f"timed() query must be a string, a callable returning one, or None, "
                f"not {type(query).__name__}."
            )
        self.kind: Kind = kind
        self.query = query
        self.operation = operation
        # db.system.name of the span (e.g. "postgresql", "redis"); None leaves it out.
        self.system = system
        # More span attributes (server.address, db.namespace, ...).
        self.attributes = attributes
        # A "db" block is one of the app's statements; False for a round trip that is not
        # (transaction control, a cursor's next batch): counted in db_queries only.
        self.statement = statement
        # Set False before stop() for no span (another instrumentation made this one's).
        self.span = True
        self.outermost = False  # whether it opened the scope (counts, and makes the span)
        # Started in a request and not stopped. A block left running (its stop() never
        # called: an ORM's hook that did not fire) scopes nothing once it is stopped or
        # its request is over.
        self.running = False
        # Round trips counted by the driver inside the block (set by stop()).
        self.queries = 0
        self._trace: Trace | bool | None = _IDLE
        self._token: Token[Timed | None] | None = None
        self._step = 0
        self._t0 = 0

    def start(self) -> Timed:
        """Begin timing now. Raises ``RuntimeError`` when the block is already running."""
        if self._trace is not _IDLE:
            raise RuntimeError("this timed() block is already running: call timed() again.")
        trace = current.get()
        if trace is None or not trace.open:
            self._trace = _OFF
            return self
        outer = scope.get()
        if outer is None or not outer.running or outer._trace is not trace:
            self.outermost = True
            self._token = scope.set(self)
        elif outer.kind == "pool":  # a checkout's own work (a new connection's setup)
            self._trace = _OFF
            return self
        self._trace = trace
        self.running = True
        self.queries = trace.queries
        self._step = trace.step_w0
        self._t0 = perf_counter_ns()
        return self

    def stop(self, error: BaseException | None = None) -> None:
        """End the block (``error``: what it raised, for its span). A block never started,
        or already stopped, is left as it is."""
        trace = self._trace
        self._trace = _IDLE
        self.running = False
        if trace is _IDLE or trace is _OFF:
            return
        t1 = perf_counter_ns()
        token, self._token = self._token, None
        if token is not None:
            try:
                scope.reset(token)
            except ValueError:  # stopped from another context than it started in
                scope.set(None)
        assert isinstance(trace, Trace)
        if not trace.open:
            return
        t0 = self._t0
        suspended = trace.step_w0 != self._step
        if suspended:
            trace.add(trace.db if self.kind == "db" else trace.pool, t0, t1)
        self.queries = trace.queries - self.queries
        if self.kind == "db":
            if not self.queries:  # no driver below counted the round trip: this is one
                trace.queries += 1
            if self.outermost and self.statement:
                trace.statements += 1
        spans = trace.otel
        if spans is not None and self.span and self.outermost and (suspended or self.kind == "db"):
            try:
                spans.timed_span(self, t0, t1, error)
            except Exception as exc:  # never the app's failure
                _failures.failed("making a timed() block's span", exc)

    async def __aenter__(self) -> Timed:
        return self.start()

    async def __aexit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(exc)

    def __enter__(self) -> Timed:
        return self.start()

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(exc)

    def __call__(self, fn: F) -> F:
        """Decorate a coroutine function: each call is one timed block."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"timed() decorates coroutine functions (async def), not {fn!r}; "
                f"time a plain call with 'with timed(...)'."
            )
        kind, query, statement = self.kind, self.query, self.statement
        operation, system, attributes = self.operation, self.system, self.attributes

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            async with Timed(
                kind,
                query,
                operation=operation,
                system=system,
                attributes=attributes,
                statement=statement,
            ):
                return await fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<loopwatch.timed {self.kind} {self.query!r}>"


def timed(
    kind: Kind = "db",
    query: str | Callable[[], str | None] | None = None,
    *,
    operation: str | None = None,
    system: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    statement: bool = True,
) -> Timed:
    """Time an awaited call into the current request's record.

    - ``kind``: ``"db"`` (``db_ms``, one query and one statement) or ``"pool"``
      (``pool_wait_ms``).
    - ``query``: the statement's text for its OpenTelemetry client span
      (``db.query.text``, sanitized by default; a text that is not SQL goes on the span
      only with ``query_text="raw"``), or a callable returning it, called only when a
      span is made (for a text that costs something to build).
    - ``operation``: ``db.operation.name`` when the text does not tell it; ``system``:
      ``db.system.name``; ``attributes``: more span attributes (``server.address``,
      ``db.namespace``, ...).
    - ``statement=False``: a round trip that is not a statement of the app's
      (``BEGIN``/``COMMIT``, a cursor's next batch), counted in ``db_queries`` only.

    Raises ``ValueError`` for another kind and ``TypeError`` for a query that is neither
    a string nor a callable. Use it as an ``async with``/``with`` block, a decorator or
    ``start()``/``stop()``.
    """
    return Timed(
        kind,
        query,
        operation=operation,
        system=system,
        attributes=attributes,
        statement=statement,
    )


__all__ = ["Kind", "Timed", "scope", "timed"]
