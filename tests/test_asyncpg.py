"""The asyncpg proxies against a real PostgreSQL: every query path is timed and counted.

Each test drives a tiny Starlette app wrapped by a real LoopWatch in-process (httpx's
ASGITransport), collects the request's record through a sink, and checks what the
record says against what the app did on the server (``pg_sleep`` of a known length).
Timing tolerances are generous: the precise accuracy lives in the benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import asyncpg.cursor
import asyncpg.pool
import asyncpg.prepared_stmt
import asyncpg.transaction
import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from loopwatch import (
    InstrumentedConnection,
    InstrumentedPool,
    LoopWatch,
    _failures,
    connect,
    create_pool,
    wrap_connection,
    wrap_pool,
)
from loopwatch._capture.steps import StepTimer
from loopwatch.record import RequestRecord

from .helpers import wait_for_requests

SLEEP = 0.05  # seconds of pg_sleep in the timed paths
SLEEP_MS = SLEEP * 1000
# The server's clock (pg_sleep) and ours (perf_counter) may run a hair apart.
CLOCK_SLACK_MS = 0.5
# Above the sleep: a round trip, a statement prepare, a pool reset, a busy 2-core machine.
MARGIN_MS = 150

Body = Callable[[], Awaitable[Any]]
Opener = Callable[[], AbstractAsyncContextManager[Any]]


# --- a tiny app and an in-process client ---------------------------------------------------


def watched(body: Body, records: list[RequestRecord], file: Path | None = None) -> LoopWatch:
    """A one-route Starlette app running ``body`` per request, wrapped by LoopWatch."""

    async def endpoint(request: Request) -> Response:
        await body()
        return PlainTextResponse("ok")

    return LoopWatch(Starlette(routes=[Route("/q", endpoint)]), file=file, sinks=[records.append])


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def in_request(body: Body) -> RequestRecord:
    """Run ``body`` inside one HTTP request through LoopWatch; return that request's record."""
    records: list[RequestRecord] = []
    async with client(watched(body, records)) as c:
        resp = await c.get("/q")
    assert resp.status_code == 200
    assert len(records) == 1
    return records[0]


def assert_db_time(rec: RequestRecord, slept_ms: float) -> None:
    assert slept_ms - CLOCK_SLACK_MS <= rec.db_ms < slept_ms + MARGIN_MS, rec
    # The timeline shows the same awaited time as db segments.
    db_segs = [(a, b) for kind, a, b in rec.segments if kind == "db"]
    assert db_segs, rec
    assert abs(sum(b - a for a, b in db_segs) - rec.db_ms) < 0.01, rec


async def close_pool(pool: Any) -> None:
    """Close a pool, failing (instead of hanging) if a connection was never released."""
    try:
        await asyncio.wait_for(pool.close(), 10)
    except asyncio.TimeoutError:  # (3.10: not yet the builtin)
        pool.terminate()
        raise


async def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[InstrumentedPool]:
    p = await create_pool(pg_dsn, min_size=2, max_size=2)
    try:
        yield p
    finally:
        await close_pool(p)


@pytest.fixture
async def pool1(pg_dsn: str) -> AsyncIterator[InstrumentedPool]:
    """A pool of exactly one connection: a leak or a second holder shows at once."""
    p = await create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        yield p
    finally:
        await close_pool(p)


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[InstrumentedConnection]:
    c = await connect(pg_dsn)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture(params=["direct", "pooled"])
async def open_conn(request: pytest.FixtureRequest, pg_dsn: str) -> AsyncIterator[Opener]:
    """``async with open_conn() as conn``: a direct connection (from ``connect``) or one
    acquired from a pool inside the request, so that acquire and release run there too."""
    if request.param == "direct":
        c = await connect(pg_dsn)

        @contextlib.asynccontextmanager
        async def use() -> AsyncIterator[InstrumentedConnection]:
            yield c

        try:
            yield use
        finally:
            await c.close()
    else:
        p = await create_pool(pg_dsn, min_size=1, max_size=1)
        try:
            yield p.acquire
        finally:
            await close_pool(p)


@pytest.fixture
async def table(pg_dsn: str) -> AsyncIterator[str]:
    """A real table (visible to every pooled connection) holding two rows."""
    name = f"lw_copy_{uuid.uuid4().hex[:12]}"
    raw = await asyncpg.connect(pg_dsn)
    try:
        await raw.execute(f"CREATE TABLE {name} (a int, b text)")
        await raw.execute(f"INSERT INTO {name} VALUES (1, 'one'), (2, 'two')")
        yield name
    finally:
        await raw.execute(f"DROP TABLE IF EXISTS {name}")
        await raw.close()


async def row_count(pg_dsn: str, name: str) -> int:
    raw = await asyncpg.connect(pg_dsn)
    try:
        return int(await raw.fetchval(f"SELECT count(*) FROM {name}"))
    finally:
        await raw.close()


# --- 1. every query path is counted and timed ----------------------------------------------

HALF = SLEEP / 2
TWO_HALVES = [(HALF,), (HALF,)]
# asyncpg added fetchmany in 0.30 and Pool.is_closing in 0.28: the paths a version lacks
# are not tested on it (the proxies forward them all the same).
HAS_FETCHMANY = hasattr(asyncpg.Connection, "fetchmany")
HAS_IS_CLOSING = hasattr(asyncpg.Pool, "is_closing")


def _supported(paths: dict[str, Any]) -> list[str]:
    return [p for p in paths if HAS_FETCHMANY or p != "fetchmany"]


CONNECTION_PATHS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "fetch": lambda c: c.fetch(f"SELECT pg_sleep({SLEEP})"),
    "fetchrow": lambda c: c.fetchrow(f"SELECT pg_sleep({SLEEP})"),
    "fetchval": lambda c: c.fetchval("SELECT pg_sleep($1)", SLEEP),
    "execute": lambda c: c.execute(f"SELECT pg_sleep({SLEEP})"),
    "execute-args": lambda c: c.execute("SELECT pg_sleep($1)", SLEEP),
    "executemany": lambda c: c.executemany("SELECT pg_sleep($1)", TWO_HALVES),
    "fetchmany": lambda c: c.fetchmany("SELECT pg_sleep($1)", TWO_HALVES),
    "copy_from_query": lambda c: c.copy_from_query(
        f"SELECT pg_sleep({SLEEP})", output=io.BytesIO()
    ),
}


