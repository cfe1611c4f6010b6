"""db.query.text without literal values: the sanitizer on a corpus, then through the real
OpenTelemetry SDK and a real PostgreSQL."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from loopwatch import InstrumentedPool, LoopWatch
from loopwatch.export.sql import MAX_CHARS, TRUNCATED, first_keyword, sanitize

CORPUS = [
    # strings: '' inside, E'' with backslash escapes, U&'', N'', bit and hex strings
    ("UPDATE t SET v = 'x' WHERE id = 42", "UPDATE t SET v = ? WHERE id = ?"),
    ("SELECT 'it''s', 'a''''b', ''", "SELECT ?, ?, ?"),
    ("SELECT E'it\\'s \\\\', e'\\n'", "SELECT ?, ?"),
    ("SELECT U&'d\\0061t' UESCAPE '!', N'nchar'", "SELECT ? UESCAPE ?, ?"),
    ("SELECT B'1010', X'1F', b'0', x'ff'", "SELECT ?, ?, ?, ?"),
    ("SELECT 'héllo wörld', 'x'\n'continued'", "SELECT ?, ?\n?"),
    # numbers, and what only looks like one
    ("SELECT 1, 1.5, .5, 5., 1e10, 1.5E-3, 2e+4", "SELECT ?, ?, ?, ?, ?, ?, ?"),
    ("SELECT 0x1F, 0o17, 0b101, 1_000_000", "SELECT ?, ?, ?, ?"),
    ("SELECT -5, a-1, b+2, c*3 FROM t", "SELECT -?, a-?, b+?, c*? FROM t"),
    ("SELECT t1.c2, col_3, a$1, x9y FROM t1", "SELECT t1.c2, col_3, a$1, x9y FROM t1"),
    (
        'SELECT "col 1", "a""b", "it\'s", "42" FROM "T1"',
        'SELECT "col 1", "a""b", "it\'s", "42" FROM "T1"',
    ),
    ("SELECT a[1:2], 1..2 FROM t", "SELECT a[?:?], ?..? FROM t"),
    # parameters and casts stay; TRUE, NULL and keywords are not values
    ("SELECT $1::text, $12, 'x'::text, 5::int", "SELECT $1::text, $12, ?::text, ?::int"),
    (
        "SELECT INTERVAL '1 day', DATE '2024-01-01', TRUE, NULL",
        "SELECT INTERVAL ?, DATE ?, TRUE, NULL",
    ),
    # dollar quotes, with and without a tag
    ("SELECT $$it's$$, $x$a $$ b$x$", "SELECT ?, ?"),
    (
        "CREATE FUNCTION f() RETURNS int AS $body$ BEGIN RETURN 42; END $body$ LANGUAGE sql",
        "CREATE FUNCTION f() RETURNS int AS ? LANGUAGE sql",
    ),
    ("SELECT $a$ $b$ secret $b$ $a$", "SELECT ?"),
    # comments: dropped, nested ones whole
    ("SELECT 1 -- the id\nFROM t", "SELECT ?\nFROM t"),
    ("SELECT /* a /* nested 42 */ still 'x' */ 1", "SELECT ?"),
    ("/* app=shop */ SELECT 1", "SELECT ?"),
    ("SELECT/**/1", "SELECT ?"),
    ("SELECT 1 -- 'secret'", "SELECT ?"),
    # IN lists collapse; a list of parameters stays
    ("SELECT * FROM t WHERE a IN (1, 2, 3)", "SELECT * FROM t WHERE a IN (?)"),
    ("SELECT * FROM t WHERE a not in ('x','y')", "SELECT * FROM t WHERE a not in (?)"),
    (
        "SELECT * FROM t WHERE a IN ($1, $2) AND b IN (7)",
        "SELECT * FROM t WHERE a IN ($1, $2) AND b IN (?)",
    ),
    ("SELECT xin(1, 2), f(1, 2)", "SELECT xin(?, ?), f(?, ?)"),
    (
        "INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y')",
        "INSERT INTO t (a, b) VALUES (?, ?), (?, ?)",
    ),
    # jsonb's ? operator is not a placeholder
    ("SELECT d ? 'k', d ?| ARRAY['a', 'b'] FROM t", "SELECT d ? ?, d ?| ARRAY[?, ?] FROM t"),
    # statements that cannot take parameters
    ("ALTER ROLE app PASSWORD 'hunter2'", "ALTER ROLE app PASSWORD ?"),
    (
        "ALTER ROLE app WITH LOGIN PASSWORD E'hun\\'ter2' VALID UNTIL '2030-01-01'",
        "ALTER ROLE app WITH LOGIN PASSWORD ? VALID UNTIL ?",
    ),
    ("CREATE USER u PASSWORD $pw$hunter2$pw$", "CREATE USER u PASSWORD ?"),
    # several statements in one text
    (
        "SELECT 1; UPDATE t SET a = 'x'; DELETE FROM u WHERE id = 7",
        "SELECT ?; UPDATE t SET a = ?; DELETE FROM u WHERE id = ?",
    ),
    # unterminated: the rest is one ?
    ("SELECT 'unterminated secret", "SELECT ?"),
    ("SELECT E'unterminated \\' secret", "SELECT ?"),
    ('SELECT "unterminated secret', "SELECT ?"),
    ("SELECT $x$ unterminated secret", "SELECT ?"),
    ("SELECT /* unterminated 'secret'", "SELECT ?"),
    ("SELECT 'a' || 'b', 'open secret", "SELECT ? || ?, ?"),
    # where a backslash ends the string depends on standard_conforming_strings
    ("SELECT 'C:\\', 'secret'", "SELECT ?"),
    ("SELECT 'x\\' secret '", "SELECT ?"),
    ("SELECT 'a\\b', 1", "SELECT ?, ?"),  # the same end either way
    # nothing to take out: unchanged
    ("SELECT $1::text", "SELECT $1::text"),
    (
        "  SELECT id\n  FROM users\n  WHERE id = $1\n",
        "  SELECT id\n  FROM users\n  WHERE id = $1\n",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), CORPUS, ids=[raw[:40] for raw, _ in CORPUS])
def test_corpus(raw: str, expected: str) -> None:
    assert sanitize(raw) == expected


@pytest.mark.parametrize(
    ("raw", "operation"),
    [
        ("SELECT 'x'", "SELECT"),
        ("/* app=shop */ update t set a = 1", "UPDATE"),
        ("-- why\n  (SELECT 1)", "SELECT"),
        ("ALTER ROLE app PASSWORD 'hunter2'", "ALTER"),
        ("'unterminated", None),
        ("", None),
    ],
)
def test_operation_is_read_from_the_sanitized_text(raw: str, operation: str | None) -> None:
    assert first_keyword(sanitize(raw)) == operation


def test_a_long_text_is_cut_before_it_is_sanitized() -> None:
    raw = "INSERT INTO t VALUES " + ", ".join(f"({i}, 'secret {i}')" for i in range(1000))
    clean = sanitize(raw)
    assert clean.endswith(TRUNCATED)
    assert "secret" not in clean
    assert clean.startswith("INSERT INTO t VALUES (?, ?), (?, ?)")
    assert len(clean) <= MAX_CHARS + len(TRUNCATED)


def test_query_text_must_be_a_known_mode() -> None:
    with pytest.raises(ValueError, match="query_text must be 'sanitized', 'raw' or 'off'"):
        LoopWatch(Starlette(), file=None, query_text="plain")  # type: ignore[arg-type]


# --- through the SDK and PostgreSQL ------------------------------------------------------

SECRET = "hunter2-literal"
NO_ROLE = "loopwatch_no_such_role"


def literal_app(pool: InstrumentedPool) -> Starlette:
    async def literal(request: Request) -> Response:
        value = await pool.fetchval(f"/* shop */ SELECT '{SECRET}'::text || 42")
        return PlainTextResponse(value)

    async def password(request: Request) -> Response:
        # A role that does not exist: the statement fails, its span is still exported.
        try:
            await pool.execute(f"ALTER ROLE {NO_ROLE} PASSWORD '{SECRET}'")
        except asyncpg.UndefinedObjectError:
            return PlainTextResponse("no such role")
        return PlainTextResponse("changed")

    return Starlette(routes=[Route("/literal", literal), Route("/password", password)])


async def query_spans(
    app: LoopWatch, path: str, exporter: InMemorySpanExporter
) -> list[ReadableSpan]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get(path)).status_code == 200
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]


async def test_a_literal_is_exported_sanitized(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(literal_app(pool), file=None, tracer_provider=provider)
    (query,) = await query_spans(app, "/literal", exporter)
    attrs = dict(query.attributes or {})
    assert attrs["db.query.text"] == "SELECT ?::text || ?"
    assert attrs["db.operation.name"] == "SELECT"  # past the leading comment
    assert query.name == "SELECT postgres"
    assert SECRET not in repr(
        [(s.name, dict(s.attributes or {})) for s in exporter.get_finished_spans()]
    )


async def test_a_password_is_exported_sanitized(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(literal_app(pool), file=None, tracer_provider=provider)
    (query,) = await query_spans(app, "/password", exporter)
    attrs = dict(query.attributes or {})
    assert attrs["db.query.text"] == f"ALTER ROLE {NO_ROLE} PASSWORD ?"
    assert attrs["db.operation.name"] == "ALTER"
    assert attrs["error.type"] == "asyncpg.exceptions.UndefinedObjectError"
    assert SECRET not in repr(
        [(s.name, dict(s.attributes or {})) for s in exporter.get_finished_spans()]
    )


async def test_raw_query_text_is_an_explicit_opt_in(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(literal_app(pool), file=None, tracer_provider=provider, query_text="raw")
    (query,) = await query_spans(app, "/literal", exporter)
    attrs = dict(query.attributes or {})
    assert attrs["db.query.text"] == f"/* shop */ SELECT '{SECRET}'::text || 42"
    assert attrs["db.operation.name"] == "SELECT"


async def test_query_text_can_be_left_out(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(literal_app(pool), file=None, tracer_provider=provider, query_text="off")
    (query,) = await query_spans(app, "/literal", exporter)
    attrs = dict(query.attributes or {})
    assert "db.query.text" not in attrs
    assert attrs["db.operation.name"] == "SELECT"
    assert query.name == "SELECT postgres"
