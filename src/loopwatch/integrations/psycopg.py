"""psycopg 3 (async): statements, round trips and pool waits, per request.

Two lines::

    from loopwatch.integrations.psycopg import AsyncConnectionPool
    pool = AsyncConnectionPool(dsn, min_size=1, max_size=10, open=False)  # then await pool.open()

or, without a pool, ``conn = await loopwatch.integrations.psycopg.AsyncConnection.connect(dsn)``.

:class:`AsyncConnection` is a subclass of ``psycopg.AsyncConnection`` (its ``connect()``
takes the same arguments and returns one); :class:`AsyncConnectionPool` and
:class:`AsyncNullConnectionPool` are subclasses of psycopg_pool's whose
``connection_class`` is loopwatch's connection (one of your own, a
``psycopg.AsyncConnection`` subclass, is used through a subclass of both that keeps its
name; anything else raises ``TypeError``). Nothing in psycopg is patched: the
connection's cursors come from its documented ``cursor_factory`` and
``server_cursor_factory``, subclasses of psycopg's cursors, and a factory you set
(``AsyncClientCursor``, ``AsyncRawCursor``, your own) is timed the same way, through a
subclass of it that keeps its name (reading the attribute back gives that subclass).
Per request:

- each ``execute`` (of a cursor or of the connection), ``executemany``, ``stream`` and
  ``async with cur.copy(...)`` is one statement: one :func:`loopwatch.timed` ``"db"``
  block, one ``db_statements``, one OpenTelemetry client span (``db.system.name``
  ``postgresql``, the sanitized ``db.query.text``, ``db.namespace``,
  ``server.address``/``server.port``; a Unix socket is the address, as for asyncpg). The
  ``BEGIN`` psycopg sends before the first statement of a transaction (without
  ``autocommit``) is one more query in ``db_queries``;
- ``commit()``, ``rollback()``, ``async with conn.transaction()`` (``BEGIN`` or
  ``SAVEPOINT`` as it starts; ``COMMIT``, ``RELEASE`` or ``ROLLBACK`` as it ends), a
  server-side cursor's ``fetch*``, ``scroll``, batches of ``async for`` and ``close``,
  the end of a ``COPY ... FROM STDIN`` and the end of a pipeline are round trips that
  are not statements (``db_ms``, ``db_queries`` and a span named by the operation),
  each when it goes to the server: a ``commit()`` outside a transaction, or a row of a
  batch already fetched, sends nothing and records nothing;
- ``getconn()``, and so ``async with pool.connection()``, is a ``"pool"`` block:
  ``pool_wait_ms`` is the wait for a free connection (with the pool's ``check``, or a
  null pool's connect); nothing below it is recorded. The ``COMMIT`` or ``ROLLBACK``
  that ``connection()`` runs as its block ends is a query of the request.

Not measured: the rows of a stream after the first (``stream()`` is timed until its
first row; the rest come on the same query, no round trip, and the wait for them is not
in ``db_ms``), the data of a ``COPY`` inside its block (``write()``, ``read()``), and,
in pipeline mode, results read before the pipeline ends (a fetch, ``pipeline.sync()``):
``execute()`` then sends without waiting, and the wait is timed where the pipeline
block ends. The ``PREPARE`` psycopg sends once for a statement run ``prepare_threshold``
times is not counted; ``connect()``, ``notifies()`` and two-phase commit are not timed.
With ``close_returns=True``, the pools need psycopg 3.3.

Nothing changes for the app: the same results, the same exceptions (a failed statement
is still one statement and one query, and its span has ``error.type`` and, when the
server sent the error, its SQLSTATE; a call psycopg refuses before sending it, such as
one with the wrong number of parameters, counts the same), and every ``isinstance``
check on psycopg's classes holds. Outside a request nothing is recorded. psycopg 3.1.8
and psycopg_pool 3.1 and later; without them this module raises ``ImportError`` naming
the extra.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Generator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

try:
    import psycopg
    import psycopg_pool
    from psycopg import AsyncCopy, AsyncPipeline, AsyncTransaction
    from psycopg.pq import TransactionStatus
    from psycopg.rows import Row
    from psycopg.sql import Composable
except ImportError as exc:  # pragma: no cover - exercised by the missing-extra test
    raise ImportError(
        "loopwatch.integrations.psycopg needs psycopg 3 and psycopg-pool: "
        "pip install 'loopwatch[psycopg]'"
    ) from exc

from ..timing import Timed, scope

if TYPE_CHECKING:
    from psycopg_pool.abc import ACT
    from typing_extensions import Self
else:
    try:
        from psycopg_pool.abc import ACT
    except ImportError:  # psycopg_pool 3.1: its pools are not generic (see _generic)
        ACT = TypeVar("ACT")

T = TypeVar("T")
_IDLE = TransactionStatus.IDLE
_logger = logging.getLogger("loopwatch")


# --- timing one call -------------------------------------------------------------------


@types.coroutine
def _timed(
    awaitable: Awaitable[T],
    connection: Any,
    query: object = None,
    operation: str | None = None,
    statement: bool = False,
) -> Generator[Any, Any, T]:
    """Await ``awaitable``, a call that goes to the server, as one ``"db"`` block: a
    statement of the app's, or a round trip that is not one (``statement=False``)."""
    block = _start(connection, query, operation, statement)
    if block is None:
        return (yield from awaitable.__await__())
    # Declared, not inferred from a wait: psycopg may find a reply ready without letting
    # the loop run. Queued in a pipeline, the round trip is the pipeline's end (timed
    # there); a BEGIN sent first is one more.
    if _pipelined(connection):
        block.round_trips = 0
    else:
        block.round_trips = 2 if statement and _begins(connection) else 1
    try:
        result = yield from awaitable.__await__()
    except StopAsyncIteration:  # a stream without a row: no error
        block.stop()
        raise
    except BaseException as exc:
        if isinstance(exc, psycopg.Error) and exc.sqlstate is None and not exc.diag.sqlstate:
            # Refused before it was sent (the wrong number of parameters), or the
            # connection failed: no statement ran; a round trip only if it waited (the
            # BEGIN psycopg sends first without autocommit).
            block.round_trips = None
            block.statement = False
        block.stop(exc)
        raise
    block.stop()
    return result


