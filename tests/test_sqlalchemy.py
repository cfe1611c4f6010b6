"""SQLAlchemy 2 asyncio and SQLModel against ground truth, under a real uvicorn and a real
PostgreSQL: each endpoint of tests/sqlalchemy_app.py measures what it did itself."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastapi
import httpx
import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool

from loopwatch.integrations import sqlalchemy as lw_sqlalchemy

from .conftest import serve
from .helpers import Server, requests_by_path
from .test_asyncpg import in_request

LOOPS = ["asyncio", "uvloop"]
# asyncpg and psycopg: connections through loopwatch's drivers (round trips counted);
# bare: SQLAlchemy's own engine, then instrument() (a statement is one query).
DRIVERS = ["asyncpg", "bare"]  # psycopg: with its integration
# What a statement of /work costs its driver: asyncpg prepares and executes (the test app
# turns asyncpg's statement cache off); psycopg sends one query; bare: counted as one.
ROUND_TRIPS = {"asyncpg": 2, "psycopg": 1, "bare": 1}


@pytest.fixture
def app_server(
    request: pytest.FixtureRequest, pg_dsn: str, record_file: Path
) -> Iterator[tuple[Server, Path, str]]:
    driver, loop, pool = request.param
    env = {
        "LOOPWATCH_FILE": str(record_file),
        "LOOPWATCH_TEST_DSN": pg_dsn,
        "DRIVER": driver,
        "POOL_MAX": str(pool),
        "GC_OFF": "1",
    }
    with serve("tests.sqlalchemy_app:app", env, loop=loop) as server:
        yield server, record_file, driver


def _get(server: Server, path: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}{path}", timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _records(path: Path, n: int) -> dict[str, dict[str, Any]]:
    return requests_by_path(path, n)


@pytest.mark.parametrize(
    "app_server", [(d, loop, 5) for d in DRIVERS for loop in LOOPS], indirect=True
)
def test_a_request_matches_what_it_measured(app_server: tuple[Server, Path, str]) -> None:
    server, records, driver = app_server
    _get(server, "/work/0?cpu=0&db=1")  # a fresh process's first request pays for imports
    truth = _get(server, "/work/1?cpu=30&db=100")
    rec = _records(records, 2)["/work/1"]

    assert truth["cpu_ms"] - 0.5 <= rec["cpu_ms"] <= truth["cpu_ms"] + 10, (truth, rec)
    # The endpoint's clock around its statements also ran SQLAlchemy's own work (compiling,
    # processing rows: CPU on the loop, loopwatch's cpu_ms beyond the burn) and waits for
    # the loop; it covers BEGIN and ROLLBACK, which the bare engine's driver runs unseen.
    assert rec["db_ms"] >= 100 - 2, rec
    orm_cpu = rec["cpu_ms"] - truth["cpu_ms"]
    assert truth["db_ms"] - 3 <= rec["db_ms"] + rec["loop_wait_ms"] + orm_cpu, (truth, rec)
    assert rec["db_ms"] <= truth["db_ms"] + 1, (truth, rec)
    assert rec["pool_wait_ms"] <= truth["pool_ms"] + 1, (truth, rec)
    assert rec["db_statements"] == truth["statements"] == 3
    # Each statement's round trips; BEGIN and ROLLBACK too when loopwatch sees the driver.
    expected = 3 * ROUND_TRIPS[driver] + (0 if driver == "bare" else 2)
    assert rec["db_queries"] == expected, rec
    kinds = {seg[0] for seg in rec["segments"]}
    assert {"cpu", "db"} <= kinds


async def _hold_three(url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=30) as client:
        responses = await asyncio.gather(*(client.get(f"{url}/hold/{i}") for i in range(3)))
    assert all(r.status_code == 200 for r in responses)
    return [r.json() for r in responses]


@pytest.mark.parametrize(
    "app_server", [(d, loop, 1) for d in DRIVERS for loop in LOOPS], indirect=True
)
def test_pool_wait_on_a_pool_of_one(app_server: tuple[Server, Path, str]) -> None:
    server, records, _ = app_server
    _get(server, "/hold/9?ms=1")  # the pool's one connection opened, outside the figures
    truths = asyncio.run(_hold_three(server.url))
    recs = _records(records, 4)

    waits = sorted(t["pool_ms"] for t in truths)
    assert waits[1] >= 90, truths  # they really queued
    assert waits[2] >= 190, truths
    for truth in truths:
        rec = recs[f"/hold/{truth['n']}"]
        # The endpoint's clock around the checkout also ran the pool's own code (CPU).
        waited = rec["pool_wait_ms"] + rec["loop_wait_ms"]
        assert waited + rec["cpu_ms"] >= truth["pool_ms"] - 2, (truth, rec)
        assert rec["pool_wait_ms"] <= truth["pool_ms"] + 1, (truth, rec)
        # Only the loop wait (a resume a loaded machine delayed) is taken out of it.
        assert rec["pool_wait_ms"] >= truth["pool_ms"] - 10 - rec["loop_wait_ms"], (truth, rec)
        assert rec["db_ms"] >= 100 - 2, rec
        assert rec["db_ms"] <= truth["db_ms"] + 1, (truth, rec)
        assert rec["db_statements"] == 1
        drawn = sum(b - a for kind, a, b in rec["segments"] if kind == "pool")
        assert abs(drawn - rec["pool_wait_ms"]) <= 0.01, rec  # the timeline shows the wait


@pytest.mark.parametrize("app_server", [("asyncpg", "asyncio", 2)], indirect=True)
def test_statements_queries_and_options(app_server: tuple[Server, Path, str]) -> None:
    server, records, _ = app_server
    twice = _get(server, "/twice")
    sqlmodel = _get(server, "/sqlmodel/apple")
    error = _get(server, "/error")
    stream = _get(server, "/stream")
    recs = _records(records, 4)

    # connect_args reached both SQLAlchemy's adapter (no statement cache: every statement
    # is prepared again) and asyncpg.connect (server_settings).
    assert twice["application_name"] == "loopwatch-sqlalchemy-test"
    rec = recs["/twice"]
    assert rec["db_statements"] == 3
    assert rec["db_queries"] == 1 + 3 * 2 + 1, rec  # BEGIN, 3 x (prepare, execute), ROLLBACK

    # SQLModel's session: INSERT and SELECT are statements, BEGIN and COMMIT are not.
    rec = recs["/sqlmodel/apple"]
    assert sqlmodel["count"] >= 1
    assert rec["db_statements"] == sqlmodel["statements"] == 2, rec
    assert rec["db_queries"] >= 2 * 2 + 2, rec

    # A failing statement is still one statement, and the app sees SQLAlchemy's error.
    assert error == {"error": "ProgrammingError", "orig": "ProgrammingError"}
    assert recs["/error"]["db_statements"] == 1
    assert recs["/error"]["status"] == 200

    # A server-side cursor read 10 rows at a time: one statement, a round trip a batch.
    assert stream["rows"] == 50
    rec = recs["/stream"]
    assert rec["db_statements"] == 1, rec
    assert rec["db_queries"] >= 5, rec


@pytest.mark.parametrize("app_server", [("asyncpg", "asyncio", 2)], indirect=True)
def test_a_session_dependency_commits_inside_the_request_only_with_function_scope(
    app_server: tuple[Server, Path, str],
) -> None:
    # FastAPI 0.118 and later close a dependency with yield after the response's last
    # body: its COMMIT falls outside the request's record. Depends(..., scope="function")
    # (0.121 and later) closes it as the endpoint returns, inside. Before 0.118 it was
    # closed before the response was sent, inside. (docs/integrations.md)
    server, records, _ = app_server
    _get(server, "/depends/request")
    function_scope = httpx.get(f"{server.url}/depends/function", timeout=30).status_code != 404
    recs = _records(records, 2)
    after_response = _version(fastapi.__version__) >= (0, 118)
    # BEGIN, prepare, execute, and COMMIT when it ran inside the request
    assert recs["/depends/request"]["db_queries"] == (3 if after_response else 4)
    assert function_scope == (_version(fastapi.__version__) >= (0, 121))
    if function_scope:
        assert recs["/depends/function"]["db_queries"] == 4


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2])


def _spans(server: Server) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/spans", timeout=30)
    return list(response.json())


@pytest.mark.parametrize("otel", ["loopwatch", "with-sqlalchemy-instrumentation"])
def test_one_client_span_per_statement(pg_dsn: str, record_file: Path, otel: str) -> None:
    env = {"LOOPWATCH_FILE": str(record_file), "LOOPWATCH_TEST_DSN": pg_dsn, "DRIVER": "asyncpg"}
    env["OTEL_SQLALCHEMY" if otel != "loopwatch" else "OTEL"] = "1"
    with serve("tests.sqlalchemy_app:app", env) as server:
        _get(server, "/work/1?cpu=0&db=10")
        spans = _spans(server)
    server_spans = [
        s for s in spans if s["kind"] == "SERVER" and s["attributes"]["url.path"] == "/work/1"
    ]
    assert len(server_spans) == 1, spans
    trace_id = server_spans[0]["trace_id"]
    statements = [
        s
        for s in spans
        if s["trace_id"] == trace_id and s["kind"] == "CLIENT" and s["name"].startswith("SELECT")
    ]
    assert len(statements) == 3, spans  # not one per round trip, not two per statement
    if otel == "loopwatch":
        assert {s["scope"] for s in statements} == {"loopwatch"}
        texts = sorted(s["attributes"]["db.query.text"] for s in statements)
        # Sanitized: the literal 1 is gone, the placeholders stay.
        assert texts == ["SELECT $1::INTEGER AS anon_1", "SELECT ?", "SELECT pg_sleep($1)"]
        for span in statements:
            attributes = span["attributes"]
            assert attributes["db.system.name"] == "postgresql"
            assert attributes["db.namespace"] == "postgres" or attributes["db.namespace"]
    else:
        assert {s["scope"] for s in statements} == {"opentelemetry.instrumentation.sqlalchemy"}
    assert server_spans[0]["attributes"]["loopwatch.db_statements"] == 3


def test_instrument_an_existing_engine(pg_dsn: str) -> None:
    engine = create_async_engine(_url(pg_dsn), pool_size=2, max_overflow=0)
    assert lw_sqlalchemy.instrument(engine) is engine
    pool = engine.sync_engine.pool
    timed = type(pool)
    assert isinstance(pool, AsyncAdaptedQueuePool)
    assert timed.__name__ == "AsyncAdaptedQueuePool"
    lw_sqlalchemy.instrument(engine)  # twice: nothing more
    lw_sqlalchemy.instrument(engine.sync_engine)
    assert type(engine.sync_engine.pool) is timed
    assert len(engine.sync_engine.dialect.dispatch.do_execute) == 1
    # No connection events: they would turn SQLAlchemy's dispatch on for every statement.
    assert not engine.sync_engine._has_events

    async def dispose() -> None:
        await engine.dispose()  # recreates the pool: it stays timed

    asyncio.run(dispose())
    assert type(engine.sync_engine.pool) is timed

    other = create_async_engine(_url(pg_dsn), poolclass=NullPool)
    lw_sqlalchemy.instrument(other)
    assert isinstance(other.sync_engine.pool, NullPool)
    assert type(other.sync_engine.pool) is not NullPool

    with pytest.raises(TypeError, match="SQLAlchemy engine"):
        lw_sqlalchemy.instrument("postgresql://")  # type: ignore[arg-type]


def test_outside_a_request_nothing_is_recorded_and_nothing_changes(pg_dsn: str) -> None:
    engine: AsyncEngine = lw_sqlalchemy.create_async_engine(_url(pg_dsn))

    async def run() -> Any:
        from sqlalchemy import text

        async with engine.connect() as conn:
            value = (await conn.execute(text("SELECT 41 + 1"))).scalar_one()
            driver = (await conn.get_raw_connection()).driver_connection
        await engine.dispose()
        return value, driver

    value, driver = asyncio.run(run())
    assert value == 42
    import asyncpg

    from loopwatch import InstrumentedConnection

    assert isinstance(driver, InstrumentedConnection)
    assert isinstance(driver, asyncpg.Connection)


def test_a_missing_sqlalchemy_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['sqlalchemy'] = None\n"
        "try:\n    import loopwatch.integrations.sqlalchemy\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'loopwatch[sqlalchemy]'" in out.stdout


def _url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1).replace(
        "postgres://", "postgresql+asyncpg://", 1
    )


class DomainError(Exception):
    """What an app's own handle_error listener turns database errors into."""


