"""The ``loopwatch`` command: ``report`` reads record files, ``demo`` shows it working."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..renderers.text import fmt_bytes, fmt_ms, to_ascii, wrap
from ..renderers.timeline import render_timeline
from ..report import (
    Report,
    ReportError,
    ReportOptions,
    build_report,
    render_capacity,
    render_diagnosis,
    render_loop,
    render_routes,
    render_summary,
)
from ..report.sources import rotated_members

if TYPE_CHECKING:
    from . import demo as demo_module


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character
        if hasattr(stream, "reconfigure"):  # gets a replacement, not a traceback
            stream.reconfigure(errors="replace")
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            return _report(args)
        return _demo(args)
    except KeyboardInterrupt:
        print("loopwatch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `loopwatch report … | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def render(report: Report, width: int, *, ascii: bool = False, color: bool = False) -> str:
    """The whole text report: the diagnosis (when there is one) first, then the
    timeline, summary, routes, loop and capacity."""
    parts = [
        render_diagnosis(report, width, color=color),
        "\n".join(wrap(report.window_title, width, "", "  ")),
        render_timeline(report.window, width, ascii=ascii, color=color),
        render_summary(report, width, color=color),
        render_routes(report, width, color=color),
        render_loop(report, width, color=color),
        render_capacity(report, width, color=color),
    ]
    text = "\n\n".join(p.rstrip("\n") for p in parts if p) + "\n"
    return to_ascii(text) if ascii else text


def _report(args: argparse.Namespace) -> int:
    outputs = _outputs_asked(args)
    if _said_refused(outputs, args.files):  # before the reading: a wrong path is said at once
        return 2
    options = ReportOptions(
        last=args.last, slowest=args.slowest, route=args.route, since=args.since, until=args.until
    )
    if outputs:  # a file's timeline has room for more rows than a terminal
        options.rows = FILE_ROWS
    try:
        report = build_report(args.files, options)
    except ReportError as exc:
        print(f"loopwatch: {exc}", file=sys.stderr)
        return 1
    if outputs:
        if args.width is not None or args.ascii:
            print("loopwatch: note: --width and --ascii shape the text report, which "
                  "--html and --perfetto replace: ignored", file=sys.stderr)  # fmt: skip
        return _write_outputs(report, outputs, args.json)
    if args.json:
        text = json.dumps(report.to_json(), indent=2)
    else:
        text = render(report, _width(args), ascii=args.ascii, color=_color())
    # The notes come last, where they are seen, and on lines of their own even when both
    # streams go to one terminal or file: the report ends with a newline, written first.
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()
    for problem in report.problems:
        print(f"loopwatch: note: {problem}", file=sys.stderr)
    return 0


FILE_ROWS = 2000  # the default window of --html and --perfetto, in requests


def _write_outputs(report: Report, outputs: list[tuple[str, str]], also_json: bool) -> int:
    """``--html`` and ``--perfetto``: write each file, and print the JSON summary too if
    ``--json`` was given."""
    if _write_files(report, outputs):
        return 1
    if also_json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
        sys.stdout.flush()
    for problem in report.problems:
        print(f"loopwatch: note: {problem}", file=sys.stderr)
    return 0


def _outputs_asked(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The files asked for, as ``(path, kind)``: ``--html`` and ``--perfetto``."""
    asked = [(args.html, "html"), (args.perfetto, "perfetto")]
    return [(path, kind) for path, kind in asked if path is not None]


def _said_refused(outputs: list[tuple[str, str]], inputs: Sequence[str]) -> bool:
    """True, once the reason is said on stderr, when an output path is refused."""
    refused = _refused_outputs(outputs, inputs)
    if refused:
        print(f"loopwatch: {refused}", file=sys.stderr)
    return bool(refused)


def _refused_outputs(outputs: list[tuple[str, str]], inputs: Sequence[str]) -> str:
    """Why the ``--html``/``--perfetto`` paths cannot be written, or "": an empty path,
    ``-``, one that is not a regular file (a device, a directory, a pipe: a file is
    written beside the path and renamed onto it, which would replace it), one of the
    record files read, rotated siblings included (it would be replaced, and the app
    writing it would lose what follows), or the same path twice."""
    if not outputs:
        return ""
    read = [Path(p) for name in inputs for p in (name, *rotated_members(name))]
    seen: list[Path] = []
    for path, kind in outputs:
        if not path:
            return f"--{kind} needs a file name."
        if path == "-":  # standard output is the text report's (or --json's)
            return f"--{kind} writes a file, not standard output: name one."
        target = Path(os.path.realpath(path))  # a symbolic link: what it points to
        if target.exists() and not target.is_file():
            return f"--{kind} {path}: not a regular file; name a file to write."
        for other in [*read, *seen]:
            with contextlib.suppress(OSError):
                if target == Path(os.path.realpath(other)) or (
                    target.exists() and other.exists() and target.samefile(other)
                ):
                    what = "is also written" if other in seen else "is a file being read"
                    return f"--{kind} {path} {what}: name another file."
        seen.append(target)
    return ""