@types.coroutine
def _if_sent(awaitable: Awaitable[T], connection: Any, operation: str) -> Generator[Any, Any, T]:
    """Await ``awaitable``, a call that may go to the server or not (a row of a batch
    already here, closing a cursor never declared), as one ``"db"`` round trip that is
    not a statement, if it did: timed from its first wait for a future (the socket, the
    connection's lock). A bare yield is no such wait: psycopg lets the loop run every 5
    ms, sending something or not."""
    steps = awaitable.__await__()
    block: Timed | None = None
    started = False
    value: Any = None
    thrown: BaseException | None = None
    try:
        while True:
            if thrown is None:
                yielded = steps.send(value)
            else:
                error, thrown = thrown, None
                yielded = steps.throw(error)
            if not started and yielded is not None:
                started = True
                block = _start(connection, None, operation, False)
            try:
                value = yield yielded
            except GeneratorExit:
                steps.close()
                raise
            except BaseException as exc:  # thrown in: a cancellation
                thrown = exc
    except StopIteration as done:
        if block is not None:
            block.stop()
        return cast(T, done.value)
    except GeneratorExit:
        if block is not None:
            block.stop()
        raise
    except BaseException as exc:
        if block is not None:
            block.stop(exc)
        raise


def _start(connection: Any, query: object, operation: str | None, statement: bool) -> Timed | None:
    """A started ``"db"`` block, or None below a pool checkout (its setup is the wait's)."""
    outer = scope.get()
    if outer is not None and outer.kind == "pool":
        return None
    block = Timed("db", operation=operation, system="postgresql", statement=statement).start()
    if block.outermost:  # it makes the span: describe it (not outside a request)
        if isinstance(query, str):
            block.query = query
        elif query is not None:  # composed only if a span is made: it costs 7-10 µs
            block.query = functools.partial(_text, query, connection)
        block.attributes = _target(connection)
    return block


def _pipelined(connection: Any) -> bool:
    """Whether the connection is in pipeline mode (execute() queues, sends nothing)."""
    try:
        return bool(connection.pgconn.pipeline_status)  # (conn.info makes an object a call)
    except Exception:  # a closed connection: psycopg raises its own error next
        return False


def _begins(connection: Any) -> bool:
    """Whether psycopg will send a BEGIN before the next statement (a round trip)."""
    try:
        return not connection.autocommit and connection.pgconn.transaction_status == _IDLE
    except Exception:  # a closed connection: psycopg raises its own error next
        return False


