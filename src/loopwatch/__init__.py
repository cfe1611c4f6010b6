"""loopwatch: what async buys a database-bound ASGI app, measured with its own traffic.

app.add_middleware(LoopWatch)                 # records to ./loopwatch.jsonl
pool = await create_pool(dsn, max_size=15)    # drop-in for asyncpg.create_pool
async with timed("db", query):                # any other awaited call, by hand
"""

from ._version import __version__
from .integrations.asyncpg import (
    InstrumentedConnection,
    InstrumentedPool,
    connect,
    create_pool,
    wrap_connection,
    wrap_pool,
)
from .middleware import LoopWatch
from .record import Meta, ProcessSample, RecordError, RequestRecord
from .timing import Timed, timed

__all__ = [
    "InstrumentedConnection",
    "InstrumentedPool",
    "LoopWatch",
    "Meta",
    "ProcessSample",
    "RecordError",
    "RequestRecord",
    "Timed",
    "__version__",
    "connect",
    "create_pool",
    "timed",
    "wrap_connection",
    "wrap_pool",
]
