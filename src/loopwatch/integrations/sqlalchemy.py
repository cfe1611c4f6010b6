"""SQLAlchemy 2 asyncio (and SQLModel): statements, round trips and pool checkouts.

Two lines::

    from loopwatch.integrations.sqlalchemy import create_async_engine
    engine = create_async_engine("postgresql+asyncpg://app@db/app", pool_size=10)

:func:`create_async_engine` takes what SQLAlchemy's takes and returns SQLAlchemy's own
``AsyncEngine``, with, per request:

- every statement (the dialect's execution of it, run from SQLAlchemy's public
  ``do_execute`` events) timed as one :func:`loopwatch.timed` ``"db"`` block: ``db_ms``,
  one ``db_statements`` each, and one OpenTelemetry client span each (none when
  OpenTelemetry's own SQLAlchemy instrumentation made one for it);
- every pool checkout timed as a ``"pool"`` block: ``pool_wait_ms`` is the wait for a
  free connection and, when the pool opens one, the connection's setup;
- for ``postgresql+asyncpg`` and ``postgresql+psycopg``, connections opened through
  loopwatch's asyncpg or psycopg integration, keeping every URL and ``connect_args``
  option (SQLAlchemy's ``do_connect`` event passes them on unchanged): each statement's
  round trips (prepare, execute, a server-side cursor's batches, BEGIN/COMMIT) count in
  ``db_queries``. On another dialect a statement counts as one query, and COMMIT and
  ROLLBACK (run by the driver, not as statements) are not seen.

:func:`instrument` does the same to an engine that already exists (``AsyncEngine`` or
its ``sync_engine``), except the driver swap: connections it opens keep their driver.
Nothing in SQLAlchemy is patched: the engine's pool becomes an instance of a subclass of
its own class that overrides only ``Pool.connect()`` (the checkout), which
``isinstance`` checks, ``engine.dispose()`` and ``pool.recreate()`` keep.

With ``async_creator=``, SQLAlchemy calls your function for connections: return
``loopwatch.connect(...)`` from it for the round trips.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

try:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
    from sqlalchemy.pool import Pool
except ImportError as exc:  # pragma: no cover - exercised by the missing-extra test
    raise ImportError(
        "loopwatch.integrations.sqlalchemy needs SQLAlchemy 2 with asyncio support: "
        "pip install 'loopwatch[sqlalchemy]'"
    ) from exc

from ..timing import Timed

# SQLAlchemy's dialect names as OpenTelemetry's db.system.name.
_SYSTEMS = {
    "postgresql": "postgresql",
    "mysql": "mysql",
    "mariadb": "mariadb",
    "sqlite": "sqlite",
    "oracle": "oracle.db",
    "mssql": "microsoft.sql_server",
}


def create_async_engine(url: Any, **kwargs: Any) -> AsyncEngine:
    """Drop-in for ``sqlalchemy.ext.asyncio.create_async_engine``: the same arguments,
    the same ``AsyncEngine``, instrumented (see the module's documentation). Raises
    what SQLAlchemy raises for bad arguments."""
    engine = _create_async_engine(url, **kwargs)
    sync_engine = engine.sync_engine
    connect = _driver_connect(sync_engine.dialect.driver)
    if connect is not None and "async_creator" not in kwargs and "creator" not in kwargs:

        def do_connect(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
            # The dialect calls connect(*cargs, **cparams) next: every option stays.
            cparams.setdefault("async_creator_fn", connect)

        event.listen(sync_engine, "do_connect", do_connect)
    instrument(engine)
    return engine


def _driver_connect(driver: str) -> Any:
    """loopwatch's drop-in connect for a SQLAlchemy driver name, or None."""
    if driver == "asyncpg":
        from .asyncpg import connect

        return connect
    if driver == "psycopg":
        from .psycopg import AsyncConnection

        return AsyncConnection.connect
    return None


def instrument(engine: AsyncEngine | Engine) -> AsyncEngine | Engine:
    """Time the statements and pool checkouts of an existing engine (an ``AsyncEngine``
    or its ``sync_engine``) and return it. Instrumenting twice is harmless. Raises
    ``TypeError`` for anything that is not a SQLAlchemy engine."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    if not isinstance(sync_engine, Engine):
        raise TypeError(
            f"instrument() takes a SQLAlchemy engine (AsyncEngine or Engine), not "
            f"{type(engine).__module__}.{type(engine).__qualname__}."
        )
    _instrument_pool(sync_engine.pool)
    if sync_engine not in _engines:
        _engines.add(sync_engine)
        _listen(sync_engine)
    return engine


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _listen(sync_engine: Engine) -> None:
    """Time each statement of ``sync_engine`` as a ``"db"`` block, with its target's
    span attributes (read once, from the engine's URL).

    The block is the dialect's own execution of the statement, run from SQLAlchemy's
    ``do_execute`` events (and their executemany and no-parameters forms): one call
    holds the statement's start and end, even when it raises. Connection events
    (``before_cursor_execute``) would turn SQLAlchemy's event dispatch on for every
    statement, at about 10 µs each."""
    url = sync_engine.url
    dialect = sync_engine.dialect
    name = dialect.name
    system = _SYSTEMS.get(name, name)
    attributes: dict[str, Any] = {"db.system.name": system}
    if url.database:
        attributes["db.namespace"] = url.database
    if url.host:
        attributes["server.address"] = url.host
    if url.port:
        attributes["server.port"] = url.port

    def run(statement: Any, context: Any, execute: Callable[..., Any], *args: Any) -> bool:
        """The dialect's ``execute(*args)`` of ``statement``, as one block; True tells
        SQLAlchemy it is done."""
        text = statement if isinstance(statement, str) else None
        timed = Timed("db", text, system=system, attributes=attributes)
        timed.round_trips = 1  # executed, even if the driver found its reply waiting
        timed.start()
        try:
            execute(*args)
        except BaseException as exc:
            _stop(timed, context, exc)
            raise
        _stop(timed, context, None)
        return True

    def do_execute(cursor: Any, statement: Any, parameters: Any, context: Any) -> bool:
        return run(statement, context, dialect.do_execute, cursor, statement, parameters, context)

    def do_executemany(cursor: Any, statement: Any, parameters: Any, context: Any) -> bool:
        return run(
            statement, context, dialect.do_executemany, cursor, statement, parameters, context
        )

    def do_execute_no_params(cursor: Any, statement: Any, context: Any) -> bool:
        return run(statement, context, dialect.do_execute_no_params, cursor, statement, context)

    event.listen(sync_engine, "do_execute", do_execute)
    event.listen(sync_engine, "do_executemany", do_executemany)
    event.listen(sync_engine, "do_execute_no_params", do_execute_no_params)


def _stop(timed: Timed, context: Any, error: BaseException | None) -> None:
    # OpenTelemetry's SQLAlchemy instrumentation keeps its span for the statement on the
    # execution context: one span per statement, then, and it is that one.
    if getattr(context, "_otel_span", None) is not None:
        timed.span = False
    timed.stop(error)


_classes: dict[type[Any], type[Any]] = {}


def _instrument_pool(pool: Pool) -> None:
    """Make ``pool`` an instance of a subclass of its class whose ``connect()`` (the
    checkout) is a ``"pool"`` block. The subclass adds no state: a class change is all
    it takes, and connections already out stay valid."""
    cls = type(pool)
    if getattr(cls, "_loopwatch_timed", False):
        return
    timed = _classes.get(cls)
    if timed is None:
        checkout = cls.connect

        def connect(self: Any) -> Any:
            block = Timed("pool").start()
            try:
                return checkout(self)
            finally:
                block.stop()

        namespace = {
            "__slots__": (),
            "__module__": cls.__module__,
            "__doc__": cls.__doc__,
            "connect": connect,
            "_loopwatch_timed": True,
        }
        timed = _classes[cls] = type(cls.__name__, (cls,), namespace)
    pool.__class__ = timed


__all__ = ["create_async_engine", "instrument"]
