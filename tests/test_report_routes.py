"""The route table: a row per method of each route, client and server errors apart."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from loopwatch.cli.main import main
from loopwatch.record import RequestRecord
from loopwatch.report import ReportError, quantiles, render_routes, render_summary
from loopwatch.report import reading as _reading
from loopwatch.report.reading import parse_route

from .test_report import meta, record_file, report_of, req, stall, write

ARTICLES = "/articles"
ARTICLE = "/articles/{id}"


def call(
    method: str, route: str | None, at: float, wall_ms: float, **fields: object
) -> RequestRecord:
    n = int(at * 1000)
    return replace(req(at, wall_ms, route=route, n=n, **fields), method=method)  # type: ignore[arg-type]


def articles(tmp_path: Path) -> Path:
    """A list and a create on one route, a read, a replace and a delete on another."""
    return record_file(
        tmp_path,
        [
            call("GET", ARTICLES, 0.0, 10.0, cpu_ms=1.0, db_ms=5.0),
            call("GET", ARTICLES, 0.1, 20.0, cpu_ms=1.0, db_ms=15.0),
            call("GET", ARTICLES, 0.2, 30.0, cpu_ms=1.0, db_ms=25.0),
            call("POST", ARTICLES, 0.3, 40.0, cpu_ms=4.0, db_ms=30.0, status=201),
            call("POST", ARTICLES, 0.4, 50.0, cpu_ms=2.0, status=422),
            call("GET", ARTICLE, 0.5, 5.0, db_ms=4.0),
            call("GET", ARTICLE, 0.6, 7.0, db_ms=6.0, status=404),
            call("DELETE", ARTICLE, 0.7, 25.0, status=500, error="RuntimeError"),
            call("PUT", ARTICLE, 0.8, 15.0, status=503),
            call("GET", None, 0.9, 1.0, status=404, path="/favicon.ico"),
            call("POST", None, 1.0, 1.5, status=405, path="/"),
        ],
    )


def test_a_row_per_method_of_each_route(tmp_path: Path) -> None:
    assert render_routes(report_of(articles(tmp_path)), 100) == (
        "Routes, by total wall time (mean cpu, db, pool wait and loop wait per request)\n"
        "  route                  reqs     p50     p95     cpu      db  pool  loop  4xx  5xx\n"
        "  POST /articles            2  40.0ms  50.0ms  3.00ms  15.0ms   0µs   0µs    1    0\n"
        "  GET /articles             3  20.0ms  30.0ms  1.00ms  15.0ms   0µs   0µs    0    0\n"
        "  DELETE /articles/{id}     1  25.0ms  25.0ms     0µs     0µs   0µs   0µs    0    1\n"
        "  PUT /articles/{id}        1  15.0ms  15.0ms     0µs     0µs   0µs   0µs    0    1\n"
        "  GET /articles/{id}        2  5.00ms  7.00ms     0µs  5.00ms   0µs   0µs    1    0\n"
        "  (no route)                2  1.00ms  1.50ms     0µs     0µs   0µs   0µs    2    0\n"
    )


def test_when_narrow_4xx_goes_before_5xx(tmp_path: Path) -> None:
    report = report_of(articles(tmp_path))

    def head(width: int) -> str:
        (line,) = [x for x in render_routes(report, width).splitlines() if x.startswith("  route")]
        return line

    assert head(73) == "  route             reqs     p50     p95     cpu      db  pool  loop  5xx"
    assert head(74).endswith("  loop  4xx  5xx")


def test_json_rows_name_the_method_and_count_4xx_apart(tmp_path: Path) -> None:
    data = report_of(articles(tmp_path)).to_json()
    rows = [(r["method"], r["route"], r["requests"], r["client_errors"], r["errors"])
            for r in data["routes"]]  # fmt: skip
    assert rows == [
        ("POST", ARTICLES, 2, 1, 0),
        ("GET", ARTICLES, 3, 0, 0),
        ("DELETE", ARTICLE, 1, 0, 1),
        ("PUT", ARTICLE, 1, 0, 1),
        ("GET", ARTICLE, 2, 1, 0),
        (None, "(no route)", 2, 2, 0),
    ]
    assert data["route_count"] == 6
    assert data["errors"] == 2  # as before: 5xx or raised
    assert list(data["routes"][0]) == [
        "method", "route", "requests", "wall_p50_ms", "wall_p95_ms", "wall_p99_ms",
        "wall_max_ms", "cpu_mean_ms", "cpu_p50_ms", "cpu_p95_ms", "cpu_p99_ms", "cpu_max_ms",
        "db_mean_ms", "db_p50_ms", "db_p95_ms", "db_p99_ms", "db_max_ms",
        "pool_wait_mean_ms", "pool_wait_p50_ms", "pool_wait_p95_ms", "pool_wait_p99_ms",
        "pool_wait_max_ms", "loop_wait_mean_ms", "loop_wait_p50_ms", "loop_wait_p95_ms",
        "loop_wait_p99_ms", "loop_wait_max_ms", "db_statements_mean", "db_queries_mean",
        "client_errors", "errors", "wall_total_ms",
    ]  # fmt: skip


def test_a_raised_error_is_a_5xx_even_after_a_4xx_status(tmp_path: Path) -> None:
    path = record_file(tmp_path, [call("GET", ARTICLES, 0, 10, status=404, error="KeyError")])
    (row,) = report_of(path).to_json()["routes"]
    assert (row["client_errors"], row["errors"]) == (0, 1)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("/items/{item_id}", (None, "/items/{item_id}")),
        ("GET /items/{item_id}", ("GET", "/items/{item_id}")),
        ("M-SEARCH /", ("M-SEARCH", "/")),
        ("/a b", (None, "/a b")),  # no method has a "/": a template with a space
        ("GET", (None, "GET")),
        ("get /items/{item_id}", ("GET", "/items/{item_id}")),  # a standard one, any case
        ("m-search /", ("m-search", "/")),  # others as written: methods are case-sensitive
    ],
)
def test_parse_route(text: str, parsed: tuple[str | None, str]) -> None:
    assert parse_route(text) == parsed


def test_route_filter_takes_a_method(tmp_path: Path) -> None:
    path = articles(tmp_path)
    post = report_of(path, route=f"POST {ARTICLES}")
    assert post.to_json()["requests"] == 2
    assert [(r.method, r.route) for r in post.summary.routes] == [("POST", ARTICLES)]
    assert {(r.method, r.route) for r in post.window} == {("POST", ARTICLES)}
    assert "  only route POST /articles" in render_summary(post, 100).splitlines()
    every = report_of(path, route=ARTICLES)
    assert every.to_json()["requests"] == 5
    assert [r.label for r in every.summary.routes] == ["POST /articles", "GET /articles"]
    with pytest.raises(ReportError, match=r"none of the 11 requests match \(route PUT /articles\)"):
        report_of(path, route=f"PUT {ARTICLES}")


def test_route_filter_with_a_method_keeps_that_method_s_stalls(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.jsonl",
        [meta(), call("POST", "/block", 1.0, 152.0), call("GET", "/block", 2.0, 10.0),
         stall(1.0, 150.0)],  # the stall of POST /block
    )  # fmt: skip
    stalls = {
        route: report_of(path, route=route).to_json()["loop"]["stall_count"]
        for route in ("POST /block", "GET /block", "/block")
    }
    assert stalls == {"POST /block": 1, "GET /block": 0, "/block": 1}


def test_the_command_takes_a_method_and_route(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = articles(tmp_path)
    assert main(["report", str(path), "--route", f"DELETE {ARTICLE}", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["requests"], data["errors"], data["scope"]) == (1, 1, f"route DELETE {ARTICLE}")


def test_rows_past_the_limit_are_counted_together_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_reading, "MAX_ROUTES", 3)
    records = [call("GET", f"/r{i}", i, 1.0 + i, status=404 if i > 3 else 200) for i in range(8)]
    rows = report_of(record_file(tmp_path, records)).summary.routes
    assert [(r.label, r.requests, r.client_errors) for r in rows] == [
        ("GET /r2", 1, 0),
        ("GET /r1", 1, 0),
        ("GET /r0", 1, 0),
        ("(all other routes)", 5, 4),  # the most wall time, but no route's
    ]


def test_statements_and_queries_per_request_once_recorded(tmp_path: Path) -> None:
    # An ORM route: 3 statements of 2 round trips each; a route of one statement; an old
    # line without db_statements does not count toward the statements' mean.
    lines = [
        replace(call("GET", ARTICLES, 0.0, 10.0), db_queries=6, db_statements=3),
        replace(call("GET", ARTICLES, 0.1, 10.0), db_queries=8, db_statements=4),
        replace(call("GET", ARTICLES, 0.2, 10.0), db_queries=9),
        replace(call("GET", ARTICLE, 0.3, 30.0), db_queries=1, db_statements=1),
    ]
    report = report_of(record_file(tmp_path, lines))
    out = render_routes(report, 120)
    assert "(mean cpu, db, statements, queries, pool wait and loop wait per request)" in out
    head, articles, article = out.splitlines()[1:4]
    assert head.split()[6:8] == ["stmts", "queries"]
    assert articles.split()[:2] == ["GET", "/articles"]
    assert articles.split()[7:9] == ["3.5", "7.7"]  # (3 + 4) / 2; (6 + 8 + 9) / 3
    assert article.split()[7:9] == ["1.0", "1.0"]
    rows = {(r["method"], r["route"]): r for r in report.to_json()["routes"]}
    assert rows[("GET", ARTICLES)]["db_statements_mean"] == 3.5
    assert rows[("GET", ARTICLES)]["db_queries_mean"] == round(23 / 3, 3)


# --- the distributions of each row ----------------------------------------------------------

FIGURES = {"wall": "wall_ms", "cpu": "cpu_ms", "db": "db_ms", "pool_wait": "pool_wait_ms",
           "loop_wait": "loop_wait_ms"}  # fmt: skip


def truth(records: list[RequestRecord]) -> dict[str, float]:
    """The percentiles and maxima of ``records``, worked out here: the nearest rank, the
    ceil(p/100 * n)-th smallest value."""
    out = {}
    for name, field in FIGURES.items():
        values = sorted(getattr(r, field) for r in records)
        for p in (50, 95, 99):
            out[f"{name}_p{p}_ms"] = round(values[math.ceil(p * len(values) / 100) - 1], 3)
        out[f"{name}_max_ms"] = round(values[-1], 3)
    return out


def timed(rng: random.Random, route: str | None, k: int, pid: int = 1) -> RequestRecord:
    """A request of times drawn at random: mostly short, with a long tail, many zeros."""
    cpu = round(rng.expovariate(1.0), 3)
    db = round(rng.choice([0.0, rng.expovariate(0.1)]), 3)
    pool = round(rng.choice([0.0, 0.0, 0.0, rng.paretovariate(1.5)]), 3)
    loop = round(rng.choice([0.0, rng.random() * 3]), 3)
    wall = round(cpu + db + pool + loop + rng.random() * 5, 3)
    return call("GET", route, k * 0.001, wall, cpu_ms=cpu, db_ms=db, pool_wait_ms=pool,
                loop_wait_ms=loop, pid=pid)  # fmt: skip


@pytest.fixture(params=["plain", "numpy"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Below VECTOR_FROM requests (plain Python), or from it on (numpy)."""
    monkeypatch.setattr(quantiles, "VECTOR_FROM", 1 << 62 if request.param == "plain" else 1)
    return str(request.param)


