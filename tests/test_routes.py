"""Route templates, and the README's usage: ``app.add_middleware(LoopWatch)``."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from loopwatch import LoopWatch, RequestRecord


async def _get(app: object, *paths: str) -> None:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for path in paths:
            await client.get(path)


async def test_fastapi_add_middleware_records_route_templates() -> None:
    records: list[RequestRecord] = []
    app = FastAPI()
    app.add_middleware(LoopWatch, file=None, sinks=[records.append])

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    await _get(app, "/items/7", "/nowhere")
    by_path = {r.path: r for r in records}
    assert by_path["/items/7"].route == "/items/{item_id}"
    assert by_path["/items/7"].status == 200
    assert by_path["/nowhere"].route is None
    assert by_path["/nowhere"].status == 404


async def _text(request: Request) -> Response:
    return PlainTextResponse("x")


async def test_starlette_routes_mounts_and_shared_endpoints() -> None:
    records: list[RequestRecord] = []
    inner = [Route("/users/{user_id:int}", _text), Route("/about", _text)]
    app = Starlette(
        routes=[
            Route("/a/{x}", _text),
            Route("/b/{y}/c", _text),  # the same endpoint as /a/{x}: matched by path
            Mount("/api", routes=inner),
        ]
    )
    app.add_middleware(LoopWatch, file=None, sinks=[records.append])
    await _get(app, "/a/1", "/b/2/c", "/api/users/3", "/api/about")
    assert [r.route for r in records] == [
        "/a/{x}",
        "/b/{y}/c",
        "/api/users/{user_id}",
        "/api/about",
    ]


async def test_mount_under_a_root_path() -> None:
    records: list[RequestRecord] = []
    app = Starlette(routes=[Mount("/v1", routes=[Route("/things/{n}", _text)])])
    app.add_middleware(LoopWatch, file=None, sinks=[records.append])
    transport = httpx.ASGITransport(app=app, root_path="/prefix")
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/prefix/v1/things/5")
    assert records[0].route == "/v1/things/{n}"
