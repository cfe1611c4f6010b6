"""The ``loopwatch`` command, run as a real process on real record files."""

from __future__ import annotations

import glob
import json
import os
import pty
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from .conftest import serve
from .helpers import read_lines

ROOT = Path(__file__).resolve().parent.parent


def loopwatch(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loopwatch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str) -> Path:
    """A record file from a real app run: 60 concurrent requests on two routes."""
    path = tmp_path_factory.mktemp("cli") / "records.jsonl"
    env = {"LOOPWATCH_FILE": str(path), "LOOPWATCH_TEST_DSN": pg_dsn, "POOL_MAX": "5"}
    with serve("tests.apps:app", env) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            client.get("/plain")

        async def fire() -> None:
            import asyncio

            limits = httpx.Limits(max_connections=60)
            async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as c:
                await asyncio.gather(*(c.get(f"/work/{i}?cpu=1&db=30") for i in range(60)))

        import asyncio

        asyncio.run(fire())
    return path  # the server has exited: every record is written


def test_report_prints_timeline_summary_and_capacity(recorded: Path) -> None:
    result = loopwatch("report", str(recorded), "--width", "120")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "█" in out
    assert "░" in out
    assert "SYNC" in out
    assert "ASYNC" in out
    assert "/work/{n}" in out
    assert "\x1b" not in out, "no colour when stdout is not a terminal"
    assert "Traceback" not in result.stderr
    assert max(len(line) for line in out.splitlines()) <= 120