async def test_an_apps_raising_error_listener_does_not_hide_statements(pg_dsn: str) -> None:
    # An app's handle_error listener that raises (a documented SQLAlchemy pattern) ends
    # the chain of listeners: loopwatch's timing, in one call around the dialect's
    # execution, never depends on one.
    engine = create_async_engine(_url(pg_dsn))

    @sqlalchemy.event.listens_for(engine.sync_engine, "handle_error")
    def translate(context: Any) -> None:
        raise DomainError("translated") from context.original_exception

    lw_sqlalchemy.instrument(engine)

    async def body() -> None:
        async with engine.connect() as conn:
            with pytest.raises(DomainError):
                await conn.execute(sqlalchemy.text("SELECT 1/0"))
            await conn.rollback()
            for _ in range(3):
                await conn.execute(sqlalchemy.text("SELECT pg_sleep(0.01)"))

    rec = await in_request(body)
    await engine.dispose()
    assert rec.db_statements == 4, rec
    assert rec.db_ms >= 30 - 1, rec


async def test_an_engine_with_execution_options_counts_each_statement_once(pg_dsn: str) -> None:
    # An engine from execution_options() fires its parent's listeners too: instrumenting
    # both must not start two blocks per statement.
    engine = lw_sqlalchemy.create_async_engine(_url(pg_dsn))
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    lw_sqlalchemy.instrument(autocommit)

    async def body() -> None:
        async with autocommit.connect() as conn:
            for _ in range(3):
                await conn.execute(sqlalchemy.text("SELECT pg_sleep(0.01)"))

    rec = await in_request(body)
    await engine.dispose()
    assert rec.db_statements == 3, rec
    assert rec.db_queries == 1 + 3, rec  # a prepare (then cached), 3 executes; no BEGIN


