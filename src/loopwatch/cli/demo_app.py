"""The app ``loopwatch demo`` serves: Starlette, LoopWatch, and a pool of 15 connections.

Run by uvicorn in its own process (``--factory loopwatch.cli.demo_app:create_app``) so the
memory and CPU it records are the server's alone. Configured by LOOPWATCH_DEMO_DSN and
LOOPWATCH_FILE.
"""

from __future__ import annotations

import contextlib
import os
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


def _create_starlette(dsn: str) -> Starlette:
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

    return Starlette(
        routes=[Route("/items/{item_id:int}", item)],
        middleware=[Middleware(LoopWatch)],
        lifespan=lifespan,
    )
