"""Tortoise ORM on asyncpg: its queries, transactions and pool waits, per request.

An engine for Tortoise's config, in place of ``tortoise.backends.asyncpg``::

    import loopwatch.integrations.tortoise as lw_tortoise

    await Tortoise.init(config=lw_tortoise.config(DB_URL, modules={"models": ["app.models"]}))
    # in a config of your own: "connections": {"default": lw_tortoise.connection(DB_URL)},
    # or {"engine": "loopwatch.integrations.tortoise", "credentials": {...}}

:func:`config` takes what ``Tortoise.init(db_url=..., modules=...)`` takes and returns
the config Tortoise builds from them, with this engine: pass it as ``config=`` to
``Tortoise.init``, ``RegisterTortoise`` or ``register_tortoise``. Tortoise's own
``expand_db_url`` parses the URL, so every option in it (``minsize``, ``maxsize``,
``ssl``, ``schema``, asyncpg's ``statement_cache_size``, ...) means what it meant.

The engine's client is Tortoise's ``AsyncpgDBClient`` with one method replaced: its
pool comes from :func:`loopwatch.create_pool`. Nothing in Tortoise is patched. Per
request:

- each ORM query and each raw ``execute_query``/``execute_script``: its time awaiting
  PostgreSQL in ``db_ms``, one ``db_queries``, one ``db_statements`` (a ``bulk_create``
  outside a transaction: one statement, three queries with Tortoise's BEGIN and COMMIT
  around it); OpenTelemetry spans as for loopwatch's asyncpg pool;
- ``in_transaction()``: BEGIN, COMMIT, ROLLBACK and savepoints in ``db_ms`` and
  ``db_queries``, not in ``db_statements``;
- ``pool_wait_ms``: Tortoise takes a connection from the pool for each query outside a
  transaction, and once for a transaction; waiting for a free one is pool wait.
  Tortoise creates the pool at the first query (or ``generate_schemas``): a request
  that does has waited for a connection, and the creation is its pool wait.

What it cannot see: requests that arrive while another one creates the pool wait
outside the pool (on Tortoise's lock, in 1.x), in no category: create the pool at
startup (``generate_schemas``, or any query, in the app's lifespan). The reset asyncpg
runs as Tortoise releases a connection is ``db_ms`` but no query. The ORM's own work
(building SQL, making model instances) is CPU on the loop: ``cpu_ms``. Only the asyncpg
engine is instrumented, not Tortoise's psycopg, SQLite or MySQL ones.

Tortoise ORM 0.19 and later, 1.x included (the versions whose asyncpg client creates its
pool in ``create_pool()``). Without Tortoise, importing this module raises
``ImportError`` naming the extra. :func:`config` and :func:`connection` raise Tortoise's
``ConfigurationError`` for a URL Tortoise cannot parse, or one of another database.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any

try:
    from tortoise.backends.asyncpg.client import AsyncpgDBClient
    from tortoise.backends.base.config_generator import expand_db_url, generate_config
    from tortoise.exceptions import ConfigurationError
except ImportError as exc:  # pragma: no cover - exercised by the missing-extra test
    raise ImportError(
        "loopwatch.integrations.tortoise needs Tortoise ORM 0.19 or later with asyncpg: "
        "pip install 'loopwatch[tortoise]'"
    ) from exc

from ..timing import timed
from .asyncpg import create_pool

ENGINE = __name__
_ASYNCPG_ENGINE = "tortoise.backends.asyncpg"


class InstrumentedAsyncpgClient(AsyncpgDBClient):
    """Tortoise's asyncpg client, with its pool created by :func:`loopwatch.create_pool`."""

    async def create_pool(self, **kwargs: Any) -> Any:
        # Any: an InstrumentedPool, which passes for the asyncpg.Pool Tortoise declares.
        # Tortoise creates the pool at the first query, maybe inside a request: that
        # request waited for a connection (nothing below a pool block is recorded).
        async with timed("pool"):
            return await create_pool(None, **kwargs)


client_class = InstrumentedAsyncpgClient  # what Tortoise loads from an engine module


def connection(db_url: str) -> dict[str, Any]:
    """One connection's config, ``{"engine": ..., "credentials": ...}``, from a
    ``postgres://`` or ``asyncpg://`` URL (and ``postgresql://`` on Tortoise 1.x), parsed
    by Tortoise's ``expand_db_url``. Raises Tortoise's ``ConfigurationError`` for another
    database."""
    return _instrumented(expand_db_url(db_url), db_url)


def config(
    db_url: str,
    modules: dict[str, Iterable[str | ModuleType]],
    *,
    connection_label: str = "default",
) -> dict[str, Any]:
    """The config ``Tortoise.init(db_url=db_url, modules=modules)`` would use, with
    loopwatch's engine: pass it as ``config=`` to ``Tortoise.init``, ``RegisterTortoise``
    or ``register_tortoise``. Raises Tortoise's ``ConfigurationError`` for a URL of
    another database."""
    full: dict[str, Any] = generate_config(db_url, modules, connection_label)
    connections = full["connections"]
    connections[connection_label] = _instrumented(connections[connection_label], db_url)
    return full


def _instrumented(expanded: dict[str, Any], db_url: str) -> dict[str, Any]:
    if expanded.get("engine") != _ASYNCPG_ENGINE:
        scheme = db_url.partition(":")[0]
        raise ConfigurationError(
            f"loopwatch instruments Tortoise's asyncpg engine only: give a postgres:// "
            f"(or asyncpg://, or postgresql:// on Tortoise 1.x) URL, not {scheme}://."
        )
    return {**expanded, "engine": ENGINE}


__all__ = ["ENGINE", "InstrumentedAsyncpgClient", "client_class", "config", "connection"]
