"""A FastAPI app on Tortoise ORM through loopwatch's engine, served by uvicorn in
test_tortoise's subprocesses. Configured by environment variables: LOOPWATCH_FILE (the
record file), LOOPWATCH_TEST_DSN (PostgreSQL, as a Tortoise db_url), POOL_MAX (the pool's
size, given as the URL's ``maxsize`` option), LAZY_POOL (no schemas generated at startup,
so Tortoise creates its pool at the first query, inside that request).

Tortoise is set up the way the docs tell users to: ``RegisterTortoise`` in the lifespan
(``Tortoise.init`` before Tortoise 0.21), with
``loopwatch.integrations.tortoise.config(db_url, modules)``. Each endpoint measures
what it did itself and returns it: the ground truth its record is checked against.

Importing it needs no environment (test_tortoise uses its model in-process).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fastapi import FastAPI
from tortoise import Tortoise, fields
from tortoise.connection import connections
from tortoise.models import Model
from tortoise.transactions import in_transaction

import loopwatch.integrations.tortoise as lw_tortoise
from loopwatch import LoopWatch

from .helpers import burn_cpu

T = TypeVar("T")
MODULES = {"models": ["tests.tortoise_app"]}


class Item(Model):
    # The primary key: Tortoise's default "id" (primary_key= is Tortoise 0.21 and later).
    name = fields.CharField(max_length=40)

    class Meta:
        table = "loopwatch_tortoise_item"


def db_url(dsn: str, **options: str) -> str:
    """``dsn`` as a Tortoise URL (``postgres://``: Tortoise 0.x knows no ``postgresql``),
    with ``options`` added to its query string (Tortoise reads them there)."""
    url = urlsplit(dsn)
    query = [*parse_qsl(url.query), *options.items()]
    socket = dict(query).get("host")
    if socket and not url.hostname:
        # Tortoise 0.x drops a unix socket's ?host=; asyncpg reads PGHOST instead.
        os.environ.setdefault("PGHOST", socket)
    return urlunsplit(url._replace(scheme="postgres", query=urlencode(query)))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    url = db_url(os.environ["LOOPWATCH_TEST_DSN"], maxsize=os.environ.get("POOL_MAX", "5"))
    config = lw_tortoise.config(url, MODULES)
    # generate_schemas also creates the pool now, outside any request.
    generate_schemas = not os.environ.get("LAZY_POOL")
    try:
        from tortoise.contrib.fastapi import RegisterTortoise  # Tortoise 0.21 and later
    except ImportError:
        await Tortoise.init(config=config)
        try:
            if generate_schemas:
                await Tortoise.generate_schemas()
            yield
        finally:
            await Tortoise.close_connections()
        return
    async with RegisterTortoise(app, config=config, generate_schemas=generate_schemas):
        yield


app = FastAPI(lifespan=lifespan)
app.add_middleware(LoopWatch)


@app.get("/ready")
async def ready() -> str:
    return "ok"


async def measured(truth: dict[str, float], awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; add to ``truth`` its wall time and the part of it the request
    was suspended (waiting for PostgreSQL): neither running on this thread nor, runnable,
    waiting for a CPU that other processes had (on a busy machine, the ORM's CPU work is
    preempted too)."""
    d0 = run_delay_ns()
    w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
    result = await awaitable
    wall, cpu = time.perf_counter_ns() - w0, time.thread_time_ns() - c0
    delay = run_delay_ns() - d0
    truth["db_wall_ms"] += wall / 1e6
    truth["db_ms"] += (wall - cpu - delay) / 1e6
    return result


def run_delay_ns() -> int:
    """How long this thread has waited for a CPU while runnable (Linux's schedstat;
    0 where there is none)."""
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as f:
            return int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0


@app.get("/work/{n}")
async def work(n: int, tag: str, cpu: float = 0, db: float = 0) -> dict[str, Any]:
    """A known CPU burn, two ORM queries and a raw ``pg_sleep`` of a known length.
    ``tag``: the test run's, in the row's name (the table outlives the server)."""
    truth: dict[str, Any] = {"n": n, "db_ms": 0.0, "db_wall_ms": 0.0}
    truth["cpu_ms"] = burn_cpu(cpu)
    name = f"{tag}-{n}"
    await measured(truth, Item.create(name=name))
    client = connections.get("default")
    await measured(truth, client.execute_query("SELECT pg_sleep($1)", [db / 1000]))
    truth["count"] = await measured(truth, Item.filter(name=name).count())
    return truth


@app.get("/hold/{n}")
async def hold(n: int, how: str, db: float = 100) -> dict[str, Any]:
    """Hold a pooled connection through a ``pg_sleep``, in a transaction or not.

    ``t0``: before asking for the connection; ``t1``: holding it; ``t2``: released. In a
    transaction ``t1 - t0`` is the wait for the connection and the BEGIN (Tortoise runs
    both inside ``in_transaction()``); with ``acquire_connection()`` it is the wait alone
    (and the pool's creation, when this is the first query).
    """
    client = connections.get("default")
    t0 = time.perf_counter()
    if how == "transaction":
        async with in_transaction() as tx:
            t1 = time.perf_counter()
            await tx.execute_query("SELECT pg_sleep($1)", [db / 1000])
    else:
        async with client.acquire_connection() as connection:
            t1 = time.perf_counter()
            await connection.fetchval("SELECT pg_sleep($1)", db / 1000)
    t2 = time.perf_counter()
    return {"n": n, "t0": t0 * 1000, "t1": t1 * 1000, "t2": t2 * 1000}
