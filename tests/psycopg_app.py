"""A psycopg 3 app served by uvicorn in the tests' subprocesses (tests/test_psycopg.py).

LOOPWATCH_FILE (the record file), LOOPWATCH_TEST_DSN (PostgreSQL), POOL_MAX (pool size).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from loopwatch import LoopWatch
from loopwatch.integrations.psycopg import AsyncConnectionPool

from .helpers import burn_cpu

DSN = os.environ.get("LOOPWATCH_TEST_DSN", "")
POOL_MAX = int(os.environ.get("POOL_MAX", "5"))


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        DSN, min_size=1, max_size=POOL_MAX, open=False
    )
    async with pool:
        await pool.wait()
        app.state.pool = pool
        yield


async def ready(request: Request) -> Response:
    return PlainTextResponse("ok")


async def work(request: Request) -> Response:
    """Burn a known CPU time, then hold a pooled connection through a known pg_sleep and a
    second query; the block's end commits.

    Returns what the endpoint measured itself: the ground truth the record is checked
    against. Its round trips: the BEGIN psycopg sends first, the two statements, and the
    COMMIT of ``connection()``'s end.
    """
    n = request.path_params["n"]
    cpu = float(request.query_params.get("cpu", "0"))
    db = float(request.query_params.get("db", "0"))
    truth: dict[str, Any] = {"n": n, "statements": 2, "queries": 4}
    truth["cpu_ms"] = burn_cpu(cpu)
    pool = request.app.state.pool
    t0 = time.perf_counter()
    async with pool.connection() as conn:
        t1 = time.perf_counter()
        await conn.execute("SELECT pg_sleep(%s)", (db / 1000,))
        cur = await conn.execute("SELECT %s::int", (n,))
        t2 = time.perf_counter()
        row = await cur.fetchone()  # the rows are here already: no wait
        t3 = time.perf_counter()
    t4 = time.perf_counter()  # the COMMIT, and the connection back in the pool
    truth["value"] = row[0]
    truth["pool_ms"] = (t1 - t0) * 1000
    truth["db_ms"] = (t2 - t1 + t4 - t3) * 1000
    return JSONResponse(truth)


app = Starlette(
    routes=[Route("/ready", ready), Route("/work/{n:int}", work)],
    middleware=[Middleware(LoopWatch)],
    lifespan=lifespan,
)
