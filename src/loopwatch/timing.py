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

import asyncio
import functools
import inspect
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from threading import get_ident
from time import perf_counter_ns
from types import TracebackType
from typing import Any, Literal, TypeVar

from . import _failures
from ._capture.process import state
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

    As a context manager one object may be entered by several requests at once (one
    made at import time and shared): each entry is timed on its own. ``start()`` times
    one block at a time.
    """

    __slots__ = (
        "_holes",
        "_outer",
        "_runs",
        "_step",
        "_t0",
        "_thread",
        "_token",
        "_trace",
        "attributes",
        "kind",
        "operation",
        "outermost",
        "queries",
        "query",
        "round_trips",
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
        # Round trips the block made when no instrumented driver below counted them. None:
        # one if it waited, and none if it never suspended (a cache hit: then the block
        # records nothing). Set it before stop() when the code inside knows: psycopg sets
        # 2 for a BEGIN sent first, 0 for a statement queued in a pipeline (it counts).
        self.round_trips: int | None = None
        # Set False before stop() for no span (another instrumentation made this one's).
        self.span = True
        self.outermost = False  # no running block of its request around it in its context
        # Started in a request and not stopped. A block left running (its stop() never
        # called: an ORM's hook that did not fire) scopes nothing once it is stopped or
        # in another request.
        self.running = False
        # Round trips counted below the block by instrumented drivers and blocks; after
        # stop(), those the block counted.
        self.queries = 0
        self._trace: Trace | bool | None = _IDLE
        self._token: Token[Timed | None] | None = None
        self._outer: Timed | None = None  # the running db block it is inside of
        self._holes: list[int] | None = None  # pool waits inside a db block: not db time
        self._runs: dict[object, list[Timed]] | None = None  # more entries at once
        self._thread = False  # started off the event loop's thread (a sync endpoint's)
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
        if outer is not None and not outer.scopes(trace):
            outer = None  # left running, or another request's
        if outer is not None and outer.kind == "pool":
            self._trace = _OFF  # a checkout's own work (a new connection's setup)
            return self
        self.outermost = outer is None
        self._outer = outer
        if outer is None or self.kind == "pool":  # nothing below a checkout records
            self._token = scope.set(self)
        self._trace = trace
        self.running = True
        self.queries = 0
        # Off the loop's thread (a thread of a sync endpoint, or to_thread) the request
        # awaits the thread: the whole block is a wait, suspension tells nothing.
        self._thread = get_ident() != state.loop_thread
        self._step = trace.step_w0
        self._t0 = perf_counter_ns()
        return self

    def stop(self, error: BaseException | None = None) -> None:
        """End the block (``error``: what it raised, for its span). A block never started,
        or already stopped, is left as it is.

        A block that never suspended the request, below which nothing went to the server
        and whose ``round_trips`` was not set (a cache hit) records nothing: no interval,
        no query, no statement, no span."""
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
        outer, self._outer = self._outer, None
        holes, self._holes = self._holes, None
        assert isinstance(trace, Trace)
        below = self.queries
        declared = self.round_trips
        suspended = self._thread or trace.step_w0 != self._step
        if not trace.open or not (suspended or below or declared is not None):
            return
        t0 = self._t0
        if self.kind == "pool":
            if suspended:
                trace.add(trace.pool, t0, t1)
                if outer is not None:  # a wait for a connection is not the db block's
                    outer.hole(t0, t1)
        else:
            if suspended:
                _add_db(trace, t0, t1, holes)
            if not below:  # no driver below counted them: the block's own round trips
                self.queries = 1 if declared is None else declared
                trace.queries += self.queries
            if self.outermost and self.statement:
                trace.statements += 1
            if outer is not None:
                outer.queries += self.queries
        spans = trace.otel
        if spans is not None and self.span and self.outermost:
            try:
                spans.timed_span(self, t0, t1, error)
            except Exception as exc:  # never the app's failure
                _failures.failed("making a timed() block's span", exc)

    def scopes(self, trace: Trace) -> bool:
        """Whether this block, found in the scope, is running in ``trace``'s request."""
        return self.running and self._trace is trace

    def hole(self, start: int, end: int) -> None:
        """A wait for a connection inside this db block (``perf_counter_ns``): pool wait,
        left out of the block's db time."""
        holes = self._holes
        if holes is None:
            holes = self._holes = []
        holes.append(start)
        holes.append(end)

    def _enter(self) -> Timed:
        if self._trace is _IDLE:
            return self.start()
        # Entered again before its exit (shared between requests): a block of its own.
        run = self._copy()
        runs = self._runs
        if runs is None:
            runs = self._runs = {}
        runs.setdefault(_who(), []).append(run)
        return run.start()

    def _exit(self, exc: BaseException | None) -> None:
        runs = self._runs
        if runs:
            mine = runs.get(_who())
            if mine:
                run = mine.pop()
                if not mine:
                    del runs[_who()]
                run.stop(exc)
                return
        self.stop(exc)

    async def __aenter__(self) -> Timed:
        return self._enter()

    async def __aexit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(exc)

    def __enter__(self) -> Timed:
        return self._enter()

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(exc)

    def __call__(self, fn: F) -> F:
        """Decorate a coroutine function: each call is one timed block."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"timed() decorates coroutine functions (async def), not {fn!r}; "
                f"time a plain call with 'with timed(...)'."
            )

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            async with self._copy():
                return await fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def _copy(self) -> Timed:
        """A block of the same description, not started."""
        return Timed(
            self.kind,
            self.query,
            operation=self.operation,
            system=self.system,
            attributes=self.attributes,
            statement=self.statement,
        )

    def __repr__(self) -> str:
        return f"<loopwatch.timed {self.kind} {self.query!r}>"


def _add_db(trace: Trace, t0: int, t1: int, holes: list[int] | None) -> None:
    """The db interval ``t0``-``t1`` less the pool waits inside it."""
    if holes is None:
        trace.add(trace.db, t0, t1)
        return
    for h0, h1 in sorted(zip(holes[::2], holes[1::2], strict=True)):
        if h0 > t0:
            trace.add(trace.db, t0, min(h0, t1))
        t0 = max(t0, h1)
        if t0 >= t1:
            return
    trace.add(trace.db, t0, t1)


def _who() -> object:
    """Who entered a shared block: the task, or the thread outside a loop."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return task if task is not None else get_ident()


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