def test_report_json_has_the_documented_keys(recorded: Path) -> None:
    result = loopwatch("report", str(recorded), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["requests"] == 62  # /ready, /plain and 60 /work
    for key in ("wall_ms", "cpu_ms", "db_ms", "pool_wait_ms"):
        assert set(data[key]) >= {"p50", "p95", "p99", "max"}
    # Each query sleeps 30 ms in PostgreSQL: db_ms is a lower bound of that (the reply may
    # have come while the loop was busy), and with the loop wait it covers it.
    assert set(data["loop_wait_ms"]) >= {"p50", "p95", "p99", "max"}
    for rec in read_lines(recorded):
        if rec["type"] == "request" and rec["path"].startswith("/work/"):
            assert rec["db_ms"] + rec["loop_wait_ms"] >= 30, rec
    assert data["peak_in_flight"] >= 30
    assert 0 < data["cpu_share"] < 1
    assert data["skipped_lines"] == 0
    assert isinstance(data["capacity"], dict)


def test_ascii_draws_without_block_characters(recorded: Path) -> None:
    result = loopwatch("report", str(recorded), "--ascii", "--width", "100")
    assert result.returncode == 0, result.stderr
    timeline = next(p for p in result.stdout.split("\n\n") if "time -->" in p)
    assert "#" in timeline
    assert not set("█░▒") & set(result.stdout)


def test_last_and_slowest_choose_the_window(recorded: Path) -> None:
    last = loopwatch("report", str(recorded), "--last", "5", "--width", "120")
    slowest = loopwatch("report", str(recorded), "--slowest", "3", "--width", "120")
    assert last.returncode == slowest.returncode == 0
    assert sum(line.lstrip().startswith("Req ") for line in last.stdout.splitlines()) == 5
    assert sum(line.lstrip().startswith("Req ") for line in slowest.stdout.splitlines()) == 3


def test_route_filter(recorded: Path) -> None:
    result = loopwatch("report", str(recorded), "--route", "/plain", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["requests"] == 1


def test_since_and_until_accept_unix_seconds_and_iso(recorded: Path) -> None:
    future = loopwatch("report", str(recorded), "--since", "2100-01-01T00:00:00", "--json")
    assert future.returncode == 1
    assert "Traceback" not in future.stderr
    everything = loopwatch("report", str(recorded), "--since", "0", "--until", "4102444800")
    assert everything.returncode == 0, everything.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--width", "5"],
        ["--last", "0"],
        ["--since", "yesterday-ish"],
        ["--last", "2", "--slowest", "2"],
    ],
)
def test_bad_arguments_get_a_usage_error(recorded: Path, args: list[str]) -> None:
    result = loopwatch("report", str(recorded), *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr


def test_a_width_too_narrow_says_the_least_there_is(recorded: Path) -> None:
    for width in ("0", "-3", "19"):
        result = loopwatch("report", str(recorded), "--width", width)
        assert result.returncode == 2
        assert f"a width of {width} is too narrow (at least 20)" in result.stderr


def test_missing_file_is_one_clear_line(tmp_path: Path) -> None:
    result = loopwatch("report", str(tmp_path / "nope.jsonl"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "nope.jsonl" in result.stderr
    assert "Traceback" not in result.stderr


def test_one_missing_file_among_good_ones_is_a_note(recorded: Path, tmp_path: Path) -> None:
    result = loopwatch("report", str(recorded), str(tmp_path / "gone.jsonl"), "--json")
    assert result.returncode == 0
    assert "gone.jsonl" in result.stderr
    assert json.loads(result.stdout)["requests"] == 62


def test_colour_on_a_terminal_unless_no_color(recorded: Path) -> None:
    def run_on_pty(env: dict[str, str]) -> str:
        main, child = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "loopwatch", "report", str(recorded), "--width", "120"],
            stdout=child, stderr=subprocess.DEVNULL, env={**os.environ, **env}, cwd=ROOT,
        )  # fmt: skip
        os.close(child)
        chunks = []
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(30)
        os.close(main)
        return b"".join(chunks).decode("utf-8", "replace")

    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    assert "\x1b[" in run_on_pty({**env, "NO_COLOR": ""})
    assert "\x1b[" not in run_on_pty({"NO_COLOR": "1"})


def test_json_carries_the_loop_and_the_diagnosis(recorded: Path) -> None:
    data = json.loads(loopwatch("report", str(recorded), "--json").stdout)
    assert set(data["loop_wait_ms"]) == {"p50", "p95", "p99", "max"}
    assert set(data["loop"]) >= {"utilization", "lag_ms", "stalls"}
    # A run this short may hold a single sample, before the busy share can be known.
    busy, lag = data["loop"]["utilization"], data["loop"]["lag_ms"]
    assert busy is None or 0 <= busy <= 1
    assert lag is None or set(lag) == {"p50", "p99", "max"}
    # Queries behind a pool of 5: whatever it says, it does not blame the loop.
    assert isinstance(data["diagnosis"], list)
    assert not any(sentence.startswith("The event loop") for sentence in data["diagnosis"])


def test_report_of_a_blocked_loop_names_the_blocking_line(tmp_path: Path, pg_dsn: str) -> None:
    path = tmp_path / "blocked.jsonl"
    env = {"LOOPWATCH_FILE": str(path), "LOOPWATCH_TEST_DSN": pg_dsn, "POOL_MAX": "5"}
    with serve("tests.loop_apps:app", env) as server:

        async def burst() -> None:
            import asyncio

            import asyncpg

            limits = httpx.Limits(max_connections=30)
            watcher = await asyncpg.connect(pg_dsn)
            async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as c:
                # As many queries as the pool has connections, each held 300 ms by
                # PostgreSQL, and a 1 s block sent once PostgreSQL shows all of them
                # running: their replies come back to a held loop, so each waits for the
                # loop about twice as long as for the database. (A block sent after a fixed
                # 100 ms sometimes arrived before the queries under load, in a CI run: no
                # loop wait, no diagnosis.)
                queries = [
                    asyncio.ensure_future(c.get(f"/q/{i}?pg_sleep_ms=300")) for i in range(5)
                ]
                running = (
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE state = 'active' AND query LIKE '%FROM pg_sleep($1)%'"
                    " AND pid <> pg_backend_pid()"
                )
                deadline = time.monotonic() + 20
                while await watcher.fetchval(running) < 5:
                    assert time.monotonic() < deadline, "the queries never reached PostgreSQL"
                    await asyncio.sleep(0.005)
                await watcher.close()
                await c.post("/block?kind=sleep&ms=1000")
                await asyncio.gather(*queries)

        import asyncio

        asyncio.run(burst())
    result = loopwatch("report", str(path), "--width", "200")
    assert result.returncode == 0, result.stderr
    lead = result.stdout.split("\n\n")[0]
    assert lead.startswith("Diagnosis\n  The event loop, not the database or the pool, is where")
    marker = next(
        n
        for n, text in enumerate((ROOT / "tests" / "loop_apps.py").read_text().splitlines(), 1)
        if "# BLOCK-SLEEP" in text
    )
    assert "Route /block held the loop once (" in lead
    assert f"loop_apps.py:{marker} in block: it delayed " in lead
    assert "run_in_executor" in lead


def _demo_leftovers() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "loopwatch-demo-*")))


