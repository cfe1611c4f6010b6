"""Sync workers against one async process, measured: the check on loopwatch's capacity model.

    python benchmarks/sync_vs_async.py                  # all four loads, W = 4 ... 100
    python benchmarks/sync_vs_async.py --quick          # a smoke run: 2 loads, W = 4, 16, 3 s
    python benchmarks/sync_vs_async.py --preload --json /tmp/sync_vs_async.json
    python benchmarks/sync_vs_async.py --loads burst,poisson --workers 8,12,16 --duration 10

The demo's well-behaved request (a little CPU, then a 50 ms query) served two ways:

(A) one async process: loopwatch.cli.demo_app under uvicorn, LoopWatch recording to a
    fresh record file per load, a pool of 15 connections;
(B) loopwatch.cli.sync_app (Flask, psycopg 3, one connection per worker) under
    ``gunicorn -w W --worker-class sync``, for each W of --workers, with ``--preload``
    when asked. The module is loaded as a top-level module so the workers hold only what
    a Flask app would, not the loopwatch package.

Each is driven by the same loads, all requests to distinct /items/{id}:

    burst     bursts of 100 concurrent requests, each sent when the previous has
              answered, one burst per second of --duration
    closed    100 closed-loop clients for --duration seconds
    constant  150 requests per second for --duration seconds (open loop: sent on
              schedule whether or not earlier ones have answered)
    poisson   Poisson arrivals at 154 per second for --duration seconds (seeded)

Per configuration: throughput (answered requests per second, from the load's start to
its last answer), p50/p95/p99 latency from each request's intended send time, errors,
and the memory of every server process at the end of the load (RSS, USS and PSS summed
over gunicorn's master and workers, and per worker). Per load: the smallest W whose
throughput is within 3% of the async process's, the smallest whose p95 is no worse, and
loopwatch's estimates from (A)'s records (``loopwatch report --json``, its ``capacity``).

The load generator runs in this process on raw asyncio streams (uvloop when installed),
keeping connections alive where the server does (uvicorn; gunicorn's sync workers close
each one); its own CPU share and, for the open-loop loads, how late it sent are printed
so a load generator that fell behind shows. Nothing is pinned: the servers, PostgreSQL
and the load generator share the machine's cores, as sync workers and an async process
would. An embedded PostgreSQL (pgserver) is started, with max_connections raised for the
largest W, unless --dsn is given. Everything started is stopped on exit and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg

from loopwatch.cli import demo
from loopwatch.cli.demo_app import POOL_SIZE

BURST = 100  # requests per burst
CLIENTS = 100  # closed-loop clients
CONSTANT_RATE = 150.0  # requests per second
POISSON_RATE = 154.0
SEED = 9
WORKERS = [4, 8, 12, 16, 20, 24, 32, 48, 64, 100]
LOADS = ["burst", "closed", "constant", "poisson"]
QUICK = {"loads": ["burst", "constant"], "workers": [4, 16], "duration": 3.0}
THROUGHPUT_MATCH = 0.97  # "the same throughput": within 3% of the async process's
# Also shown: the smallest W within 10% of the async p95. A sync request costs a little
# more than an async one (a new connection each, gunicorn's parsing), so where the async
# p95 is the bare service time no W reaches it exactly.
P95_SLACK = 1.10
REQUEST_TIMEOUT = 120.0
BACKLOG = 4096  # every request of an open-loop load may wait for a sync worker at once
ESTIMATE_KEYS = [
    "sync_workers_same_throughput",
    "sync_workers_same_latency",
    "sync_workers_no_queueing",
]
SYNC_DIR = Path(demo.__file__).resolve().parent  # where sync_app.py is
MB = 2**20

ids = itertools.count(1)  # item ids, distinct over the whole run


# -- the load generator ---------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    intended: float  # perf_counter seconds
    sent: float
    done: float
    ok: bool


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Client:
    """GET /items/{id} over HTTP/1.1: a connection is kept for the next request when the
    server keeps it alive (uvicorn), a new one opened per request when the server closes
    it (gunicorn's sync workers), so each server is met as it serves."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[Conn] = []
        self.samples: list[Sample] = []

    async def get(self, intended: float) -> None:
        sent = time.perf_counter()
        try:
            ok = await asyncio.wait_for(self._get(next(ids)), REQUEST_TIMEOUT)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            ok = False
        self.samples.append(Sample(intended, sent, time.perf_counter(), ok))

    async def _get(self, item: int) -> bool:
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"GET /items/%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % item)
            head = await reader.readuntil(b"\r\n\r\n")
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection":
                    close = value.strip().lower() == b"close"
            await reader.readexactly(length)
        except BaseException:  # a timeout's cancellation too: the connection is unusable
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self.idle.append((reader, writer))
        return head.startswith(b"HTTP/1.1 200")

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def burst(client: Client, duration: float) -> None:
    for _ in range(max(1, round(duration))):
        t = time.perf_counter()
        await asyncio.gather(*(client.get(t) for _ in range(BURST)))


async def closed(client: Client, duration: float) -> None:
    end = time.perf_counter() + duration

    async def one() -> None:
        while (t := time.perf_counter()) < end:
            await client.get(t)

    await asyncio.gather(*(one() for _ in range(CLIENTS)))


async def constant(client: Client, duration: float) -> None:
    await open_loop(client, [i / CONSTANT_RATE for i in range(round(CONSTANT_RATE * duration))])


async def poisson(client: Client, duration: float) -> None:
    rng, t, offsets = random.Random(SEED), 0.0, []
    while (t := t + rng.expovariate(POISSON_RATE)) < duration:
        offsets.append(t)
    await open_loop(client, offsets)


async def open_loop(client: Client, offsets: list[float]) -> None:
    """Send a request at each offset (seconds from now), answered or not."""
    t0 = time.perf_counter()
    tasks = []
    for offset in offsets:
        due = t0 + offset
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(client.get(due)))
    await asyncio.gather(*tasks)


