"""A FastAPI app on SQLAlchemy's asyncio engine (and SQLModel's session), served by uvicorn
in the tests' subprocesses. Each endpoint measures what it did itself and returns it.

Configured by environment variables: LOOPWATCH_FILE, LOOPWATCH_TEST_DSN (PostgreSQL, as
asyncpg takes it), DRIVER (``asyncpg``, ``psycopg``; ``bare``: SQLAlchemy's own engine,
then ``instrument()``), POOL_MAX (the pool size, no overflow), OTEL (``1``: spans kept
in memory, read back at /spans), OTEL_SQLALCHEMY (``1``: the same, and OpenTelemetry's
SQLAlchemy instrumentation on too), GC_OFF (``1``: no garbage collection).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import sqlalchemy
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.ext.asyncio import create_async_engine as sqlalchemy_engine
from sqlmodel import Field, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelSession

from loopwatch import LoopWatch
from loopwatch.integrations.sqlalchemy import create_async_engine, instrument

from .helpers import burn_cpu, finished_spans, gc_off_if_asked, in_memory_spans

DSN = os.environ.get("LOOPWATCH_TEST_DSN", "")
DRIVER = os.environ.get("DRIVER", "asyncpg")
POOL_MAX = int(os.environ.get("POOL_MAX", "5"))
spans: Any = None
gc_off_if_asked()


class Item(SQLModel, table=True):
    __tablename__ = "lw_sqlmodel_item"
    id: int | None = Field(default=None, primary_key=True)
    name: str


def _url() -> str:
    driver = "psycopg" if DRIVER == "psycopg" else "asyncpg"
    return DSN.replace("postgresql://", f"postgresql+{driver}://", 1).replace(
        "postgres://", f"postgresql+{driver}://", 1
    )


def make_engine() -> AsyncEngine:
    options: dict[str, Any] = {"pool_size": POOL_MAX, "max_overflow": 0}
    if DRIVER == "asyncpg":
        # Options that async_creator= used to drop: one for SQLAlchemy's asyncpg adapter,
        # one for asyncpg.connect itself. Both must arrive.
        options["connect_args"] = {
            "prepared_statement_cache_size": 0,
            "server_settings": {"application_name": "loopwatch-sqlalchemy-test"},
        }
    if DRIVER == "bare":
        engine = sqlalchemy_engine(_url(), **options)
        instrument(engine)
        return engine
    return create_async_engine(_url(), **options)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global spans
    engine = make_engine()
    if os.environ.get("OTEL") or os.environ.get("OTEL_SQLALCHEMY"):
        spans = in_memory_spans()
    if os.environ.get("OTEL_SQLALCHEMY"):
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        # Its version check stops at SQLAlchemy 2.0; its engine events work on 2.1.
        SQLAlchemyInstrumentor().instrument(engine=engine.sync_engine, skip_dep_check=True)
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.create_all)
    app.state.engine = engine
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)
app.add_middleware(LoopWatch)


async def session() -> AsyncIterator[AsyncSession]:
    async with AsyncSession(app.state.engine) as s:
        yield s


async def committed(s: Annotated[AsyncSession, Depends(session)]) -> AsyncIterator[AsyncSession]:
    yield s
    await s.commit()  # after the endpoint returns


@app.get("/ready")
async def ready() -> str:
    return "ok"


@app.get("/work/{n}")
async def work(n: int, cpu: float = 0, db: float = 0) -> dict[str, Any]:
    """A known CPU burn, a known pg_sleep and two more statements on one session."""
    truth: dict[str, Any] = {"n": n, "statements": 3}
    truth["cpu_ms"] = burn_cpu(cpu)
    async with AsyncSession(app.state.engine) as s:
        t0 = time.perf_counter()
        conn = await s.connection()  # the checkout (and BEGIN, lazily, with the first)
        t1 = time.perf_counter()
        await s.execute(text("SELECT pg_sleep(:s)"), {"s": db / 1000})
        assert (await s.execute(text("SELECT 1"))).scalar_one() == 1
        assert (await s.execute(sqlalchemy.select(sqlalchemy.literal(2)))).scalar_one() == 2
        t2 = time.perf_counter()
        await s.rollback()
        t3 = time.perf_counter()
    del conn
    truth["pool_ms"] = (t1 - t0) * 1000
    truth["db_ms"] = (t2 - t1 + t3 - t2) * 1000
    return truth


@app.get("/twice")
async def twice() -> dict[str, Any]:
    """The same statement twice, and the connection's application_name."""
    async with AsyncSession(app.state.engine) as s:
        for _ in range(2):
            await s.execute(text("SELECT 1"))
        name = (await s.execute(text("SHOW application_name"))).scalar_one()
        await s.rollback()
    return {"application_name": name, "statements": 3}


@app.get("/hold/{n}")
async def hold(n: int, ms: float = 100) -> dict[str, Any]:
    """Hold a connection for ``ms``: on a pool of one, the others wait."""
    engine: AsyncEngine = app.state.engine
    t0 = time.perf_counter()
    async with engine.connect() as conn:
        t1 = time.perf_counter()
        await conn.execute(text("SELECT pg_sleep(:s)"), {"s": ms / 1000})
        t2 = time.perf_counter()
        await conn.rollback()
    t3 = time.perf_counter()
    return {"n": n, "pool_ms": (t1 - t0) * 1000, "db_ms": (t3 - t1) * 1000, "held": t2 - t1}


@app.get("/sqlmodel/{name}")
async def sqlmodel_items(name: str) -> dict[str, Any]:
    """SQLModel's session: an insert, a commit and a select."""
    async with SQLModelSession(app.state.engine) as s:
        s.add(Item(name=name))
        await s.commit()
        items = (await s.exec(select(Item).where(Item.name == name))).all()
    return {"count": len(items), "statements": 2}


@app.get("/error")
async def error() -> dict[str, Any]:
    async with AsyncSession(app.state.engine) as s:
        try:
            await s.execute(text("SELECT * FROM no_such_table"))
        except sqlalchemy.exc.ProgrammingError as exc:
            return {"error": type(exc).__name__, "orig": type(exc.orig).__name__}
    return {"error": None}


@app.get("/stream")
async def stream() -> dict[str, Any]:
    """A server-side cursor read in batches: one statement, several round trips."""
    async with app.state.engine.connect() as conn:
        result = await conn.stream(
            text("SELECT g FROM generate_series(1, 50) g"), execution_options={"yield_per": 10}
        )
        rows = [row async for row in result]
        await conn.rollback()
    return {"rows": len(rows), "statements": 1}


@app.get("/depends/request")
async def depends_request(s: Annotated[AsyncSession, Depends(committed)]) -> dict[str, Any]:
    await s.execute(text("SELECT 1"))
    return {"statements": 1}


try:  # FastAPI 0.121 and later: the dependency's exit runs as the endpoint returns
    function_scope: Any = Depends(committed, scope="function")  # type: ignore[call-arg]
except TypeError:
    function_scope = None

if function_scope is not None:

    @app.get("/depends/function")
    async def depends_function(s: Annotated[AsyncSession, function_scope]) -> dict[str, Any]:
        await s.execute(text("SELECT 1"))
        return {"statements": 1}


@app.get("/spans")
def exported_spans() -> list[dict[str, Any]]:
    return finished_spans(spans)