@pytest.mark.parametrize("path", _supported(CONNECTION_PATHS))
async def test_connection_query_is_counted_and_timed(open_conn: Opener, path: str) -> None:
    async def body() -> None:
        async with open_conn() as conn:
            await CONNECTION_PATHS[path](conn)

    rec = await in_request(body)
    assert rec.db_queries == 1
    assert rec.db_statements == 1
    assert_db_time(rec, SLEEP_MS)


STATEMENT_PATHS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "fetch": lambda s: s.fetch(SLEEP),
    "fetchrow": lambda s: s.fetchrow(SLEEP),
    "fetchval": lambda s: s.fetchval(SLEEP),
    "fetchmany": lambda s: s.fetchmany(TWO_HALVES),
    "executemany": lambda s: s.executemany(TWO_HALVES),
    "explain-analyze": lambda s: s.explain(SLEEP, analyze=True),
}


@pytest.mark.parametrize("path", _supported(STATEMENT_PATHS))
async def test_prepared_statement_is_counted_and_timed(open_conn: Opener, path: str) -> None:
    async def body() -> None:
        async with open_conn() as conn:
            stmt = await conn.prepare("SELECT pg_sleep($1)")
            await STATEMENT_PATHS[path](stmt)

    rec = await in_request(body)
    assert rec.db_queries == 2  # the prepare and the execution
    assert rec.db_statements == 1  # the execution: a prepare is not a statement of the app's
    assert_db_time(rec, SLEEP_MS)


async def test_prepare_alone_is_one_query(conn: InstrumentedConnection) -> None:
    async def body() -> None:
        stmt = await conn.prepare("SELECT $1::int + 1")
        assert stmt.get_parameters()[0].name == "int4"  # statement API forwarded

    rec = await in_request(body)
    assert rec.db_queries == 1
    assert rec.db_statements == 0  # a prepare is not a statement of the app's
    assert rec.db_ms > 0


async def test_cursor_iteration_is_counted_and_timed(open_conn: Opener) -> None:
    rows: list[Any] = []

    async def body() -> None:
        async with open_conn() as conn, conn.transaction():
            async for row in conn.cursor(f"SELECT pg_sleep({SLEEP})"):
                rows.append(row)

    rec = await in_request(body)
    assert len(rows) == 1
    # BEGIN, the one round trip that fetched the row (and closed the portal), COMMIT.
    assert rec.db_queries == 3
    assert rec.db_statements == 1  # the cursor's query; BEGIN and COMMIT are not
    assert_db_time(rec, SLEEP_MS)


async def test_prepared_statement_cursor_iteration_is_counted_and_timed(
    open_conn: Opener,
) -> None:
    rows: list[Any] = []

    async def body() -> None:
        async with open_conn() as conn, conn.transaction():
            stmt = await conn.prepare("SELECT pg_sleep($1)")
            async for row in stmt.cursor(SLEEP):
                rows.append(row)

    rec = await in_request(body)
    assert len(rows) == 1
    assert rec.db_queries == 4  # BEGIN, prepare, one round trip, COMMIT
    assert_db_time(rec, SLEEP_MS)


async def test_awaited_prepared_statement_cursor_is_counted_and_timed(
    open_conn: Opener,
) -> None:
    async def body() -> None:
        async with open_conn() as conn, conn.transaction():
            stmt = await conn.prepare("SELECT pg_sleep($1) FROM generate_series(1, 3)")
            cursor = await stmt.cursor(SLEEP)
            await cursor.fetchrow()

    rec = await in_request(body)
    assert rec.db_queries == 5  # BEGIN, prepare, open, fetchrow, COMMIT
    assert rec.db_statements == 1  # the open
    assert_db_time(rec, SLEEP_MS)


async def test_cursor_iteration_counts_round_trips_not_rows(conn: InstrumentedConnection) -> None:
    rows: list[int] = []

    async def body() -> None:
        async with conn.transaction():
            cursor = conn.cursor("SELECT g FROM generate_series(1, 25) AS g", prefetch=10)
            async for row in cursor:
                rows.append(row["g"])

    rec = await in_request(body)
    assert rows == list(range(1, 26))
    # 26 __anext__ calls, 3 round trips: prepare + rows 1-10, rows 11-20, rows 21-25 (and
    # the portal's close); the other 23 calls were served from asyncpg's buffer. Plus
    # BEGIN and COMMIT.
    assert rec.db_queries == 2 + 3
    assert rec.db_statements == 1


CURSOR_METHODS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "fetch": lambda cur: cur.fetch(1),
    "fetchrow": lambda cur: cur.fetchrow(),
    "forward": lambda cur: cur.forward(1),
}


@pytest.mark.parametrize("method", list(CURSOR_METHODS))
async def test_awaited_cursor_is_counted_and_timed(open_conn: Opener, method: str) -> None:
    async def body() -> None:
        async with open_conn() as conn, conn.transaction():
            # Opening binds the portal; each row is computed (and slept for) when fetched.
            cursor = await conn.cursor(f"SELECT pg_sleep({SLEEP}) FROM generate_series(1, 3)")
            await CURSOR_METHODS[method](cursor)

    rec = await in_request(body)
    assert rec.db_queries == 4  # BEGIN, open, the fetch, COMMIT
    assert_db_time(rec, SLEEP_MS)