def test_demo_end_to_end_on_the_embedded_database() -> None:
    before = _demo_leftovers()
    result = loopwatch("demo", "--width", "110", "--requests", "40", timeout=180)
    assert result.returncode == 0, result.stderr
    assert "40 concurrent requests" in result.stdout
    assert "█" in result.stdout
    assert "░" in result.stdout
    assert "SYNC" in result.stdout
    assert "ASYNC" in result.stdout
    assert _demo_leftovers() == before, "the demo removes its temporary files"
    assert not _processes_using("loopwatch-demo-"), "the demo stops its database"


def test_demo_cleans_up_on_ctrl_c() -> None:
    before = _demo_leftovers()
    proc = subprocess.Popen(
        # Enough requests (~3 s on a pool of 15) that the demo is still at them when the
        # signal comes, however fast the database starts (an external one: at once).
        [sys.executable, "-m", "loopwatch", "demo", "--requests", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    me = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the uvicorn child is up
        if any("uvicorn" in _cmdline(c) for c in me.children(recursive=True)):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the demo server never started")
    children = me.children(recursive=True)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "Traceback" not in err
    _gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"left running: {[_cmdline(p) for p in alive]}"
    assert _demo_leftovers() == before
    # pgserver's postgres daemonizes (not a child): find it by its data directory.
    assert not _processes_using("loopwatch-demo-")


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # exited (or a zombie) meanwhile
        return ""


def _processes_using(fragment: str) -> list[str]:
    found = []
    for p in psutil.process_iter():
        cmdline = _cmdline(p)
        if fragment in cmdline and "pytest" not in cmdline and p.status() != psutil.STATUS_ZOMBIE:
            found.append(cmdline)
    return found


def test_demo_without_its_extra_says_how_to_install_it() -> None:
    # uvicorn made unimportable, as on a machine without `loopwatch[demo]`.
    code = (
        "import sys; sys.modules['uvicorn'] = None; "
        "from loopwatch.cli import main; sys.exit(main(['demo']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "pip install 'loopwatch[demo]'" in result.stderr
    assert "uvicorn" in result.stderr
    assert "Traceback" not in result.stderr


def _demo_line(needle: str) -> int:
    """The line of the demo app that contains ``needle``."""
    source = (ROOT / "src" / "loopwatch" / "cli" / "demo_app.py").read_text().splitlines()
    (line,) = [n for n, text in enumerate(source, 1) if needle in text.split("#")[0]]
    return line


def test_demo_blocking_records_stalls_at_the_demo_apps_blocking_lines(
    pg_dsn: str, tmp_path: Path
) -> None:
    from loopwatch.cli import demo
    from loopwatch.record import RequestRecord, Stall, parse_line

    record_file = demo.run(pg_dsn, 40, tmp_path, blocking=demo.BLOCKING_REQUESTS).record_file
    records = [parse_line(line) for line in record_file.read_text().splitlines() if line]
    stalls = [r for r in records if isinstance(r, Stall)]
    requests = [r for r in records if isinstance(r, RequestRecord)]

    demo_app = str(ROOT / "src" / "loopwatch" / "cli" / "demo_app.py")
    expected = {
        "/hash/{item_id}": (demo_app, _demo_line('b"salt", iterations)')),
        "/sleep/{item_id}": (demo_app, _demo_line("time.sleep(BLOCK_SECONDS)")),
    }
    assert sorted(s.route or "" for s in stalls) == sorted(2 * list(expected))
    for stall in stalls:
        assert stall.location is not None, stall
        assert stall.location[:2] == expected[stall.route or ""], stall
        # Each block is calibrated to 150 ms of CPU; a calibration on a busy core may
        # come out shorter, never below the 100 ms stall threshold it is recorded at.
        assert stall.duration_ms >= 100
        # (The hash's cause is "cpu" only while its core is not shared with other work.)
        if stall.route == "/sleep/{item_id}":
            assert stall.cause == "blocked"
    assert len(requests) == 44
    # The well-behaved requests in flight during a block waited for the loop, and their
    # records say which route held it.
    waited = [
        r
        for r in requests
        if r.route == "/items/{item_id}"
        and r.loop_wait_ms >= 50
        and r.blocked_by is not None
        and r.blocked_by.route in expected
    ]
    assert waited, [(r.path, r.loop_wait_ms, r.blocked_by) for r in requests]


def test_demo_blocking_says_what_it_sent(tmp_path: Path) -> None:
    before = _demo_leftovers()
    html, trace = tmp_path / "demo.html", tmp_path / "demo.json"
    result = loopwatch(
        "demo", "--blocking", "--width", "110", "--requests", "40",
        "--html", str(html), "--perfetto", str(trace), timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # The files of the report printed: its figures, its stalls.
    assert f"loopwatch: wrote {html} (" in result.stderr
    assert f"loopwatch: wrote {trace} (" in result.stderr
    page = html.read_text(encoding="utf-8")
    data = json.loads(page.split('type="application/json"', 1)[1].split(">", 1)[1].split("<", 1)[0])
    assert data["report"]["requests"] == 44
    assert data["series"]["stall_count"] >= 4
    events = json.loads(trace.read_bytes())["traceEvents"]
    assert sum(e["ph"] == "i" for e in events) == data["series"]["stall_count"]
    first = result.stdout.splitlines()[0]
    assert first.startswith("40 concurrent requests, each a little CPU and a 50 ms query, ")
    assert "4 that block the event loop for 150 ms each" in first
    assert "time.sleep" in first
    for route in ("/items/{item_id}", "/hash/{item_id}", "/sleep/{item_id}"):
        assert route in result.stdout
    assert "Traceback" not in result.stderr
    assert _demo_leftovers() == before, "the demo removes its temporary files"
    assert not _processes_using("loopwatch-demo-"), "the demo stops its database"


def test_demo_compare_sync_runs_as_many_sync_workers_as_estimated() -> None:
    import re

    before = _demo_leftovers()
    result = loopwatch("demo", "--compare-sync", "--requests", "30", "--width", "120", timeout=240)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    found = re.search(r"SYNC  same p95 latency \([^)]*\):\s+(\d+) workers?", out)
    assert found, out
    workers = int(found.group(1))
    assert f"the same 30 requests, then {workers} sync workers" in out
    rows = {}
    for side in ("ASYNC", "SYNC"):
        row = re.search(
            rf"^  {side} .*?\s(\d+)\s+([\d,]+)\s+([\d.]+)(ms|s)\s+([\d.]+) (MB|GB)$", out, re.M
        )
        assert row, out
        rows[side] = row.groups()
    # gunicorn's master and its workers; the async side is one process
    assert int(rows["SYNC"][0]) == workers + 1
    assert int(rows["ASYNC"][0]) == 1
    for side in rows.values():
        assert int(side[1].replace(",", "")) > 0  # requests per second
        assert float(side[2]) > 0  # p95
        assert float(side[4]) > 0  # memory
    assert _demo_leftovers() == before, "the demo removes its temporary files"
    assert not _processes_using("loopwatch-demo-"), "the demo stops its database"
    assert not _processes_using("sync_app:create_app"), "the demo stops its sync workers"


def test_ascii_output_is_ascii_and_fits_its_width_on_an_ascii_terminal(recorded: Path) -> None:
    env = {"PYTHONIOENCODING": "ascii"}
    result = loopwatch("report", str(recorded), "--ascii", "--width", "60", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.isascii()
    assert "Traceback" not in result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) <= 60
    # Without --ascii, what the terminal cannot show is replaced, never a traceback.
    plain = loopwatch("report", str(recorded), "--width", "60", env=env)
    assert plain.returncode == 0, plain.stderr
    assert "Traceback" not in plain.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_time_that_is_not_one_is_refused(recorded: Path, value: str) -> None:
    result = loopwatch("report", str(recorded), f"--since={value}")
    assert result.returncode == 2
    assert f"{value!r} is not a time" in result.stderr


def test_demo_with_an_unreachable_database_says_so() -> None:
    result = loopwatch("demo", "--dsn", "postgresql://nobody@127.0.0.1:1/x", "--requests", "5")
    assert result.returncode == 1
    assert "loopwatch: could not connect to PostgreSQL:" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_compare_sync_refuses_blocking_requests() -> None:
    result = loopwatch("demo", "--blocking", "--compare-sync")
    assert result.returncode == 1
    assert "run it without --blocking" in result.stderr


def test_the_sync_side_starts_measuring_once_every_worker_exists(pg_dsn: str) -> None:
    # gunicorn forks its workers up to 0.1 s apart; the first answers /ready long before
    # the last exists, and traffic sent then meets fewer workers than the demo says.
    from loopwatch.cli import demo

    with demo._served(pg_dsn, None, 8) as (_, pid):
        workers = psutil.Process(pid).children()
        assert len(workers) == 8, workers


def test_file_outputs_never_replace_what_is_not_a_report_file(tmp_path: Path) -> None:
    from .test_report_split import recording, write

    records = write(tmp_path / "r.jsonl", recording(300))
    kept = records.read_bytes()
    rotated = tmp_path / "r.jsonl.1"  # read with r.jsonl, as its older part
    rotated.write_bytes(kept)
    for args, said in [
        (("--html", str(records)), "is a file being read"),
        (("--perfetto", str(records)), "is a file being read"),
        (("--html", str(rotated)), "is a file being read"),
        (("--perfetto", str(rotated)), "is a file being read"),
        (("--html", "-"), "not standard output"),
        (("--html", str(tmp_path / "o"), "--perfetto", str(tmp_path / "o")), "is also written"),
        (("--html", str(tmp_path)), "not a regular file"),
        (("--html", "/dev/null"), "not a regular file"),
        (("--html", ""), "needs a file name"),
    ]:
        result = loopwatch("report", str(records), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert said in result.stderr, (args, result.stderr)
    assert records.read_bytes() == kept
    assert rotated.read_bytes() == kept
    assert not (tmp_path / "o").exists()
    assert not (tmp_path / "-").exists()
    assert Path("/dev/null").is_char_device()
    # A symbolic link is written through, and stays a link.
    (tmp_path / "target.html").write_text("old")
    (tmp_path / "link.html").symlink_to(tmp_path / "target.html")
    result = loopwatch("report", str(records), "--html", str(tmp_path / "link.html"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "link.html").is_symlink()
    assert (tmp_path / "target.html").read_text().startswith("<!doctype html>")
    # A file replaced keeps its permissions; a new one has the usual ones.
    (tmp_path / "target.html").chmod(0o600)
    result = loopwatch("report", str(records), "--html", str(tmp_path / "link.html"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "target.html").stat().st_mode & 0o777 == 0o600
    result = loopwatch("report", str(records), "--perfetto", str(tmp_path / "new.json"))
    assert result.returncode == 0, result.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644 & ~umask
    # Options of the text report, which is not printed: said, not silently dropped.
    result = loopwatch("report", str(records), "--html", str(tmp_path / "new.html"), "--ascii")
    assert result.returncode == 0, result.stderr
    assert "--width and --ascii shape the text report" in result.stderr