LOAD_FUNCTIONS: dict[str, Callable[[Client, float], Awaitable[None]]] = {
    "burst": burst,
    "closed": closed,
    "constant": constant,
    "poisson": poisson,
}
DESCRIPTIONS = {
    "burst": "bursts of {burst} concurrent requests, each sent when the last has answered",
    "closed": "{clients} closed-loop clients",
    "constant": f"{CONSTANT_RATE:.0f} requests per second, open loop",
    "poisson": f"Poisson arrivals at {POISSON_RATE:.0f} per second, open loop, seed {SEED}",
}


def run_loop(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def drive(load: str, port: int, duration: float) -> dict[str, Any]:
    """Run ``load`` against the server on ``port``; its client-side figures."""
    client = Client(port)

    async def go() -> None:
        try:
            await LOAD_FUNCTIONS[load](client, duration)
        finally:
            client.close()

    cpu0, t0 = time.process_time(), time.perf_counter()
    run_loop(go())
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    samples = client.samples
    ok = [s for s in samples if s.ok]
    latency = sorted((s.done - s.intended) * 1000 for s in ok)
    lag = sorted((s.sent - s.intended) * 1000 for s in samples)
    span = max(s.done for s in ok) - t0 if ok else wall
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "seconds": round(span, 3),
        "throughput": round(len(ok) / span, 1),
        "p50_ms": pct(latency, 0.50),
        "p95_ms": pct(latency, 0.95),
        "p99_ms": pct(latency, 0.99),
        "max_ms": pct(latency, 1.0),
        "send_lag_p99_ms": pct(lag, 0.99),
        "send_lag_max_ms": pct(lag, 1.0),
        "client_cpu_share": round(cpu / wall, 3),
    }


def pct(values: list[float], q: float) -> float | None:
    """Nearest rank of sorted ``values``."""
    if not values:
        return None
    return round(values[max(0, math.ceil(q * len(values)) - 1)], 1)


async def warm_up(port: int, workers: int) -> None:
    """Enough concurrent requests that every sync worker has loaded the app and opened
    its connection before a load is measured."""
    client = Client(port)
    for _ in range(3):
        t = time.perf_counter()
        await asyncio.gather(*(client.get(t) for _ in range(workers)))
    client.close()


# -- the servers ----------------------------------------------------------------------