def _text(query: object, connection: Any) -> str | None:
    """The text of a query for its span: a string, bytes, or a ``psycopg.sql`` object
    (composed with the connection, as psycopg does; ``Literal`` values land in the text,
    where the sanitizer replaces them). None for anything else (a template string)."""
    if isinstance(query, str):
        return query
    if isinstance(query, bytes):
        return query.decode("utf-8", "replace")
    if isinstance(query, Composable):
        try:
            return query.as_string(connection)
        except Exception:  # psycopg raises its own error when it composes it
            return None
    return None


def _target(connection: Any) -> dict[str, Any]:
    """``db.namespace``, ``server.address``, ``server.port``: read once per connection."""
    target: dict[str, Any] | None = getattr(connection, "_lw_target", None)
    if target is not None:
        return target
    target = {}
    try:
        info = connection.info
        dbname, host, port = info.dbname, info.host, info.port
    except Exception:  # a closed connection has no target to give
        return target
    if dbname:
        target["db.namespace"] = dbname
    if host.startswith("/"):  # libpq names a Unix socket's directory: the socket is the address
        target["server.address"] = f"{host}/.s.PGSQL.{port}"
    elif host:
        target["server.address"] = host
        if port:
            target["server.port"] = int(port)
    with contextlib.suppress(AttributeError):  # no __slots__ of its own: read it each time
        connection._lw_target = target
    return target


# --- cursors ---------------------------------------------------------------------------


class AsyncCursor(psycopg.AsyncCursor[Row]):
    """psycopg's ``AsyncCursor``, with each statement timed. The default
    ``cursor_factory`` of :class:`AsyncConnection`."""

    __slots__ = ()

    async def execute(self, query: Any, *args: Any, **kwargs: Any) -> Self:
        return await _timed(
            super().execute(query, *args, **kwargs), self.connection, query, statement=True
        )

    async def executemany(self, query: Any, *args: Any, **kwargs: Any) -> None:
        await _timed(
            super().executemany(query, *args, **kwargs), self.connection, query, statement=True
        )

    async def stream(self, query: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Row]:
        rows = cast("AsyncGenerator[Row, None]", super().stream(query, *args, **kwargs))
        try:
            try:
                # The statement: sending it, up to its first row.
                first = await _timed(rows.__anext__(), self.connection, query, statement=True)
            except StopAsyncIteration:  # no row at all
                return
            yield first
            async for row in rows:
                yield row
        finally:
            # Closed early (a break, an error), psycopg's own generator ends the query now.
            await rows.aclose()

    @asynccontextmanager
    async def copy(self, statement: Any, *args: Any, **kwargs: Any) -> AsyncIterator[AsyncCopy]:
        context = super().copy(statement, *args, **kwargs)
        connection = self.connection
        copy = await _timed(context.__aenter__(), connection, statement, statement=True)
        # The data between is not timed: it streams on the COPY (see the module's notes).
        try:
            yield copy
        except BaseException as exc:
            ending = context.__aexit__(type(exc), exc, exc.__traceback__)
            if not await _if_sent(ending, connection, "COPY"):
                raise
        else:
            # The end of a COPY FROM: the server's answer to the data (a COPY TO has it).
            await _if_sent(context.__aexit__(None, None, None), connection, "COPY")


class AsyncServerCursor(AsyncCursor[Row], psycopg.AsyncServerCursor[Row]):
    """psycopg's ``AsyncServerCursor`` (``conn.cursor(name)``): its ``execute`` (the
    DECLARE) is the statement; each fetch, scroll and batch of ``async for`` is a round
    trip. The default ``server_cursor_factory`` of :class:`AsyncConnection`."""

    __slots__ = ()

    async def fetchone(self) -> Row | None:
        return await _timed(super().fetchone(), self.connection, operation="FETCH")

    async def fetchmany(self, size: int = 0) -> list[Row]:
        return await _timed(super().fetchmany(size), self.connection, operation="FETCH")

    async def fetchall(self) -> list[Row]:
        return await _timed(super().fetchall(), self.connection, operation="FETCH")

    async def scroll(self, value: int, mode: str = "relative") -> None:
        await _timed(super().scroll(value, mode), self.connection, operation="MOVE")

    def __aiter__(self) -> AsyncIterator[Row]:  # type: ignore[override]
        rows = super().__aiter__()
        if rows is self:  # psycopg 3.2 and later: __anext__ fetches the batches
            return self
        return _Batches(rows, self.connection)  # psycopg 3.1: an async generator does

    def __anext__(self) -> Awaitable[Row]:  # type: ignore[override]
        # Not a coroutine of its own: a row of a batch already here costs one generator.
        return _if_sent(super().__anext__(), self.connection, "FETCH")

    async def close(self) -> None:
        await _if_sent(super().close(), self.connection, "CLOSE")


