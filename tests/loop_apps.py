"""An app whose endpoints block the event loop, served by uvicorn in the loop tests.

``GET /q/{n}`` runs one tiny query (``?pg_sleep_ms=N``: one PostgreSQL sleeps in) and
returns what it measured itself: the pool wait, the time it awaited the query, and
PostgreSQL's own clock when the query ran, so the test knows when the reply left the
server. ``POST /block?kind=cpu|sleep&ms=N`` holds the loop for N ms and says how long it
did: a CPU-heavy hash, or ``time.sleep`` in an ``async def`` (the lines marked
``BLOCK-...`` are the ones a stall's stack must name). With ``BACKGROUND_STALL_MS`` set,
a task started at start-up sleeps on the loop once, with no request in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from loopwatch import LoopWatch, create_pool

DSN = os.environ.get("LOOPWATCH_TEST_DSN", "")
POOL_MAX = int(os.environ.get("POOL_MAX", "5"))
BACKGROUND_STALL_MS = float(os.environ.get("BACKGROUND_STALL_MS", "0"))
BACKGROUND_DELAY_S = 0.5
QUERY = "SELECT extract(epoch FROM clock_timestamp())::float8"


def _hash_rounds_per_ms() -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.thread_time()
        hashlib.pbkdf2_hmac("sha256", b"password", b"salt", 20_000)
        best = min(best, time.thread_time() - t0)
    return 20_000 / max(best * 1000, 1e-3)


ROUNDS_PER_MS = _hash_rounds_per_ms()


async def background_stall() -> None:
    await asyncio.sleep(BACKGROUND_DELAY_S)
    time.sleep(BACKGROUND_STALL_MS / 1000)  # BLOCK-BACKGROUND  # noqa: ASYNC251


async def _no_reset(conn: Any) -> None:
    pass


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    task = asyncio.create_task(background_stall()) if BACKGROUND_STALL_MS else None
    # No reset query on release: the query is the endpoint's only round trip.
    # (asyncpg added the reset argument in 0.30; before it, the reset runs on release.)
    no_reset = {"reset": _no_reset} if hasattr(asyncpg.Connection, "fetchmany") else {}
    async with create_pool(DSN, min_size=POOL_MAX, max_size=POOL_MAX, **no_reset) as pool:
        # Every connection prepares the query once now: later it is one round trip.
        held = [await pool.acquire() for _ in range(POOL_MAX)]
        for conn in held:
            await conn.fetchval(QUERY)
            await pool.release(conn)
        app.state.pool = pool
        yield
    if task is not None:
        task.cancel()


async def ready(request: Request) -> Response:
    return PlainTextResponse("ok")


async def query(request: Request) -> Response:
    truth: dict[str, Any] = {"n": request.path_params["n"]}
    t0 = time.time()
    async with request.app.state.pool.acquire() as conn:
        t1 = time.time()
        pg_sleep = float(request.query_params.get("pg_sleep_ms", "0")) / 1000
        if pg_sleep:  # a query that keeps PostgreSQL busy, the loop free meanwhile
            done = await conn.fetchval(f"{QUERY} FROM pg_sleep($1)", pg_sleep)
        else:
            done = await conn.fetchval(QUERY)
        t2 = time.time()
    t3 = time.time()
    truth["pool_ms"] = (t1 - t0) * 1000
    truth["await_ms"] = (t2 - t1) * 1000  # the query as the endpoint saw it
    truth["db_ms"] = (done - t1) * 1000  # until PostgreSQL ran it and replied
    truth["loop_ms"] = (t2 - done) * 1000  # from the reply to the resume
    truth["release_ms"] = (t3 - t2) * 1000
    return JSONResponse(truth)


async def block(request: Request) -> Response:
    ms = float(request.query_params.get("ms", "150"))
    t0 = time.perf_counter()
    if request.query_params.get("kind") == "sleep":
        time.sleep(ms / 1000)  # BLOCK-SLEEP  # noqa: ASYNC251
    else:
        # Hashes of ~10 ms until the time asked has passed: the rounds per ms calibrated
        # at import drift with the clock speed and the load (a 150 ms block once took
        # 124 ms), and a block under the stall threshold is no stall.
        rounds = max(1, int(10 * ROUNDS_PER_MS))
        end = t0 + ms / 1000
        while time.perf_counter() < end:
            hashlib.pbkdf2_hmac("sha256", b"password", b"salt", rounds)  # BLOCK-CPU
    # How long the loop was really held.
    return JSONResponse({"held_ms": (time.perf_counter() - t0) * 1000})


app = Starlette(
    routes=[
        Route("/ready", ready),
        Route("/q/{n:int}", query),
        Route("/block", block, methods=["POST"]),
    ],
    middleware=[Middleware(LoopWatch)],
    lifespan=lifespan,
)
