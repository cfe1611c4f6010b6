"""Small apps for the record-file and worker tests.

``make_app`` builds an app in the test process itself (driven through httpx's
ASGITransport), so a test can look at the writer's counters; ``create_app`` is a factory
for ``uvicorn --factory tests.file_apps:create_app``, configured by environment variables:
LOOPWATCH_FILE (the record file) and LOOPWATCH_SAMPLE_INTERVAL (seconds).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from loopwatch import LoopWatch


async def ready(request: Request) -> Response:
    return PlainTextResponse("ok")


async def plain(request: Request) -> Response:
    return PlainTextResponse("hello")


async def sleep(request: Request) -> Response:
    await asyncio.sleep(float(request.query_params.get("ms", "0")) / 1000)
    return PlainTextResponse("slept")


async def pid(request: Request) -> Response:
    return PlainTextResponse(str(os.getpid()))


def make_app(**loopwatch_kwargs: Any) -> LoopWatch:
    routes = [
        Route("/ready", ready),
        Route("/plain", plain),
        Route("/sleep", sleep),
        Route("/pid", pid),
    ]
    return LoopWatch(Starlette(routes=routes), **loopwatch_kwargs)


def create_app() -> LoopWatch:
    interval = float(os.environ.get("LOOPWATCH_SAMPLE_INTERVAL", "0.5"))
    return make_app(sample_interval=interval)
