"""psycopg 3 (async) against a real PostgreSQL: statements, round trips and pool waits.

The ground truth runs tests/psycopg_app.py under a real uvicorn (asyncio and uvloop): each
endpoint measures what it did itself. The rest drive a tiny Starlette app wrapped by a
real LoopWatch in-process (httpx's ASGITransport) and read the request's record through
a sink. Timing tolerances are those of tests/test_ground_truth.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import psycopg.errors
import psycopg_pool
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from psycopg import sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import loopwatch
from loopwatch import LoopWatch
from loopwatch.integrations.psycopg import (
    AsyncConnection,
    AsyncConnectionPool,
    AsyncCursor,
    AsyncNullConnectionPool,
    AsyncServerCursor,
    _if_sent,
)
from loopwatch.record import RequestRecord

from .conftest import serve
from .helpers import burn_cpu, requests_in
from .test_ground_truth import _fire

LOOPS = ["asyncio", "uvloop"]
SLEEP_MS = 50  # of pg_sleep, in the in-process tests
# The server's clock (pg_sleep) and ours (perf_counter) may run a hair apart.
CLOCK_SLACK_MS = 0.5

Body = Callable[[], Awaitable[Any]]


# --- the ground truth, under uvicorn -------------------------------------------------------


def _get(url: str) -> dict[str, Any]:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _records(path: Path, paths: set[str], timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """The records of ``paths``, once all are written (the server's /ready may be there
    once or more besides)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {r["path"]: r for r in requests_in(path)} if path.exists() else {}
        if paths <= found.keys() or time.monotonic() > deadline:
            assert paths <= found.keys(), (paths, sorted(found))
            return found
        time.sleep(0.05)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_request_matches_what_it_measured(pg_dsn: str, record_file: Path, loop: str) -> None:
    env = {"LOOPWATCH_FILE": str(record_file), "LOOPWATCH_TEST_DSN": pg_dsn, "POOL_MAX": "2"}
    with serve("tests.psycopg_app:app", env, loop=loop) as server:
        _get(f"{server.url}/work/0?cpu=0&db=1")  # a fresh process's first request: imports
        truth = _get(f"{server.url}/work/1?cpu=30&db=100")
        rec = _records(record_file, {"/work/0", "/work/1"})["/work/1"]

    assert truth["value"] == 1
    assert rec["status"] == 200
    assert rec["route"] == "/work/{n}"
    assert truth["cpu_ms"] - 0.5 <= rec["cpu_ms"] <= truth["cpu_ms"] + 10, (truth, rec)
    # A wait for the loop inside a query is loop wait, taken out of db_ms: the two
    # together are what the endpoint saw.
    assert truth["db_ms"] - 1 <= rec["db_ms"] + rec["loop_wait_ms"], (truth, rec)
    assert rec["db_ms"] <= truth["db_ms"] + 10, (truth, rec)
    assert rec["db_ms"] >= 100 - 2, rec
    assert rec["pool_wait_ms"] <= truth["pool_ms"] + 1, (truth, rec)
    assert rec["db_statements"] == truth["statements"] == 2
    assert rec["db_queries"] == truth["queries"] == 4  # BEGIN, the two, COMMIT
    assert {"cpu", "db"} <= {seg[0] for seg in rec["segments"]}


