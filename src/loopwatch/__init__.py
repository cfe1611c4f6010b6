"""loopwatch: what async buys a database-bound ASGI app, measured with its own traffic.

app.add_middleware(LoopWatch)                 # records to ./loopwatch.jsonl
pool = await create_pool(dsn, max_size=15)    # drop-in for asyncpg.create_pool
async with timed("db", query):                # any other awaited call, by hand

The names are imported when first used (PEP 562): ``loopwatch report`` then starts
without asyncpg and the middleware, which it does not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
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

_WHERE = {
    "InstrumentedConnection": ".integrations.asyncpg",
    "InstrumentedPool": ".integrations.asyncpg",
    "connect": ".integrations.asyncpg",
    "create_pool": ".integrations.asyncpg",
    "wrap_connection": ".integrations.asyncpg",
    "wrap_pool": ".integrations.asyncpg",
    "LoopWatch": ".middleware",
    "Meta": ".record",
    "ProcessSample": ".record",
    "RecordError": ".record",
    "RequestRecord": ".record",
    "Timed": ".timing",
    "timed": ".timing",
}

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


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'loopwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next look-up is a plain one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
