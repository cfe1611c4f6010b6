"""Instructions per request under valgrind's callgrind: deterministic where CPU time is not.

    python benchmarks/instructions.py [--requests 1000] [--before SRC] [--dsn DSN]

Calls benchmarks/bench_app.py in-process (ASGI calls with its lifespan, no HTTP server),
``--concurrency`` requests in flight at a time as in overhead.py, under
``valgrind --tool=callgrind --separate-threads=yes``, twice per configuration and
endpoint: with WARMUP requests and with WARMUP + ``--requests``. The difference divided
by ``--requests`` is the instruction count per request, start-up and imports cancelled.
Reported for the loop thread (every request's work) and for the whole process (the
record writer, sampler and watchdog threads too: their idle wake-ups follow the wall
clock, which callgrind slows about fifty-fold, so that column overstates them).

loopwatch's time thresholds (idle gap, long step, loop-wait floor, CPU merge gap, stall
threshold) are multiplied by ``--scale`` (default 100) inside the measured process, so
that under callgrind's slowdown the same branches run as in a real server: no step is
"long", no stall happens. ``--before SRC`` adds, for each configuration other than bare,
the same with the loopwatch package from SRC (an earlier commit's worktree). A
PYTHONPATH set outside comes after SRC: point it at another worktree's src to measure a
commit rather than a working tree that is being edited.

``--stacks`` and ``--statements`` are overhead.py's (BENCH_STACK, /query?n=N); with more
than one count, the instructions each configuration adds per statement over its stack's
first (bare) are printed last:

    python benchmarks/instructions.py --stacks asyncpg,sqlalchemy --statements 1,10 \
        --endpoints /query --requests 300
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WARMUP = 200
BEFORE = "@before"


def _scale_thresholds(scale: int) -> None:
    """Multiply loopwatch's time thresholds (the ``*_NS`` constants of the capture
    modules this version has) by ``scale``."""
    import importlib

    for module_name in ("loop", "trace", "steps"):
        try:
            module = importlib.import_module(f"loopwatch._capture.{module_name}")
        except ImportError:
            continue
        for name, value in list(vars(module).items()):
            if name.isupper() and name.endswith("_NS") and type(value) is int:
                setattr(module, name, value * scale)
    # The compiled step timer holds its own copy of the thresholds.
    steps = sys.modules.get("loopwatch._capture.steps")
    if steps is not None and hasattr(steps, "configure"):
        steps.configure()


async def _drive(app: Any, target: str, count: int, concurrency: int) -> None:
    path, _, query = target.partition("?")
    startup: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    events: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    await events.put({"type": "lifespan.startup"})

    async def lifespan_send(message: Any) -> None:
        await startup.put(message)

    lifespan_scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    lifespan = asyncio.create_task(app(lifespan_scope, events.get, lifespan_send))
    got = asyncio.ensure_future(startup.get())
    # An app that fails to start (a mode the --before tree lacks) ends its lifespan task
    # without a word: fail, rather than wait for the word forever.
    await asyncio.wait({got, lifespan}, return_when=asyncio.FIRST_COMPLETED)
    if not got.done():
        got.cancel()
        lifespan.result()  # raises what the app raised
        raise RuntimeError("the app's lifespan ended before it started")
    started = got.result()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the app did not start: {started}")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise RuntimeError(f"{path} answered {message['status']}")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"127.0.0.1")],
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
    }
    todo = list(range(count))

    async def worker() -> None:
        while todo:
            todo.pop()
            await app(dict(scope), receive, send)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await events.put({"type": "lifespan.shutdown"})
    await lifespan


def run_inside(path: str, count: int, concurrency: int, scale: int) -> None:
    """The measured process: bench_app (configured by BENCH_MODE) driven in-process."""
    sys.path.insert(0, str(HERE))
    _scale_thresholds(scale)
    import bench_app

    asyncio.run(_drive(bench_app.app, path, count, concurrency))


def _instructions(out_prefix: str) -> tuple[int, int]:
    """(loop thread, all threads) from callgrind's per-thread files."""
    per_thread = []
    for name in sorted(glob.glob(out_prefix + "*")):
        text = Path(name).read_text(errors="replace")
        found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
        per_thread.append((name, int(found.group(1)) if found else 0))
    main = next(n for name, n in per_thread if name.endswith("-01"))
    return main, sum(n for _, n in per_thread)