@pytest.mark.parametrize("loop", LOOPS)
def test_a_pool_of_one_makes_requests_wait_what_they_measured(
    pg_dsn: str, record_file: Path, loop: str
) -> None:
    env = {"LOOPWATCH_FILE": str(record_file), "LOOPWATCH_TEST_DSN": pg_dsn, "POOL_MAX": "1"}
    with serve("tests.psycopg_app:app", env, loop=loop) as server:
        _get(f"{server.url}/work/9?cpu=0&db=1")  # imports, outside the figures
        truths = asyncio.run(_fire(server.url, 3, lambda i: 0, 100))
        records = _records(record_file, {f"/work/{i}" for i in range(3)})

    waits = []
    for truth in truths:
        rec = records[f"/work/{truth['n']}"]
        # The loop may have been busy as the connection came (the previous holder's
        # response): that part is loop wait.
        assert truth["pool_ms"] - 3 <= rec["pool_wait_ms"] + rec["loop_wait_ms"], (truth, rec)
        assert rec["pool_wait_ms"] <= truth["pool_ms"] + 3, (truth, rec)
        assert rec["db_ms"] >= 100 - 2, rec
        assert rec["db_queries"] == 4
        waits.append(truth["pool_ms"])
    # One connection for three holders of 100 ms: the last one waited for two of them.
    assert max(waits) >= 2 * 100 - 10, waits


# --- in-process: a tiny app, a real LoopWatch ------------------------------------------------


def watched(
    body: Body, records: list[RequestRecord], provider: TracerProvider | None = None
) -> LoopWatch:
    async def endpoint(request: Request) -> Response:
        await body()
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/q", endpoint)])
    if provider is None:
        return LoopWatch(app, file=None, sinks=[records.append])
    return LoopWatch(app, file=None, sinks=[records.append], tracer_provider=provider)


async def in_request(body: Body, provider: TracerProvider | None = None) -> RequestRecord:
    """Run ``body`` inside one HTTP request through LoopWatch; return the request's record."""
    records: list[RequestRecord] = []
    transport = httpx.ASGITransport(app=watched(body, records, provider))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/q")
    assert response.status_code == 200
    (rec,) = records
    return rec


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[AsyncConnection[Any]]:
    """A connection as psycopg opens it: transactions begin by themselves."""
    c: AsyncConnection[Any] = await AsyncConnection.connect(pg_dsn)
    yield c
    await c.close()


@pytest.fixture
async def aconn(pg_dsn: str) -> AsyncIterator[AsyncConnection[Any]]:
    """An autocommit connection: no implicit BEGIN."""
    c: AsyncConnection[Any] = await AsyncConnection.connect(pg_dsn, autocommit=True)
    yield c
    await c.close()


async def test_statements_count_the_begin_and_commit_as_queries(
    conn: AsyncConnection[Any],
) -> None:
    async def body() -> None:
        await conn.execute("SELECT pg_sleep(%s)", (SLEEP_MS / 1000,))
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
        await conn.commit()
        await conn.commit()  # nothing to commit: psycopg sends nothing

    rec = await in_request(body)
    assert rec.db_statements == 2
    assert rec.db_queries == 4  # BEGIN, the two statements, COMMIT
    assert SLEEP_MS - CLOCK_SLACK_MS <= rec.db_ms < SLEEP_MS + 150, rec


async def test_autocommit_statements_are_one_query_each(aconn: AsyncConnection[Any]) -> None:
    async def body() -> None:
        cur = aconn.cursor()
        await cur.execute("SELECT 1")
        await cur.execute(b"SELECT 2")
        await cur.execute(sql.SQL("SELECT {}").format(3))
        await aconn.rollback()  # no transaction: nothing sent

    rec = await in_request(body)
    assert (rec.db_statements, rec.db_queries) == (3, 3)


async def test_a_call_that_sends_nothing_records_nothing(aconn: AsyncConnection[Any]) -> None:
    async def body() -> None:
        await aconn.execute("SELECT 1")
        # psycopg lets the loop run (a bare yield) when it has not for 5 ms, even in a
        # call that sends nothing: that is no wait for the server.
        burn_cpu(10)
        await aconn.commit()
        async with aconn.cursor(name="lw_never") as cur:
            assert cur.name == "lw_never"  # never declared: nothing to close
            burn_cpu(10)

    rec = await in_request(body)
    assert (rec.db_statements, rec.db_queries) == (1, 1)


