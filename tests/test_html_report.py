"""``loopwatch report --html``: the page, opened in a real headless Chromium with the
network blocked, on a record file of real traffic (uvicorn, PostgreSQL) and on synthetic
files for the edge cases."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from loopwatch.record import Meta, ProcessSample, RequestRecord, Stall
from loopwatch.renderers.html import SEGMENT_BUDGET, html_report
from loopwatch.renderers.text import fmt_bytes, fmt_count, fmt_ms, fmt_span, fmt_time
from loopwatch.renderers.timeline import _intervals, _row_states, render_bar
from loopwatch.report import ReportOptions, build_report
from loopwatch.report import capacity as capacity_mod
from loopwatch.report import loop as loop_mod
from loopwatch.report.capacity import Capacity
from loopwatch.report.loop import LoopStats, StallGroup
from loopwatch.report.summary import (
    _ROUTE_COLUMNS,
    Distribution,
    ProcessMemory,
    RouteStats,
    _memory_line,
)

from .conftest import serve
from .helpers import read_lines

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = '</script><script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
# Chromium as CI installs it (Debian's package), or where LOOPWATCH_TEST_CHROMIUM says.
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def loopwatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loopwatch", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def html_and_json(records: Path, *options: str) -> tuple[Path, dict[str, Any]]:
    """``loopwatch report RECORDS --html OUT --json``: the page's path and the JSON."""
    out = records.with_suffix(".html")
    result = loopwatch("report", str(records), "--html", str(out), "--json", *options)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return out, json.loads(result.stdout)