class _Batches(AsyncIterator[Row]):
    """psycopg 3.1's iteration of a server-side cursor, each batch it fetches timed."""

    __slots__ = ("_connection", "_rows")

    def __init__(self, rows: AsyncIterator[Row], connection: Any) -> None:
        self._rows = rows
        self._connection = connection

    def __anext__(self) -> Awaitable[Row]:
        return _if_sent(self._rows.__anext__(), self._connection, "FETCH")

    async def aclose(self) -> None:
        await cast("AsyncGenerator[Row, None]", self._rows).aclose()


_subclasses: dict[tuple[type[Any], type[Any]], type[Any]] = {}


def _timed_class(cls: Any, timing: type[Any], plain: type[Any]) -> Any:
    """``cls`` with ``timing``'s methods: ``timing`` itself for psycopg's own class
    (``plain``), ``cls`` when it has them already, else a subclass of both that keeps
    ``cls``'s name. Raises ``TypeError`` when the two cannot be combined."""
    if cls is plain:
        return timing
    if issubclass(cls, timing):
        return cls
    key = (timing, cls)
    combined = _subclasses.get(key)
    if combined is None:
        namespace = {
            "__slots__": (),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        }
        combined = _subclasses[key] = type(cls.__name__, (timing, cls), namespace)
    return combined


def _cursor_class(cls: Any, timing: type[Any], plain: type[Any]) -> Any:
    """The class a connection makes its cursors with, for a factory set on it: timed
    when it is one of psycopg's cursor classes, as it is otherwise (never an error)."""
    if not (isinstance(cls, type) and issubclass(cls, plain)):
        return cls
    try:
        return _timed_class(cls, timing, plain)
    except TypeError as exc:
        _logger.warning(
            "loopwatch: the cursors of %s.%s are not timed: %s", cls.__module__, cls.__name__, exc
        )
        return cls


# --- connections -----------------------------------------------------------------------


class AsyncConnection(psycopg.AsyncConnection[Row]):
    """psycopg's ``AsyncConnection``, with its statements, transactions and round trips
    timed (see the module's documentation). ``await AsyncConnection.connect(...)`` takes
    psycopg's arguments."""

    _lw_cursor_factory: type[psycopg.AsyncCursor[Any]] = AsyncCursor
    _lw_server_cursor_factory: type[psycopg.AsyncServerCursor[Any]] = AsyncServerCursor

    @property
    def cursor_factory(self) -> type[psycopg.AsyncCursor[Row]]:
        """The class of the cursors of ``cursor()``: set any ``psycopg.AsyncCursor``
        subclass; it is timed (reading it back gives the timed subclass)."""
        return self._lw_cursor_factory

    @cursor_factory.setter
    def cursor_factory(self, factory: type[psycopg.AsyncCursor[Row]]) -> None:
        self._lw_cursor_factory = _cursor_class(factory, AsyncCursor, psycopg.AsyncCursor)

    @property
    def server_cursor_factory(self) -> type[psycopg.AsyncServerCursor[Row]]:
        """The class of the cursors of ``cursor(name)``, timed as ``cursor_factory`` is."""
        return self._lw_server_cursor_factory

    @server_cursor_factory.setter
    def server_cursor_factory(self, factory: type[psycopg.AsyncServerCursor[Row]]) -> None:
        self._lw_server_cursor_factory = _cursor_class(
            factory, AsyncServerCursor, psycopg.AsyncServerCursor
        )

    async def commit(self) -> None:
        if self.pgconn.transaction_status == _IDLE:  # no transaction: psycopg sends nothing
            await super().commit()
        else:
            await _timed(super().commit(), self, operation="COMMIT")

    async def rollback(self) -> None:
        if self.pgconn.transaction_status == _IDLE:
            await super().rollback()
        else:
            await _timed(super().rollback(), self, operation="ROLLBACK")

    @asynccontextmanager
    async def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AsyncIterator[AsyncTransaction]:
        # The same rule as psycopg's: the outermost block begins a transaction, one
        # inside a transaction makes a savepoint.
        outer = self.pgconn.transaction_status == _IDLE
        context = super().transaction(savepoint_name, force_rollback)
        opening = "BEGIN" if outer else "SAVEPOINT"
        transaction = await _timed(context.__aenter__(), self, operation=opening)
        try:
            yield transaction
        except BaseException as exc:
            ending = context.__aexit__(type(exc), exc, exc.__traceback__)
            if not await _timed(ending, self, operation="ROLLBACK"):
                raise
        else:
            closing = "ROLLBACK" if force_rollback else "COMMIT" if outer else "RELEASE"
            await _timed(context.__aexit__(None, None, None), self, operation=closing)

    @asynccontextmanager
    async def pipeline(self) -> AsyncIterator[AsyncPipeline]:
        # execute() in pipeline mode sends without waiting: the wait for the results is
        # where the pipeline ends (and where a nested one starts).
        context = super().pipeline()
        pipeline = await _if_sent(context.__aenter__(), self, "PIPELINE")
        try:
            yield pipeline
        except BaseException as exc:
            ending = context.__aexit__(type(exc), exc, exc.__traceback__)
            if not await _if_sent(ending, self, "PIPELINE"):
                raise
        else:
            await _if_sent(context.__aexit__(None, None, None), self, "PIPELINE")


