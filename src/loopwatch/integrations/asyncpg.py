"""asyncpg instrumentation: proxies that time every awaited query and every pool wait.

Nothing in asyncpg is patched. :func:`create_pool` and :func:`connect` return proxies
around asyncpg's own pool and connection; every query path (the query methods, prepared
statements, cursors, transactions, ``copy_*``, queries run on the pool) records the
interval it was awaited on the current request's trace. Outside a request, or after a
request has ended, a proxy only forwards.

The proxies pass asyncpg's type checks: ``isinstance(x, C)`` holds for every class ``C``
that asyncpg's own object is an instance of (``asyncpg.Pool``, ``asyncpg.Connection``,
``asyncpg.pool.PoolConnectionProxy`` for a pooled connection and not for a direct one, a
custom ``connection_class``, ``PreparedStatement``, ...), as a proxy's ``__class__`` is
its asyncpg object's class. ``type(x)`` still names the proxy's class, so the checks that
use it fail: asyncpg's ``Pool.release()`` refuses a proxy (release it through the
instrumented pool, which unwraps it).
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import asyncpg.connection

from .._capture import process as _process
from .._capture.trace import current
from ..timing import scope

# asyncpg's Connection answers isinstance() for subclasses of this marker class, which is
# how its own pool proxy passes as a Connection. Where it is missing, a proxy still works
# but is not an instance of asyncpg.Connection.
if TYPE_CHECKING:
    _ConnectionBase = object
else:
    _ConnectionBase = getattr(asyncpg.connection, "_ConnectionProxy", object)

_ALWAYS, _IF_SUSPENDED, _NEVER = 0, 1, 2


async def _timed(
    awaitable: Awaitable[Any],
    pool: bool = False,
    count: int = _ALWAYS,
    proxy: Any = None,
    call: str = "",
    args: tuple[Any, ...] = (),
    statement: bool = False,
) -> Any:
    """Await ``awaitable`` and record on the current trace how long it was suspended.

    An await that never suspended (a cursor row already buffered, an idle pooled
    connection) did not wait for the database, and records no interval. ``proxy``,
    ``call`` and ``args`` describe the query for its span, when spans are on.
    ``statement``: the call issues a statement of the app's (not a prepare, a cursor's
    next batch or transaction control), counted in ``db_statements``.

    Inside a :func:`loopwatch.timed` statement (an ORM's), the round trip is still
    recorded but it is not another statement and has no span of its own; inside a timed
    pool checkout, nothing is recorded (a new connection's setup is the checkout's).
    """
    trace = current.get()
    if trace is None or not trace.open:
        return await awaitable
    spans = trace.otel
    outer = scope.get()
    if outer is not None:
        if not outer.scopes(trace):
            outer = None
        elif outer.kind == "pool":
            return await awaitable
        else:
            spans = None
            statement = False
    step = trace.step_w0
    if spans is None:
        t0 = perf_counter_ns()
        try:
            return await awaitable
        except BaseException as exc:
            if count != _NEVER and _unsent(exc):
                count = _NEVER
            raise
        finally:
            _account(trace, step, t0, pool, count, statement, outer)
    # With spans (inline rather than a second coroutine: this is every query's path).
    text, operation, connection = (
        proxy._lw_describe(call, args) if proxy is not None else (None, None, None)
    )
    span = spans.query_start(text, operation, connection) if count == _ALWAYS else None
    t0 = perf_counter_ns()
    try:
        result = await awaitable
    except BaseException as exc:
        _account(trace, step, t0, pool, _NEVER if _unsent(exc) else count, statement)
        spans.query_end(span, exc)
        raise
    suspended, t1 = _account(trace, step, t0, pool, count, statement)
    spans.query_end(span, None)
    if suspended and span is None and (pool or count == _IF_SUSPENDED):  # a wait, a batch
        spans.waited("pool" if pool else "db", t0, t1, connection)
    return result


async def _released(awaitable: Awaitable[Any]) -> Any:
    """Await a release: database time (asyncpg resets the connection), not a query.

    asyncpg runs the release in a task of its own, under ``asyncio.shield``. The interval
    recorded here covers that task from start to end, so it is not also timed step by step
    as a task of the request's (it is made with no request current): its few microseconds
    of CPU count as the release's DB time, as they would with any driver whose release
    needs no task, and the request path is spared a step timer and a task factory call.
    """
    trace = current.get()
    if trace is None or not trace.open:
        return await awaitable
    outer = scope.get()
    if outer is not None and outer.scopes(trace) and outer.kind == "pool":
        return await awaitable  # nothing is recorded under a timed checkout
    step = trace.step_w0
    token = current.set(None)
    t0 = perf_counter_ns()
    try:
        return await awaitable
    finally:
        current.reset(token)
        _account(trace, step, t0, False, _NEVER)


def _unsent(exc: BaseException) -> bool:
    """Whether asyncpg refused the call on the client, so PostgreSQL executed nothing: a
    misuse of its API (``InterfaceError``: a closed connection, another operation in
    progress, the wrong number of arguments) or an argument it could not encode (the
    ``DataError`` asyncpg raises then has only its class's SQLSTATE 22000; an error
    PostgreSQL sent carries the server's fields, ``sqlstate`` among them)."""
    if isinstance(exc, asyncpg.InterfaceError):
        return True
    return isinstance(exc, asyncpg.DataError) and "sqlstate" not in vars(exc)


def _account(
    trace: Any,
    step: int,
    t0: int,
    pool: bool,
    count: int,
    statement: bool = False,
    outer: Any = None,
) -> tuple[bool, int]:
    """Record an awaited call that began at ``t0`` in step ``step``, inside the timed
    ``"db"`` block ``outer`` if not None; returns whether it was suspended, and when it
    ended."""
    t1 = perf_counter_ns()
    suspended = False
    if trace.open:
        suspended = trace.step_w0 != step
        if suspended:
            trace.add(trace.pool if pool else trace.db, t0, t1)
            if pool and outer is not None:
                outer.hole(t0, t1)  # the block's wait for a connection is not db time
        if count == _ALWAYS or (count == _IF_SUSPENDED and suspended):
            trace.queries += 1
            if statement:
                trace.statements += 1
            elif outer is not None:
                outer.queries += 1  # its round trips: the block is not one more
    return suspended, t1


def _query(name: str, statement: bool = True) -> Callable[..., Awaitable[Any]]:
    """A timed query method; ``statement``: each call is one of the app's statements."""

    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await _timed(
            getattr(self._lw_inner, name)(*args, **kwargs),
            proxy=self,
            call=name,
            args=args,
            statement=statement,
        )

    method.__name__ = method.__qualname__ = name
    return method


class _Proxy:
    __slots__ = ()

    # isinstance() consults __class__ when type() does not match (as for mock's specs):
    # the proxy passes every isinstance check its asyncpg object passes, asyncpg.Pool and
    # PoolConnectionProxy included, while type() and isinstance of the proxy's own class
    # are unchanged. Subclassing asyncpg's classes instead would run any method the proxy
    # does not forward (one a newer asyncpg adds) on an empty asyncpg object, and they are
    # no ABCs to register with. Nothing on a query's path reads __class__.
    @property  # type: ignore[misc]
    def __class__(self) -> type[Any]:
        return type(object.__getattribute__(self, "_lw_inner"))

    def _lw_describe(self, call: str, args: tuple[Any, ...]) -> tuple[Any, Any, Any]:
        """(query text, operation name, connection) of a call, for its span."""
        return (None, None, None)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_lw_inner"), name)

    def __repr__(self) -> str:
        inner = object.__getattribute__(self, "_lw_inner")
        return f"<loopwatch {type(self).__name__} of {inner!r}>"


class InstrumentedConnection(_Proxy, _ConnectionBase):
    """An asyncpg connection (or pool connection proxy) whose queries are timed.

    It is an instance of ``asyncpg.Connection`` and of its connection's class: a pooled one
    is an ``asyncpg.pool.PoolConnectionProxy``, a direct one is not. It can be weakly
    referenced. Notification, log and termination callbacks added through it are called
    with it, not with asyncpg's object. Build one with :func:`wrap_connection`.
    """

    __slots__ = ("__weakref__", "_lw_inner", "_lw_relays")

    def __init__(self, connection: Any) -> None:
        self._lw_inner = connection
        self._lw_relays: dict[tuple[Any, ...], Callable[..., Any]] | None = None

    execute = _query("execute")
    executemany = _query("executemany")
    fetch = _query("fetch")
    fetchval = _query("fetchval")
    fetchrow = _query("fetchrow")
    fetchmany = _query("fetchmany")
    copy_from_table = _query("copy_from_table")
    copy_from_query = _query("copy_from_query")
    copy_to_table = _query("copy_to_table")
    copy_records_to_table = _query("copy_records_to_table")

    async def prepare(self, *args: Any, **kwargs: Any) -> InstrumentedStatement:
        inner = self._lw_inner
        statement = await _timed(
            inner.prepare(*args, **kwargs), proxy=self, call="prepare", args=args
        )
        return InstrumentedStatement(statement, inner)

    def cursor(self, *args: Any, **kwargs: Any) -> InstrumentedCursorFactory:
        text = _text(args)
        return InstrumentedCursorFactory(
            self._lw_inner.cursor(*args, **kwargs), self._lw_inner, text
        )

    def transaction(self, **kwargs: Any) -> InstrumentedTransaction:
        return InstrumentedTransaction(self._lw_inner.transaction(**kwargs), self._lw_inner)

    def _lw_describe(self, call: str, args: tuple[Any, ...]) -> tuple[Any, Any, Any]:
        if call.startswith("copy_"):
            return (_text(args) if call == "copy_from_query" else None, "COPY", self._lw_inner)
        return (_text(args), None, self._lw_inner)

    # asyncpg calls these callbacks with its own object (the pool's proxy, for a pooled
    # connection): each is registered through a relay that passes this proxy instead.

    async def add_listener(self, channel: str, callback: Callable[..., Any]) -> None:
        await self._lw_inner.add_listener(channel, self._lw_relay(("listen", channel), callback))

    async def remove_listener(self, channel: str, callback: Callable[..., Any]) -> None:
        relay = self._lw_unrelay(("listen", channel), callback)
        await self._lw_inner.remove_listener(channel, relay)

    def add_log_listener(self, callback: Callable[..., Any]) -> None:
        self._lw_inner.add_log_listener(self._lw_relay(("log",), callback))

    def remove_log_listener(self, callback: Callable[..., Any]) -> None:
        self._lw_inner.remove_log_listener(self._lw_unrelay(("log",), callback))

    def add_termination_listener(self, callback: Callable[..., Any]) -> None:
        self._lw_inner.add_termination_listener(self._lw_relay(("termination",), callback))

    def remove_termination_listener(self, callback: Callable[..., Any]) -> None:
        self._lw_inner.remove_termination_listener(self._lw_unrelay(("termination",), callback))

    def _lw_relay(self, key: tuple[Any, ...], callback: Callable[..., Any]) -> Any:
        """The one relay of ``callback`` for ``key`` (asyncpg keeps callbacks in sets, and
        removes them by equality)."""
        if not callable(callback):
            return callback  # asyncpg's own error for it
        relays = self._lw_relays
        if relays is None:
            relays = self._lw_relays = {}
        full = (*key, callback)
        relay = relays.get(full)
        if relay is None:
            relay = relays[full] = _relay(self, callback)
        return relay

    def _lw_unrelay(self, key: tuple[Any, ...], callback: Callable[..., Any]) -> Any:
        relays = self._lw_relays
        relay = relays.pop((*key, callback), None) if relays else None
        # Not added through this proxy: asyncpg has it (or not) as it is.
        return callback if relay is None else relay


def _relay(proxy: InstrumentedConnection, callback: Callable[..., Any]) -> Callable[..., Any]:
    """``callback`` with ``proxy`` in place of the connection asyncpg passes; async when
    ``callback`` is, as asyncpg decides by the same test how to call it."""
    if inspect.iscoroutinefunction(callback):

        async def relay_async(connection: Any, *args: Any) -> Any:
            return await callback(proxy, *args)

        return relay_async

    def relay(connection: Any, *args: Any) -> Any:
        return callback(proxy, *args)

    return relay


class InstrumentedStatement(_Proxy):
    """A prepared statement whose executions are timed."""

    __slots__ = ("_lw_con", "_lw_inner")

    def __init__(self, statement: Any, connection: Any = None) -> None:
        self._lw_inner = statement
        self._lw_con = connection

    def _lw_describe(self, call: str, args: tuple[Any, ...]) -> tuple[Any, Any, Any]:
        text = self._lw_inner.get_query()
        return (text, "EXPLAIN" if call == "explain" else None, self._lw_con)

    fetch = _query("fetch")
    fetchval = _query("fetchval")
    fetchrow = _query("fetchrow")
    fetchmany = _query("fetchmany")
    executemany = _query("executemany")
    explain = _query("explain")

    def cursor(self, *args: Any, **kwargs: Any) -> InstrumentedCursorFactory:
        factory = self._lw_inner.cursor(*args, **kwargs)
        return InstrumentedCursorFactory(factory, self._lw_con, self._lw_inner.get_query())


class _CursorProxy(_Proxy):
    """The cursor proxies: each knows its query and connection, for spans."""

    __slots__ = ("_lw_con", "_lw_inner", "_lw_text")

    def __init__(self, inner: Any, connection: Any = None, text: str | None = None) -> None:
        self._lw_inner = inner
        self._lw_con = connection
        self._lw_text = text

    def _lw_describe(self, call: str, args: tuple[Any, ...]) -> tuple[Any, Any, Any]:
        return (self._lw_text, None, self._lw_con)


class InstrumentedCursorFactory(_CursorProxy):
    """``conn.cursor(...)``: iterate it (``async for``) or await it for a Cursor."""

    __slots__ = ()

    def __aiter__(self) -> InstrumentedCursorIterator:
        trace = current.get()  # the statement; its batches are queries only
        outer = scope.get()
        if trace is not None and trace.open and not (outer and outer.scopes(trace)):
            trace.statements += 1
        return InstrumentedCursorIterator(self._lw_inner.__aiter__(), self._lw_con, self._lw_text)

    def __await__(self) -> Generator[Any, None, InstrumentedCursor]:
        return self._open().__await__()

    async def _open(self) -> InstrumentedCursor:
        cursor = await _timed(self._lw_inner, proxy=self, call="open", statement=True)
        return InstrumentedCursor(cursor, self._lw_con, self._lw_text)


class InstrumentedCursorIterator(_CursorProxy):
    __slots__ = ()

    def __aiter__(self) -> InstrumentedCursorIterator:
        return self

    async def __anext__(self) -> Any:
        # Rows come in batches: only the calls that went to the server count as queries.
        return await _timed(
            self._lw_inner.__anext__(), count=_IF_SUSPENDED, proxy=self, call="fetch"
        )


class InstrumentedCursor(_CursorProxy):
    __slots__ = ()

    fetch = _query("fetch", statement=False)
    fetchrow = _query("fetchrow", statement=False)
    forward = _query("forward", statement=False)


class InstrumentedTransaction(_Proxy):
    """``conn.transaction()``: BEGIN, COMMIT and ROLLBACK are timed as queries."""

    __slots__ = ("_lw_con", "_lw_inner")

    def __init__(self, transaction: Any, connection: Any = None) -> None:
        self._lw_inner = transaction
        self._lw_con = connection

    start = _query("start", statement=False)
    commit = _query("commit", statement=False)
    rollback = _query("rollback", statement=False)

    async def __aenter__(self) -> None:
        await _timed(self._lw_inner.__aenter__(), proxy=self, call="start")

    async def __aexit__(self, *exc_info: Any) -> None:
        call = "commit" if exc_info[0] is None else "rollback"
        await _timed(self._lw_inner.__aexit__(*exc_info), proxy=self, call=call)

    def _lw_describe(self, call: str, args: tuple[Any, ...]) -> tuple[Any, Any, Any]:
        operation = _TRANSACTION_OPERATIONS.get(call)
        return (operation, operation, self._lw_con)


_TRANSACTION_OPERATIONS = {"start": "BEGIN", "commit": "COMMIT", "rollback": "ROLLBACK"}


def _text(args: tuple[Any, ...]) -> str | None:
    """The query text of a call: its first argument, when that is a string."""
    return args[0] if args and isinstance(args[0], str) else None


# Called with (pool, seconds) after every acquire, for the wait-time metric; empty unless
# OpenTelemetry metrics are on.
acquire_listeners: list[Callable[[InstrumentedPool, float], None]] = []


class _Acquire:
    """``pool.acquire()``: used with ``async with`` or awaited, like asyncpg's."""

    __slots__ = ("_ctx", "_pool")

    def __init__(self, pool: InstrumentedPool, ctx: Any) -> None:
        self._pool = pool
        self._ctx = ctx

    # Not coroutine functions: `async with` awaits the coroutine they return, one
    # coroutine layer fewer for every step of an acquire or a release.
    def __aenter__(self) -> Coroutine[Any, Any, InstrumentedConnection]:
        return self._wait(self._ctx.__aenter__())

    def __aexit__(self, *exc_info: Any) -> Coroutine[Any, Any, None]:
        self._pool._lw_used -= 1
        return _released(self._ctx.__aexit__(*exc_info))

    def __await__(self) -> Generator[Any, None, InstrumentedConnection]:
        return self._wait(self._ctx).__await__()

    async def _wait(self, acquiring: Awaitable[Any]) -> InstrumentedConnection:
        pool = self._pool
        pool._lw_pending += 1
        t0 = perf_counter_ns()
        trace = current.get()
        try:
            if trace is None or trace.otel is not None or scope.get() is not None:
                connection = await _timed(acquiring, pool=True, count=_NEVER)
            elif not trace.open:
                connection = await acquiring
            else:  # _timed's plain case, inline: one coroutine layer fewer per acquire
                step = trace.step_w0
                try:
                    connection = await acquiring
                finally:
                    _account(trace, step, t0, True, _NEVER)
        finally:
            pool._lw_pending -= 1
        pool._lw_used = used = pool._lw_used + 1
        if used > pool._lw_used_max:
            pool._lw_used_max = used
        for listener in acquire_listeners:
            listener(pool, (perf_counter_ns() - t0) / 1e9)
        return InstrumentedConnection(connection)


def _via_pool(name: str) -> Callable[..., Awaitable[Any]]:
    async def method(self: InstrumentedPool, *args: Any, **kwargs: Any) -> Any:
        async with self.acquire() as con:
            return await getattr(con, name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


class InstrumentedPool(_Proxy):
    """An asyncpg pool whose acquires and queries are timed. Await it (or ``async with``
    it) to initialise it, as with ``asyncpg.create_pool``.

    It is an instance of ``asyncpg.Pool`` and can be weakly referenced. Its connections
    are :class:`InstrumentedConnection`; release them through it. Build one with
    :func:`create_pool` or :func:`wrap_pool`.
    """

    __slots__ = ("__weakref__", "_lw_inner", "_lw_name", "_lw_pending", "_lw_used", "_lw_used_max")

    def __init__(self, pool: Any, name: str | None = None) -> None:
        self._lw_inner = pool
        self._lw_name = name or f"asyncpg-{next(_pool_numbers)}"
        self._lw_pending = 0  # acquires waiting now
        self._lw_used = 0  # connections acquired through this proxy and not released
        self._lw_used_max = 0  # the most at once
        pools.add(self)

    @property
    def loopwatch_name(self) -> str:
        """The pool's name in metrics (``db.client.connection.pool.name``)."""
        return self._lw_name

    def acquire(self, *, timeout: float | None = None) -> _Acquire:
        return _Acquire(self, self._lw_inner.acquire(timeout=timeout))

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        if isinstance(connection, InstrumentedConnection):
            connection = connection._lw_inner
        self._lw_used -= 1
        await _released(self._lw_inner.release(connection, timeout=timeout))

    execute = _via_pool("execute")
    executemany = _via_pool("executemany")
    fetch = _via_pool("fetch")
    fetchval = _via_pool("fetchval")
    fetchrow = _via_pool("fetchrow")
    fetchmany = _via_pool("fetchmany")
    copy_from_table = _via_pool("copy_from_table")
    copy_from_query = _via_pool("copy_from_query")
    copy_to_table = _via_pool("copy_to_table")
    copy_records_to_table = _via_pool("copy_records_to_table")

    def __await__(self) -> Generator[Any, None, InstrumentedPool]:
        return self._init().__await__()

    async def _init(self) -> InstrumentedPool:
        await self._lw_inner
        return self

    async def __aenter__(self) -> InstrumentedPool:
        return await self._init()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._lw_inner.close()


def create_pool(*args: Any, **kwargs: Any) -> InstrumentedPool:
    """Drop-in for ``asyncpg.create_pool``: same arguments, a pool that behaves the same."""
    dsn = args[0] if args and isinstance(args[0], str) else kwargs.get("dsn")
    return InstrumentedPool(asyncpg.create_pool(*args, **kwargs), _pool_name(dsn, kwargs))


def _pool_name(dsn: Any, kwargs: dict[str, Any] | None = None) -> str | None:
    """``host:port/database`` from a DSN, or from ``host``, ``port`` and ``database``
    keyword arguments (Tortoise passes those); never a user or password."""
    if not isinstance(dsn, str):
        kw = kwargs or {}
        host, port, database = kw.get("host"), kw.get("port"), kw.get("database")
        if not (isinstance(host, str) and isinstance(database, str)):
            return None
        return f"{host}{f':{port}' if port else ''}/{database}"
    try:
        url = urlsplit(dsn)
        host = url.hostname or parse_qs(url.query).get("host", [""])[0]
        port = url.port
    except ValueError:
        return None
    database = url.path.lstrip("/")
    if not (host or database):
        return None
    return f"{host}{f':{port}' if port else ''}/{database}"


pools: weakref.WeakSet[InstrumentedPool] = weakref.WeakSet()
_pool_numbers = itertools.count(1)


def pool_snapshot() -> list[InstrumentedPool]:
    """The instrumented pools alive now, from any thread (the sampler's, a metric
    reader's): a WeakSet cannot be listed while the loop thread adds a pool to it."""
    for _ in range(3):
        try:
            return list(pools)
        except RuntimeError:  # a pool was created meanwhile
            continue
    return []


def _connections() -> tuple[int, int] | None:
    """For the process samples: the most connections each pool had in use at once, and
    the pools' maximum sizes, added up (on the sampler thread)."""
    live = pool_snapshot()
    if not live:
        return None
    return (
        sum(p._lw_used_max for p in live),
        sum(p._lw_inner.get_max_size() for p in live),
    )


_process.connection_sources.append(_connections)


async def connect(*args: Any, **kwargs: Any) -> InstrumentedConnection:
    """Drop-in for ``asyncpg.connect``: same arguments, a connection that behaves the same."""
    return InstrumentedConnection(await asyncpg.connect(*args, **kwargs))


def wrap_pool(pool: Any) -> InstrumentedPool:
    """Instrument a pool you already have (an ``asyncpg.Pool``); an instrumented pool is
    returned as it is. Raises ``TypeError`` for anything else."""
    if isinstance(pool, InstrumentedPool):
        return pool
    if not isinstance(pool, asyncpg.Pool):
        raise TypeError(
            f"wrap_pool() takes an asyncpg pool (from asyncpg.create_pool()), not "
            f"{_type_name(pool)}: loopwatch instruments asyncpg only."
        )
    return InstrumentedPool(pool)


def wrap_connection(connection: Any) -> InstrumentedConnection:
    """Instrument a connection you already have (from ``asyncpg.connect`` or
    ``pool.acquire``); an instrumented one is returned as it is. Raises ``TypeError`` for
    anything else (another driver's connection, a pool)."""
    if isinstance(connection, InstrumentedConnection):
        return connection
    if not isinstance(connection, asyncpg.Connection):
        raise TypeError(
            f"wrap_connection() takes an asyncpg connection (from asyncpg.connect() or "
            f"pool.acquire()), not {_type_name(connection)}: loopwatch instruments asyncpg "
            f"only."
        )
    return InstrumentedConnection(connection)


def _type_name(obj: Any) -> str:
    kind = type(obj)  # a proxy's own class, not the asyncpg class it passes for
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"
