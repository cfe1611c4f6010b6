"""What loopwatch costs the server: CPU per request and throughput, bare vs instrumented.

    python benchmarks/overhead.py [--requests 20000] [--rounds 5] [--dsn DSN]

Serves benchmarks/bench_app.py with uvicorn (one process, uvloop when installed, as
uvicorn picks it) in each configuration, all servers running at once, and drives them
with a keep-alive load generator in another process for a fixed number of requests per
run. Runs are interleaved (bare, loopwatch, bare, loopwatch, ...). The server's CPU time
comes from the kernel's accounting of the server process (user + system, all threads,
the record writer and the span batch processor included), not from the load generator.
Reports medians and the ratio to the first configuration (bare). Server and load
generator are pinned to different cores when the machine has two or more.

--modes picks the configurations (BENCH_MODE in bench_app.py), default bare,loopwatch.
The span comparison:

    python benchmarks/overhead.py --modes bare,loopwatch,otel-contrib,loopwatch-spans

otel-contrib is OpenTelemetry's ASGI + asyncpg instrumentation, loopwatch-spans is
loopwatch exporting its spans; both through the same SDK set-up and an exporter that
does nothing (benchmarks/otel_setup.py), and the added CPU of the one is reported as a
fraction of the other's. Add lw-spans-nofile (loopwatch as a span exporter only) and
sdk-floor (the fewest spans, straight through the SDK) to see what the SDK itself costs.

--before SRC adds, after each configuration other than bare, the same configuration with
the loopwatch package imported from SRC (the src folder of an earlier commit's worktree),
labelled MODE@before, interleaved with the rest: what a change costs, same harness:

    git worktree add /tmp/lw-before a7d4b84
    python benchmarks/overhead.py --before /tmp/lw-before/src

A PYTHONPATH set outside comes after SRC: point it at another worktree's src to measure
a commit rather than a working tree that is being edited.

--stacks measures database stacks other than asyncpg (BENCH_STACK in bench_app.py), each
bare against loopwatch on the same stack: asyncpg (a pool), sqlalchemy (SQLAlchemy's
asyncio engine on asyncpg, a session per request), psycopg (psycopg_pool's
AsyncConnectionPool), tortoise (Tortoise ORM's asyncpg engine). --statements N,M,...
serves /query with that many ``SELECT 1`` per request (/query?n=N; 1 is /query), so
that the cost per statement separates from the cost per request:

    python benchmarks/overhead.py --stacks asyncpg,sqlalchemy,psycopg,tortoise \
        --statements 1,10 --endpoints /query --requests 5000 --rounds 3

Configurations are then labelled STACK:MODE, each compared with its own stack's bare,
and a last table gives, per stack, the added CPU per request at each count and per
statement: (added at the most statements - added at the fewest) / (their difference),
from each round's interleaved runs, median and range over the rounds. A stack whose
libraries or loopwatch integration cannot be imported, or whose server does not start,
is skipped with a message. Stacks other than asyncpg take the modes bare, loopwatch,
lw-mw (LoopWatch over the stack alone) and lw-nofile.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from loopwatch.cli.demo import database

HERE = Path(__file__).resolve().parent
MODES = ["bare", "loopwatch"]
ENDPOINTS = ["/trivial", "/query"]
STACKS = ["asyncpg", "sqlalchemy", "psycopg", "tortoise"]
# The modes for stacks other than asyncpg.
STACK_MODES = ["bare", "loopwatch", "lw-mw", "lw-nofile", "lw-sampled"]
# What each stack's configurations import: the stack's libraries, loopwatch's integration.
STACK_IMPORTS = {
    "asyncpg": ["asyncpg", "loopwatch"],
    "sqlalchemy": ["sqlalchemy.ext.asyncio", "loopwatch.integrations.sqlalchemy"],
    "psycopg": ["psycopg_pool", "loopwatch.integrations.psycopg"],
    "tortoise": ["tortoise", "loopwatch.integrations.tortoise"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BEFORE = "@before"


def parse_label(label: str) -> tuple[str, str]:
    """(stack, mode) of a configuration's label: MODE or STACK:MODE, maybe @before."""
    stack, _, mode = label.removesuffix(BEFORE).rpartition(":")
    return stack or "asyncpg", mode


def stack_missing(stack: str) -> str | None:
    """Why ``stack`` cannot be measured here, or None."""
    import importlib

    if stack not in STACK_IMPORTS:
        return f"unknown stack (one of {', '.join(STACKS)})"
    for module in STACK_IMPORTS[stack]:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a module being written may fail in any way
            return f"cannot import {module}: {type(exc).__name__}: {exc}"
    return None


def query_path(statements: int) -> str:
    return "/query" if statements == 1 else f"/query?n={statements}"