def _connection_class(cls: Any) -> Any:
    """A pool's ``connection_class``, timed: a ``psycopg.AsyncConnection`` subclass of
    your own becomes a subclass of it and of :class:`AsyncConnection`."""
    if not (isinstance(cls, type) and issubclass(cls, psycopg.AsyncConnection)):
        raise TypeError(
            f"connection_class must be psycopg.AsyncConnection or a subclass of it, not "
            f"{cls!r}: loopwatch times psycopg's connections."
        )
    try:
        return _timed_class(cls, AsyncConnection, psycopg.AsyncConnection)
    except TypeError as exc:
        raise TypeError(
            f"connection_class {cls.__module__}.{cls.__qualname__} cannot be combined "
            f"with loopwatch's AsyncConnection ({exc}); subclass "
            f"loopwatch.integrations.psycopg.AsyncConnection instead."
        ) from None


# --- pools -----------------------------------------------------------------------------

_DEFAULT_CONNECTION: Any = AsyncConnection


def _generic(pool_class: Any) -> Any:
    """``pool_class``, subscriptable by the connection class as psycopg_pool 3.2 and
    later make their pools; psycopg_pool 3.1's are not generic."""
    if getattr(pool_class, "__parameters__", ()):
        return pool_class
    generic: Any = Generic
    name = f"_Generic{pool_class.__name__}"
    return types.new_class(
        name, (pool_class, generic[ACT]), exec_body=lambda ns: ns.update(__module__=__name__)
    )


if TYPE_CHECKING:
    _Pool = psycopg_pool.AsyncConnectionPool
    _NullPool = psycopg_pool.AsyncNullConnectionPool
else:
    _Pool = _generic(psycopg_pool.AsyncConnectionPool)
    _NullPool = _generic(psycopg_pool.AsyncNullConnectionPool)


class AsyncConnectionPool(_Pool[ACT]):
    """psycopg_pool's ``AsyncConnectionPool``: the same arguments, its connections are
    :class:`AsyncConnection`, and the wait in ``getconn()`` (so in ``connection()``) is
    pool wait.

    A ``connection_class`` of your own (a ``psycopg.AsyncConnection`` subclass) is used
    through a subclass of it and of :class:`AsyncConnection`, which keeps its name and
    its methods; anything else raises ``TypeError``."""

    def __init__(
        self,
        conninfo: Any = "",
        *,
        connection_class: type[ACT] = _DEFAULT_CONNECTION,
        **kwargs: Any,
    ) -> None:
        super().__init__(conninfo, connection_class=_connection_class(connection_class), **kwargs)

    async def getconn(self, timeout: float | None = None) -> ACT:
        block = Timed("pool").start()
        try:
            connection = await super().getconn(timeout)
        except BaseException as exc:
            block.stop(exc)
            raise
        block.stop()
        return connection


class AsyncNullConnectionPool(AsyncConnectionPool[ACT], _NullPool[ACT]):
    """psycopg_pool's ``AsyncNullConnectionPool`` (a connection per ``getconn()``),
    instrumented as :class:`AsyncConnectionPool` is: opening the connection is the wait."""


__all__ = [
    "AsyncConnection",
    "AsyncConnectionPool",
    "AsyncCursor",
    "AsyncNullConnectionPool",
    "AsyncServerCursor",
]
