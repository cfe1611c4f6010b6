"""Route templates, and the README's usage: ``app.add_middleware(LoopWatch)``.

Every way FastAPI and Starlette compose routes: routers included with prefixes, nested
and included twice, mounts (with path parameters, nested), mounted FastAPI and Starlette
apps, apps mounted whole, root_path from the server and from a mount, host routing, and
paths no route matched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi
import httpx
import pytest
import starlette
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Host, Mount, Route, Router

from loopwatch import LoopWatch, RequestRecord

from .conftest import serve
from .helpers import wait_for_requests

# Starlette 0.35 keeps root_path in the path, as ASGI servers now send it; before, the
# path a server sent left root_path out.
_ROOT_PATH_IN_PATH = tuple(int(p) for p in starlette.__version__.split(".")[:2]) >= (0, 35)
_FASTAPI = tuple(int(p) for p in fastapi.__version__.split(".")[:2])


async def _routes(
    app: Any, *paths: str, root_path: str = "", host: str = "t", method: str = "GET"
) -> list[str | None]:
    """The routes recorded for ``paths``, requested in turn; LoopWatch is added here."""
    records: list[RequestRecord] = []
    app.add_middleware(LoopWatch, file=None, sinks=[records.append])
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    base = root_path if _ROOT_PATH_IN_PATH else ""
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as client:
        for path in paths:
            await client.request(method, base + path)
    assert len(records) == len(paths)
    return [r.route for r in records]


async def _text(request: Request) -> Response:
    return PlainTextResponse("x")


async def _other(request: Request) -> Response:
    return PlainTextResponse("y")


async def _whole(scope: Any, receive: Any, send: Any) -> None:
    """An app mounted whole: static files, another framework."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"whole"})