def file_renderer(kind: str) -> Callable[[Report], bytes]:
    """The renderer of ``--html`` (``"html"``) or ``--perfetto`` (``"perfetto"``),
    imported when first asked for."""
    if kind == "html":
        from ..renderers.html import html_report

        return html_report
    from ..renderers.perfetto import perfetto_trace

    return perfetto_trace


def _write_files(report: Report, outputs: list[tuple[str, str]]) -> int:
    """Write each ``(path, kind)`` (whole or not at all) and say where on stderr; 0, or
    1 when one could not be written (the error said on stderr)."""
    for path, kind in outputs:
        try:
            size = _write_atomically(Path(path), file_renderer(kind)(report))
        except OSError as exc:
            print(f"loopwatch: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"loopwatch: wrote {path} ({fmt_bytes(size)})", file=sys.stderr)
    return 0


def _write_atomically(path: Path, data: bytes) -> int:
    """Write ``data`` to ``path`` through a temporary file beside it, so a reader never
    sees half a file and a failure leaves no file; returns the bytes written."""
    import tempfile

    path = Path(os.path.realpath(path))  # a symbolic link stays one: write its target
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:  # a file replaced keeps its permissions (a report kept private stays so)
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o644 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    dsn = args.dsn or os.environ.get("LOOPWATCH_DSN")
    blocking = demo.BLOCKING_REQUESTS if args.blocking else 0
    reports: list[Report] = []
    files = _outputs_asked(args)
    if _said_refused(files, []):  # before the demo runs, not after
        return 2
    wide: list[Report] = []

    def sync_workers_for(record_file: Path) -> int:
        reports.append(build_report([str(record_file)], ReportOptions()))
        return reports[0].capacity.same_latency or 1

    try:
        with demo.temporary_workdir() as workdir:
            ran = demo.run(
                dsn,
                args.requests,
                Path(workdir),
                ascii=args.ascii,
                blocking=blocking,
                sync_workers_for=sync_workers_for if args.compare_sync else None,
            )
            if not reports:
                reports.append(build_report([str(ran.record_file)], ReportOptions()))
            if files:  # the same run, with the files' window (the terminal's has 40 rows)
                wide.append(build_report([str(ran.record_file)], ReportOptions(rows=FILE_ROWS)))
    except (demo.DemoError, ReportError) as exc:
        print(f"loopwatch: {exc}", file=sys.stderr)
        return 1
    report, seconds = reports[0], ran.seconds
    if wide and _write_files(wide[0], files):
        return 1
    query_ms = demo_query_ms()
    sent = f"{args.requests} concurrent requests, each a little CPU and a {query_ms} ms query"
    if blocking:
        from .demo_app import BLOCK_SECONDS

        ms = round(BLOCK_SECONDS * 1000)
        hashes = (blocking + 1) // 2
        sleeps = blocking // 2
        sent += (
            f", and {blocking} that block the event loop for {ms} ms each among them "
            f"({hashes} hashing a password on it, {sleeps} calling time.sleep in an "
            f"async endpoint)"
        )
    print(f"{sent}, served by one process in {seconds * 1000:.0f} ms.\n")
    sys.stdout.write(render(report, _width(args), ascii=args.ascii, color=_color()))
    if ran.sync is not None and ran.sync_workers is not None:
        sys.stdout.write(
            "\n" + compared(ran.measured, ran.sync, ran.sync_workers, args.requests, _width(args))
        )
    return 0


def compared(
    asynchronous: demo_module.Measured,
    sync: demo_module.Measured,
    workers: int,
    requests: int,
    width: int,
) -> str:
    """``--compare-sync``: the two runs side by side, as measured."""
    from .demo_app import POOL_SIZE

    rows = [
        ("", "processes", "req/s", "p95", "memory (PSS)"),
        (
            f"ASYNC  uvicorn, LoopWatch, a pool of {POOL_SIZE}",
            f"{asynchronous.processes}",
            f"{asynchronous.rate:,.0f}",
            fmt_ms(asynchronous.p95_s * 1000),
            "?" if asynchronous.memory is None else fmt_bytes(asynchronous.memory),
        ),
        (
            f"SYNC   gunicorn -w {workers}, a connection each",
            f"{sync.processes}",
            f"{sync.rate:,.0f}",
            fmt_ms(sync.p95_s * 1000),
            "?" if sync.memory is None else fmt_bytes(sync.memory),
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = wrap(
        f"Measured on this machine: the same {requests} requests, then {workers} sync "
        "workers (loopwatch's same-p95 estimate) running the same work (Flask, psycopg). "
        "Measured at the client, from each request sent to its answer: slower than the "
        "report's figures above, which start when the server hands a request to the app.",
        width,
        "",
        "  ",
    )
    for r in rows:
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  " + "   ".join(cells).rstrip())
    lines += wrap(
        "(gunicorn's processes are its master and workers; PSS counts each shared page once.)",
        width,
        "  ",
        "   ",
    )
    return "\n".join(lines) + "\n"


def demo_query_ms() -> int:
    from .demo_app import QUERY_SECONDS

    return round(QUERY_SECONDS * 1000)


def _width(args: argparse.Namespace) -> int:
    if args.width is not None:
        return int(args.width)
    return shutil.get_terminal_size((100, 24)).columns


def _color() -> bool:
    # https://no-color.org: any non-empty NO_COLOR turns colour off.
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _positive(text: str) -> int:
    n = _whole(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return n


def _width_arg(text: str) -> int:
    n = _whole(text)
    if n < 20:
        raise argparse.ArgumentTypeError(f"a width of {n} is too narrow (at least 20)")
    return n


def _time(text: str) -> float:
    """Unix seconds, or an ISO 8601 date and time (UTC unless it names a zone)."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise argparse.ArgumentTypeError(f"{text!r} is not a time")
        return seconds
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither Unix seconds nor an ISO 8601 time such as 2026-11-24T20:41:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopwatch",
        description="What async buys a database-bound ASGI app, measured from its own traffic.",
    )
    parser.add_argument("--version", action="version", version=f"loopwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    report = sub.add_parser(
        "report",
        help="timelines, summary and capacity from record files",
        description="Read record files (one or several, from several processes or hosts) "
        "and print the timeline of a window, a summary, a per-route table and the "
        "sync-versus-async capacity comparison.",
    )
    report.add_argument("files", nargs="+", metavar="FILE", help="record files (JSON lines)")
    window = report.add_mutually_exclusive_group()
    window.add_argument("--last", type=_positive, metavar="N", help="the last N requests")
    window.add_argument("--slowest", type=_positive, metavar="N", help="the N slowest")
    report.add_argument(
        "--route",
        metavar="TEMPLATE",
        help="only this route, '/items/{item_id}', or one method of it, 'GET /items/{item_id}'",
    )
    report.add_argument("--since", type=_time, metavar="TIME", help="only requests from TIME on")
    report.add_argument("--until", type=_time, metavar="TIME", help="only requests before TIME")
    _output_options(report)
    report.add_argument("--json", action="store_true", help="the summary as JSON")
    _file_outputs(report, "instead of printing the report")

    demo = sub.add_parser(
        "demo",
        help="serve 100 concurrent database-bound requests and report them",
        description="Start an embedded PostgreSQL (unless --dsn or LOOPWATCH_DSN names "
        "one), serve a small app with LoopWatch and a pool of 15 under uvicorn, send "
        "concurrent requests, and print the report of that run.",
    )
    demo.add_argument("--dsn", help="PostgreSQL to use instead of an embedded one")
    demo.add_argument("--requests", type=_positive, default=100, metavar="N")
    demo.add_argument(
        "--compare-sync",
        action="store_true",
        help="then send the same requests to the same work served by as many sync workers "
        "(gunicorn, Flask, psycopg) as loopwatch estimated, and show both as measured "
        "(pip install 'loopwatch[sync]')",
    )
    demo.add_argument(
        "--blocking",
        action="store_true",
        help="also send a few requests that block the event loop (CPU on the loop, "
        "time.sleep in an async endpoint): what a blocked loop looks like",
    )
    _file_outputs(demo, "as well")
    _output_options(demo)
    return parser


def _file_outputs(parser: argparse.ArgumentParser, how: str) -> None:
    parser.add_argument(
        "--html",
        metavar="OUT",
        help=f"write a self-contained HTML report (charts, timeline) to OUT, {how}",
    )
    parser.add_argument(
        "--perfetto",
        metavar="OUT",
        help=f"write a Chrome/Perfetto trace (JSON) to OUT, for ui.perfetto.dev, {how}",
    )


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--width",
        type=_width_arg,
        metavar="W",
        help="the text report's columns (default: terminal)",
    )
    parser.add_argument(
        "--ascii", action="store_true", help="draw the text report with # . %% instead of blocks"
    )


def run() -> None:
    """Console-script entry point."""
    interrupted = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as ever

    # A KeyboardInterrupt that lands in a finalizer (an asyncio transport's __del__) is
    # ignored by Python: the flag still knows the user asked to stop.
    signal.signal(signal.SIGINT, on_sigint)
    code = 130
    try:
        code = main()
    except KeyboardInterrupt:  # one that came between main's own handlers (e.g. cleanup)
        print("loopwatch: interrupted", file=sys.stderr)
    finally:
        if code == 130 or interrupted:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    if interrupted and code != 130:  # swallowed where it was raised: main went on
        print("loopwatch: interrupted", file=sys.stderr)
        code = 130
    if code == 130:
        # Interrupted, and main has cleaned up (the demo's server, database and files):
        # leave now, not through an interpreter shutdown that an interrupt swallowed by a
        # finalizer could end by the signal (status -2).
        with contextlib.suppress(OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(130)
    sys.exit(code)
