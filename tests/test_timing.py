"""The public timing API, loopwatch.timed(): against what the endpoints of
tests/timing_app.py measured themselves, under a real uvicorn and a real PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

import loopwatch
from loopwatch import timed

from .conftest import serve
from .helpers import requests_by_path

LOOPS = ["asyncio", "uvloop"]


def _get(url: str) -> dict[str, Any]:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def _gates(url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=30) as client:
        responses = await asyncio.gather(*(client.get(f"{url}/gate/{i}") for i in range(3)))
    return [r.json() for r in responses]


@pytest.mark.parametrize("loop", LOOPS)
def test_timed_blocks_match_what_the_endpoint_measured(
    pg_dsn: str, record_file: Path, loop: str
) -> None:
    env = {"LOOPWATCH_FILE": str(record_file), "LOOPWATCH_TEST_DSN": pg_dsn}
    with serve("tests.timing_app:app", env, loop=loop) as server:
        block = _get(f"{server.url}/block?ms=80")
        decorated = _get(f"{server.url}/decorated?ms=30")
        gates = asyncio.run(_gates(server.url))
        nested = _get(f"{server.url}/nested")
        fails = _get(f"{server.url}/fails")
        cached = _get(f"{server.url}/cached")
        records = requests_by_path(record_file, 8)

    rec = records["/block"]
    assert rec["db_ms"] >= 80 - 1, rec
    assert block["db_ms"] - 3 <= rec["db_ms"] + rec["loop_wait_ms"] <= block["db_ms"] + 1, rec
    assert (rec["db_queries"], rec["db_statements"]) == (2, 2)

    rec = records["/decorated"]
    assert decorated["value"] == "valuevalue"
    assert rec["db_ms"] >= 60 - 1, rec
    assert rec["db_ms"] <= decorated["db_ms"] + 1, rec
    assert (rec["db_queries"], rec["db_statements"]) == (2, 2)

    # A pool of one held 100 ms by each of three requests at once.
    waits = sorted(g["pool_ms"] for g in gates)
    assert waits[2] >= 190, gates
    for truth in gates:
        rec = records[f"/gate/{truth['n']}"]
        assert abs(rec["pool_wait_ms"] + rec["loop_wait_ms"] - truth["pool_ms"]) <= 5, (truth, rec)
        assert rec["pool_wait_ms"] >= truth["pool_ms"] - 5, (truth, rec)
        # (A resume the loop delayed is loop wait, taken out of db: under load, a little.)
        assert rec["db_ms"] + rec["loop_wait_ms"] >= 100 - 1, rec
        assert rec["db_ms"] >= 90, rec
        # The db block inside the pool block was the checkout's: no query of its own.
        assert (rec["db_queries"], rec["db_statements"]) == (1, 1), rec

    # Around a driver loopwatch instruments: the driver counts the round trips (prepare,
    # execute), the block the one statement; a block inside it is a query, and so is a
    # block with statement=False.
    rec = records["/nested"]
    assert rec["db_statements"] == nested["statements"]
    assert rec["db_queries"] == nested["queries"]

    assert fails == {"error": "UndefinedTableError"}  # the app's exception, unchanged
    assert records["/fails"]["db_statements"] == 1

    # A block that never suspended went nowhere (a cache hit): it records nothing.
    rec = records["/cached"]
    assert cached["statements"] == 0
    assert (rec["db_ms"], rec["db_queries"], rec["db_statements"]) == (0.0, 0, 0)
    assert not [s for s in rec["segments"] if s[0] == "db"]


async def _at_once(url: str, paths: list[str]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*(client.get(f"{url}{p}") for p in paths))


@pytest.mark.parametrize("loop", LOOPS)
def test_concurrent_shared_threaded_and_enclosing_blocks(
    pg_dsn: str, record_file: Path, loop: str
) -> None:
    env = {"LOOPWATCH_FILE": str(record_file), "LOOPWATCH_TEST_DSN": pg_dsn}
    with serve("tests.timing_app:app", env, loop=loop) as server:
        concurrent = _get(f"{server.url}/concurrent")
        shared = asyncio.run(_at_once(server.url, [f"/shared/{i}" for i in range(4)]))
        threaded = _get(f"{server.url}/threaded?ms=50")
        # The pool of 2, held 100 ms by each of 3 units of work: the third waits.
        units = asyncio.run(_at_once(server.url, [f"/unit/{i}" for i in range(3)]))
        records = requests_by_path(record_file, 9)

    # Blocks at once in one request each count (they overlap: db_ms is their union).
    rec = records["/concurrent"]
    assert (
        (rec["db_queries"], rec["db_statements"])
        == (3, 3)
        == (
            concurrent["queries"],
            concurrent["statements"],
        )
    )
    assert 20 - 1 <= rec["db_ms"] < 60 - 1, rec

    # One object entered by four requests at once: each request times its own entry,
    # and the app is unaffected.
    assert [r.status_code for r in shared] == [200] * 4
    for i in range(4):
        rec = records[f"/shared/{i}"]
        assert (rec["db_queries"], rec["db_statements"]) == (1, 1), rec
        # (What the loop, busy with the other three, delayed the resume by is loop wait,
        # not database time: 48.9 + 1.1 ms seen on a loaded machine.)
        assert rec["db_ms"] + rec["loop_wait_ms"] >= 50 - 1, rec
        assert rec["db_ms"] >= 40, rec

    # In a sync endpoint's thread the request awaits the thread: the blocking call
    # inside the block is database time.
    rec = records["/threaded"]
    assert rec["db_ms"] >= 50 - 1, rec
    assert rec["db_ms"] <= threaded["db_ms"] + 1, rec
    assert (rec["db_queries"], rec["db_statements"]) == (1, 1)

    # A db block around a checkout: the wait for the connection is pool wait, taken out
    # of the block's db time; the query below is the block's round trip.
    assert all(r.status_code == 200 for r in units)
    for truth in (r.json() for r in units):
        rec = records[f"/unit/{truth['n']}"]
        assert rec["pool_wait_ms"] <= truth["pool_ms"] + 1, (truth, rec)
        assert rec["pool_wait_ms"] + rec["loop_wait_ms"] >= truth["pool_ms"] - 3, (truth, rec)
        assert rec["db_ms"] + rec["pool_wait_ms"] <= truth["pool_ms"] + truth["db_ms"] + 1
        # (A resume the loop delayed is loop wait, taken out of db: under load, a little.)
        assert rec["db_ms"] + rec["loop_wait_ms"] >= 100 - 1, rec
        assert rec["db_ms"] >= 90, rec
        assert (rec["db_queries"], rec["db_statements"]) == (1, 1), rec
    assert max(r.json()["pool_ms"] for r in units) >= 90  # one of them did wait


def test_timed_blocks_make_client_spans(pg_dsn: str, record_file: Path) -> None:
    env = {"LOOPWATCH_FILE": str(record_file), "LOOPWATCH_TEST_DSN": pg_dsn, "OTEL": "1"}
    with serve("tests.timing_app:app", env) as server:
        _get(f"{server.url}/block?ms=20")
        _get(f"{server.url}/decorated?ms=5")
        _get(f"{server.url}/nested")
        _get(f"{server.url}/fails")
        spans = httpx.get(f"{server.url}/spans", timeout=30).json()
    clients = [s for s in spans if s["kind"] == "CLIENT"]
    by_text: dict[str, list[dict[str, Any]]] = {}
    for span in clients:
        by_text.setdefault(span["attributes"].get("db.query.text", span["name"]), []).append(span)

    sleep = by_text["SELECT pg_sleep($1)"][0]
    assert sleep["attributes"]["db.system.name"] == "postgresql"
    assert sleep["attributes"]["db.operation.name"] == "SELECT"
    assert sleep["duration_ms"] >= 20 - 1
    assert "SELECT ?" in by_text  # SELECT 1, sanitized
    # Not SQL: no text unless query_text="raw", the operation as given by nobody -> name.
    redis = [s for s in clients if s["attributes"].get("db.system.name") == "redis"]
    assert len(redis) == 2
    assert all("db.query.text" not in s["attributes"] for s in redis)
    # The nested statement is one span: not one more per prepare and execute below it.
    below = {"SELECT $1::int", "SELECT inner"}
    assert [s for s in clients if s["attributes"].get("db.query.text") in below] == []
    assert len(by_text["SELECT ?"]) == 2  # /block's SELECT 1 and /nested's SELECT 2
    failed = by_text["SELECT broken"][0]
    assert failed["status"] == "ERROR"
    assert failed["attributes"]["error.type"] == "asyncpg.exceptions.UndefinedTableError"
    assert failed["attributes"]["db.response.status_code"] == "42P01"


async def test_outside_a_request_a_block_records_nothing_and_changes_nothing() -> None:
    async with timed("db", "SELECT 1") as block:
        await asyncio.sleep(0)
    assert block.queries == 0
    with pytest.raises(KeyError):
        async with timed("pool"):
            raise KeyError("the app's own")

    @timed("db")
    async def answer(x: int) -> int:
        """Docs kept."""
        return x * 2

    assert await answer(21) == 42
    assert answer.__name__ == "answer"
    assert answer.__doc__ == "Docs kept."


def test_bad_use_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="'db' or 'pool'"):
        timed("http")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="query must be a string"):
        timed("db", b"SELECT 1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="coroutine functions"):
        timed("db")(lambda: None)
    block = timed("db").start()
    with pytest.raises(RuntimeError, match="already running"):
        block.start()
    block.stop()
    block.stop()  # stopping twice is harmless
    assert loopwatch.timed is timed