def _users() -> APIRouter:
    users = APIRouter()

    @users.get("")
    async def list_users() -> list[int]:
        return []

    @users.get("/{user_id}")
    async def get_user(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    return users


def _c1() -> APIRouter:
    c1 = APIRouter()

    @c1.get("/list")
    async def list_c1() -> list[int]:
        return []

    return c1


async def test_fastapi_add_middleware_records_route_templates() -> None:
    records: list[RequestRecord] = []
    app = FastAPI()
    app.add_middleware(LoopWatch, file=None, sinks=[records.append])

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/items/7")
        await client.get("/nowhere")
    by_path = {r.path: r for r in records}
    assert by_path["/items/7"].route == "/items/{item_id}"
    assert by_path["/items/7"].status == 200
    assert by_path["/nowhere"].route is None
    assert by_path["/nowhere"].status == 404


async def test_router_included_with_a_prefix() -> None:
    app = FastAPI()
    app.include_router(_users(), prefix="/users")
    assert await _routes(app, "/users/3", "/users", "/users/x") == [
        "/users/{user_id}",
        "/users",
        "/users/{user_id}",  # a 422 is still the route's
    ]


async def test_nested_routers_and_a_router_included_twice() -> None:
    items = APIRouter(prefix="/items")

    @items.get("/{item_id}")
    async def get_item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    shop = APIRouter()
    shop.include_router(items, prefix="/shop")
    app = FastAPI()
    app.include_router(shop, prefix="/v1")
    app.include_router(shop, prefix="/v2")
    assert await _routes(app, "/v1/shop/items/1", "/v2/shop/items/2") == [
        "/v1/shop/items/{item_id}",
        "/v2/shop/items/{item_id}",
    ]


async def test_method_not_allowed_is_the_routes() -> None:
    app = FastAPI()
    app.include_router(_users(), prefix="/users")
    assert await _routes(app, "/users/3", method="DELETE") == ["/users/{user_id}"]


async def test_starlette_route_in_an_included_router() -> None:
    ops = APIRouter()
    ops.add_route("/health/{part}", _text)
    app = FastAPI()
    app.include_router(ops, prefix="/ops")
    app.add_route("/plain/{n}", _other)
    assert await _routes(app, "/ops/health/db", "/plain/1") == [
        "/ops/health/{part}",
        "/plain/{n}",
    ]


def _api_app() -> FastAPI:
    """The users router at /users, and a FastAPI app of its own mounted at /api/v1."""
    sub = FastAPI()
    sub.include_router(_c1(), prefix="/c1")
    app = FastAPI()
    app.include_router(_users(), prefix="/users")
    app.mount("/api/v1", sub)
    return app


async def test_mounted_fastapi_and_starlette_apps() -> None:
    app = _api_app()
    app.mount("/legacy", Starlette(routes=[Route("/things/{n}", _text)]))
    assert await _routes(app, "/api/v1/c1/list", "/legacy/things/4", "/users/1") == [
        "/api/v1/c1/list",
        "/legacy/things/{n}",
        "/users/{user_id}",
    ]


async def test_starlette_routes_mounts_and_shared_endpoints() -> None:
    inner = [Route("/users/{user_id:int}", _text), Route("/about", _text)]
    app = Starlette(
        routes=[
            Route("/a/{x}", _text),
            Route("/b/{y}/c", _text),  # the same endpoint as /a/{x}: matched by path
            Mount("/api", routes=inner),
        ]
    )
    assert await _routes(app, "/a/1", "/b/2/c", "/api/users/3", "/api/about") == [
        "/a/{x}",
        "/b/{y}/c",
        "/api/users/{user_id}",
        "/api/about",
    ]


@pytest.mark.skipif(_FASTAPI < (0, 137), reason="FastAPI before 0.137 drops a router's mounts")
async def test_mounts_in_a_router_included_with_a_prefix() -> None:
    tenant = APIRouter()
    tenant.mount("/static", _whole)
    tenant.mount("/inner", Router(routes=[Route("/p/{q}", _text)]))
    app = FastAPI()
    app.include_router(tenant, prefix="/t/{tenant}")
    paths = ["/t/acme/static/a.css", "/t/acme/inner/p/1", "/t/acme/inner/nowhere"]
    assert await _routes(app, *paths) == [
        "/t/{tenant}/static/{path}",
        "/t/{tenant}/inner/p/{q}",
        None,
    ]


async def test_mounts_nested_and_with_path_parameters() -> None:
    users = [Route("/users/{user_id:int}", _text)]
    app = Starlette(
        routes=[
            Mount("/orgs/special", routes=[Route("/x", _other)]),
            Mount("/orgs/{org}", routes=[Mount("/v1", routes=users)]),
            Mount("/files/{rest:path}", routes=[Route("/raw", _other)]),
        ]
    )
    paths = ["/orgs/acme/v1/users/3", "/orgs/special/x", "/files/a/b/raw"]
    assert await _routes(app, *paths) == [
        "/orgs/{org}/v1/users/{user_id}",
        "/orgs/special/x",
        "/files/{rest}/raw",
    ]


async def test_apps_mounted_whole_have_the_mounts_template() -> None:
    app = FastAPI()
    app.mount("/static", _whole)
    app.mount("/t/{tenant}/files", _whole)
    assert await _routes(app, "/static/css/site.css", "/t/acme/files/a.txt") == [
        "/static/{path}",
        "/t/{tenant}/files/{path}",
    ]


async def test_unmatched_paths_have_no_route() -> None:
    app = _api_app()
    app.mount("/legacy", Starlette(routes=[Route("/things/{n}", _text)]))
    app.mount("/orgs/{org}", Router(routes=[Route("/about", _text)]))
    paths = [
        "/nowhere",
        "/users/3/extra",
        "/api/v1/nowhere",
        "/api/v1/c1/nowhere",
        "/legacy/nowhere",
        "/orgs/acme/nowhere",
        "/users/3/",  # redirected to /users/3
    ]
    assert await _routes(app, *paths) == [None] * len(paths)
    # Starlette's router (from 1.7) leaves the mount in scope["route"].
    app = Starlette(
        routes=[
            Mount("/api", routes=[Route("/about", _text)]),
            Mount("/orgs/{org}", routes=[Route("/about", _text)]),
        ]
    )
    assert await _routes(app, "/api/nowhere", "/orgs/acme/nowhere", "/x") == [None] * 3


async def test_root_path_from_the_server() -> None:
    app = _api_app()
    routes = await _routes(app, "/users/3", "/api/v1/c1/list", "/nowhere", root_path="/prefix")
    assert routes == ["/users/{user_id}", "/api/v1/c1/list", None]


async def test_mount_under_a_root_path() -> None:
    app = Starlette(routes=[Mount("/v1", routes=[Route("/things/{n}", _text)])])
    assert await _routes(app, "/v1/things/5", root_path="/prefix") == ["/v1/things/{n}"]


async def test_loopwatch_inside_a_mounted_app_is_relative_to_it() -> None:
    sub = FastAPI()
    sub.include_router(_c1(), prefix="/c1")
    sub.mount("/files/{kind}", Router(routes=[Route("/{name}", _text)]))
    records: list[RequestRecord] = []
    sub.add_middleware(LoopWatch, file=None, sinks=[records.append])
    app = Starlette(routes=[Mount("/t/{tenant}", app=sub)])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/t/acme/c1/list")
        await client.get("/t/acme/files/pdf/report")
    # The mount is to this app what a server's root_path is.
    assert [r.route for r in records] == ["/c1/list", "/files/{kind}/{name}"]


async def test_routes_added_after_the_first_request() -> None:
    records: list[RequestRecord] = []
    app = FastAPI()
    app.add_route("/early/{n}", _text)
    app.add_middleware(LoopWatch, file=None, sinks=[records.append])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/early/1")
        app.add_route("/late/{n}", _other)
        await client.get("/late/2")
    assert [r.route for r in records] == ["/early/{n}", "/late/{n}"]


async def test_host_routing() -> None:
    api = FastAPI()
    api.include_router(_users(), prefix="/users")
    tenants = Router(routes=[Mount("/v1", routes=[Route("/items/{n}", _text)])])
    app = Starlette(
        routes=[
            Host("api.example.org", app=api),
            Host("{tenant}.example.org", app=tenants),
        ]
    )
    assert await _routes(app, "/users/3", "/nowhere", host="api.example.org") == [
        "/users/{user_id}",
        None,
    ]
    app = Starlette(routes=[Host("{tenant}.example.org", app=tenants)])
    assert await _routes(app, "/v1/items/2", "/v1/nowhere", host="acme.example.org") == [
        "/v1/items/{n}",
        None,
    ]


def served() -> FastAPI:
    """The app for uvicorn (``--factory``): LoopWatch writes to $LOOPWATCH_FILE."""
    app = FastAPI()
    app.include_router(_users(), prefix="/users")
    app.add_route("/ready", _text)
    app.add_middleware(LoopWatch)
    return app


@pytest.mark.skipif(not _ROOT_PATH_IN_PATH, reason="Starlette before 0.35: no root_path in path")
def test_root_path_set_by_uvicorn(record_file: Path) -> None:
    env = {"LOOPWATCH_FILE": str(record_file)}
    args = ("--factory", "--root-path", "/prefix")
    with serve("tests.test_routes:served", env, extra_args=args) as server:
        # A proxy removed the prefix; uvicorn puts it back in the path and in root_path.
        httpx.get(f"{server.url}/users/3", timeout=30)
        records = wait_for_requests(record_file, 2)
    assert [r["route"] for r in records if r["path"].endswith("/users/3")] == ["/users/{user_id}"]
