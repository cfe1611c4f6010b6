"""The demo's well-behaved endpoint as a sync WSGI app: Flask, psycopg 3, one connection.

The same per-request work as ``/items/{item_id}`` in loopwatch.cli.demo_app (a little
CPU, then a 50 ms query), for sync workers to serve side by side with the async demo:

    LOOPWATCH_DEMO_DSN=... gunicorn -w 16 'loopwatch.cli.sync_app:create_app()'

Each worker process holds one connection, opened at its first request (after the fork,
so ``--preload`` shares none) and reopened when broken. ``/ready`` does no database
work. Needs the ``sync`` extra: ``pip install 'loopwatch[sync]'``. It imports nothing from
loopwatch, so it also runs as a top-level module (``--pythonpath`` this folder,
``'sync_app:create_app()'``) with workers that hold only what a Flask app would.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
from flask import Flask

QUERY_SECONDS = 0.05  # as in demo_app

# The process's connection and the pid that opened it: a forked child must not use
# its parent's socket.
_conn: tuple[int, psycopg.Connection[tuple[Any, ...]]] | None = None


def create_app() -> Flask:
    """The app, configured by LOOPWATCH_DEMO_DSN."""
    dsn = os.environ["LOOPWATCH_DEMO_DSN"]
    app = Flask(__name__)

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> dict[str, int]:
        checksum = sum(i * i for i in range(20_000)) % 97
        row = (
            _connection(dsn)
            .execute("SELECT %s::int AS id, pg_sleep(%s)::text AS slept", (item_id, QUERY_SECONDS))
            .fetchone()
        )
        if row is None:  # a SELECT without FROM returns its row
            raise RuntimeError("the query returned no row")
        return {"id": row[0], "checksum": checksum}

    @app.get("/ready")
    def ready() -> str:
        return "ok"

    return app


def _connection(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    global _conn
    pid = os.getpid()
    if _conn is not None and _conn[0] == pid and not _conn[1].broken and not _conn[1].closed:
        return _conn[1]
    if _conn is not None and _conn[0] == pid:
        _conn[1].close()
    conn = psycopg.connect(dsn, autocommit=True)
    _conn = (pid, conn)
    return conn