def endpoints_of(endpoints: str, statements: str) -> tuple[list[int], list[str]]:
    """--statements as sorted counts, and --endpoints with /query one per count (also
    instructions.py's)."""
    counts = sorted({int(n) for n in statements.split(",")})
    paths = [
        x for e in endpoints.split(",") for x in ([e] if e != "/query" else map(query_path, counts))
    ]
    return counts, paths


def start_server(
    label: str, dsn: str, record_dir: str, cpu: int | None, before: str | None
) -> tuple[subprocess.Popen[bytes], int]:
    """Serve bench_app in configuration ``label``: a mode, STACK:MODE, or either with
    @before for that configuration with the loopwatch package from ``before``."""
    port = free_port()
    stack, mode = parse_label(label)
    path = [str(HERE)]
    if label.endswith(BEFORE) and before is not None:
        path.append(os.path.abspath(before))
    if os.environ.get("PYTHONPATH"):  # e.g. a worktree's src for the current side
        path.append(os.environ["PYTHONPATH"])
    env = {
        **os.environ,
        "BENCH_MODE": mode,
        "BENCH_STACK": stack,
        "BENCH_DSN": dsn,
        "LOOPWATCH_FILE": os.path.join(record_dir, f"{label.replace(':', '-')}.jsonl"),
        "PYTHONPATH": os.pathsep.join(path),
    }
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench_app:app",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = subprocess.Popen(cmd, env=env, cwd=HERE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {label} server exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/trivial", timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the {label} server did not start")


def server_cpu_s(proc: subprocess.Popen[bytes]) -> float:
    # After `taskset` execs uvicorn the pid is uvicorn's own.
    t = psutil.Process(proc.pid).cpu_times()
    return float(t.user + t.system)