async def test_a_transaction_block_counts_queries_but_not_statements(
    aconn: AsyncConnection[Any],
) -> None:
    async def body() -> None:
        async with aconn.transaction():
            await aconn.execute("SELECT pg_sleep(%s)", (SLEEP_MS / 1000,))
            await aconn.execute("SELECT 1")
            async with aconn.transaction() as inner:
                assert inner.savepoint_name is not None
                await aconn.execute("SELECT 2")

    rec = await in_request(body)
    assert rec.db_statements == 3
    assert rec.db_queries == 7  # BEGIN, 2, SAVEPOINT, 1, RELEASE, COMMIT
    assert rec.db_ms >= SLEEP_MS - CLOCK_SLACK_MS


class Boom(Exception):
    pass


async def test_a_transaction_block_rolls_back_and_lets_the_error_through(
    aconn: AsyncConnection[Any],
) -> None:
    caught: list[BaseException] = []

    async def body() -> None:
        try:
            async with aconn.transaction():
                await aconn.execute("CREATE TEMP TABLE lw_gone (a int)")
                raise Boom("in the block")
        except Boom as exc:
            caught.append(exc)
        async with aconn.transaction():  # psycopg's own Rollback is swallowed, as ever
            await aconn.execute("SELECT 1")
            raise psycopg.Rollback()

    rec = await in_request(body)
    assert [str(e) for e in caught] == ["in the block"]
    assert rec.db_statements == 2
    assert rec.db_queries == 6  # BEGIN, CREATE, ROLLBACK, BEGIN, SELECT, ROLLBACK
    cur = await aconn.execute("SELECT to_regclass('lw_gone')")
    assert await cur.fetchone() == (None,)


async def test_server_side_cursor_fetches_are_queries_not_statements(
    conn: AsyncConnection[Any],
) -> None:
    got: list[Any] = []

    async def body() -> None:
        async with conn.cursor(name="lw_fetch") as cur:
            assert isinstance(cur, psycopg.AsyncServerCursor)
            await cur.execute("SELECT generate_series(1, 10)")
            got.append(await cur.fetchone())
            got.append(await cur.fetchmany(3))
            await cur.scroll(1)
            got.append(await cur.fetchall())

    rec = await in_request(body)
    assert got == [(1,), [(2,), (3,), (4,)], [(6,), (7,), (8,), (9,), (10,)]]
    assert rec.db_statements == 1
    assert rec.db_queries == 7  # BEGIN, DECLARE, FETCH, FETCH, MOVE, FETCH, CLOSE
    await conn.rollback()


async def test_server_side_cursor_batches_are_queries_rows_already_here_are_not(
    conn: AsyncConnection[Any],
) -> None:
    got: list[int] = []

    async def body() -> None:
        async with conn.cursor(name="lw_iter") as cur:
            cur.itersize = 4
            await cur.execute("SELECT generate_series(1, 10)")
            got.extend([row[0] async for row in cur])

    rec = await in_request(body)
    assert got == list(range(1, 11))
    assert rec.db_statements == 1
    assert rec.db_queries == 6  # BEGIN, DECLARE, three batches (4, 4, 2), CLOSE
    await conn.rollback()