def measure(
    label: str, path: str, count: int, args: argparse.Namespace, dsn: str, rec: str
) -> tuple[int, int]:
    stack, _, mode = label.removesuffix(BEFORE).rpartition(":")
    pythonpath = [str(HERE)]
    if label.endswith(BEFORE):
        pythonpath.append(os.path.abspath(args.before))
    if os.environ.get("PYTHONPATH"):  # e.g. a worktree's src for the current side
        pythonpath.append(os.environ["PYTHONPATH"])
    env = {
        **os.environ,
        "BENCH_MODE": mode,
        "BENCH_STACK": stack or "asyncpg",
        "BENCH_DSN": dsn,
        "LOOPWATCH_FILE": os.path.join(rec, f"{label.replace(':', '-')}.jsonl"),
        "LOOPWATCH_STALL_MS": str(100 * args.scale),
        "PYTHONPATH": os.pathsep.join(pythonpath),
        "PYTHONHASHSEED": "0",
    }
    name = re.sub(r"[^A-Za-z0-9]+", "_", f"{label}.{path.strip('/')}")
    prefix = os.path.join(rec, f"cg.{name}.{count}")
    cmd = ["valgrind", "--tool=callgrind", "--separate-threads=yes",
           f"--callgrind-out-file={prefix}.%p", sys.executable, __file__,
           "--inside", path, str(count), str(args.concurrency), str(args.scale)]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return _instructions(prefix)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--scale", type=int, default=100)
    parser.add_argument("--dsn", default=os.environ.get("LOOPWATCH_DSN"))
    parser.add_argument("--modes", default="bare,loopwatch")
    parser.add_argument("--endpoints", default="/trivial,/query")
    parser.add_argument("--stacks", default="asyncpg", help="as in overhead.py")
    parser.add_argument("--statements", default="1", help="as in overhead.py, e.g. 1,10")
    parser.add_argument("--before", metavar="SRC", help="also each configuration from SRC")
    parser.add_argument("--inside", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        path, count, concurrency, scale = args.inside
        run_inside(path, int(count), int(concurrency), int(scale))
        return

    from loopwatch.cli.demo import database
    from overhead import endpoints_of, query_path

    counts, endpoints = endpoints_of(args.endpoints, args.statements)
    prefixed = args.stacks != "asyncpg"  # labels STACK:MODE, not MODE
    modes = []
    for stack in args.stacks.split(","):
        for m in args.modes.split(","):
            label = f"{stack}:{m}" if prefixed else m
            modes += [label] if m == "bare" or not args.before else [label, label + BEFORE]
    width = max(10, *map(len, endpoints))
    print(
        f"instructions per request (callgrind, {args.requests} requests after {WARMUP}, "
        f"{args.concurrency} in flight)\n"
    )
    print(f"{'endpoint':{width}} {'config':22} {'loop thread':>12} {'all threads':>12}")
    found: dict[tuple[str, str], tuple[float, float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="lwcg-") as rec,
        database(args.dsn, Path(rec)) as dsn,
    ):
        for path in endpoints:
            for label in modes:
                lo = measure(label, path, WARMUP, args, dsn, rec)
                hi = measure(label, path, WARMUP + args.requests, args, dsn, rec)
                main_k = (hi[0] - lo[0]) / args.requests / 1000
                all_k = (hi[1] - lo[1]) / args.requests / 1000
                found[label, path] = main_k, all_k
                print(f"{path:{width}} {label:22} {main_k:10.1f}k {all_k:11.1f}k", flush=True)

    def stack_of(label: str) -> str:
        return label.removesuffix(BEFORE).rpartition(":")[0]

    bases = {stack_of(label): label for label in reversed(modes)}  # each stack's first
    few, most = counts[0], counts[-1]
    if most > few and query_path(most) in endpoints and len(bases) < len(modes):
        e1, en = query_path(few), query_path(most)
        print(
            f"\nadded per statement over the stack's first (bare): (added at {most} - added "
            f"at {few}) / {most - few}"
        )
        print(f"{'config':22} {'loop thread':>12} {'all threads':>12}")
        for label in modes:
            base = bases[stack_of(label)]
            if label == base:
                continue
            at_n = [found[label, en][i] - found[base, en][i] for i in (0, 1)]
            at_1 = [found[label, e1][i] - found[base, e1][i] for i in (0, 1)]
            per = [(at_n[i] - at_1[i]) / (most - few) for i in (0, 1)]
            print(f"{label:22} {per[0]:+10.1f}k {per[1]:+11.1f}k")


if __name__ == "__main__":
    main()