def test_each_row_has_the_percentiles_of_its_requests(tmp_path: Path, way: str) -> None:
    rng = random.Random(11)
    sizes = {"/a": 1, "/b": 2, "/c": 19, "/d": 20, "/e": 101, "/f": 1500, None: 37}
    records = [timed(rng, route, k) for route, n in sizes.items() for k in range(n)]
    rng.shuffle(records)
    data = report_of(record_file(tmp_path, records)).to_json()
    assert len(data["routes"]) == len(sizes)
    for row in data["routes"]:
        route = None if row["route"] == "(no route)" else row["route"]
        want = truth([r for r in records if r.route == route])
        assert {k: row[k] for k in want} == want, route
    # (the wall's p50 and p95 are as they were)
    assert all(r["wall_p50_ms"] <= r["wall_p95_ms"] <= r["wall_p99_ms"] <= r["wall_max_ms"]
               for r in data["routes"])  # fmt: skip


def test_one_route_s_distributions_are_the_summary_s(tmp_path: Path, way: str) -> None:
    rng = random.Random(5)
    data = report_of(record_file(tmp_path, [timed(rng, ARTICLES, k) for k in range(900)]))
    (row,) = data.to_json()["routes"]
    summary = data.to_json()
    for name, field in FIGURES.items():
        assert {p: row[f"{name}_{p}_ms"] for p in ("p50", "p95", "p99", "max")} == summary[field]