async def test_a_cancelled_fetch_raises_as_it_would(
    conn: AsyncConnection[Any], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    caught: list[BaseException] = []

    async def body() -> None:
        async with conn.cursor(name="lw_slow") as cur:
            await cur.execute("SELECT pg_sleep(5) FROM generate_series(1, 2)")
            rows = cur.__aiter__()
            try:
                await asyncio.wait_for(rows.__anext__(), SLEEP_MS / 1000)
            except asyncio.TimeoutError as exc:  # (3.10: not yet the builtin)
                caught.append(exc)

    rec = await in_request(body, provider)
    assert len(caught) == 1
    assert rec.db_ms >= SLEEP_MS - 5, rec
    fetch = client_spans(exporter)[-1]
    assert dict(fetch.attributes or {})["db.operation.name"] == "FETCH"
    assert dict(fetch.attributes or {})["error.type"] == "asyncio.exceptions.CancelledError"
    # BEGIN, DECLARE, the FETCH cancelled; no CLOSE: the query failed with it (psycopg
    # 3.2 and later cancel it on the server) or still runs (3.1).
    assert rec.db_queries == 3


async def test_copy_is_one_statement(aconn: AsyncConnection[Any]) -> None:
    await aconn.execute("CREATE TEMP TABLE lw_copy (a int, b text)")
    copied: list[Any] = []

    async def body() -> None:
        cur = aconn.cursor()
        async with cur.copy("COPY lw_copy (a, b) FROM STDIN") as copy:
            assert isinstance(copy, psycopg.AsyncCopy)
            for i in range(100):
                await copy.write_row((i, "x"))
        async with cur.copy("COPY lw_copy TO STDOUT") as copy:
            copied.extend([row async for row in copy.rows()])

    rec = await in_request(body)
    assert len(copied) == 100
    assert rec.db_statements == 2
    # COPY FROM: the COPY, and its end (the server's answer to the data); COPY TO: the
    # COPY (its rows come with it).
    assert rec.db_queries == 3


async def test_copy_errors_propagate(aconn: AsyncConnection[Any]) -> None:
    caught: list[BaseException] = []

    async def body() -> None:
        cur = aconn.cursor()
        try:
            async with cur.copy("COPY lw_nowhere FROM STDIN"):
                pass
        except psycopg.errors.UndefinedTable as exc:
            caught.append(exc)
        await aconn.execute("CREATE TEMP TABLE lw_copy_int (a int)")
        try:
            async with cur.copy("COPY lw_copy_int FROM STDIN") as copy:
                await copy.write_row(("seven",))
        except psycopg.errors.InvalidTextRepresentation as exc:
            caught.append(exc)

    rec = await in_request(body)
    assert [type(e) for e in caught] == [
        psycopg.errors.UndefinedTable,
        psycopg.errors.InvalidTextRepresentation,
    ]
    assert rec.db_statements == 3
    assert rec.db_queries == 4  # COPY, CREATE, COPY and the end the server refused
    cur = await aconn.execute("SELECT 1")
    assert await cur.fetchone() == (1,)


async def test_stream_is_one_statement_and_closes_early(aconn: AsyncConnection[Any]) -> None:
    got: list[Any] = []

    async def body() -> None:
        cur = aconn.cursor()
        got.append([row async for row in cur.stream("SELECT generate_series(1, 5)")])
        got.append([row async for row in cur.stream("SELECT 1 WHERE false")])
        async for row in cur.stream("SELECT generate_series(1, 100000)"):
            got.append(row)
            break
        # psycopg ended the abandoned stream: the connection is ready again.
        got.append(await (await aconn.execute("SELECT 7")).fetchone())

    rec = await in_request(body)
    assert got == [[(1,), (2,), (3,), (4,), (5,)], [], (1,), (7,)]
    assert rec.db_statements == 4


async def test_closing_a_stream_ends_its_query_at_once(aconn: AsyncConnection[Any]) -> None:
    rows = aconn.cursor().stream("SELECT generate_series(1, 100000)")
    assert await rows.__anext__() == (1,)
    assert aconn.info.transaction_status == psycopg.pq.TransactionStatus.ACTIVE
    await rows.aclose()  # type: ignore[attr-defined]
    assert aconn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


async def test_executemany_is_one_statement(aconn: AsyncConnection[Any]) -> None:
    await aconn.execute("CREATE TEMP TABLE lw_many (a int)")

    async def body() -> None:
        cur = aconn.cursor()
        await cur.executemany("INSERT INTO lw_many VALUES (%s)", [(i,) for i in range(20)])

    rec = await in_request(body)
    assert rec.db_statements == 1
    assert rec.db_queries == 1
    cur = await aconn.execute("SELECT count(*) FROM lw_many")
    assert await cur.fetchone() == (20,)


async def test_a_pipeline_is_timed_where_it_waits(aconn: AsyncConnection[Any]) -> None:
    got: list[Any] = []

    async def body() -> None:
        async with aconn.pipeline():
            await aconn.execute("SELECT pg_sleep(%s)", (SLEEP_MS / 1000,))
            cur = await aconn.execute("SELECT 1")
        got.append(await cur.fetchone())

    rec = await in_request(body)
    assert got == [(1,)]
    assert rec.db_statements == 2
    assert SLEEP_MS - CLOCK_SLACK_MS <= rec.db_ms < SLEEP_MS + 150, rec


async def test_a_transaction_inside_a_pipeline(aconn: AsyncConnection[Any]) -> None:
    got: list[Any] = []

    async def body() -> None:
        async with aconn.pipeline():
            async with aconn.transaction():
                cur = await aconn.execute("SELECT 2")
            got.append(await cur.fetchone())

    rec = await in_request(body)
    assert got == [(2,)]
    assert rec.db_statements == 1


class MyServerCursor(psycopg.AsyncServerCursor[Any]):
    """An app's own server-side cursor class."""


async def test_instrumented_objects_are_psycopgs(pg_dsn: str) -> None:
    conn = await AsyncConnection.connect(pg_dsn, cursor_factory=psycopg.AsyncClientCursor)
    async with conn:
        assert isinstance(conn, psycopg.AsyncConnection)
        assert isinstance(conn, AsyncConnection)
        cur = conn.cursor()
        # The factory set is timed through a subclass of it that keeps its name.
        assert isinstance(cur, psycopg.AsyncClientCursor)
        assert isinstance(cur, AsyncCursor)
        assert type(cur).__name__ == "AsyncClientCursor"
        assert issubclass(conn.cursor_factory, psycopg.AsyncClientCursor)
        named = conn.cursor(name="lw_named")
        assert isinstance(named, psycopg.AsyncServerCursor)
        assert isinstance(named, AsyncServerCursor)
        await named.close()
        conn.server_cursor_factory = MyServerCursor
        mine = conn.cursor(name="lw_mine")
        assert isinstance(mine, MyServerCursor)
        assert isinstance(mine, AsyncServerCursor)
        assert type(mine).__qualname__ == "MyServerCursor"
        await mine.close()

        async def body() -> None:
            # Client-side binding (AsyncClientCursor): still one timed statement.
            cur = await conn.execute("SELECT %s::int", (5,))
            assert await cur.fetchone() == (5,)

        rec = await in_request(body)
        assert (rec.db_statements, rec.db_queries) == (1, 2)  # and the BEGIN


class MyConnection(psycopg.AsyncConnection[Any]):
    """An app's own connection class."""

    def greeting(self) -> str:
        return "hello"


async def test_pool_connections_are_instrumented_and_keep_a_connection_class(
    pg_dsn: str,
) -> None:
    options = {"autocommit": True}
    async with AsyncConnectionPool(
        pg_dsn, kwargs=options, min_size=1, max_size=1, open=False
    ) as pool:
        assert isinstance(pool, psycopg_pool.AsyncConnectionPool)
        async with pool.connection() as c:
            assert isinstance(c, AsyncConnection)
            assert c.autocommit  # psycopg_pool's own kwargs= reached the connection
    pool_of_mine: AsyncConnectionPool[Any] = AsyncConnectionPool(
        pg_dsn, connection_class=MyConnection, min_size=1, max_size=1, open=False
    )
    async with pool_of_mine:

        async def body() -> None:
            async with pool_of_mine.connection() as c:
                assert isinstance(c, MyConnection)
                assert isinstance(c, AsyncConnection)
                assert c.greeting() == "hello"
                await c.execute("SELECT 1")

        rec = await in_request(body)
    assert (rec.db_statements, rec.db_queries) == (1, 3)  # BEGIN, SELECT, COMMIT
    with pytest.raises(TypeError, match=r"connection_class must be psycopg\.AsyncConnection"):
        AsyncConnectionPool(pg_dsn, connection_class=dict, open=False)  # type: ignore[type-var]


@pytest.mark.skipif(
    not hasattr(psycopg_pool.AsyncConnectionPool, "check_connection"),
    reason="psycopg_pool 3.1 has no check",
)
async def test_a_checkout_is_pool_wait_and_nothing_below_it_is_recorded(pg_dsn: str) -> None:
    # A pool whose check runs a query in getconn(): that query is the checkout's.
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        pg_dsn,
        min_size=1,
        max_size=1,
        open=False,
        check=AsyncConnectionPool.check_connection,
    )
    async with pool:
        await pool.wait()
        held = asyncio.Event()

        async def holder() -> None:
            async with pool.connection() as c:
                held.set()
                await c.execute("SELECT pg_sleep(%s)", (SLEEP_MS / 1000,))

        async def body() -> None:
            task = asyncio.create_task(holder())
            await held.wait()
            async with pool.connection() as c:
                await c.execute("SELECT 1")
            await task

        rec = await in_request(body)
    assert rec.pool_wait_ms >= SLEEP_MS - 10, rec  # the holder had started its sleep
    # The holder's BEGIN, sleep and COMMIT (a child task of the request), then ours.
    assert (rec.db_statements, rec.db_queries) == (2, 6)