# --- the browser ---------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in (os.environ.get("LOOPWATCH_TEST_CHROMIUM"), *BROWSERS):
        if name and (found := shutil.which(name)):
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    if executable is None:
        pytest.skip(
            "no Chromium to open the HTML report in: install Debian's chromium package "
            "(.ci/run does) or set LOOPWATCH_TEST_CHROMIUM to a Chromium or Chrome binary"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=executable,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield b
        b.close()


@dataclass
class Opened:
    page: Any
    errors: list[str]  # console errors and warnings, uncaught exceptions
    requests: list[str]  # every URL the page asked for, itself included
    blocked: list[str]  # the network requests it tried (all refused)


@contextlib.contextmanager
def opened(browser: Any, path: Path, **context: Any) -> Iterator[Opened]:
    """``path`` opened from a file:// URL, offline, every network request refused."""
    ctx = browser.new_context(**context)
    ctx.set_offline(True)
    seen = Opened(None, [], [], [])

    def refuse(route: Any) -> None:
        seen.blocked.append(route.request.url)
        route.abort()

    ctx.route(re.compile(r"^(?!file:)"), refuse)
    ctx.route_web_socket(re.compile(".*"), lambda ws: seen.blocked.append(ws.url))
    page = ctx.new_page()
    page.on("request", lambda r: seen.requests.append(r.url))
    page.on(
        "console",
        lambda m: (
            seen.errors.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
        ),
    )
    page.on("pageerror", lambda e: seen.errors.append(f"uncaught: {e}"))
    page.goto(path.as_uri())
    page.wait_for_function("document.documentElement.dataset.ready", timeout=10_000)
    seen.page = page
    try:
        yield seen
    finally:
        ctx.close()


# --- record files --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str) -> Path:
    """Real traffic on a real app: queries held by PostgreSQL, with requests that block
    the loop (a sleep, then a computation) sent while they run, over a few samples."""
    path = tmp_path_factory.mktemp("html") / "records.jsonl"
    env = {"LOOPWATCH_FILE": str(path), "LOOPWATCH_TEST_DSN": pg_dsn, "POOL_MAX": "5"}
    with serve("tests.loop_apps:app", env) as server:

        async def traffic() -> None:
            limits = httpx.Limits(max_connections=40)
            async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as c:
                for kind in ("sleep", "cpu"):
                    queries = [
                        asyncio.ensure_future(c.get(f"/q/{i}?pg_sleep_ms=150")) for i in range(12)
                    ]
                    await asyncio.sleep(0.05)
                    await c.post(f"/block?kind={kind}&ms=200")
                    await asyncio.gather(*queries)
                    await asyncio.sleep(0.6)  # a process sample or two between
                for i in range(10):
                    await c.get(f"/q/{100 + i}")

        # (in a thread: the browser's client may be running an event loop in this one)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, traffic()).result()
    return path


@pytest.fixture(scope="module")
def page_of_recorded(recorded: Path) -> tuple[Path, dict[str, Any]]:
    return html_and_json(recorded)


T0 = 1_800_000_000.0


def request(i: int, start: float, **fields: Any) -> RequestRecord:
    values: dict[str, Any] = {
        "id": f"r{i}",
        "pid": 4242,
        "start": start,
        "method": "GET",
        "path": f"/items/{i}",
        "route": "/items/{item_id}",
        "status": 200,
        "wall_ms": 40.0,
        "cpu_ms": 4.0,
        "db_ms": 30.0,
        "pool_wait_ms": 0.0,
        "db_queries": 1,
        "rss_bytes": 50_000_000,
        "segments": (("cpu", 0.0, 2.0), ("db", 2.0, 32.0), ("cpu", 32.0, 34.0)),
        "db_statements": 1,
    }
    values.update(fields)
    return RequestRecord(**values)


def write(path: Path, *records: Any) -> Path:
    lines = [Meta(pid=4242, started=T0).to_json()] + [r.to_json() for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def sample(t: float, **fields: Any) -> ProcessSample:
    values: dict[str, Any] = {
        "time": t,
        "pid": 4242,
        "rss_bytes": 50_000_000,
        "uss_bytes": 30_000_000,
        "in_flight": 3,
        "loop_busy": 0.25,
        "loop_lag_ms": 1.5,
    }
    values.update(fields)
    return ProcessSample(**values)


# --- the page, without a browser -----------------------------------------------------------


def data_of(page: bytes) -> dict[str, Any]:
    text = page.decode()
    start = text.index('<script id="loopwatch-data" type="application/json">')
    body = text[text.index(">", start) + 1 : text.index("</script>", start)]
    parsed: dict[str, Any] = json.loads(body)
    return parsed


def test_the_page_carries_the_same_json_as_the_report(tmp_path: Path) -> None:
    path = write(tmp_path / "r.jsonl", request(1, T0), request(2, T0 + 0.01), sample(T0 + 0.5))
    report = build_report([str(path)], ReportOptions())
    data = data_of(html_report(report))
    assert data["report"] == json.loads(json.dumps(report.to_json()))
    assert report.series is not None
    assert data["series"] == json.loads(json.dumps(report.series.to_json()))
    assert [row[12] for row in data["window"]["rows"]] == ["r1", "r2"]


def test_the_page_names_no_address_and_allows_only_its_own_script_and_style(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "r.jsonl", request(1, T0))
    page = html_report(build_report([str(path)], ReportOptions())).decode()
    outside_data = re.sub(r'(?s)<script id="loopwatch-data".*?</script>', "", page)
    assert not re.search(
        r"(?i)\b(https?|wss?|ftp):|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\(", outside_data
    )
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert policy is not None
    assert "default-src 'none'" in policy.group(1)
    assert "unsafe-inline" not in policy.group(1)


def test_hostile_text_cannot_close_the_data_element(tmp_path: Path) -> None:
    path = write(tmp_path / "r.jsonl", request(1, T0, route=HOSTILE, path="/<!--", method="GET"))
    page = html_report(build_report([str(path)], ReportOptions()))
    assert page.count(b"</script") == 2  # the two elements' own ends
    assert b"<!--" not in page
    assert b"<img" not in page
    assert data_of(page)["window"]["rows"][0][8] == HOSTILE


def test_requests_with_many_segments_keep_the_page_small(tmp_path: Path) -> None:
    # 2,000 requests in flight at once, each with the 512 segments a request may record.
    segments = tuple(
        (
            kind,
            0.2 * j + (0.0 if kind == "cpu" else 0.05),
            0.2 * j + (0.05 if kind == "cpu" else 0.2),
        )
        for j in range(256)
        for kind in ("cpu", "db")
    )
    reqs = [request(k, T0 + 0.00001 * k, wall_ms=60.0, segments=segments) for k in range(2000)]
    report = build_report([str(write(tmp_path / "r.jsonl", *reqs))], ReportOptions(rows=2000))
    assert len(report.window) == 2000
    page = html_report(report)
    assert len(page) < 5_000_000
    rows = data_of(page)["window"]["rows"]
    cap = rows[0][18]
    assert 0 < cap < 512
    assert sum(len(r[13]) // 3 for r in rows) <= SEGMENT_BUDGET
    # Each row is what the terminal draws of the request alone over that many columns.
    bar = render_bar(reqs[0], cap)
    drawn = [" "] * cap
    for k in range(0, len(rows[0][13]), 3):
        state, a, b = rows[0][13][k : k + 3]
        for c in range(round(a / (60.0 / cap)), round(b / (60.0 / cap))):
            drawn[c] = "█▓▒░"[int(state)]
    assert "".join(drawn) == bar.replace("·", " ")


# --- in the browser: real traffic ----------------------------------------------------------


def test_the_page_loads_offline_with_no_request_and_no_error(
    browser: Any, page_of_recorded: tuple[Path, dict[str, Any]]
) -> None:
    path, data = page_of_recorded
    with opened(browser, path) as seen:
        assert seen.requests == [path.as_uri()]
        assert seen.blocked == []
        assert seen.errors == []
        heading = seen.page.text_content("h1")
        assert heading == "loopwatch report"
        assert seen.page.locator("#timeline canvas").count() == 1
        assert seen.page.locator("#series canvas").count() == 4
    assert data["requests"] > 20


# --json's figures (the summary's as f"{figure}_ms", the routes' as f"{figure}_{pct}_ms")
FIGURES = ("wall", "cpu", "db", "pool_wait", "loop_wait")
PCTS = ("p50", "p95", "p99", "max")


def test_the_summary_shows_the_figures_of_json(
    browser: Any, page_of_recorded: tuple[Path, dict[str, Any]]
) -> None:
    path, data = page_of_recorded
    with opened(browser, path) as seen:
        page = seen.page
        for key in (f"{f}_ms" for f in FIGURES):
            for p in PCTS:
                assert page.text_content(f'#summary-table [data-key="{key}.{p}"]') == fmt_ms(
                    data[key][p]
                ), (key, p)
        assert page.text_content('.cards [data-key="requests"]') == f"{data['requests']:,}"
        assert page.text_content('.cards [data-key="wall_ms.p95"]') == fmt_ms(
            data["wall_ms"]["p95"]
        )
        processes = [
            ProcessMemory(
                p["pid"],
                p["requests"],
                p["rss_bytes_max"],
                p["rss_bytes_min"],
                p["uss_bytes_max"],
                p["uss_bytes_min"],
                p["loop_busy_max"],
                p["dropped"],
            )
            for p in data["memory"]["by_pid"]
        ]
        prose = page.locator("#summary .prose p").all_text_contents()
        assert prose[:3] == [
            f"CPU on the loop: {data['cpu_share']:.1%} of wall time.",
            f"In flight at once (all processes): peak {data['peak_in_flight']:,}, "
            f"p95 {data['p95_in_flight']:,}.",
            _memory_line(processes),
        ]
        period = fmt_span(data["last_end"] - data["first_start"])
        assert page.text_content("#period") == (
            f"{fmt_count(data['requests'], 'request')}, {fmt_count(len(processes), 'process')}, "
            f"{fmt_time(data['first_start'])} to {fmt_time(data['last_end'])[11:]} UTC ({period})"
        )


def test_the_route_table_has_the_rows_of_json(
    browser: Any, page_of_recorded: tuple[Path, dict[str, Any]]
) -> None:
    path, data = page_of_recorded
    with opened(browser, path) as seen:
        rows = seen.page.locator("#routes-table tbody tr")
        assert rows.count() == len(data["routes"]) >= 2
        for i, route in enumerate(data["routes"]):
            stats = route_stats(route)
            row = rows.nth(i)
            assert row.locator("th").text_content() == stats.label
            for heading, cell, _ in _ROUTE_COLUMNS:  # the terminal's own cells
                assert row.locator(f'td[data-col="{heading}"]').text_content() == cell(stats)


def test_each_route_s_distributions_show_the_figures_of_json(
    browser: Any, page_of_recorded: tuple[Path, dict[str, Any]]
) -> None:
    path, data = page_of_recorded
    with opened(browser, path) as seen:
        page = seen.page
        for fold in page.locator("#routes .dist-more summary").all():  # (past 8 rows)
            fold.click()
        for i, route in enumerate(data["routes"]):
            drawn = [f for f in FIGURES if f == "wall" or route[f"{f}_max_ms"] > 0]
            rows = page.locator(f'.dist-g[data-route="{i}"]')
            assert [rows.nth(k).get_attribute("data-figure") for k in range(rows.count())] == drawn
            for f in drawn:
                row = page.locator(f'.dist-g[data-route="{i}"][data-figure="{f}"]')
                for p in PCTS:
                    shown = row.locator(f'[data-key="{f}_{p}_ms"]').text_content()
                    assert shown == fmt_ms(route[f"{f}_{p}_ms"]), (route["route"], f, p)
                # The glyph in the order of its figures: box p50 to p95 (2 px at least),
                # the line's cap at p99, the diamond at max.
                b = {k: row.locator(f".{k}").bounding_box() for k in ("box", "cap", "max")}
                p99, top = (b[k]["x"] + b[k]["width"] / 2 for k in ("cap", "max"))
                assert b["box"]["x"] + b["box"]["width"] <= p99 + 2.5
                assert p99 <= top + 1
        # Hovering one shows its figures.
        i, route = next((i, r) for i, r in enumerate(data["routes"]) if r["db_max_ms"] > 0)
        page.locator(f'.dist-g[data-route="{i}"][data-figure="db"] .dist-track').hover()
        tip = page.locator("#tip")
        tip.wait_for(state="visible")
        text = tip.inner_text()
        label = route["route"] if route["method"] is None else f"{route['method']} {route['route']}"
        assert f"{label}: awaited DB" in text
        kv = (
            "[...document.querySelectorAll('#tip .kv')].map((e) => [e.children[0].textContent, "
            "e.children[1].textContent])"
        )
        assert dict(page.evaluate(kv)) == {
            **{p: fmt_ms(route[f"db_{p}_ms"]) for p in PCTS},
            "mean": fmt_ms(route["db_mean_ms"]),
            "requests": f"{route['requests']:,}",
        }
        page.mouse.move(1, 1)
        tip.wait_for(state="hidden")


def test_the_route_glyphs_sit_on_a_log_axis_when_the_times_span_decades(
    browser: Any, tmp_path: Path
) -> None:
    # 100 requests: walls of 10 ms (50), 100 ms (49) and 1 s, 1 ms of CPU each, so that
    # wall p50 = 10 ms, p95 = p99 = 100 ms, max = 1 s; no pool or loop wait.
    walls = [10.0] * 50 + [100.0] * 49 + [1000.0]
    reqs = [request(k, T0 + 0.002 * k, wall_ms=w, cpu_ms=1.0, db_ms=0.0,
                    segments=(("cpu", 0.0, 1.0),)) for k, w in enumerate(walls)]  # fmt: skip
    path, data = html_and_json(write(tmp_path / "log.jsonl", *reqs))
    (route,) = data["routes"]
    assert [route[f"wall_{p}_ms"] for p in PCTS] == [10.0, 100.0, 100.0, 1000.0]
    with opened(browser, path) as seen:
        page = seen.page
        assert seen.errors == []
        assert page.get_attribute("#route-dist", "data-scale") == "log"
        assert page.text_content("#dist-scale-note").startswith("Log scale")
        labels = page.locator(".dist-axis .dist-scale span").all_text_contents()
        assert labels == ["\u22641ms", "10ms", "100ms", "1s"]
        wall = page.locator('.dist-g[data-figure="wall"]')
        grid = [b["x"] for b in (g.bounding_box() for g in wall.locator(".gl").all())]
        assert grid[1] - grid[0] == pytest.approx(grid[3] - grid[2], abs=1)  # decades alike

        def at(sel: str, side: str = "middle") -> float:
            b = wall.locator(sel).bounding_box()
            return b["x"] + {"left": 0, "middle": b["width"] / 2, "right": b["width"]}[side]

        assert at(".box", "left") == pytest.approx(grid[1], abs=1.5)  # p50: 10 ms
        assert at(".box", "right") == pytest.approx(grid[2], abs=1.5)  # p95: 100 ms
        assert at(".cap") == pytest.approx(grid[2], abs=1.5)  # p99: 100 ms
        assert at(".max") == pytest.approx(grid[3], abs=1.5)  # max: 1 s
        cpu = page.locator('.dist-g[data-figure="cpu"] .box').bounding_box()
        assert cpu["x"] == pytest.approx(grid[0], abs=1.5)  # 1 ms, the axis's left end
        assert "no awaited DB, no pool wait, no loop wait" in page.text_content(".dist-label")


def test_the_route_glyphs_sit_on_a_linear_axis_when_the_times_are_alike(
    browser: Any, tmp_path: Path
) -> None:
    # (and 10 routes: the first 8 shown, the others under a fold)
    reqs = [request(k, T0 + 0.05 * k, wall_ms=40.0 + k, route=f"/r{k % 10}") for k in range(20)]
    path, data = html_and_json(write(tmp_path / "linear.jsonl", *reqs))
    with opened(browser, path) as seen:
        page = seen.page
        assert seen.errors == []
        assert page.get_attribute("#route-dist", "data-scale") == "linear"
        assert page.text_content("#dist-scale-note").startswith("Linear scale from 0")
        labels = page.locator(".dist-axis .dist-scale span").all_text_contents()
        assert labels[0] == "0"
        assert page.locator(".dist-route:visible").count() == 8
        page.locator("#routes .dist-more summary").click()
        routes = page.locator(".dist-route .route").all_text_contents()
        assert routes == [f"GET {r['route']}" for r in data["routes"]]


def route_stats(r: dict[str, Any]) -> RouteStats:
    return RouteStats(
        route=r["route"],
        method=r["method"],
        requests=r["requests"],
        wall=Distribution(*(r[f"wall_{p}_ms"] for p in PCTS)),
        cpu_mean=r["cpu_mean_ms"],
        db_mean=r["db_mean_ms"],
        pool_mean=r["pool_wait_mean_ms"],
        loop_mean=r["loop_wait_mean_ms"],
        errors=r["errors"],
        wall_total=r["wall_total_ms"],
        client_errors=r["client_errors"],
        statements_mean=r["db_statements_mean"],
        queries_mean=r["db_queries_mean"],
    )


def test_the_loop_capacity_and_diagnosis_read_as_in_the_terminal(
    browser: Any, page_of_recorded: tuple[Path, dict[str, Any]]
) -> None:
    path, data = page_of_recorded
    assert data["loop"]["stalls"], "the blocking requests' stalls were recorded"
    cap = data["capacity"]
    capacity = Capacity(
        same_latency=cap["sync_workers_same_latency"],
        same_throughput=cap["sync_workers_same_throughput"],
        no_queueing=cap["sync_workers_no_queueing"],
        no_queueing_p95=cap["sync_workers_no_queueing_p95"],
        p95_ms=cap["async_p95_ms"],
        throughput=cap["async_throughput_rps"],
        worker_rss=cap["sync_worker_rss_bytes"],
        worker_uss=cap["sync_worker_uss_bytes"],
        async_processes=cap["async_processes"],
        async_rss=cap["async_bytes"],
        async_uss=cap["async_uss_bytes"],
        loop_busy_max=cap["loop_busy_max"],
        connections_used=cap["db_connections_used_max"],
        connections_max=cap["db_connections_max"],
    )
    cap_lines = [line.strip() for line in capacity_mod.render(capacity, 10_000, False).splitlines()]
    with opened(browser, path) as seen:
        page = seen.page
        assert_loop_section(page, data)
        rows = page.locator("#capacity-table tr").all_inner_texts()
        for row, line in zip(rows, cap_lines[1:5], strict=True):
            assert " ".join(row.split()) == " ".join(line.replace(":", "", 1).split())
        assert page.locator("#capacity .prose p").all_text_contents() == cap_lines[5:]
        shown = page.locator("#diagnosis p").all_text_contents()
        assert shown == [s.replace("`", "") for s in data["diagnosis"]]


def assert_loop_section(page: Any, data: dict[str, Any]) -> None:
    """The page's Loop section says what the terminal's renderer says of the same JSON."""
    loop = data["loop"]
    stats = LoopStats(
        utilization=loop["utilization"],
        samples=loop["samples"],
        lag=None
        if loop["lag_ms"] is None
        else tuple(loop["lag_ms"][k] for k in ("p50", "p99", "max")),
        stalls=[stall_group(g) for g in loop["stalls"]],
    )
    terminal = [line.strip() for line in loop_mod.render(stats, 10_000, False).splitlines()]
    assert page.text_content("#loop-health") == terminal[1]
    items = page.locator("#loop .stalls li").all_text_contents()
    assert len(items) == len(stats.stalls) <= 10
    assert [f"- {item}" for item in items] == terminal[3:]


def stall_group(g: dict[str, Any]) -> StallGroup:
    loc = g["location"]
    return StallGroup(
        location=None
        if loc is None
        else (loc["file"], loc["line"], loc["function"], loc["project"]),
        count=g["count"],
        total_ms=g["total_ms"],
        max_ms=g["max_ms"],
        cpu_ms=g["cpu_ms"],
        routes=tuple(g["routes"]),
        delayed_requests=g["delayed_requests"],
        delayed_ms=g["delayed_ms"],
        cpu_bound=g["count"] if g["cause"] == "cpu" else 0,
    )


def test_the_timeline_rows_have_the_terminals_states(
    browser: Any, page_of_recorded: tuple[Path, dict[str, Any]]
) -> None:
    path, _ = page_of_recorded
    kinds = ("cpu", "loop", "pool", "db")
    with opened(browser, path) as seen:
        rows = seen.page.evaluate("loopwatch.data.window.rows")
        assert len(rows) >= 12
        span = max(r[0] + r[1] for r in rows)
        for n in (37, 120, 1000):
            drawn = seen.page.evaluate(
                """([span, n]) => loopwatch.data.window.rows.map((r) => {
                    const iv = loopwatch.intervals(r[13], Math.max(r[1], 0));
                    const states = new Uint8Array(n), acc = new Float64Array(5 * n);
                    const wall = Math.max(r[1], 0);
                    return Array.from(loopwatch.rowStates(iv, wall, r[0], span, n, acc, states));
                })""",
                [span, n],
            )
            for row, states in zip(rows, drawn, strict=True):
                segs = row[13]
                rec = request(
                    0,
                    0.0,
                    wall_ms=row[1],
                    segments=tuple(
                        (kinds[segs[k]], segs[k + 1], segs[k + 2]) for k in range(0, len(segs), 3)
                    ),
                )
                assert states == _row_states(rec, row[0], span, n), (n, row[12])
        assert any(3 in s for s in drawn), "database waits drawn"
        assert any(1 in s for s in drawn), "loop waits drawn"


def test_overlapping_segments_resolve_as_in_the_terminal(browser: Any, tmp_path: Path) -> None:
    # Random overlaps of every kind, short and long, some past the wall time.
    rng = random.Random(14)
    kinds = ("cpu", "loop", "pool", "db")
    rows = []
    for _ in range(300):
        wall = round(rng.uniform(0.01, 50), 3)
        segs = []
        for _ in range(rng.randrange(0, 12)):
            a = round(rng.uniform(-1, wall * 1.1), 3)
            segs.append((rng.choice(kinds), a, round(a + rng.expovariate(1 / (wall / 4)), 3)))
        rows.append((wall, round(rng.uniform(0, 30), 3), tuple(segs)))
    # Ties, exactly: a column is 90 / 64 = 1.40625 ms; half of one is in each state.
    col, half = 1.40625, 0.703125
    rows += [
        (col, 0.0, (("cpu", 0.0, half), ("db", half, col))),
        (col, 0.0, (("db", 0.0, half), ("loop", half, col))),
        (col, 0.0, (("pool", 0.0, half), ("db", half, col))),
        (half, 0.0, ()),  # in flight half the column, "other": it wins over not in flight
        (col, half, (("db", 0.0, half),)),
    ]
    path, _ = html_and_json(write(tmp_path / "one.jsonl", request(1, T0)))
    with opened(browser, path) as seen:
        got = seen.page.evaluate(
            """(rows) => rows.map(([wall, offset, segs]) => {
                const iv = loopwatch.intervals(segs.flat(), wall), n = 64;
                const states = new Uint8Array(n), acc = new Float64Array(5 * n);
                loopwatch.rowStates(iv, wall, offset, 90, n, acc, states);
                return [iv.out, Array.from(states)];
            })""",
            [[w, o, [[kinds.index(k), a, b] for k, a, b in segs]] for w, o, segs in rows],
        )
    for (wall, offset, segs), (intervals, states) in zip(rows, got, strict=True):
        rec = request(0, 0.0, wall_ms=wall, segments=segs)
        assert intervals == [list(i) for i in _intervals(segs, wall)[0]], segs
        assert states == _row_states(rec, offset, 90, 64), segs


def test_hovering_a_row_shows_its_request(
    browser: Any, recorded: Path, page_of_recorded: tuple[Path, dict[str, Any]]
) -> None:
    path, _ = page_of_recorded
    by_id = {r["id"]: r for r in read_lines(recorded) if r["type"] == "request"}
    with opened(browser, path) as seen:
        page = seen.page
        box = page.locator(".tl-box")
        row_h, axis_h = page.evaluate("[loopwatch.timeline.rowH, loopwatch.timeline.axisH]")
        width = box.bounding_box()["width"]
        ids = page.evaluate("loopwatch.data.window.rows.map((r) => r[12])")
        i = next(k for k, rid in enumerate(ids[:10]) if by_id[rid]["db_ms"] > 0)
        box.hover(position={"x": width * 0.6, "y": axis_h + i * row_h + row_h / 2})
        tip = page.locator("#tip")
        tip.wait_for(state="visible")
        text = tip.inner_text()
        rec = by_id[ids[i]]
        assert f"{rec['method']} {rec['route']} \u2192 {rec['status']}" in text
        for key in ("cpu_ms", "db_ms", "pool_wait_ms", "loop_wait_ms", "wall_ms"):
            assert fmt_ms(rec[key]) in text, key
        assert f"request {rec['id']}" in text
        box.hover(position={"x": width * 0.6, "y": axis_h + (i + 1) * row_h + row_h / 2})
        assert f"request {ids[i + 1]}" in tip.inner_text()
        page.mouse.move(1, 1)
        tip.wait_for(state="hidden")


def test_zooming_changes_the_axis_and_reset_restores_it(
    browser: Any, page_of_recorded: tuple[Path, dict[str, Any]]
) -> None:
    path, _ = page_of_recorded
    with opened(browser, path) as seen:
        page = seen.page
        box = page.locator(".tl-box")

        def ticks() -> str:
            page.evaluate("new Promise((done) => requestAnimationFrame(() => done()))")
            value: str = box.get_attribute("data-ticks")
            return value

        def span() -> float:
            value: float = page.evaluate("loopwatch.timeline.view.hi - loopwatch.timeline.view.lo")
            return value

        full, full_span = ticks(), span()
        b = box.bounding_box()
        page.mouse.move(b["x"] + b["width"] * 0.7, b["y"] + 60)
        page.keyboard.down("Control")
        page.mouse.wheel(0, -200)
        page.keyboard.up("Control")
        zoomed = ticks()
        assert zoomed != full
        assert span() < full_span / 2
        lo = page.evaluate("loopwatch.timeline.view.lo")
        page.mouse.down()
        page.mouse.move(b["x"] + b["width"] * 0.5, b["y"] + 60, steps=5)
        page.mouse.up()
        assert page.evaluate("loopwatch.timeline.view.lo") > lo, "dragging left moves later"
        page.locator("#timeline button", has_text="Reset").click()
        assert ticks() == full
        page.locator("#timeline button[title='Zoom in']").click()
        assert span() == pytest.approx(full_span / 2)
        chart = page.locator("#series .chart").first
        before = chart.get_attribute("data-ticks")
        page.locator("#series button[title='Zoom in']").click()
        page.locator("#series button[title='Zoom in']").click()
        page.evaluate("new Promise((done) => requestAnimationFrame(() => done()))")
        assert chart.get_attribute("data-ticks") != before


def test_it_fits_a_phone_and_a_tap_shows_a_request(
    browser: Any, page_of_recorded: tuple[Path, dict[str, Any]]
) -> None:
    path, _ = page_of_recorded
    phone = {
        "viewport": {"width": 390, "height": 844},
        "device_scale_factor": 3,
        "is_mobile": True,
        "has_touch": True,
    }
    with opened(browser, path, **phone) as seen:
        page = seen.page
        assert seen.errors == []
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        for sel in (".tl-box", "#series .chart", "#routes .dist"):
            box = page.locator(sel).first.bounding_box()
            assert box["x"] >= 0, sel
            assert box["x"] + box["width"] <= 390, sel
        page.locator(".tl-box").scroll_into_view_if_needed()
        b = page.locator(".tl-box").bounding_box()
        row_h, axis_h = page.evaluate("[loopwatch.timeline.rowH, loopwatch.timeline.axisH]")
        page.touchscreen.tap(b["x"] + b["width"] * 0.6, b["y"] + axis_h + row_h * 1.5)
        page.locator("#tip").wait_for(state="visible")
        first = page.evaluate("loopwatch.data.window.rows[1][12]")
        assert f"request {first}" in page.locator("#tip").inner_text()
        tip = page.locator("#tip").bounding_box()
        assert tip["x"] >= 0
        assert tip["x"] + tip["width"] <= 390
        # A tap on a route's distribution shows its figures, and stays.
        wall = page.locator('.dist-g[data-route="0"][data-figure="wall"] .dist-track')
        wall.scroll_into_view_if_needed()
        b = wall.bounding_box()
        page.touchscreen.tap(b["x"] + b["width"] / 2, b["y"] + b["height"] / 2)
        assert ": wall" in page.locator("#tip").inner_text()
        assert page.locator("#tip").is_visible()


def _swipe(page: Any, x0: float, y0: float, x1: float, y1: float, steps: int = 12) -> None:
    """One finger from (x0, y0) to (x1, y1), as a touchscreen sends it (CDP touch events:
    the browser, not the page, decides what the gesture does)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send(
        "Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x0, "y": y0}]}
    )
    for k in range(1, steps + 1):
        point = {"x": x0 + (x1 - x0) * k / steps, "y": y0 + (y1 - y0) * k / steps}
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
        page.wait_for_timeout(16)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    page.wait_for_timeout(300)  # (a fling's end)
    cdp.detach()


def test_on_a_phone_a_swipe_moves_in_time_or_scrolls_the_page(browser: Any, tmp_path: Path) -> None:
    # More rows than the timeline shows at once: its rows scroll.
    records = write(tmp_path / "many.jsonl", *(request(k, T0 + 0.002 * k) for k in range(300)))
    path, _ = html_and_json(records)
    phone = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
    with opened(browser, path, **phone) as seen:
        page = seen.page
        page.evaluate("loopwatch.timeline.view.zoom(0.25)")  # room to move in time
        page.locator(".tl-box").scroll_into_view_if_needed()
        b = page.locator(".tl-box").bounding_box()
        before = page.evaluate("[loopwatch.timeline.view.lo, loopwatch.timeline.view.hi]")
        mid = b["y"] + min(b["height"], 844 - b["y"]) / 2
        _swipe(page, b["x"] + b["width"] * 0.8, mid, b["x"] + b["width"] * 0.2, mid)
        after = page.evaluate("[loopwatch.timeline.view.lo, loopwatch.timeline.view.hi]")
        # As far as the finger went (not one move's worth, then taken by the browser).
        g = page.evaluate("loopwatch.timeline.geom()")
        went = b["width"] * 0.6 / g["width"] * (before[1] - before[0])
        assert after[0] - before[0] == pytest.approx(went, rel=0.1)
        assert after[1] - after[0] == pytest.approx(before[1] - before[0])
        # Up, once the rows are at their end: the page scrolls on, not stuck on the rows.
        page.evaluate("(s => { s.scrollTop = s.scrollHeight; })(loopwatch.timeline.scroller)")
        scrolled = page.evaluate("window.scrollY")
        _swipe(page, b["x"] + b["width"] / 2, mid, b["x"] + b["width"] / 2, mid - 300)
        assert page.evaluate("window.scrollY") > scrolled
        assert seen.errors == []


# --- in the browser: edge cases ------------------------------------------------------------


def test_hostile_names_are_shown_as_text(browser: Any, tmp_path: Path) -> None:
    stall = Stall(
        time=T0 + 0.01,
        pid=4242,
        duration_ms=120.0,
        cpu_ms=1.0,
        id="r1",
        method="GET",
        route=HOSTILE,
        stacks=(((HOSTILE + ".py", 7, "<b>f</b>", True),),),
    )
    records = write(
        tmp_path / "hostile.jsonl",
        request(1, T0, route=HOSTILE, path="/<script>x</script>", error=None, status=200),
        request(2, T0 + 0.005, route=None, path=HOSTILE, status=None, error="<b>Boom</b>"),
        sample(T0 + 0.5),
        stall,
        sample(T0 + 1.0),
    )
    path, data = html_and_json(records)
    with opened(browser, path) as seen:
        page = seen.page
        assert seen.errors == []
        assert page.evaluate("window.pwned") is None
        assert page.locator("script").count() == 2
        assert page.locator("img, b").count() == 0
        labels = page.locator("#routes-table tbody th").all_text_contents()
        assert f"GET {HOSTILE}" in labels
        assert HOSTILE + ".py:7 in <b>f</b>" in page.locator("#loop .stalls").inner_text()
    assert data["routes"][0]["route"] in (HOSTILE, "(no route)")


def test_one_request_and_no_samples(browser: Any, tmp_path: Path) -> None:
    path, data = html_and_json(write(tmp_path / "one.jsonl", request(1, T0)))
    with opened(browser, path) as seen:
        page = seen.page
        assert seen.errors == []
        assert page.evaluate("loopwatch.data.window.rows.length") == 1
        assert "No process samples" in page.locator("#series").inner_text()
        assert page.locator("#diagnosis").count() == 0
        assert page.text_content(".cards [data-key='requests']") == "1"
        assert data["requests"] == 1


def test_stalls_are_marked_on_the_loop_chart(browser: Any, tmp_path: Path) -> None:
    stalls = [
        Stall(time=T0 + 0.2 * k, pid=4242, duration_ms=60.0 + k, cpu_ms=55.0 * (k % 2))
        for k in range(1, 6)
    ]
    records = write(
        tmp_path / "stalls.jsonl",
        *(request(k, T0 + 0.1 * k) for k in range(12)),
        *(sample(T0 + 0.5 * k, in_flight=k) for k in range(4)),
        *stalls,
    )
    path, data = html_and_json(records)
    with opened(browser, path) as seen:
        page = seen.page
        assert seen.errors == []
        marks = page.evaluate("loopwatch.charts[2].marks.map((m) => [m.t, m.v])")
        assert marks == [[s.time, s.duration_ms] for s in stalls]
        drawn = page.evaluate(
            """async (marks) => {
                await new Promise((done) => requestAnimationFrame(done));
                const c = loopwatch.charts[2], g = c.geom(), r = window.devicePixelRatio;
                const ctx = c.canvas.getContext("2d");
                const css = getComputedStyle(document.documentElement);
                return marks.map(([t, v, cause]) => {
                    const y = g.top + g.height - (v / c.yTop) * g.height;
                    const x = Math.round(c.x(t) * r);
                    const px = ctx.getImageData(x, Math.round(y * r), 1, 1).data;
                    return [Array.from(px.slice(0, 3)), css.getPropertyValue("--" + cause).trim()];
                });
            }""",
            [[s.time, s.duration_ms, "cpu" if s.cause == "cpu" else "loop"] for s in stalls],
        )
        for pixel, colour in drawn:  # each mark in its cause's colour
            assert "#" + "".join(f"{c:02x}" for c in pixel) == colour
        assert_loop_section(page, data)
        chart = page.locator("#series .chart").nth(2)
        chart.scroll_into_view_if_needed()
        b = chart.bounding_box()
        x = page.evaluate(f"loopwatch.charts[2].x({stalls[2].time})")
        g = page.evaluate("loopwatch.charts[2].geom()")
        top = page.evaluate("loopwatch.charts[2].yTop")
        y = g["top"] + g["height"] - stalls[2].duration_ms / top * g["height"]
        page.mouse.move(b["x"] + x, b["y"] + y)
        page.locator("#tip").wait_for(state="visible")
        assert f"Stall: {fmt_ms(stalls[2].duration_ms)}" in page.locator("#tip").inner_text()
        assert "5 stalls" in page.locator("#loop").inner_text()
        assert "delayed no other request" in page.locator("#loop").inner_text()


def test_a_busy_share_with_no_neighbour_is_drawn(browser: Any, tmp_path: Path) -> None:
    # A process's first sample has no busy share yet: a short run (the demo's) has one
    # known value between unknowns, which a line alone never drew.
    busy = [None, 0.4, None, 0.7]
    records = write(
        tmp_path / "lone.jsonl",
        *(request(k, T0 + 0.1 * k) for k in range(12)),
        *(sample(T0 + 0.5 * k, loop_busy=b) for k, b in enumerate(busy)),
    )
    path, _ = html_and_json(records)
    with opened(browser, path) as seen:
        assert seen.errors == []
        drawn = seen.page.evaluate(
            """async () => {
                await new Promise((done) => requestAnimationFrame(done));
                const c = loopwatch.charts[1], g = c.geom(), r = window.devicePixelRatio;
                const ctx = c.canvas.getContext("2d"), line = c.lines[0];
                const top = c.yTop;
                return line.t.flatMap((t, i) => line.v[i] === null ? [] : [[
                    Array.from(ctx.getImageData(
                        Math.round(c.x(t) * r) - 1, // (the last one is at the clip's edge)
                        Math.round((g.top + g.height - (line.v[i] / top) * g.height) * r), 1, 1
                    ).data.slice(0, 3)),
                    line.color,
                ]]);
            }"""
        )
        assert len(drawn) == 2
        for pixel, colour in drawn:
            assert "#" + "".join(f"{c:02x}" for c in pixel) == colour


def test_formatting_is_the_terminals(browser: Any, tmp_path: Path) -> None:
    path, _ = html_and_json(write(tmp_path / "one.jsonl", request(1, T0)))
    ms = [0, 0.0005, 0.0015, 0.0025, 0.4995, 0.9994, 0.9996, 1, 1.005, 1.125, 2.675, 9.995]
    ms += [9.9951, 12.25, 12.35, 99.95, 999.94, 999.96, 1234.5, 1005, 59_999.5, 3.6e6]
    ms += [round(0.001 * 1.37**k, 3) for k in range(60)]
    sizes = [0, 999, 1000, 1500, 9_950, 9_999_999, 10_500_000, 52_000_000, 3e9, 12.5e9]
    times = [T0, T0 + 0.0005, T0 + 0.9995, T0 + 0.123456, 1.5, 86_400 * 365.25 * 80 + 0.0015]
    spans = [0.5, 59.9, 60, 89.5, 90.5, 3599.4, 7200, 172_800, 200_000]
    with opened(browser, path) as seen:
        got = seen.page.evaluate(
            """([ms, sizes, times, spans]) => [
                ms.map((v) => loopwatch.fmt.ms(v)), sizes.map((v) => loopwatch.fmt.bytes(v)),
                times.map((t) => loopwatch.fmt.time(t, true)),
                spans.map((s) => loopwatch.fmt.span(s)),
                [0, 1, 2, 1234567].map((n) => loopwatch.fmt.count(n, "process")),
            ]""",
            [ms, sizes, times, spans],
        )
    assert got == [
        [fmt_ms(v) for v in ms],
        [fmt_bytes(v) for v in sizes],
        [fmt_time(t, True) for t in times],
        [fmt_span(s) for s in spans],
        [fmt_count(n, "process") for n in (0, 1, 2, 1234567)],
    ]


def test_a_full_window_renders_fast_and_stays_small(browser: Any, tmp_path: Path) -> None:
    # 2,000 overlapping requests (the --html window) and a sample every 0.5 s for an hour.
    reqs = [
        request(
            k,
            T0 + 0.00003 * k,
            wall_ms=80.0 + k % 50,
            segments=tuple(
                (
                    kind,
                    6.0 * j + (0 if kind == "cpu" else 1.0),
                    6.0 * j + (1.0 if kind == "cpu" else 5.5),
                )
                for j in range(12)
                for kind in ("cpu", "db")
            ),
        )
        for k in range(2000)
    ]
    samples = [sample(T0 - 3600 + 0.5 * k, in_flight=k % 90) for k in range(7200)]
    path, data = html_and_json(write(tmp_path / "big.jsonl", *reqs, *samples))
    assert data["window"]["requests"] == 2000
    assert path.stat().st_size < 5_000_000
    with opened(browser, path, viewport={"width": 1400, "height": 900}) as seen:
        assert seen.errors == []
        ready = float(seen.page.evaluate("document.documentElement.dataset.ready"))
        assert ready < 2000, f"the page was ready {ready:.0f} ms after it started loading"
        t = time.perf_counter()
        seen.page.evaluate(
            """async () => { for (let k = 0; k < 10; k++) {
                loopwatch.timeline.view.zoom(0.8);
                await new Promise((done) => requestAnimationFrame(done)); } }"""
        )
        assert time.perf_counter() - t < 2.0, "ten zoom steps of a full window"