def test_the_merged_rows_have_the_percentiles_of_all_their_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    rng = random.Random(3)
    # 25 routes: 19 rows and "(6 more routes)".
    records = [timed(rng, f"/r{i}", k) for i in range(25) for k in range(60 - 2 * i)]

    def merged(rows: list[dict[str, object]]) -> list[RequestRecord]:
        rest = {f"/r{i}" for i in range(25)} - {r["route"] for r in rows[:-1]}
        assert len(rest) == 6
        return [r for r in records if r.route in rest]

    rows = report_of(record_file(tmp_path, records)).to_json()["routes"]
    assert len(rows) == 20
    assert rows[-1]["route"] == "(6 more routes)"
    want = truth(merged(rows))
    assert {k: rows[-1][k] for k in want} == want
    # Past MAX_ROUTES: the routes not told apart (the last three) are merged too.
    monkeypatch.setattr(_reading, "MAX_ROUTES", 22)
    rows = report_of(record_file(tmp_path, records, "s.jsonl")).to_json()["routes"]
    assert rows[-1]["route"] == "(all other routes)"
    assert {"/r22", "/r23", "/r24"} <= {r.route for r in merged(rows)}
    want = truth(merged(rows))
    assert {k: rows[-1][k] for k in want} == want


def test_a_sampled_route_s_percentiles_are_of_its_recorded_requests(
    tmp_path: Path, way: str
) -> None:
    # As the summary's: one recorded request of a process that samples a tenth counts
    # once, not ten times (the page and the Sampled line say the figures are the sample's).
    rng = random.Random(8)
    recorded = [timed(rng, ARTICLES, k) for k in range(300)]
    sampled = recorded[:100]
    for r in sampled:
        r.sample_rate = 0.1
    data = report_of(record_file(tmp_path, recorded)).to_json()
    assert (data["sampled_requests"], data["requests_estimated"]) == (100, 1200)
    (row,) = data["routes"]
    assert row["requests"] == 300
    want = truth(recorded)
    assert {k: row[k] for k in want} == want