async def test_a_bulk_insert_in_batches_is_a_statement_per_batch(pg_dsn: str) -> None:
    # SQLAlchemy sends an INSERT ... RETURNING of many rows in batches of 1,000
    # ("insertmanyvalues"): each batch is a statement sent (docs/integrations.md).
    engine = lw_sqlalchemy.create_async_engine(_url(pg_dsn))
    table = sqlalchemy.Table(
        "lw_bulk",
        sqlalchemy.MetaData(),
        sqlalchemy.Column("id", sqlalchemy.Integer, primary_key=True),
    )
    async with engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)

    async def body() -> None:
        async with engine.begin() as conn:
            rows = [{"id": i} for i in range(2500)]
            result = await conn.execute(sqlalchemy.insert(table).returning(table.c.id), rows)
            assert len(result.all()) == 2500

    rec = await in_request(body)
    async with engine.begin() as conn:
        await conn.run_sync(table.metadata.drop_all)
    await engine.dispose()
    assert rec.db_statements == 3, rec  # 3 batches of INSERT ... RETURNING


async def test_a_sync_engine_in_def_endpoints(pg_dsn: str) -> None:
    # A def endpoint runs in a thread while its request awaits it: the statement and the
    # wait for the pool's one connection, in that thread, are the request's waits.
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    from loopwatch import LoopWatch
    from loopwatch.record import RequestRecord

    url = _url(pg_dsn).replace("+asyncpg", "+psycopg", 1)
    engine = sqlalchemy.create_engine(url, pool_size=1, max_overflow=0)
    lw_sqlalchemy.instrument(engine)

    def endpoint(request: Request) -> Response:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_sleep(0.1)"))
        return PlainTextResponse("ok")

    records: list[RequestRecord] = []
    app = LoopWatch(Starlette(routes=[Route("/q", endpoint)]), file=None, sinks=[records.append])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        responses = await asyncio.gather(c.get("/q"), c.get("/q"))
    engine.dispose()
    assert [r.status_code for r in responses] == [200, 200]
    assert len(records) == 2
    for rec in records:
        assert rec.db_ms >= 100 - 1, rec
        assert rec.db_statements == 1, rec
    assert max(r.pool_wait_ms for r in records) >= 90, records  # the second one waited