@contextlib.contextmanager
def serve(cmd: Callable[[int], list[str]], env: dict[str, str], processes: int) -> Iterator[Any]:
    """Run ``cmd(port)`` in its own session until it answers /ready with ``processes``
    processes in all; yields (port, psutil.Process)."""
    # A port rather than a listening socket's fd: uvicorn takes an fd for a Unix socket
    # (socket.fromfd(fd, AF_UNIX)), so asyncio leaves Nagle on for its TCP connections
    # and every response after a keep-alive connection's first waits ~40 ms for the
    # client's delayed ACK before its body goes out.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    proc = subprocess.Popen(
        cmd(port),
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches this script only; it stops the server
    )
    try:
        server = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}: {cmd(0)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within two minutes: {cmd(0)}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2).close()
                if 1 + len(server.children()) >= processes:
                    break
            time.sleep(0.1)
        yield port, server
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # uvicorn writes its last records on a clean exit
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers left behind, if any
    proc.wait()


def uvicorn_cmd(port: int) -> list[str]:
    # The demo's command (loopwatch.cli.demo.server) on a port, keep-alive long enough that
    # an idle connection of the load generator is not closed under it.
    return [sys.executable, "-m", "uvicorn", "--factory", "loopwatch.cli.demo_app:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--backlog", str(BACKLOG),
            "--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "60"]  # fmt: skip


def gunicorn_cmd(workers: int, preload: bool) -> Callable[[int], list[str]]:
    def cmd(port: int) -> list[str]:
        return [sys.executable, "-m", "gunicorn", "--pythonpath", str(SYNC_DIR),
                "-w", str(workers), "--worker-class", "sync", "--bind", f"127.0.0.1:{port}",
                "--backlog", str(BACKLOG), "--timeout", "60", "--graceful-timeout", "10",
                "--log-level", "warning", *(["--worker-tmp-dir", "/dev/shm"]
                if os.path.isdir("/dev/shm") else []),
                *(["--preload"] if preload else []), "sync_app:create_app()"]  # fmt: skip

    return cmd


def settle(server: psutil.Process, timeout: float = 60.0) -> None:
    """Wait until the server's processes are (nearly) idle: start-up and warm-up done."""
    deadline = time.monotonic() + timeout
    before = tree_cpu(server)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = tree_cpu(server)
        if now - before < 0.05:
            return
        before = now


def tree_cpu(server: psutil.Process) -> float:
    total = 0.0
    for p in [server, *server.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def memory(server: psutil.Process) -> dict[str, Any]:
    """RSS, USS and PSS of the server's processes, summed, and per worker (gunicorn's
    workers; the process itself for uvicorn)."""
    procs = [server, *server.children(recursive=True)]
    info = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            info[p.pid] = p.memory_full_info()
    workers = [m for pid, m in info.items() if pid != server.pid] or list(info.values())

    def mean(name: str) -> int:
        return round(sum(getattr(m, name) for m in workers) / len(workers))

    return {
        "processes": len(info),
        "rss_bytes": sum(m.rss for m in info.values()),
        "uss_bytes": sum(m.uss for m in info.values()),
        "pss_bytes": sum(m.pss for m in info.values()),
        "worker_rss_bytes": mean("rss"),
        "worker_uss_bytes": mean("uss"),
        "worker_pss_bytes": mean("pss"),
    }


@contextlib.contextmanager
def postgres(dsn: str | None, workdir: Path, connections: int) -> Iterator[tuple[str, int]]:
    """The database, allowing ``connections`` clients where it can; yields its DSN and the
    connections it allows."""
    with demo.database(dsn, workdir) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            allowed = int(conn.execute("SHOW max_connections").fetchone()[0])  # type: ignore[index]
            if dsn is None and allowed < connections:
                conn.execute(f"ALTER SYSTEM SET max_connections = {int(connections)}")
        if dsn is not None or allowed >= connections:
            yield url, allowed
            return
        from pgserver._commands import pg_ctl

        # pgserver starts its server itself, so the setting takes effect on a restart (as
        # the user pgserver runs PostgreSQL as when we are root), and the restarted server
        # is stopped here: pgserver knows only the first one's pid.
        datadir, user = workdir / "pg", ("pgserver" if os.geteuid() == 0 else None)
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=datadir, user=user, timeout=60)
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                allowed = int(conn.execute("SHOW max_connections").fetchone()[0])  # type: ignore[index]
            yield url, allowed
        finally:
            with contextlib.suppress(Exception):
                pg_ctl(["-w", "-m", "fast", "stop"], pgdata=datadir, user=user, timeout=60)
            logging.getLogger("pgserver").disabled = True  # its own stop now fails, harmlessly


def estimate(record_file: Path) -> dict[str, Any]:
    """``loopwatch report --json`` on the async process's records: its capacity section and
    the figures that explain it."""
    out = subprocess.run(
        [sys.executable, "-m", "loopwatch", "report", "--json", str(record_file)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()}
    report = json.loads(out.stdout)
    keys = ["requests", "peak_in_flight", "p95_in_flight", "pool_wait_ms", "db_ms", "cpu_ms"]
    return {"capacity": report.get("capacity", {}), **{k: report.get(k) for k in keys}}


# -- the run --------------------------------------------------------------------------


def run(args: argparse.Namespace, loads: list[str], workers: list[int]) -> dict[str, Any]:
    results: dict[str, Any] = {
        "config": {
            "loads": loads,
            "workers": workers,
            "duration": args.duration,
            "preload": args.preload,
            "pool_size": POOL_SIZE,
            "cpus": os.cpu_count(),
            "notes": [],
        },
        "loads": {load: {"async": None, "sync": {}, "loopwatch": None} for load in loads},
    }
    with (
        tempfile.TemporaryDirectory(prefix="lw-sync-vs-async-") as tmp,
        postgres(args.dsn, Path(tmp), max(workers) + POOL_SIZE + 20) as (dsn, allowed),
    ):
        if max(workers) > allowed - 5:
            note = f"PostgreSQL allows {allowed} connections: W capped at {allowed - 5}"
            results["config"]["notes"].append(note)
            print(note, file=sys.stderr)
            workers = [w for w in workers if w <= allowed - 5]
        for load in loads:
            record_file = Path(tmp) / f"async-{load}.jsonl"
            env = {"LOOPWATCH_DEMO_DSN": dsn, "LOOPWATCH_FILE": str(record_file)}
            with serve(uvicorn_cmd, env, 1) as (port, server):
                settle(server)
                r = drive(load, port, args.duration) | memory(server)
            results["loads"][load]["async"] = r
            results["loads"][load]["loopwatch"] = estimate(record_file)
            progress(load, "async", r)
        for w in workers:
            env = {"LOOPWATCH_DEMO_DSN": dsn}
            with serve(gunicorn_cmd(w, args.preload), env, 1 + w) as (port, server):
                run_loop(warm_up(port, w))
                for load in loads:
                    settle(server)
                    r = drive(load, port, args.duration) | memory(server)
                    results["loads"][load]["sync"][w] = r
                    progress(load, f"W={w}", r)
    for load in loads:
        results["loads"][load]["match"] = match(results["loads"][load])
    return results


def progress(load: str, label: str, r: dict[str, Any]) -> None:
    print(f"  {load:9} {label:6} {r['throughput']:6.1f} req/s  p95 {r['p95_ms']} ms  "
          f"errors {r['errors']}  RSS {r['rss_bytes'] / MB:.0f} MB", file=sys.stderr)  # fmt: skip


def match(result: dict[str, Any]) -> dict[str, int | None]:
    """The smallest W with the async process's throughput (within 3%), with its p95, and
    with its p95 within 10%."""
    a, sync = result["async"], sorted(result["sync"].items())
    ok = [(w, r) for w, r in sync if r["errors"] == 0 and r["p95_ms"] is not None]
    p95 = a["p95_ms"] if a["p95_ms"] is not None else -1.0
    return {
        "same_throughput": next(
            (w for w, r in ok if r["throughput"] >= THROUGHPUT_MATCH * a["throughput"]), None
        ),
        "same_p95": next((w for w, r in ok if r["p95_ms"] <= p95), None),
        "p95_within_10pct": next((w for w, r in ok if r["p95_ms"] <= P95_SLACK * p95), None),
    }


# -- the tables -----------------------------------------------------------------------

COLUMNS = [  # header, key, format; memory in MB
    ("req/s", "throughput", "{:.1f}"),
    ("p50 ms", "p50_ms", "{:.0f}"),
    ("p95 ms", "p95_ms", "{:.0f}"),
    ("p99 ms", "p99_ms", "{:.0f}"),
    ("err", "errors", "{}"),
    ("RSS MB", "rss_bytes", "{:.0f}"),
    ("USS MB", "uss_bytes", "{:.0f}"),
    ("PSS MB", "pss_bytes", "{:.0f}"),
    ("RSS/w", "worker_rss_bytes", "{:.1f}"),
    ("USS/w", "worker_uss_bytes", "{:.1f}"),
    ("PSS/w", "worker_pss_bytes", "{:.1f}"),
    ("cli CPU", "client_cpu_share", "{:.0%}"),
    ("lag p99", "send_lag_p99_ms", "{:.1f}"),
    ("lag max", "send_lag_max_ms", "{:.1f}"),
]


def row(label: str, r: dict[str, Any]) -> str:
    cells = []
    for _, key, fmt in COLUMNS:
        v = r.get(key)
        if v is None:
            cells.append("-")
        else:
            cells.append(fmt.format(v / MB if key.endswith("bytes") else v))
    return f"{label:18}" + "".join(f"{c:>9}" for c in cells)


def render(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        f"duration {cfg['duration']:g} s, sync workers {'with' if cfg['preload'] else 'without'}"
        f" --preload, {cfg['cpus']} CPUs; latency from the intended send time; memory at the"
        " end of each load, per worker (/w) the mean over gunicorn's workers",
        *cfg["notes"],
    ]
    for load, result in results["loads"].items():
        desc = DESCRIPTIONS[load].format(burst=BURST, clients=CLIENTS)
        a, m = result["async"], result["match"]
        lines += ["", f"{load}: {desc}", f"{'':18}" + "".join(f"{h:>9}" for h, _, _ in COLUMNS)]
        lines.append(row(f"async (pool {POOL_SIZE})", a))
        lines += [row(f"sync W={w}", r) for w, r in sorted(result["sync"].items())]
        top = max(result["sync"], default=None)
        lines.append(
            f"  sync W matching the async throughput (>= {THROUGHPUT_MATCH:.0%} of "
            f"{a['throughput']:.1f} req/s): {m['same_throughput'] or f'none up to {top}'}"
        )
        lines.append(
            f"  sync W matching the async p95 (<= {a['p95_ms']:.0f} ms): "
            f"{m['same_p95'] or f'none up to {top}'}; within 10% "
            f"(<= {P95_SLACK * a['p95_ms']:.0f} ms): {m['p95_within_10pct'] or f'none up to {top}'}"
        )
        est = result["loopwatch"]
        if "error" in est:
            lines.append(f"  loopwatch report failed: {est['error']}")
            continue
        cap = est["capacity"]
        lines.append(
            f"  loopwatch's estimate from the async records ({est['requests']} requests, "
            f"in flight peak {est['peak_in_flight']}, p95 {est['p95_in_flight']}):"
        )
        lines += [f"    {k:34} {_value(cap.get(k))}" for k in ESTIMATE_KEYS]
        lines += [
            f"    capacity.{k:25} {_value(v)}" for k, v in cap.items() if k not in ESTIMATE_KEYS
        ]
    return "\n".join(lines) + "\n"


def _value(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int) and not isinstance(v, bool) and v >= MB:
        return f"{v} ({v / MB:.1f} MB)"
    return json.dumps(v) if isinstance(v, dict | list) else str(v)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loads", help=f"comma-separated, of {','.join(LOADS)} (default: all)")
    parser.add_argument("--workers", help="sync worker counts, comma-separated (default: "
                        f"{','.join(map(str, WORKERS))})")  # fmt: skip
    parser.add_argument("--duration", type=float, help="seconds per load (default: 10)")
    parser.add_argument("--preload", action="store_true", help="gunicorn --preload")
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--dsn", help="a PostgreSQL to use instead of an embedded one")
    parser.add_argument("--json", metavar="OUT", help="also write all results to OUT")
    args = parser.parse_args()
    defaults: dict[str, Any] = QUICK if args.quick else {"loads": LOADS, "workers": WORKERS}
    loads = args.loads.split(",") if args.loads else defaults["loads"]
    workers = (
        sorted({int(w) for w in args.workers.split(",")}) if args.workers else defaults["workers"]
    )
    args.duration = args.duration or defaults.get("duration", 10.0)
    if unknown := set(loads) - set(LOADS):
        parser.error(f"unknown loads: {', '.join(sorted(unknown))}")
    # Ctrl-C (even when started in the background, where SIGINT comes ignored) and a plain
    # `kill` stop the servers too: the exceptions unwind through the context managers.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        results = run(args, loads, workers)
    except KeyboardInterrupt:
        sys.exit("interrupted; the servers and the database are stopped")
    print(render(results), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