async def test_awaited_cursor_returns_rows(conn: InstrumentedConnection) -> None:
    async def body() -> None:
        async with conn.transaction():
            cursor = await conn.cursor("SELECT g FROM generate_series(1, 10) AS g")
            assert [r["g"] for r in await cursor.fetch(3)] == [1, 2, 3]
            assert await cursor.forward(2) == 2
            row = await cursor.fetchrow()
            assert row is not None
            assert row["g"] == 6

    rec = await in_request(body)
    assert rec.db_queries == 1 + 1 + 3 + 1  # BEGIN, open, fetch/forward/fetchrow, COMMIT


# copy_* paths, on a connection (direct or pooled) and on the pool: the table already
# holds rows (1, 'one') and (2, 'two'); each call adds what it says to the row count.
COPY_PATHS: dict[str, tuple[Callable[[Any, str], Awaitable[Any]], int]] = {
    "copy_from_table": (lambda c, t: c.copy_from_table(t, output=io.BytesIO()), 0),
    "copy_from_query": (
        lambda c, t: c.copy_from_query(f"SELECT * FROM {t}", output=io.BytesIO()),
        0,
    ),
    "copy_to_table": (
        lambda c, t: c.copy_to_table(t, source=io.BytesIO(b"3\tthree\n4\tfour\n")),
        2,
    ),
    "copy_records_to_table": (
        lambda c, t: c.copy_records_to_table(t, records=[(3, "three")]),
        1,
    ),
}


@pytest.mark.parametrize("path", list(COPY_PATHS))
async def test_connection_copy_is_counted_and_timed(
    open_conn: Opener, table: str, pg_dsn: str, path: str
) -> None:
    call, added = COPY_PATHS[path]

    async def body() -> None:
        async with open_conn() as conn:
            await call(conn, table)

    rec = await in_request(body)
    assert rec.db_queries == 1
    assert rec.db_statements == 1
    assert rec.db_ms > 0
    assert await row_count(pg_dsn, table) == 2 + added


@pytest.mark.parametrize("path", list(COPY_PATHS))
async def test_pool_copy_is_counted_and_timed(
    pool: InstrumentedPool, table: str, pg_dsn: str, path: str
) -> None:
    call, added = COPY_PATHS[path]
    rec = await in_request(lambda: call(pool, table))
    assert rec.db_queries == 1
    assert rec.db_ms > 0
    assert await row_count(pg_dsn, table) == 2 + added


async def test_copy_from_table_output_is_intact(conn: InstrumentedConnection, table: str) -> None:
    out = io.BytesIO()

    async def body() -> None:
        status = await conn.copy_from_table(table, output=out)
        assert status == "COPY 2"

    await in_request(body)
    assert sorted(out.getvalue().splitlines()) == [b"1\tone", b"2\ttwo"]


POOL_PATHS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "fetch": lambda p: p.fetch(f"SELECT pg_sleep({SLEEP})"),
    "fetchrow": lambda p: p.fetchrow(f"SELECT pg_sleep({SLEEP})"),
    "fetchval": lambda p: p.fetchval("SELECT pg_sleep($1)", SLEEP),
    "execute": lambda p: p.execute(f"SELECT pg_sleep({SLEEP})"),
    "executemany": lambda p: p.executemany("SELECT pg_sleep($1)", TWO_HALVES),
    "fetchmany": lambda p: p.fetchmany("SELECT pg_sleep($1)", TWO_HALVES),
    "copy_from_query": lambda p: p.copy_from_query(
        f"SELECT pg_sleep({SLEEP})", output=io.BytesIO()
    ),
}


@pytest.mark.parametrize("path", _supported(POOL_PATHS))
async def test_pool_query_is_counted_and_timed(pool: InstrumentedPool, path: str) -> None:
    rec = await in_request(lambda: POOL_PATHS[path](pool))
    assert rec.db_queries == 1  # the acquire and the release are not queries
    assert rec.pool_wait_ms < MARGIN_MS  # an idle connection was there
    assert_db_time(rec, SLEEP_MS)


async def test_pool_query_returns_result(pool: InstrumentedPool) -> None:
    got: list[Any] = []

    async def body() -> None:
        got.append(await pool.fetchval("SELECT $1::int * 2", 21))
        got.append([tuple(r) for r in await pool.fetch("SELECT 1 AS a, 'x' AS b")])

    await in_request(body)
    assert got == [42, [(1, "x")]]


async def test_transaction_block_counts_begin_and_commit(conn: InstrumentedConnection) -> None:
    async def body() -> None:
        async with conn.transaction():
            assert conn.is_in_transaction()
            await conn.execute("SELECT 1")
        assert not conn.is_in_transaction()

    rec = await in_request(body)
    assert rec.db_queries == 3  # BEGIN, SELECT, COMMIT
    assert rec.db_statements == 1
    assert rec.db_ms > 0


async def test_transaction_start_commit_rollback_are_counted(
    conn: InstrumentedConnection,
) -> None:
    async def body() -> None:
        tr = conn.transaction()
        await tr.start()
        await tr.commit()
        tr = conn.transaction(isolation="serializable")
        await tr.start()
        await tr.rollback()

    rec = await in_request(body)
    assert rec.db_queries == 4
    assert rec.db_statements == 0
    assert not conn.is_in_transaction()


async def test_transaction_block_rolls_back_on_error(
    conn: InstrumentedConnection, table: str, pg_dsn: str
) -> None:
    class Boom(Exception):
        pass

    caught: list[BaseException] = []

    async def body() -> None:
        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (3, 'three')")
                raise Boom
        except Boom as exc:
            caught.append(exc)

    rec = await in_request(body)
    assert len(caught) == 1
    assert rec.db_queries == 3  # BEGIN, INSERT, ROLLBACK
    assert await row_count(pg_dsn, table) == 2, "the block's exception must reach asyncpg"


async def test_transaction_time_is_db_time(conn: InstrumentedConnection) -> None:
    async def body() -> None:
        async with conn.transaction():
            await conn.execute(f"SELECT pg_sleep({SLEEP})")

    rec = await in_request(body)
    assert_db_time(rec, SLEEP_MS)