async def test_a_null_pool_connects_inside_the_checkout(pg_dsn: str) -> None:
    async def configure(c: psycopg.AsyncConnection[Any]) -> None:
        await c.execute("SELECT pg_sleep(0.01)")  # the checkout's: not a query of the request
        await c.commit()

    async with AsyncNullConnectionPool(pg_dsn, configure=configure, open=False) as pool:
        assert isinstance(pool, psycopg_pool.AsyncNullConnectionPool)

        async def body() -> None:
            async with pool.connection() as c:
                assert isinstance(c, AsyncConnection)
                await c.execute("SELECT 1")

        rec = await in_request(body)
    assert rec.pool_wait_ms >= 10 - CLOCK_SLACK_MS, rec
    assert (rec.db_statements, rec.db_queries) == (1, 3)  # BEGIN, SELECT, COMMIT


async def test_inside_a_timed_statement_round_trips_count_and_statements_do_not(
    conn: AsyncConnection[Any],
) -> None:
    async def body() -> None:
        async with loopwatch.timed("db", "an ORM's statement"):
            await conn.execute("SELECT 1")

    rec = await in_request(body)
    assert (rec.db_statements, rec.db_queries) == (1, 2)  # the ORM's; BEGIN and SELECT
    await conn.rollback()


async def test_errors_propagate_unchanged_and_the_statement_counts(
    aconn: AsyncConnection[Any], pg_dsn: str
) -> None:
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as plain:
        with pytest.raises(psycopg.Error) as expected:
            await plain.execute("SELEC nonsense")
    caught: list[BaseException] = []

    async def body() -> None:
        try:
            await aconn.execute("SELEC nonsense")
        except psycopg.Error as exc:
            caught.append(exc)

    rec = await in_request(body)
    (exc,) = caught
    assert type(exc) is type(expected.value) is psycopg.errors.SyntaxError
    assert exc.sqlstate == "42601"
    assert (rec.db_statements, rec.db_queries) == (1, 1)
    assert rec.db_ms > 0


