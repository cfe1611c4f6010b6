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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BEFORE = "@before"


def start_server(
    label: str, dsn: str, record_dir: str, cpu: int | None, before: str | None
) -> tuple[subprocess.Popen[bytes], int]:
    """Serve bench_app in configuration ``label``: a mode, or MODE@before for that mode
    with the loopwatch package from ``before``."""
    port = free_port()
    mode = label.removesuffix(BEFORE)
    path = [str(HERE)]
    if label.endswith(BEFORE) and before is not None:
        path.append(os.path.abspath(before))
    if os.environ.get("PYTHONPATH"):  # e.g. a worktree's src for the current side
        path.append(os.environ["PYTHONPATH"])
    env = {
        **os.environ,
        "BENCH_MODE": mode,
        "BENCH_DSN": dsn,
        "LOOPWATCH_FILE": os.path.join(record_dir, f"{label}.jsonl"),
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
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument(
        "--before", metavar="SRC", help="also each configuration with loopwatch from SRC"
    )
    args = parser.parse_args()
    modes = args.modes.split(",")
    if args.before:
        modes = [x for m in modes for x in ([m] if m == "bare" else [m, m + BEFORE])]
    endpoints = args.endpoints.split(",")
    pin = os.cpu_count() is not None and (os.cpu_count() or 1) >= 2 and bool(_which("taskset"))
    server_cpu, client_cpu = (0, 1) if pin else (None, None)

    raw: dict[str, dict[str, list[tuple[float, float]]]] = {
        m: {e: [] for e in endpoints} for m in modes
    }
    with (
        tempfile.TemporaryDirectory(prefix="lwbench-") as rec,
        database(args.dsn, Path(rec)) as dsn,
    ):
        servers = {m: start_server(m, dsn, rec, server_cpu, args.before) for m in modes}
        try:
            for _proc, port in servers.values():  # warm up: imports, pools, caches
                for e in endpoints:
                    load(port, e, 2000, args.connections, client_cpu)
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
                            f"round {r + 1} {e:9} {m:18} {us:7.1f} us/req  {rps:8.0f} req/s",
                            file=sys.stderr,
                        )
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(10)

    print(
        f"\n{args.requests} requests per run, {args.rounds} interleaved runs per configuration, "
        f"{args.connections} connections; medians (min-max)\n"
    )
    print(
        f"{'endpoint':10} {'config':18} {'server CPU/req':>22} {'req/s':>20} "
        f"{'added CPU':>10} {'CPU ratio':>10}"
    )
    for e in endpoints:
        base = statistics.median(us for us, _ in raw[modes[0]][e])
        for m in modes:
            us = [u for u, _ in raw[m][e]]
            rps = [x for _, x in raw[m][e]]
            med = statistics.median(us)
            print(
                f"{e:10} {m:18} {med:8.1f} us ({min(us):5.1f}-{max(us):5.1f}) "
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
                print(f"{e:10} {m:18} {now - then:+7.1f} us ({now:.1f} against {then:.1f})")
    span_modes = [m for m in ("loopwatch-spans", "lw-spans-nofile", "sdk-floor") if m in modes]
    if "otel-contrib" in modes and span_modes:
        print(f"\nadded CPU as a share of otel-contrib's (both over {modes[0]}):")
        for e in endpoints:
            base = statistics.median(us for us, _ in raw[modes[0]][e])
            otel = statistics.median(us for us, _ in raw["otel-contrib"][e]) - base
            for m in span_modes:
                lw = statistics.median(us for us, _ in raw[m][e]) - base
                share = f"{lw / otel:.2f}" if otel > 0 else "n/a"
                print(f"{e:10} {m:15} {lw:+7.1f} us / {otel:+7.1f} us = {share}")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


if __name__ == "__main__":
    main()