async def test_acquire_and_release_are_not_queries(pool: InstrumentedPool) -> None:
    async def body() -> None:
        c = await pool.acquire()
        try:
            await c.fetchval("SELECT 1")
        finally:
            await pool.release(c)
        async with pool.acquire() as c2:
            await c2.fetchval("SELECT 1")

    rec = await in_request(body)
    assert rec.db_queries == 2


async def test_release_task_is_not_timed_a_second_time(pool: InstrumentedPool) -> None:
    # asyncpg releases in a task of its own (under asyncio.shield); the release's interval
    # already covers it, so the task factory must not wrap it in a step timer as well.
    made: list[Any] = []

    def spy(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def body() -> None:
        async with pool.acquire() as c:
            await c.fetchval("SELECT 1")
        c2 = await pool.acquire()
        await pool.release(c2)

    loop = asyncio.get_running_loop()
    before = loop.get_task_factory()
    loop.set_task_factory(spy)  # LoopWatch chains it: it sees what LoopWatch hands on
    try:
        rec = await in_request(body)
    finally:
        loop.set_task_factory(before)
    releases = [c for c in made if getattr(c, "cr_code", None) is not None
                and c.cr_code.co_name == "release"]  # fmt: skip
    assert len(releases) == 2, made
    assert not any(isinstance(c, StepTimer) for c in releases), releases
    assert rec.db_queries == 1
    assert len([s for s in rec.segments if s[0] == "db"]) >= 2  # the query and the resets


async def test_acquiring_an_idle_connection_is_no_pool_wait(pool: InstrumentedPool) -> None:
    # asyncpg hands out an idle connection without suspending: nothing was waited for.
    async def body() -> None:
        async with pool.acquire() as c:
            await c.fetchval("SELECT 1")

    rec = await in_request(body)
    assert rec.pool_wait_ms == 0
    assert not any(kind == "pool" for kind, _, _ in rec.segments)


# --- 2. concurrent queries in one request: db time is a union --------------------------------


async def test_gathered_queries_count_their_overlap_once(pool: InstrumentedPool) -> None:
    async def one() -> None:
        async with pool.acquire() as c:
            await c.fetchval("SELECT pg_sleep(0.1)")

    async def body() -> None:
        await asyncio.gather(one(), one())

    rec = await in_request(body)
    assert rec.db_queries == 2
    assert 100 - CLOCK_SLACK_MS <= rec.db_ms < 170, rec  # not 200


def run_on_uvloop(main: Callable[[], Awaitable[RequestRecord]]) -> RequestRecord:
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def test_query_is_counted_and_timed_on_uvloop(pg_dsn: str) -> None:
    async def main() -> RequestRecord:
        async with create_pool(pg_dsn, min_size=1, max_size=1) as p:
            return await in_request(lambda: p.fetchval(f"SELECT pg_sleep({SLEEP})"))

    rec = run_on_uvloop(main)
    assert rec.db_queries == 1
    assert_db_time(rec, SLEEP_MS)


def test_gathered_queries_count_their_overlap_once_on_uvloop(pg_dsn: str) -> None:
    async def main() -> RequestRecord:
        async with create_pool(pg_dsn, min_size=2, max_size=2) as p:
            sleep = "SELECT pg_sleep(0.1)"
            return await in_request(lambda: asyncio.gather(p.fetchval(sleep), p.fetchval(sleep)))

    rec = run_on_uvloop(main)
    assert rec.db_queries == 2
    assert 100 - CLOCK_SLACK_MS <= rec.db_ms < 170, rec


# --- 3. waiting for a pooled connection ------------------------------------------------------


async def _hold_with_async_with(p: InstrumentedPool) -> None:
    async with p.acquire() as c:
        await c.fetchval("SELECT pg_sleep(0.1)")


async def _hold_with_await(p: InstrumentedPool) -> None:
    c = await p.acquire()
    try:
        await c.fetchval("SELECT pg_sleep(0.1)")
    finally:
        await p.release(c)


@pytest.mark.parametrize("hold", [_hold_with_async_with, _hold_with_await], ids=["with", "await"])
async def test_pool_wait_is_recorded_apart_from_db_time(
    pool1: InstrumentedPool, hold: Callable[[InstrumentedPool], Awaitable[None]]
) -> None:
    records: list[RequestRecord] = []
    async with client(watched(lambda: hold(pool1), records)) as c:
        responses = await asyncio.gather(c.get("/q"), c.get("/q"))
    assert [r.status_code for r in responses] == [200, 200]
    first, second = sorted(records, key=lambda r: r.pool_wait_ms)
    assert first.pool_wait_ms < 20, first
    assert 90 <= second.pool_wait_ms < 100 + MARGIN_MS, second
    assert any(kind == "pool" for kind, _, _ in second.segments)
    # The wait is not database time: each request's own query took ~100 ms.
    for rec in (first, second):
        assert 100 - CLOCK_SLACK_MS <= rec.db_ms < 100 + 60, rec


async def test_db_time_stays_exact_past_the_drawn_segments(conn: InstrumentedConnection) -> None:
    # 700 queries of 2 ms each, one after the other: more than the 512 segments a
    # record draws of a kind; db_ms still holds all of them (it held 512 before).
    n, each = 700, 0.002

    async def many() -> None:
        for _ in range(n):
            await conn.fetchval(f"SELECT pg_sleep({each})")

    rec = await in_request(many)
    assert rec.db_queries == n
    assert rec.db_ms >= n * each * 1000 - CLOCK_SLACK_MS, rec.db_ms
    assert rec.db_ms <= rec.wall_ms, rec
    assert rec.segments_dropped >= n - 512
    assert sum(1 for kind, _, _ in rec.segments if kind == "db") <= 512


async def test_connections_in_use_at_most_are_counted_for_the_process_samples(
    pg_dsn: str,
) -> None:
    import gc

    from loopwatch._capture import process

    gc.collect()  # other tests' pools: only those still referenced count, and stay
    used0, size0 = (n or 0 for n in process._connections())
    async with create_pool(pg_dsn, min_size=1, max_size=3) as p:
        assert process._connections() == (used0, size0 + 3)
        # Eight queries at once on a pool of three: never more than three in use.
        await asyncio.gather(*(p.fetchval("SELECT pg_sleep(0.05)") for _ in range(8)))
        c = await p.acquire()  # and by await acquire / release, the other path
        await p.release(c)
        assert (p._lw_used, p._lw_used_max) == (0, 3)
        assert process._connections() == (used0 + 3, size0 + 3)


# --- 4. API compatibility --------------------------------------------------------------------


async def test_pooled_connections_are_asyncpg_connections(pool: InstrumentedPool) -> None:
    async with pool.acquire() as c:
        assert isinstance(c, asyncpg.Connection)
        assert isinstance(c, InstrumentedConnection)
    c = await pool.acquire()
    try:
        assert isinstance(c, asyncpg.Connection)
    finally:
        await pool.release(c)


async def test_direct_connection_is_an_asyncpg_connection(conn: InstrumentedConnection) -> None:
    assert isinstance(conn, asyncpg.Connection)
    assert conn.get_server_version().major >= 12
    assert not conn.is_closed()


async def test_await_acquire_and_release(pool: InstrumentedPool) -> None:
    assert pool.get_idle_size() == 2
    c = await pool.acquire()
    assert pool.get_idle_size() == 1
    assert await c.fetchval("SELECT 7") == 7
    await pool.release(c)
    assert pool.get_idle_size() == 2


async def test_async_with_acquire(pool: InstrumentedPool) -> None:
    async with pool.acquire(timeout=5) as c:
        assert pool.get_idle_size() == 1
        assert await c.fetchval("SELECT 8") == 8
    assert pool.get_idle_size() == 2


async def test_pool_methods_are_forwarded(pg_dsn: str) -> None:
    p = await create_pool(pg_dsn, min_size=1, max_size=3)
    assert p.get_size() == 1
    assert p.get_idle_size() == 1
    assert p.get_min_size() == 1
    assert p.get_max_size() == 3
    if HAS_IS_CLOSING:
        assert not p.is_closing()
    await p.close()
    if HAS_IS_CLOSING:
        assert p.is_closing()
    assert p.get_size() == 0


async def test_create_pool_as_async_context_manager(pg_dsn: str) -> None:
    async with create_pool(pg_dsn, min_size=1, max_size=1) as p:
        assert isinstance(p, InstrumentedPool)
        assert await p.fetchval("SELECT 9") == 9
    assert p.is_closing() if HAS_IS_CLOSING else p.get_size() == 0


async def test_wrap_pool_instruments_an_existing_pool(pg_dsn: str) -> None:
    raw = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        p = wrap_pool(raw)
        assert wrap_pool(p) is p
        rec = await in_request(lambda: p.fetchval(f"SELECT pg_sleep({SLEEP})"))
        assert rec.db_queries == 1
        assert_db_time(rec, SLEEP_MS)
        assert raw.get_idle_size() == 1
    finally:
        await close_pool(raw)


async def test_wrap_connection_instruments_an_existing_connection(pg_dsn: str) -> None:
    raw = await asyncpg.connect(pg_dsn)
    try:
        c = wrap_connection(raw)
        assert wrap_connection(c) is c
        assert isinstance(c, asyncpg.Connection)
        rec = await in_request(lambda: c.fetchval(f"SELECT pg_sleep({SLEEP})"))
        assert rec.db_queries == 1
        assert_db_time(rec, SLEEP_MS)
    finally:
        await raw.close()


async def test_wrap_connection_instruments_a_raw_pooled_connection(pg_dsn: str) -> None:
    raw_pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:

        async def body() -> None:
            async with raw_pool.acquire() as raw:
                await wrap_connection(raw).fetchval(f"SELECT pg_sleep({SLEEP})")

        rec = await in_request(body)
        assert rec.db_queries == 1
        assert_db_time(rec, SLEEP_MS)
        assert raw_pool.get_idle_size() == 1
    finally:
        await close_pool(raw_pool)


FAILING_PATHS: dict[str, Callable[[Any, Any], Awaitable[Any]]] = {
    "connection": lambda c, p: c.fetch("SELEC 1"),
    "prepare": lambda c, p: c.prepare("SELEC 1"),
    "pool": lambda c, p: p.fetchval("SELEC 1"),
    "executemany": lambda c, p: c.executemany("SELEC $1", [(1,)]),
}


@pytest.mark.parametrize("path", list(FAILING_PATHS))
async def test_asyncpg_errors_propagate_unchanged_and_are_counted(
    conn: InstrumentedConnection, pool: InstrumentedPool, path: str
) -> None:
    caught: list[BaseException] = []

    async def body() -> None:
        try:
            await FAILING_PATHS[path](conn, pool)
        except Exception as exc:
            caught.append(exc)

    rec = await in_request(body)
    assert len(caught) == 1
    assert type(caught[0]) is asyncpg.PostgresSyntaxError
    assert caught[0].sqlstate == "42601"
    assert rec.db_queries == 1
    assert rec.db_ms > 0
    # The connections are fine afterwards.
    assert await conn.fetchval("SELECT 1") == 1
    assert pool.get_idle_size() == 2


async def test_unhandled_asyncpg_error_propagates_through_the_middleware(
    conn: InstrumentedConnection,
) -> None:
    records: list[RequestRecord] = []
    async with client(watched(lambda: conn.fetch("SELECT 1/0"), records)) as c:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await c.get("/q")
    (rec,) = records
    # Starlette's ServerErrorMiddleware sends the 500 before it re-raises, and the record
    # ends with that response: its ``error`` stays unset.
    assert rec.status == 500
    assert rec.db_queries == 1


async def _prepared_then_unencodable(c: Any, p: Any) -> Any:
    stmt = await c.prepare("SELECT $1::int")
    return await stmt.fetchval("seven")


# Calls asyncpg refuses on the client: PostgreSQL executes nothing. Each with the error
# raised, and the queries the request counts (the explicit prepare, where there is one).
CLIENT_SIDE_ERRORS: dict[str, tuple[Callable[[Any, Any], Awaitable[Any]], type, int]] = {
    "unencodable argument": (
        lambda c, p: c.fetchval("SELECT $1::int", "seven"),
        asyncpg.DataError,
        0,
    ),
    "pool, unencodable argument": (
        lambda c, p: p.fetchval("SELECT $1::int", "seven"),
        asyncpg.DataError,
        0,
    ),
    "executemany, unencodable row": (
        lambda c, p: c.executemany("SELECT $1::int", [("seven",)]),
        asyncpg.DataError,
        0,
    ),
    "prepared statement, unencodable argument": (_prepared_then_unencodable, asyncpg.DataError, 1),
    "missing argument": (lambda c, p: c.fetchval("SELECT $1::int"), asyncpg.InterfaceError, 0),
}


@pytest.mark.parametrize("path", list(CLIENT_SIDE_ERRORS))
async def test_error_raised_on_the_client_is_not_a_query(
    conn: InstrumentedConnection, pool: InstrumentedPool, path: str
) -> None:
    call, error, queries = CLIENT_SIDE_ERRORS[path]
    caught: list[BaseException] = []

    async def body() -> None:
        try:
            await call(conn, pool)
        except Exception as exc:
            caught.append(exc)

    rec = await in_request(body)
    assert [type(exc) for exc in caught] == [error]
    assert rec.db_queries == queries
    assert await conn.fetchval("SELECT 1") == 1
    assert pool.get_idle_size() == 2


async def test_data_error_from_the_server_is_a_query(conn: InstrumentedConnection) -> None:
    # The rule above keys on who raised the error, not on its class: PostgreSQL's own
    # data errors are asyncpg.DataError subclasses too.
    caught: list[BaseException] = []

    async def body() -> None:
        try:
            await conn.fetchval("SELECT 'seven'::int")
        except asyncpg.DataError as exc:
            caught.append(exc)

    rec = await in_request(body)
    (exc,) = caught
    assert type(exc) is asyncpg.InvalidTextRepresentationError
    assert exc.sqlstate == "22P02"
    assert rec.db_queries == 1


async def test_span_of_an_error_raised_on_the_client_has_no_sqlstate(
    conn: InstrumentedConnection,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def endpoint(request: Request) -> Response:
        with contextlib.suppress(asyncpg.DataError):
            await conn.fetchval("SELECT $1::int", "seven")
        return PlainTextResponse("ok")

    app = LoopWatch(Starlette(routes=[Route("/q", endpoint)]), file=None, tracer_provider=provider)
    try:
        async with client(app) as c:
            assert (await c.get("/q")).status_code == 200
    finally:
        provider.shutdown()
    (query,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    attrs = dict(query.attributes or {})
    assert attrs["error.type"] == "asyncpg.exceptions.DataError"
    assert "db.response.status_code" not in attrs  # 22000 is the class's, never sent


# --- 5. outside any request --------------------------------------------------------------------


async def test_proxies_work_outside_a_request(pool: InstrumentedPool, table: str) -> None:
    failures = _failures.total()
    assert await pool.fetchval("SELECT $1::int", 1) == 1
    assert await pool.copy_records_to_table(table, records=[(5, "five")]) == "COPY 1"
    async with pool.acquire() as c:
        stmt = await c.prepare("SELECT $1::int + 1")
        assert await stmt.fetchval(1) == 2
        async with c.transaction():
            assert [r[0] async for r in c.cursor("SELECT generate_series(1, 3)")] == [1, 2, 3]
            cursor = await c.cursor("SELECT generate_series(1, 3)")
            assert await cursor.fetchrow() == (1,)
    c = await pool.acquire()
    await pool.release(c)
    assert pool.get_idle_size() == 2
    assert _failures.total() == failures


async def test_query_after_the_response_is_not_charged(pool: InstrumentedPool) -> None:
    # A background task runs after the final body was sent: the request has ended.
    ran: list[Any] = []

    async def later() -> None:
        ran.append(await pool.fetchval(f"SELECT 42 FROM pg_sleep({SLEEP})"))

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(later))

    records: list[RequestRecord] = []
    app = LoopWatch(Starlette(routes=[Route("/q", endpoint)]), file=None, sinks=[records.append])
    failures = _failures.total()
    async with client(app) as c:
        assert (await c.get("/q")).status_code == 200
    assert ran == [42]
    (rec,) = records
    assert rec.db_queries == 0
    assert rec.db_ms == 0
    assert _failures.total() == failures


async def test_queries_of_a_task_outside_the_request_are_not_charged(
    pool: InstrumentedPool,
) -> None:
    # A worker started outside any request (say, at startup) queries while a request is
    # in flight on the same loop: nothing of it belongs to the request.
    worker_started = asyncio.Event()

    async def worker() -> None:
        worker_started.set()
        for _ in range(3):
            await pool.fetchval(f"SELECT pg_sleep({SLEEP})")

    async def body() -> None:
        await worker_started.wait()
        await asyncio.sleep(0.1)

    task = asyncio.create_task(worker())
    try:
        rec = await in_request(body)
    finally:
        await task
    assert rec.db_queries == 0
    assert rec.db_ms == 0
    assert rec.pool_wait_ms == 0
    assert not any(kind in ("db", "pool") for kind, _, _ in rec.segments)


# --- 6. no leaked connections ------------------------------------------------------------------


async def test_cancelled_request_returns_its_connection(pool1: InstrumentedPool) -> None:
    in_query = asyncio.Event()

    async def body() -> None:
        async with pool1.acquire() as c:
            in_query.set()
            await c.fetch("SELECT pg_sleep(5)")

    records: list[RequestRecord] = []
    async with client(watched(body, records)) as c:
        task = asyncio.create_task(c.get("/q"))
        await asyncio.wait_for(in_query.wait(), 5)
        await asyncio.sleep(0.05)  # let the query reach the server
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await wait_until(lambda: pool1.get_idle_size() == pool1.get_size() == 1, 3), (
        f"size {pool1.get_size()}, idle {pool1.get_idle_size()}"
    )
    async with pool1.acquire(timeout=3) as c:
        assert await c.fetchval("SELECT 1") == 1
    assert time.monotonic() - t0 < 3, "the server must have stopped the pg_sleep(5)"
    (rec,) = records
    assert rec.error == "CancelledError"


async def test_query_timeout_returns_connection_to_pool(pool1: InstrumentedPool) -> None:
    caught: list[BaseException] = []
    pids: list[int] = []

    async def body() -> None:
        async with pool1.acquire() as c:
            pids.append(c.get_server_pid())
            try:
                await c.fetch("SELECT pg_sleep(5)", timeout=0.1)
            except asyncio.TimeoutError as exc:
                caught.append(exc)

    t0 = time.monotonic()
    rec = await in_request(body)
    assert len(caught) == 1
    assert isinstance(caught[0], asyncio.TimeoutError)
    assert pool1.get_size() == pool1.get_idle_size() == 1
    async with pool1.acquire(timeout=3) as c:
        assert c.get_server_pid() == pids[0], "the same connection, back in the pool"
        assert await c.fetchval("SELECT 1") == 1
    assert time.monotonic() - t0 < 3, "the server must have stopped the pg_sleep(5)"
    assert rec.db_queries == 1
    assert rec.db_ms >= 100 - CLOCK_SLACK_MS  # the query was awaited for its whole timeout


async def test_pool_query_timeout_returns_connection_to_pool(pool1: InstrumentedPool) -> None:
    caught: list[BaseException] = []

    async def body() -> None:
        try:
            await pool1.fetch("SELECT pg_sleep(5)", timeout=0.1)
        except asyncio.TimeoutError as exc:
            caught.append(exc)

    t0 = time.monotonic()
    rec = await in_request(body)
    assert len(caught) == 1
    assert pool1.get_size() == pool1.get_idle_size() == 1
    assert await pool1.fetchval("SELECT 1") == 1
    assert time.monotonic() - t0 < 3, "the server must have stopped the pg_sleep(5)"
    assert rec.db_queries == 1


# --- 7. no secrets in the record file ----------------------------------------------------------

PARAM_SECRET = "hunter2-param"


def dsn_with_password(dsn: str) -> tuple[str, str]:
    """The DSN with a password in it (pgserver trusts every local connection, so any
    password works), and that password."""
    parts = urlsplit(dsn)
    if parts.password:
        return dsn, parts.password
    password = "s3cretpw"
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or 'postgres'}:{password}@{host}"
    return urlunsplit(parts._replace(netloc=netloc)), password


async def test_record_file_holds_no_password_or_parameter(pg_dsn: str, record_file: Path) -> None:
    dsn, password = dsn_with_password(pg_dsn)
    async with create_pool(dsn, min_size=1, max_size=1) as p:

        async def ok() -> None:
            assert await p.fetchval("SELECT $1::text", PARAM_SECRET) == PARAM_SECRET

        async def fails() -> None:
            # The error message carries the parameter value.
            await p.fetchval("SELECT $1::int", PARAM_SECRET)

        async def endpoint(request: Request) -> Response:
            await (fails() if request.query_params.get("fail") else ok())
            return PlainTextResponse("ok")

        app = LoopWatch(Starlette(routes=[Route("/q", endpoint)]), file=record_file)
        async with client(app) as c:
            assert (await c.get(f"/q?token={PARAM_SECRET}")).status_code == 200
            with pytest.raises(asyncpg.DataError, match=PARAM_SECRET):
                await c.get("/q?fail=1")
        records = await asyncio.to_thread(wait_for_requests, record_file, 2)

    assert [r["status"] for r in records] == [200, 500]
    # The failing call's argument could not be encoded: asyncpg refused it on the client.
    assert [r["db_queries"] for r in records] == [1, 0]
    text = await asyncio.to_thread(record_file.read_text, encoding="utf-8")
    for secret in (password, PARAM_SECRET, dsn, pg_dsn):
        assert secret not in text


# --- 8. asyncpg's own type checks pass ----------------------------------------------------------


async def release_or_close(pool: Any, conn: Any) -> None:
    """A helper common in apps: a pooled connection goes back to its pool, a direct one is
    closed."""
    if isinstance(conn, asyncpg.pool.PoolConnectionProxy):
        await pool.release(conn)
    else:
        await conn.close()


async def test_instrumented_pool_is_an_asyncpg_pool(pool: InstrumentedPool) -> None:
    assert isinstance(pool, asyncpg.Pool)
    assert isinstance(pool, InstrumentedPool)
    assert type(pool) is InstrumentedPool  # what cannot hold: type() names the proxy


async def test_wrapped_pool_is_an_asyncpg_pool(pg_dsn: str) -> None:
    raw = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        assert isinstance(wrap_pool(raw), asyncpg.Pool)
    finally:
        await close_pool(raw)


async def test_pooled_connection_is_a_pool_connection_proxy(pool: InstrumentedPool) -> None:
    async with pool.acquire() as c:
        assert isinstance(c, asyncpg.pool.PoolConnectionProxy)
    c = await pool.acquire()
    try:
        assert isinstance(c, asyncpg.pool.PoolConnectionProxy)
    finally:
        await pool.release(c)


async def test_direct_connection_is_not_a_pool_connection_proxy(
    conn: InstrumentedConnection,
) -> None:
    assert not isinstance(conn, asyncpg.pool.PoolConnectionProxy)
    assert isinstance(conn, asyncpg.connection.Connection)


async def test_release_or_close_keeps_a_pooled_connection_in_its_pool(
    pool1: InstrumentedPool,
) -> None:
    c = await pool1.acquire()
    pid = c.get_server_pid()
    await release_or_close(pool1, c)
    assert pool1.get_size() == pool1.get_idle_size() == 1
    async with pool1.acquire(timeout=3) as again:
        assert again.get_server_pid() == pid, "the same connection, not a new one"


async def test_release_or_close_closes_a_direct_connection(
    pool1: InstrumentedPool, pg_dsn: str
) -> None:
    c = await connect(pg_dsn)
    await release_or_close(pool1, c)
    assert c.is_closed()
    assert pool1.get_size() == pool1.get_idle_size() == 1


async def test_connection_can_be_weakly_referenced(pg_dsn: str) -> None:
    c = await connect(pg_dsn)
    ref = weakref.ref(c)
    assert ref() is c
    await c.close()
    del c
    gc.collect()
    assert ref() is None


async def test_statement_cursor_and_transaction_pass_asyncpg_checks(
    conn: InstrumentedConnection,
) -> None:
    stmt = await conn.prepare("SELECT generate_series(1, 3)")
    assert isinstance(stmt, asyncpg.prepared_stmt.PreparedStatement)
    transaction = conn.transaction()
    assert isinstance(transaction, asyncpg.transaction.Transaction)
    async with transaction:
        factory = conn.cursor("SELECT 1")
        assert isinstance(factory, asyncpg.cursor.CursorFactory)
        assert isinstance(await factory, asyncpg.cursor.Cursor)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_notification_callback_receives_the_wrapper(open_conn: Opener, kind: str) -> None:
    got: asyncio.Queue[tuple[Any, str, str]] = asyncio.Queue()

    def on_notify(con: Any, pid: int, channel: str, payload: str) -> None:
        got.put_nowait((con, channel, payload))

    async def on_notify_async(con: Any, pid: int, channel: str, payload: str) -> None:
        on_notify(con, pid, channel, payload)

    callback = on_notify if kind == "sync" else on_notify_async
    async with open_conn() as conn:
        await conn.add_listener("lw_channel", callback)
        await conn.execute("NOTIFY lw_channel, 'hello'")
        assert await asyncio.wait_for(got.get(), 5) == (conn, "lw_channel", "hello")
        # Removed by the callback it was added with: nothing is left listening.
        await conn.remove_listener("lw_channel", callback)
        await conn.execute("NOTIFY lw_channel, 'again'")
        await conn.fetchval("SELECT 1")
        await asyncio.sleep(0.05)
        assert got.empty()
        assert not conn._listeners


async def test_log_and_termination_callbacks_receive_the_wrapper(pg_dsn: str) -> None:
    c = await connect(pg_dsn)
    got: list[tuple[str, Any, str]] = []

    def on_log(con: Any, message: Any) -> None:
        got.append(("log", con, message.message))

    def on_log_removed(con: Any, message: Any) -> None:
        got.append(("removed", con, message.message))

    def on_close(con: Any) -> None:
        got.append(("closed", con, ""))

    c.add_log_listener(on_log)
    c.add_log_listener(on_log_removed)
    c.remove_log_listener(on_log_removed)
    c.add_termination_listener(on_close)
    await c.execute("DO $$ BEGIN RAISE NOTICE 'hi'; END $$")
    await c.close()
    assert await wait_until(lambda: len(got) == 2, 5), got
    assert got == [("log", c, "hi"), ("closed", c, "")]


async def test_wrap_connection_refuses_another_drivers_connection(pg_dsn: str) -> None:
    psycopg = pytest.importorskip("psycopg")
    other = await psycopg.AsyncConnection.connect(pg_dsn)
    try:
        with pytest.raises(TypeError, match=r"asyncpg connection.*not psycopg\."):
            wrap_connection(other)
    finally:
        await other.close()


async def test_wrap_connection_refuses_what_is_not_a_connection(pool: InstrumentedPool) -> None:
    for other in (object(), pool, pool._lw_inner, "postgresql://db"):
        with pytest.raises(TypeError, match="wrap_connection"):
            wrap_connection(other)


async def test_wrap_pool_refuses_what_is_not_a_pool(conn: InstrumentedConnection) -> None:
    for other in (object(), conn, conn._lw_inner, None):
        with pytest.raises(TypeError, match=r"wrap_pool\(\) takes an asyncpg pool"):
            wrap_pool(other)


def test_a_later_event_loop_is_watched_not_taken_for_a_stalled_one(pg_dsn: str) -> None:
    # Two loops one after the other in one process (two asyncio.run calls, as a test suite
    # or a script makes): the first one's lag probe dies with it, and a watchdog left
    # watching it takes the second loop's quiet moments for stalls (in CI: a 100 ms query
    # recorded as loop wait behind "no request"). The probe must move to the new loop.
    from loopwatch._capture.loop import monitor

    async def main() -> tuple[RequestRecord, int, int]:
        async with create_pool(pg_dsn, min_size=1, max_size=1) as p:
            rec = await in_request(lambda: p.fetchval("SELECT pg_sleep(0.3)"))
            seen = monitor.watchdog.probe_w
            await asyncio.sleep(0.25)  # more than a probe interval, on this loop
            return rec, seen, monitor.watchdog.probe_w

    asyncio.run(main())
    time.sleep(0.3)  # the first loop is gone: its probe is overdue by now
    rec, seen, later = asyncio.run(main())
    assert later > seen, "the lag probe runs on the second loop"
    assert rec.loop_wait_ms < 20, rec
    assert_db_time(rec, 300)


async def test_a_pool_made_from_keywords_is_named_by_them() -> None:
    # Tortoise passes host, port and database as keywords, not as a DSN.
    pool = create_pool(host="db.internal", port=6432, database="shop", user="u", password="pw")
    assert pool.loopwatch_name == "db.internal:6432/shop"
    pool = create_pool(host="/run/postgresql", database="shop", password="pw")
    assert pool.loopwatch_name == "/run/postgresql/shop"
    assert create_pool(password="pw").loopwatch_name.startswith("asyncpg-")
