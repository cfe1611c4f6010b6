"""loopwatch in one minute: a Starlette app on an embedded PostgreSQL, 100 requests at once.

    python examples/quickstart.py [--dsn DSN]

Starts an embedded PostgreSQL (pgserver) unless a DSN is given, serves a small app with
LoopWatch and a pool of 15 under uvicorn on 127.0.0.1, sends 100 concurrent requests
(each a little CPU and a 50 ms query), then reads the record file and says what one
process did with them. ``loopwatch report`` will draw the timeline of such a file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loopwatch import LoopWatch, create_pool


def make_app(dsn: str, record_file: Path) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with create_pool(dsn, min_size=1, max_size=15) as pool:
            app.state.pool = pool
            yield

    async def item(request: Request) -> Response:
        sum(i * i for i in range(20_000))  # a little CPU: parse, validate, build
        row = await request.app.state.pool.fetchrow(
            "SELECT $1::int AS id, pg_sleep(0.05)::text AS slept", request.path_params["item_id"]
        )
        return JSONResponse({"id": row["id"]})

    return Starlette(
        routes=[Route("/items/{item_id:int}", item)],
        middleware=[Middleware(LoopWatch, file=str(record_file))],
        lifespan=lifespan,
    )


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="lwdemo-") as datadir:
        server = pgserver.get_server(datadir, cleanup_mode="delete")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


async def run(dsn: str, record_file: Path, n: int) -> float:
    config = uvicorn.Config(
        make_app(dsn, record_file), host="127.0.0.1", port=0, log_level="warning"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:
        t0 = time.perf_counter()
        responses = await asyncio.gather(*(client.get(f"/items/{i}") for i in range(n)))
        elapsed = time.perf_counter() - t0
    assert all(r.status_code == 200 for r in responses)
    server.should_exit = True
    await serving
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL to use (default: an embedded one)")
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    with database(args.dsn) as dsn, tempfile.TemporaryDirectory() as tmp:
        record_file = Path(tmp) / "loopwatch.jsonl"
        elapsed = asyncio.run(run(dsn, record_file, args.requests))
        from loopwatch import _writer

        _writer._close_all()  # the background writer: flush before reading
        lines = [json.loads(line) for line in record_file.read_text().splitlines()]

    reqs = [d for d in lines if d["type"] == "request"]
    rss = max(d["rss_bytes"] or 0 for d in reqs) / 2**20

    def med(key: str) -> float:
        return statistics.median(d[key] for d in reqs)

    print(f"{len(reqs)} concurrent requests served by one process in {elapsed * 1000:.0f} ms")
    print(
        f"  per request (median): wall {med('wall_ms'):.1f} ms = CPU on the loop "
        f"{med('cpu_ms'):.2f} ms + awaiting PostgreSQL {med('db_ms'):.1f} ms "
        f"+ waiting for a pooled connection {med('pool_wait_ms'):.1f} ms"
    )
    print(f"  process memory: {rss:.0f} MB RSS for all of them")
    print(
        f"  the event loop was on the CPU {sum(d['cpu_ms'] for d in reqs):.0f} ms of "
        f"{elapsed * 1000:.0f} ms; a sync server holds one worker process per request "
        f"in flight"
    )


if __name__ == "__main__":
    main()
