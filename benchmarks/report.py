"""How long ``loopwatch report`` takes on a big record file, and how much memory.

    python benchmarks/report.py [--requests 1000000] [--keep FILE]

Writes a synthetic but realistic record file (four worker processes, eight routes, a
little CPU, pool waits and one to three queries a request, bursts of four times the load, process
samples every 0.5 s) with the real record classes, then times, in a fresh process,
build_report, the text `loopwatch report` prints, its ``--json`` and each renderer, and
reports the peak RSS of that process and of its helper process (which shares pages with
it: the two peaks overstate what they hold together); then, in another fresh process
each, what ``--perfetto`` and ``--html`` do (build_report with their larger window, the
trace or the page).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

from loopwatch.record import Meta, ProcessSample, RequestRecord

# route, share of traffic, CPU ms per step, queries, DB ms per query
ROUTES = [
    ("/items/{item_id}", 0.40, 0.25, 1, 2.0),
    ("/items", 0.20, 0.8, 2, 6.0),
    ("/users/{user_id}/orders", 0.12, 0.5, 3, 4.0),
    ("/search", 0.08, 2.5, 1, 25.0),
    ("/health", 0.10, 0.05, 0, 0.0),
    ("/orders", 0.05, 1.2, 3, 8.0),
    ("/reports/{report_id}", 0.03, 6.0, 2, 60.0),
    (None, 0.02, 0.1, 0, 0.0),
]
PIDS = [41001, 41002, 41003, 41004]


def generate(path: str, n: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    weights = [r[1] for r in ROUTES]
    t = 1_795_000_000.0
    next_sample = {pid: t for pid in PIDS}
    in_flight_guess = 0
    with open(path, "w", encoding="utf-8") as f:
        for pid in PIDS:
            f.write(Meta(pid=pid, started=t, loopwatch="0.1.0", python="3.11.7").to_json() + "\n")
        for i in range(n):
            # ~1,500 requests/s, with bursts four times denser
            burst = (i // 5000) % 7 == 0
            t += rng.expovariate(6_000 if burst else 1_500)
            route, _, cpu_step, queries, db_ms = rng.choices(ROUTES, weights)[0]
            pid = PIDS[i % len(PIDS)]
            segs: list[tuple[str, float, float]] = []
            at = 0.0
            pool_total = db_total = cpu_total = 0.0
            for q in range(queries + 1):
                cpu = cpu_step * rng.lognormvariate(0, 0.4)
                segs.append(("cpu", at, at + cpu))
                at += cpu
                cpu_total += cpu
                if q == queries:
                    break
                if q == 0 and rng.random() < (0.5 if burst else 0.05):
                    wait = rng.expovariate(1 / 3.0)
                    segs.append(("pool", at, at + wait))
                    at += wait
                    pool_total += wait
                d = db_ms * rng.lognormvariate(0, 0.5)
                segs.append(("db", at, at + d))
                at += d
                db_total += d
            wall = at + rng.expovariate(1 / 0.2)
            status = 500 if rng.random() < 0.002 else (404 if rng.random() < 0.01 else 200)
            rss = 52_000_000 + (i % 4096) * 1000
            rec = RequestRecord(
                id=f"{pid:x}-{i}",
                pid=pid,
                start=round(t, 6),
                method="GET",
                path=f"/items/{rng.randrange(100000)}" if route == "/items/{item_id}" else "/x",
                route=route,
                status=status,
                wall_ms=round(wall, 3),
                cpu_ms=round(cpu_total, 3),
                db_ms=round(db_total, 3),
                pool_wait_ms=round(pool_total, 3),
                db_queries=queries,
                rss_bytes=rss,
                segments=tuple((k, round(a, 3), round(b, 3)) for k, a, b in segs),
                error="RuntimeError" if status == 500 else None,
            )
            f.write(rec.to_json() + "\n")
            if t >= next_sample[pid]:
                next_sample[pid] = t + 0.5
                sample = ProcessSample(
                    time=t,
                    pid=pid,
                    rss_bytes=rss,
                    uss_bytes=rss - 14_000_000,
                    in_flight=in_flight_guess,
                    loop_busy=round(rng.uniform(0.05, 0.4), 3),
                    requests=i // len(PIDS),
                )
                f.write(sample.to_json() + "\n")


def measure(path: str) -> dict[str, float]:
    import json as _json

    from loopwatch.cli.main import render
    from loopwatch.report import (
        ReportOptions,
        build_report,
        render_capacity,
        render_diagnosis,
        render_loop,
        render_routes,
        render_summary,
    )

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    report = build_report([path], ReportOptions())
    t1 = time.perf_counter()
    text = render(report, 100)  # what `loopwatch report` prints
    t2 = time.perf_counter()
    _json.dumps(report.to_json(), indent=2)  # ... and `--json`
    t3 = time.perf_counter()
    for renderer in (render_summary, render_routes, render_loop, render_capacity):
        renderer(report, 100)
    render_diagnosis(report, 100)
    t4 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The helper process's (reaped by build_report): its peak counts the pages it
    # shares with this process as well.
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "requests": report.summary.requests,
        "build_s": t1 - t0,
        "text_s": t2 - t1,
        "json_s": t3 - t2,
        "renderers_s": t4 - t3,
        "peak_rss_mb": peak,
        "children_peak_rss_mb": children,
        "baseline_rss_mb": base,
        "output": text,  # type: ignore[dict-item]
    }


def measure_file(kind: str, path: str) -> dict[str, float]:
    """What ``loopwatch report FILE --html OUT`` (``kind`` "html") or ``--perfetto OUT``
    ("perfetto") does: build_report with the files' window (FILE_ROWS requests), then the
    file's bytes, written out."""
    from loopwatch.cli.main import FILE_ROWS, file_renderer
    from loopwatch.report import ReportOptions, build_report

    t0 = time.perf_counter()
    report = build_report([path], ReportOptions(rows=FILE_ROWS))
    t1 = time.perf_counter()
    data = file_renderer(kind)(report)
    t2 = time.perf_counter()
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
    return {
        "build_s": t1 - t0,
        "render_s": t2 - t1,
        "bytes": len(data),
        "window": len(report.window),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _in_a_fresh_process(args: list[str]) -> dict[str, Any]:
    """What this script prints with ``args`` (a hidden ``--measure*`` option), measured
    in a new interpreter."""
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--keep", metavar="FILE", help="write the record file here and keep it")
    parser.add_argument("--measure", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--measure-file", nargs=2, metavar=("KIND", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    if args.measure_file:
        print(json.dumps(measure_file(*args.measure_file)))
        return
    path = args.keep or tempfile.mktemp(prefix="loopwatch-bench-", suffix=".jsonl")
    try:
        t0 = time.perf_counter()
        generate(path, args.requests)
        size = os.path.getsize(path)
        print(
            f"generated {args.requests:,} requests, {size / 1e6:.0f} MB, "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        # A fresh process, so the peak RSS is the report's alone.
        result = _in_a_fresh_process(["--measure", path])
        print(result.pop("output"))
        print(
            f"build_report: {result['build_s']:.2f} s   text: {result['text_s']:.3f} s   "
            f"--json: {result['json_s']:.3f} s   each renderer: {result['renderers_s']:.3f} s\n"
            f"total (text): {result['build_s'] + result['text_s']:.2f} s   "
            f"total (--json): {result['build_s'] + result['json_s']:.2f} s\n"
            f"peak RSS: {result['peak_rss_mb']:.0f} MB "
            f"(interpreter and imports: {result['baseline_rss_mb']:.0f} MB); "
            f"helper process: {result['children_peak_rss_mb']:.0f} MB"
        )
        for kind, what in (("perfetto", "trace"), ("html", "page")):
            m = _in_a_fresh_process(["--measure-file", kind, path])
            print(
                f"--{kind}: build_report {m['build_s']:.2f} s + {what} {m['render_s']:.3f} s "
                f"= {m['build_s'] + m['render_s']:.2f} s; {m['window']:,} requests, "
                f"{m['bytes'] / 1e6:.2f} MB; peak RSS {m['peak_rss_mb']:.0f} MB "
                f"(helper process: {m['children_peak_rss_mb']:.0f} MB)"
            )
    finally:
        if not args.keep and os.path.exists(path):
            os.unlink(path)


if __name__ == "__main__":
    main()
