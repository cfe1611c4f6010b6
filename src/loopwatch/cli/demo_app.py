"""The app ``loopwatch demo`` serves: Starlette, LoopWatch, and a pool of 15 connections.

Run by uvicorn in its own process (``--factory loopwatch.cli.demo_app:create_app``) so the
memory and CPU it records are the server's alone. Configured by LOOPWATCH_DEMO_DSN and
LOOPWATCH_FILE.

``/items/{item_id}`` is the well-behaved endpoint. ``/hash/{item_id}`` and
``/sleep/{item_id}`` are the demo's deliberate mistakes (``loopwatch demo --blocking``):
each holds the event loop for BLOCK_SECONDS, so every other request waits.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import LoopWatch, create_pool

POOL_SIZE = 15
QUERY_SECONDS = 0.05
BLOCK_SECONDS = 0.15  # what each blocking endpoint holds the loop for


def create_app() -> ASGIApp:
    """The demo app, behind a readiness probe that is answered outside LoopWatch (so the
    demo's own polling stays out of the report)."""
    app = _create_starlette(os.environ["LOOPWATCH_DEMO_DSN"])
    ready = PlainTextResponse("ok")

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/ready":
            await ready(scope, receive, send)
        else:
            await app(scope, receive, send)

    return dispatch


def pbkdf2_iterations(seconds: float) -> int:
    """How many PBKDF2-SHA256 iterations take ``seconds`` of CPU on this machine."""
    n = 20_000
    while True:
        t0 = time.thread_time()
        hashlib.pbkdf2_hmac("sha256", b"password", b"salt", n)
        took = time.thread_time() - t0
        if took >= 0.05:  # long enough that a cold first run does not skew it
            return max(1, round(n * seconds / took))
        n *= 4


def _create_starlette(dsn: str) -> Starlette:
    # Calibrated once, at start-up, outside any request.
    # A tenth of the block: the hash is repeated until BLOCK_SECONDS of CPU have gone,
    # as a machine's speed varies (a calibration made under load can come out short).
    iterations = pbkdf2_iterations(BLOCK_SECONDS / 10)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE) as pool:
            app.state.pool = pool
            yield

    async def item(request: Request) -> Response:
        # A little CPU, as a real handler parses, validates and builds a response.
        checksum = sum(i * i for i in range(20_000)) % 97
        row = await request.app.state.pool.fetchrow(
            "SELECT $1::int AS id, pg_sleep($2)::text AS slept",
            request.path_params["item_id"],
            QUERY_SECONDS,
        )
        return JSONResponse({"id": row["id"], "checksum": checksum})

    # Deliberate mistake 1: CPU-heavy work (a password hash) run on the event loop.
    # Nothing else runs while it computes. The fix: `await asyncio.to_thread(...)` or
    # `await anyio.to_thread.run_sync(...)`, or a process pool for pure-Python work.
    async def hash_password(request: Request) -> Response:
        t0 = time.thread_time()
        digest = b""
        while time.thread_time() - t0 < BLOCK_SECONDS:
            digest = hashlib.pbkdf2_hmac("sha256", b"password", b"salt", iterations)
        return JSONResponse({"id": request.path_params["item_id"], "hash": digest.hex()[:16]})

    # Deliberate mistake 2: a blocking call inside an `async def` endpoint, the most
    # common async mistake (time.sleep, requests.get, a sync database driver, file I/O).
    # The fix: `await asyncio.sleep(...)`, an async client, or a plain `def` endpoint,
    # which Starlette and FastAPI run in a thread.
    async def sleep(request: Request) -> Response:
        time.sleep(BLOCK_SECONDS)  # noqa: ASYNC251 (the mistake this endpoint shows)
        return JSONResponse({"id": request.path_params["item_id"]})

    return Starlette(
        routes=[
            Route("/items/{item_id:int}", item),
            Route("/hash/{item_id:int}", hash_password),
            Route("/sleep/{item_id:int}", sleep),
        ],
        # Every request recorded, whatever LOOPWATCH_SAMPLE_RATE says: the demo draws them all.
        middleware=[Middleware(LoopWatch, sample_rate=1.0)],
        lifespan=lifespan,
    )