def load(port: int, path: str, requests: int, connections: int, cpu: int | None) -> float:
    """Run the load generator in its own process; returns its requests per second."""
    cmd = [
        sys.executable,
        str(HERE / "loadgen.py"),
        str(port),
        path,
        str(requests),
        str(connections),
    ]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)["rps"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000, help="requests per run")
    parser.add_argument("--rounds", type=int, default=5, help="runs per configuration")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--dsn", default=os.environ.get("LOOPWATCH_DSN"))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS))
    parser.add_argument(
        "--stacks", default="asyncpg", help=f"database stacks, of {','.join(STACKS)}"
    )
    parser.add_argument(
        "--statements", default="1", help="statements per /query request, e.g. 1,10"
    )
    parser.add_argument(
        "--warmup", type=int, default=2000, help="requests per server and endpoint first"
    )
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument(
        "--before", metavar="SRC", help="also each configuration with loopwatch from SRC"
    )
    args = parser.parse_args()
    counts, endpoints = endpoints_of(args.endpoints, args.statements)
    prefixed = args.stacks != "asyncpg"  # labels STACK:MODE, not MODE
    stacks = []
    for stack in args.stacks.split(","):
        why = stack_missing(stack)
        if why is None:
            stacks.append(stack)
        else:
            print(f"skipping the {stack} stack: {why}", file=sys.stderr)
    modes = []
    for stack in stacks:
        for m in args.modes.split(","):
            if stack != "asyncpg" and m not in STACK_MODES:
                print(f"skipping {stack}:{m}: that mode is for asyncpg only", file=sys.stderr)
                continue
            label = f"{stack}:{m}" if prefixed else m
            modes += [label] if m == "bare" or not args.before else [label, label + BEFORE]
    if not modes:
        raise SystemExit("nothing to measure")
    ew = max(10, *map(len, endpoints))  # column widths
    cw = max(18, *map(len, modes))
    pin = os.cpu_count() is not None and (os.cpu_count() or 1) >= 2 and bool(_which("taskset"))
    server_cpu, client_cpu = (0, 1) if pin else (None, None)

    raw: dict[str, dict[str, list[tuple[float, float]]]] = {
        m: {e: [] for e in endpoints} for m in modes
    }
    with (
        tempfile.TemporaryDirectory(prefix="lwbench-") as rec,
        database(args.dsn, Path(rec)) as dsn,
    ):
        servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        try:
            for m in modes:
                stack = parse_label(m)[0]
                if stack not in stacks:
                    continue
                try:
                    servers[m] = start_server(m, dsn, rec, server_cpu, args.before)
                except RuntimeError as exc:
                    # Without its stack's first (bare) configuration, no other compares.
                    if m == next(x for x in modes if parse_label(x)[0] == stack):
                        print(f"skipping the {stack} stack: {exc}", file=sys.stderr)
                        stacks.remove(stack)
                    else:
                        print(f"skipping {m}: {exc}", file=sys.stderr)
            for m in [m for m in servers if parse_label(m)[0] not in stacks]:
                proc, _ = servers.pop(m)
                proc.terminate()
                proc.wait(10)
            modes = [m for m in modes if m in servers]
            raw = {m: raw[m] for m in modes}
            if not modes:
                raise SystemExit("nothing to measure")

            for _proc, port in servers.values():  # warm up: imports, pools, caches
                for e in endpoints:
                    load(port, e, args.warmup, args.connections, client_cpu)
            for r in range(args.rounds):
                for e in endpoints:
                    for m in modes:
                        proc, port = servers[m]
                        c0 = server_cpu_s(proc)
                        rps = load(port, e, args.requests, args.connections, client_cpu)
                        time.sleep(0.3)  # let the record writer finish this run's lines
                        us = (server_cpu_s(proc) - c0) / args.requests * 1e6
                        raw[m][e].append((us, rps))
                        print(
                            f"round {r + 1} {e:{ew}} {m:{cw}} {us:7.1f} us/req  {rps:8.0f} req/s",
                            file=sys.stderr,
                        )
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(10)

    def base_of(m: str) -> str:
        """The configuration ``m`` is compared with: its stack's first (bare)."""
        stack = parse_label(m)[0]
        return next(x for x in modes if parse_label(x)[0] == stack)

    def median_us(m: str, e: str) -> float:
        return statistics.median(us for us, _ in raw[m][e])

    def label(mode: str) -> str:
        return f"asyncpg:{mode}" if prefixed else mode

    print(
        f"\n{args.requests} requests per run, {args.rounds} interleaved runs per configuration, "
        f"{args.connections} connections; medians (min-max)\n"
    )
    print(
        f"{'endpoint':{ew}} {'config':{cw}} {'server CPU/req':>22} {'req/s':>20} "
        f"{'added CPU':>10} {'CPU ratio':>10}"
    )
    for e in endpoints:
        for m in modes:
            base = median_us(base_of(m), e)
            us = [u for u, _ in raw[m][e]]
            rps = [x for _, x in raw[m][e]]
            med = statistics.median(us)
            print(
                f"{e:{ew}} {m:{cw}} {med:8.1f} us ({min(us):5.1f}-{max(us):5.1f}) "
                f"{statistics.median(rps):8.0f} ({min(rps):4.0f}-{max(rps):4.0f}) "
                f"{med - base:+8.1f} us {med / base:9.3f}"
            )
    paired = [m for m in modes if m + BEFORE in modes]
    if paired:
        print(f"\nnow against before ({args.before}), per request:")
        for e in endpoints:
            for m in paired:
                now = statistics.median(us for us, _ in raw[m][e])
                then = statistics.median(us for us, _ in raw[m + BEFORE][e])
                print(f"{e:{ew}} {m:{cw}} {now - then:+7.1f} us ({now:.1f} against {then:.1f})")
    contrib = label("otel-contrib")
    span_modes = [
        label(m) for m in ("loopwatch-spans", "lw-spans-nofile", "sdk-floor") if label(m) in modes
    ]
    if contrib in modes and span_modes:
        print(f"\nadded CPU as a share of otel-contrib's (both over {base_of(contrib)}):")
        for e in endpoints:
            base = median_us(base_of(contrib), e)
            otel = median_us(contrib, e) - base
            for m in span_modes:
                lw = median_us(m, e) - base
                share = f"{lw / otel:.2f}" if otel > 0 else "n/a"
                print(f"{e:{ew}} {m:15} {lw:+7.1f} us / {otel:+7.1f} us = {share}")
    few, most = counts[0], counts[-1]
    if most > few and query_path(most) in endpoints:
        e1, en = query_path(few), query_path(most)
        print(
            f"\nper configuration, against its stack's first (bare): added server CPU "
            f"per request at {few} and {most} statements (medians), and per statement: "
            f"(added at {most} - added at {few}) / {most - few}, from each round's runs, "
            f"median (min-max) over the rounds"
        )
        print(
            f"{'config':{cw}} {'base CPU/req':>12} {'base per stmt':>13} "
            f"{f'added @{few}':>10} {f'added @{most}':>10} {'added per statement':>24}"
        )
        for m in modes:
            b = base_of(m)
            if m == b:
                continue
            per_round = [
                ((x[0] - bx[0]) - (y[0] - by[0])) / (most - few)
                for x, bx, y, by in zip(raw[m][en], raw[b][en], raw[m][e1], raw[b][e1], strict=True)
            ]
            base_stmt = (median_us(b, en) - median_us(b, e1)) / (most - few)
            added_1 = median_us(m, e1) - median_us(b, e1)
            added_n = median_us(m, en) - median_us(b, en)
            print(
                f"{m:{cw}} {median_us(b, e1):9.1f} us {base_stmt:10.1f} us "
                f"{added_1:+7.1f} us {added_n:+7.1f} us "
                f"{statistics.median(per_round):+8.1f} us ({min(per_round):+.1f} to "
                f"{max(per_round):+.1f})"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


if __name__ == "__main__":
    main()