async def test_an_unhandled_error_fails_the_request_that_records_it(
    aconn: AsyncConnection[Any],
) -> None:
    records: list[RequestRecord] = []

    async def body() -> None:
        await aconn.execute("SELECT 1/0")

    transport = httpx.ASGITransport(app=watched(body, records))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(psycopg.errors.DivisionByZero):
            await client.get("/q")
    (rec,) = records
    assert rec.status == 500  # Starlette's ServerErrorMiddleware answered first
    assert (rec.db_statements, rec.db_queries) == (1, 1)


async def test_a_call_psycopg_refuses_sends_nothing_and_records_nothing(
    aconn: AsyncConnection[Any], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # As for asyncpg: a call refused on the client (the wrong number of parameters) never
    # reached PostgreSQL; it never waited, so it is no statement, no query and no span.
    caught: list[BaseException] = []

    async def body() -> None:
        try:
            await aconn.execute("SELECT %s, %s", (1,))
        except psycopg.ProgrammingError as exc:
            caught.append(exc)

    rec = await in_request(body, provider)
    assert aconn.autocommit  # no BEGIN sent first
    assert [type(e) for e in caught] == [psycopg.ProgrammingError]
    assert (rec.db_statements, rec.db_queries) == (0, 0)
    assert client_spans(exporter) == []


async def test_a_refused_call_after_a_begin_is_that_query_and_no_statement(
    conn: AsyncConnection[Any],
) -> None:
    # Without autocommit psycopg sends BEGIN, then refuses the parameters: the BEGIN is
    # a query (when it waited for its reply), no statement ran.
    caught: list[BaseException] = []

    async def body() -> None:
        try:
            await conn.execute("SELECT %s, %s", (1,))
        except psycopg.ProgrammingError as exc:
            caught.append(exc)

    rec = await in_request(body)
    assert not conn.autocommit
    assert [type(e) for e in caught] == [psycopg.ProgrammingError]
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS  # BEGIN went
    assert rec.db_statements == 0, rec
    assert rec.db_queries <= 1, rec
    await conn.rollback()


async def _cancelled(conn: psycopg.AsyncConnection[Any]) -> list[Any]:
    """What a statement cancelled by a timeout raises, and what the connection does next."""
    outcome: list[Any] = []
    try:
        await asyncio.wait_for(conn.execute("SELECT pg_sleep(5)"), SLEEP_MS / 1000)
    except asyncio.TimeoutError as exc:  # (3.10: not yet the builtin)
        outcome.append(type(exc))
    try:
        outcome.append(await (await conn.execute("SELECT 1")).fetchone())
    except psycopg.Error as exc:  # psycopg 3.1 leaves the query running
        outcome.append(type(exc))
    return outcome


async def test_a_cancelled_statement_raises_as_it_would(
    aconn: AsyncConnection[Any], pg_dsn: str
) -> None:
    plain = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
    try:
        expected = await _cancelled(plain)
    finally:
        await plain.close()  # (not its __aexit__: psycopg 3.1 would commit mid-query)
    got: list[Any] = []

    async def body() -> None:
        got.extend(await _cancelled(aconn))

    rec = await in_request(body)
    assert got == expected
    assert got[0] is asyncio.TimeoutError
    assert rec.db_statements in (1, 2)  # the second fails before sending, or is sent
    assert rec.db_ms >= SLEEP_MS - 5, rec


async def test_outside_a_request_nothing_is_recorded_and_all_works(
    conn: AsyncConnection[Any],
) -> None:
    async with conn.transaction():
        cur = await conn.execute("SELECT %s::text", ("x",))
        assert await cur.fetchone() == ("x",)
    async with conn.cursor(name="lw_out") as named:
        await named.execute("SELECT generate_series(1, 3)")
        assert [r async for r in named] == [(1,), (2,), (3,)]
    await conn.commit()


async def test_what_is_thrown_into_a_wait_reaches_the_call_unchanged() -> None:
    seen: list[BaseException] = []

    async def call() -> str:
        try:
            await asyncio.get_running_loop().create_future()
        except BaseException as exc:
            seen.append(exc)
            if isinstance(exc, Boom):
                return "handled"
            raise
        return "not reached"

    boom = Boom()
    # A generator-based coroutine: driven here as the task would drive it.
    waiting: Any = _if_sent(call(), None, "FETCH")
    assert isinstance(waiting.send(None), asyncio.Future)
    with pytest.raises(StopIteration) as done:
        waiting.throw(boom)
    assert done.value.value == "handled"
    closing: Any = _if_sent(call(), None, "FETCH")
    closing.send(None)
    closing.close()
    assert seen == [boom, seen[1]]
    assert type(seen[1]) is GeneratorExit


def test_a_missing_psycopg_names_the_extra() -> None:
    for module in ("psycopg", "psycopg_pool"):
        code = (
            f"import sys; sys.modules[{module!r}] = None\n"
            "try:\n    import loopwatch.integrations.psycopg\n"
            "except ImportError as e:\n    print(e)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert "pip install 'loopwatch[psycopg]'" in out.stdout, (module, out)


# --- OpenTelemetry ---------------------------------------------------------------------------


def client_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]


SECRET_PARAM = "hunter2-param"


async def test_one_client_span_per_statement_with_database_conventions(
    aconn: AsyncConnection[Any], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async def body() -> None:
        await aconn.execute("SELECT %s::text, 'a literal'", (SECRET_PARAM,))
        await aconn.execute(
            sql.SQL("SELECT {} FROM (SELECT 1 AS x) AS t").format(sql.Identifier("x"))
        )

    await in_request(body, provider)
    spans = client_spans(exporter)
    assert [dict(s.attributes or {})["db.query.text"] for s in spans] == [
        "SELECT %s::text, ?",
        'SELECT "x" FROM (SELECT ? AS x) AS t',
    ]
    info = aconn.info
    for span in spans:
        attrs = dict(span.attributes or {})
        assert attrs["db.system.name"] == "postgresql"
        assert attrs["db.operation.name"] == "SELECT"
        assert attrs["db.namespace"] == info.dbname
        assert span.name == f"SELECT {info.dbname}"
        if info.host.startswith("/"):  # a Unix socket
            assert attrs["server.address"] == f"{info.host}/.s.PGSQL.{info.port}"
            assert "server.port" not in attrs
        else:
            assert attrs["server.address"] == info.host
            assert attrs["server.port"] == info.port
    (server,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert all(s.parent is not None and s.parent.span_id == server.context.span_id for s in spans)
    text = repr([(s.name, dict(s.attributes or {})) for s in exporter.get_finished_spans()])
    assert SECRET_PARAM not in text
    assert "a literal" not in text


async def test_transaction_control_spans_are_named_by_their_operation(
    conn: AsyncConnection[Any], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async def body() -> None:
        await conn.execute("SELECT 1")  # its BEGIN is one round trip with it: no span
        await conn.commit()

    await in_request(body, provider)
    spans = client_spans(exporter)
    operations = [dict(s.attributes or {}).get("db.operation.name") for s in spans]
    assert operations == ["SELECT", "COMMIT"]
    assert "db.query.text" not in dict(spans[1].attributes or {})


async def test_savepoints_and_an_empty_stream_have_their_spans(
    aconn: AsyncConnection[Any], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async def body() -> None:
        async with aconn.transaction():
            await aconn.execute("SELECT 1")
            async with aconn.transaction():
                await aconn.execute("SELECT 2")
            assert [r async for r in aconn.cursor().stream("SELECT 1 WHERE false")] == []

    await in_request(body, provider)
    spans = client_spans(exporter)
    operations = [dict(s.attributes or {}).get("db.operation.name") for s in spans]
    assert operations == ["BEGIN", "SELECT", "SAVEPOINT", "SELECT", "RELEASE", "SELECT", "COMMIT"]
    assert all(s.status.status_code != StatusCode.ERROR for s in spans)


async def test_a_failed_statements_span_has_the_error_and_sqlstate(
    aconn: AsyncConnection[Any], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async def body() -> None:
        with contextlib.suppress(psycopg.errors.SyntaxError):
            await aconn.execute("SELEC nonsense")

    await in_request(body, provider)
    (span,) = client_spans(exporter)
    attrs = dict(span.attributes or {})
    assert attrs["error.type"] == "psycopg.errors.SyntaxError"
    assert attrs["db.response.status_code"] == "42601"
    assert span.status.status_code == StatusCode.ERROR
