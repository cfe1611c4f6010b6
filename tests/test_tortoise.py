"""Tortoise ORM through loopwatch's engine, against a real PostgreSQL.

The ground-truth tests serve tests/tortoise_app.py (FastAPI, RegisterTortoise with
``loopwatch.integrations.tortoise.config``) under a real uvicorn; each endpoint measures
what it did itself and the record must agree. Tolerances as in test_ground_truth.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from tortoise import Tortoise
from tortoise.backends.base.config_generator import DB_LOOKUP, expand_db_url, generate_config
from tortoise.connection import connections
from tortoise.exceptions import ConfigurationError, OperationalError
from tortoise.transactions import in_transaction

import loopwatch.integrations.tortoise as lw_tortoise
from loopwatch import InstrumentedConnection, InstrumentedPool, LoopWatch
from loopwatch.record import RequestRecord

from .conftest import ROOT, serve
from .helpers import requests_in
from .test_ground_truth import LOOPS, by_path
from .tortoise_app import MODULES, Item, db_url

URL = "postgres://app:s%40cret@db.example:6543/shop?maxsize=7&minsize=2&ssl=true&schema=s1"


# The config helpers.


def test_connection_keeps_every_url_option() -> None:
    entry = lw_tortoise.connection(URL)
    assert entry == {"engine": "loopwatch.integrations.tortoise", **_credentials(URL)}
    assert entry["credentials"]["password"] == "s@cret"
    assert entry["credentials"]["maxsize"] == "7"  # Tortoise's own parsing, kept as is


def test_config_is_tortoises_with_loopwatchs_engine() -> None:
    modules = {"models": ["app.models"], "other": ["app.other"]}
    expected = generate_config(URL, modules, "main")
    expected["connections"]["main"]["engine"] = lw_tortoise.ENGINE
    assert lw_tortoise.config(URL, modules, connection_label="main") == expected


ASYNCPG_ENGINE = "tortoise.backends.asyncpg"
# Those Tortoise maps to its asyncpg engine (postgresql:// since Tortoise 1.0).
ASYNCPG_SCHEMES = sorted(k for k, v in DB_LOOKUP.items() if v["engine"] == ASYNCPG_ENGINE)


@pytest.mark.parametrize("scheme", ASYNCPG_SCHEMES)
def test_every_asyncpg_scheme_is_accepted(scheme: str) -> None:
    entry = lw_tortoise.connection(f"{scheme}://u@h/d")
    assert entry["engine"] == lw_tortoise.ENGINE
    assert entry["credentials"]["database"] == "d"


@pytest.mark.parametrize("url", ["psycopg://u@h/d", "sqlite://:memory:", "mysql://u@h/d"])
def test_another_engine_is_a_configuration_error(url: str) -> None:
    scheme = url.partition(":")[0]
    with pytest.raises(ConfigurationError, match=f"asyncpg engine only.*not {scheme}://"):
        lw_tortoise.connection(url)
    with pytest.raises(ConfigurationError, match="asyncpg engine only"):
        lw_tortoise.config(url, {"models": ["app.models"]})


def test_missing_tortoise_names_the_extra() -> None:
    code = "import sys; sys.modules['tortoise'] = None; import loopwatch.integrations.tortoise"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: loopwatch.integrations.tortoise needs Tortoise ORM")
    assert "pip install 'loopwatch[tortoise]'" in last


def _credentials(url: str) -> dict[str, Any]:
    return {"credentials": expand_db_url(url)["credentials"]}


# Tortoise on the engine, in-process and outside any request: the proxies only forward.


async def test_tortoise_works_the_same_on_the_engine(pg_dsn: str) -> None:
    # The same work on Tortoise's own asyncpg engine and on loopwatch's: the same rows.
    seen = {}
    for engine in (ASYNCPG_ENGINE, lw_tortoise.ENGINE):
        config = lw_tortoise.config(db_url(pg_dsn, maxsize="2"), MODULES)
        config["connections"]["default"]["engine"] = engine
        await Tortoise.init(config=config)
        try:
            seen[engine] = await _orm_work(engine == lw_tortoise.ENGINE)
        finally:
            await Tortoise.close_connections()
            await Tortoise._reset_apps()
    assert seen[lw_tortoise.ENGINE] == seen[ASYNCPG_ENGINE]
    assert seen[lw_tortoise.ENGINE][:3] == ["same-1", "same-2", "same-3"]


async def _orm_work(instrumented: bool) -> list[str]:
    """Rows made through every path of Tortoise's client, and rolled back; the names of
    those that stayed."""
    await Tortoise.generate_schemas()
    client = connections.get("default")
    if instrumented:
        assert type(client) is lw_tortoise.InstrumentedAsyncpgClient
        assert type(client._pool) is InstrumentedPool
        assert client._pool.get_max_size() == 2  # the URL's maxsize

    await Item.filter(name__startswith="same-").delete()
    await Item.create(name="same-1")
    await Item.bulk_create([Item(name="same-2"), Item(name="same-3")])  # execute_many
    with pytest.raises(RuntimeError):
        await _rolled_back("same-rolled-back")
    async with in_transaction() as tx:
        if instrumented:
            assert isinstance(tx._connection, InstrumentedConnection)
        await Item.create(name="same-4", using_db=tx)
        with pytest.raises(RuntimeError):
            await _rolled_back("same-nested")  # a savepoint (Tortoise 0.22 and later)
    with pytest.raises(OperationalError):  # Tortoise's translation of asyncpg's error
        await client.execute_query("SELECT * FROM no_such_table")
    await client.execute_script("SELECT 1; SELECT 2")

    # Every connection went back to the pool (through the proxy: asyncpg's own release()
    # refuses a proxy).
    assert client._pool.get_idle_size() == client._pool.get_size()
    rows = Item.filter(name__startswith="same-").order_by("name")
    return list(await rows.values_list("name", flat=True))


async def _rolled_back(name: str) -> None:
    async with in_transaction() as tx:
        await Item.create(name=name, using_db=tx)
        raise RuntimeError


# Each of Tortoise's paths, counted (in-process: LoopWatch around a tiny app).


async def _bulk_create() -> None:
    await Item.bulk_create([Item(name="paths-1"), Item(name="paths-2")])


async def _in_transaction() -> None:
    async with in_transaction() as tx:
        await Item.create(name="paths-tx", using_db=tx)


PATHS: dict[str, tuple[Callable[[], Awaitable[Any]], int, int]] = {
    # what the endpoint does: (it, db_queries, db_statements)
    "create": (lambda: Item.create(name="paths-0"), 1, 1),
    "count": (lambda: Item.filter(name="paths-0").count(), 1, 1),
    "raw": (lambda: connections.get("default").execute_query("SELECT 1"), 1, 1),
    "script": (lambda: connections.get("default").execute_script("SELECT 1; SELECT 2"), 1, 1),
    "bulk_create": (_bulk_create, 3, 1),  # BEGIN, the INSERTs, COMMIT
    "transaction": (_in_transaction, 3, 1),  # BEGIN, INSERT, COMMIT
}


async def test_each_path_counts_its_round_trips_and_statements(pg_dsn: str) -> None:
    records: list[RequestRecord] = []

    async def endpoint(request: Request) -> Response:
        await PATHS[request.path_params["name"]][0]()
        return PlainTextResponse("ok")

    app = LoopWatch(
        Starlette(routes=[Route("/{name}", endpoint)]), file=None, sinks=[records.append]
    )
    await Tortoise.init(config=lw_tortoise.config(db_url(pg_dsn), MODULES))
    try:
        await Tortoise.generate_schemas()  # the pool too: no request creates it
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for name in PATHS:
                assert (await client.get(f"/{name}")).status_code == 200
    finally:
        await Tortoise.close_connections()
        await Tortoise._reset_apps()
    assert len(records) == len(PATHS)
    for name, rec in zip(PATHS, records, strict=True):
        expected = PATHS[name][1:]
        assert (rec.db_queries, rec.db_statements) == expected, (name, rec)
        assert rec.db_ms > 0, (name, rec)
        assert rec.pool_wait_ms == 0, (name, rec)


# Ground truth under uvicorn.


def _wait_for_paths(record_file: Path, prefix: str, n: int) -> dict[str, dict[str, Any]]:
    """The records of paths starting with ``prefix``, once there are ``n`` of them (the
    record file also has the readiness probes, as many as it took)."""
    deadline = time.monotonic() + 10
    while True:
        found = by_path(requests_in(record_file), prefix) if record_file.exists() else {}
        if len(found) >= n or time.monotonic() > deadline:
            assert len(found) >= n, found
            return found
        time.sleep(0.05)


def _env(pg_dsn: str, record_file: Path, pool_max: int) -> dict[str, str]:
    return {
        "LOOPWATCH_FILE": str(record_file),
        "LOOPWATCH_TEST_DSN": pg_dsn,
        "POOL_MAX": str(pool_max),
    }


@pytest.mark.parametrize("loop", LOOPS)
def test_orm_request_matches_ground_truth(pg_dsn: str, record_file: Path, loop: str) -> None:
    with serve("tests.tortoise_app:app", _env(pg_dsn, record_file, 5), loop=loop) as server:
        # The first request of a fresh process pays for imports and first statements.
        tag = uuid.uuid4().hex[:12]
        warm_up = httpx.get(f"{server.url}/work/0?tag={tag}&cpu=0&db=1", timeout=30)
        assert warm_up.status_code == 200
        resp = httpx.get(f"{server.url}/work/1?tag={tag}&cpu=30&db=100", timeout=30)
        truth = resp.json()
        rec = _wait_for_paths(record_file, "/work/", 2)["/work/1"]

    assert rec["status"] == 200
    assert rec["route"] == "/work/{n}"
    assert truth["count"] == 1
    assert truth["cpu_ms"] - 0.5 <= rec["cpu_ms"] <= truth["cpu_ms"] + 10, (truth, rec)
    # truth db_ms: the time the endpoint's awaits were suspended, db_wall_ms: their wall
    # time. loopwatch's intervals also hold the driver's CPU inside them (not the ORM's
    # around them), and a wait for the loop is loop wait.
    assert truth["db_ms"] - 1 <= rec["db_ms"] + rec["loop_wait_ms"], (truth, rec)
    assert rec["db_ms"] <= truth["db_wall_ms"] + 1, (truth, rec)
    assert rec["db_ms"] >= 100 - 2, rec
    # INSERT, pg_sleep, COUNT: one round trip and one statement each. The pool had an
    # idle connection for each: no wait.
    assert rec["db_queries"] == 3, rec
    assert rec["db_statements"] == 3, rec
    assert rec["pool_wait_ms"] < 1, rec
    assert rec["wall_ms"] >= rec["cpu_ms"] + rec["db_ms"] - 1


async def _hold_all(url: str, how: str, n: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=60) as client:
        responses = await asyncio.gather(
            *(client.get(f"{url}/hold/{i}?how={how}&db=100") for i in range(n))
        )
    assert all(r.status_code == 200 for r in responses)
    return [r.json() for r in responses]


@pytest.mark.parametrize("how", ["transaction", "connection"])
@pytest.mark.parametrize("loop", LOOPS)
def test_pool_of_one_makes_requests_wait(
    pg_dsn: str, record_file: Path, loop: str, how: str
) -> None:
    # Three requests at once, each holding the pool's one connection for 100 ms: they
    # get it one after the other, each as the one before releases it.
    with serve("tests.tortoise_app:app", _env(pg_dsn, record_file, 1), loop=loop) as server:
        assert httpx.get(f"{server.url}/hold/9?how={how}&db=1", timeout=30).status_code == 200
        truths = asyncio.run(_hold_all(server.url, how, 3))
        records = _wait_for_paths(record_file, "/hold/", 4)

    truths.sort(key=lambda t: t["t1"])  # in the order they got the connection
    waits = []
    for k, truth in enumerate(truths):
        rec = records[f"/hold/{truth['n']}"]
        # The wait, and in a transaction the BEGIN: no way to time the wait alone there,
        # so the truth is the ordering's.
        entered = truth["t1"] - truth["t0"]
        # From the ordering: the connection came when the request before released it.
        derived = 0.0 if k == 0 else max(0.0, truths[k - 1]["t2"] - truth["t0"])
        # A wait for the loop inside the pool wait (the other requests' CPU) is loop
        # wait: the two together are at least what the endpoint saw.
        waited = rec["pool_wait_ms"] + rec["loop_wait_ms"]
        assert rec["pool_wait_ms"] <= entered + 1, (truth, rec)
        assert rec["pool_wait_ms"] <= derived + 5, (k, derived, truth, rec)
        assert derived - 5 <= waited, (k, derived, truth, rec)
        if how == "connection":  # the endpoint measured the wait alone
            assert entered - 2 <= waited, (truth, rec)
        # pg_sleep, and in a transaction BEGIN and COMMIT: no statements of their own.
        assert rec["db_queries"] == (3 if how == "transaction" else 1), rec
        assert rec["db_statements"] == 1, rec
        assert rec["db_ms"] >= 100 - 2, rec
        waits.append(rec["pool_wait_ms"])
    assert waits[0] < 5, waits
    assert waits[1] >= 100 - 20, waits  # minus how much later the second one asked
    assert waits[2] >= waits[1] + 100 - 10, waits


def test_pool_created_in_a_request_is_its_pool_wait(pg_dsn: str, record_file: Path) -> None:
    # Tortoise creates its pool at the first query: that request waited for a connection
    # while the pool opened it. Its setup queries are no queries of the request's.
    env = {**_env(pg_dsn, record_file, 1), "LAZY_POOL": "1"}
    with serve("tests.tortoise_app:app", env) as server:
        resp = httpx.get(f"{server.url}/hold/0?how=connection&db=10", timeout=30)
        truth = resp.json()
        rec = _wait_for_paths(record_file, "/hold/", 1)["/hold/0"]
    entered = truth["t1"] - truth["t0"]
    assert entered >= 1, truth  # connecting to PostgreSQL takes a few ms
    assert entered - 2 <= rec["pool_wait_ms"] + rec["loop_wait_ms"], (truth, rec)
    assert rec["pool_wait_ms"] <= entered + 1, (truth, rec)
    assert rec["db_queries"] == 1, rec
    assert rec["db_statements"] == 1, rec
