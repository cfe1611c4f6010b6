"""The LoopWatch ASGI middleware: one trace per HTTP request, handed to sinks at its end."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from random import random
from time import perf_counter_ns
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from . import _failures
from ._capture import routes as _routes
from ._capture.loop import Held
from ._capture.process import state
from ._capture.steps import StepTimer, TaskFactory, install_task_factory
from ._capture.trace import Trace, current
from ._capture.watchdog import DEFAULT_STALL_S, learn_base
from .export import server_timing as _server_timing
from .export.sql import QUERY_TEXT_MODES, QueryText
from .export.writer import SHUTDOWN_WAIT_S, FileWriter, writer_for
from .record import MIN_SAMPLE_RATE, BlockedBy, RequestRecord, error_type

if TYPE_CHECKING:
    from .export.otel import Spans
    from .export.otel_metrics import Metrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]
RequestSink = Callable[[RequestRecord], None]

_DEFAULT_FILE = "loopwatch.jsonl"
_FROM_ENV: Any = object()


class LoopWatch:
    """Record, for every HTTP request, its CPU on the event loop, awaited DB time,
    pool wait and the process's memory.

    ``file`` is the record file's path (default ``$LOOPWATCH_FILE`` or
    ``./loopwatch.jsonl``; ``None`` turns file recording off). With ``max_bytes`` (default
    ``$LOOPWATCH_MAX_BYTES``, else unbounded) the file is rotated before it would grow past
    that size, keeping ``backup_count`` (default ``$LOOPWATCH_BACKUP_COUNT``, else 5)
    rotated files: ``PATH.1`` the newest. What is queued is written when the server shuts
    down (the ASGI lifespan's ``shutdown.complete``, waiting at most 2 s) and at exit.
    ``sinks`` are extra callables that receive each finished
    :class:`~loopwatch.record.RequestRecord` on the event loop's thread; they must be
    quick and must not block.

    OpenTelemetry: with an SDK tracer provider configured (``tracer_provider``, default
    the global one), each request gets a server span (or loopwatch's attributes on the
    server span OpenTelemetry's ASGI middleware made) and each query a client span
    (``query_spans=False`` keeps only the request's). ``spans=False`` turns spans off.
    A query span's ``db.query.text`` has every literal value replaced by ``?``
    (``query_text="sanitized"``); ``query_text="raw"`` puts the text as sent, values and
    all, into the spans (unsafe: passwords and personal data in the SQL reach the
    collector), ``query_text="off"`` leaves it out.
    With an SDK meter provider (``meter_provider``, default the global one) it records
    request, pool, memory and event-loop metrics; ``metrics=False`` turns them off.

    The event loop: each request's loop wait (time it could have continued while the
    loop ran something else) is taken out of its DB, pool and other waiting. A step
    that holds the loop longer than ``stall_threshold`` seconds (default
    ``$LOOPWATCH_STALL_MS`` ms, else 0.1 s, asyncio's ``slow_callback_duration``) is
    written as a ``stall`` line with the stack it blocked in. One process has one
    watchdog: the first middleware to start sets its threshold.

    Sampling: with ``sample_rate`` below 1 (default ``$LOOPWATCH_SAMPLE_RATE``, else 1:
    every request), each request is recorded in full with that probability, drawn at
    random; the others cost a few microseconds (about 1 µs in-process, 3 to 4 µs of a
    server's CPU) and are only counted (in the process samples' ``requests`` and
    ``in_flight``). A sampled request's line carries ``sample_rate``; the report
    estimates the requests the sample stands for and says which figures are of the
    sample. An
    unsampled request gets no span and no request metrics; its steps are not timed, so a
    sampled request it holds up sees its loop wait held by unnamed work.

    Server-Timing: with ``server_timing=True`` (default ``$LOOPWATCH_SERVER_TIMING``,
    ``1`` or ``0``, else off) each recorded response gets a ``Server-Timing`` header
    (W3C Server Timing) that browsers' developer tools show beside the request::

        Server-Timing: cpu;dur=12.345;desc="CPU on the loop", db;dur=20.512;desc="awaited DB",
                       pool;dur=0.004;desc="pool wait", loop;dur=0.000;desc="loop wait"

    (one line, wrapped here). Durations are milliseconds, measured as the record measures
    them, up to the moment the app sends ``http.response.start``: the request's CPU on
    the loop (including the step running then), its DB time and pool wait (queries and
    acquires finished by then, overlaps counted once, loop wait taken out) and its loop
    wait. A streaming response's later work is in its record, not in the header. A
    ``Server-Timing`` header the app set stays as it is; loopwatch's is a header line of
    its own after it. Unsampled requests, requests an outer LoopWatch records, and
    non-HTTP scopes get none; off, it costs one attribute check per response. Every
    client sees the header: turn it on where these figures may be shown.

    Raises ValueError for a non-positive ``sample_interval``, ``stall_threshold``,
    ``max_bytes`` or ``backup_count``, a ``sample_rate`` that is not a number from 1e-06
    to 1, a ``server_timing`` that is not a bool, or a
    ``query_text`` other than those above. A bad ``LOOPWATCH_SAMPLE_RATE``,
    ``LOOPWATCH_STALL_MS``, ``LOOPWATCH_MAX_BYTES``, ``LOOPWATCH_BACKUP_COUNT`` or
    ``LOOPWATCH_SERVER_TIMING`` is not an error: it is logged once (the ``loopwatch``
    logger) and the default is used, so a typo in a deployment's environment cannot take
    the app down.
    """

    def __init__(
        self,
        app: ASGIApp,
        file: str | os.PathLike[str] | None = _FROM_ENV,
        *,
        sinks: Iterable[RequestSink] = (),
        queue_size: int = 10_000,
        sample_interval: float = 0.5,
        spans: bool = True,
        query_spans: bool = True,
        query_text: QueryText = "sanitized",
        tracer_provider: Any = None,
        metrics: bool = True,
        meter_provider: Any = None,
        stall_threshold: float | None = None,
        max_bytes: int | None = _FROM_ENV,
        backup_count: int | None = None,
        sample_rate: float | None = None,
        server_timing: bool | None = None,
    ) -> None:
        if file is _FROM_ENV:
            file = os.environ.get("LOOPWATCH_FILE") or _DEFAULT_FILE
        if sample_interval <= 0:
            raise ValueError(f"sample_interval must be positive, not {sample_interval!r}.")
        if sample_rate is None:
            sample_rate = _env_number(
                "LOOPWATCH_SAMPLE_RATE", 1.0, "a number from 1e-06 to 1",
                float, lambda r: MIN_SAMPLE_RATE <= r <= 1,
            )  # fmt: skip
        if (
            isinstance(sample_rate, bool)
            or not isinstance(sample_rate, (int, float))
            or not MIN_SAMPLE_RATE <= sample_rate <= 1  # (False for NaN too)
        ):
            raise ValueError(f"sample_rate must be a number from 1e-06 to 1, not {sample_rate!r}.")
        if query_text not in QUERY_TEXT_MODES:
            raise ValueError(f"query_text must be 'sanitized', 'raw' or 'off', not {query_text!r}.")
        if stall_threshold is None:
            stall_threshold = _env_number(
                "LOOPWATCH_STALL_MS", DEFAULT_STALL_S, "a positive number of milliseconds",
                lambda raw: float(raw) / 1000, lambda s: 0 < s < math.inf,
            )  # fmt: skip
        if not 0 < stall_threshold < math.inf:
            raise ValueError(
                f"stall_threshold must be a positive number of seconds, not {stall_threshold!r}."
            )
        if server_timing is None:
            server_timing = _env_number(
                "LOOPWATCH_SERVER_TIMING", False, "1 or 0 (true/false, yes/no, on/off)",
                _flag, lambda on: True,
            )  # fmt: skip
        if not isinstance(server_timing, bool):
            raise ValueError(f"server_timing must be True or False, not {server_timing!r}.")
        self.app = app
        self.server_timing = server_timing
        self.sample_interval = sample_interval
        self.sample_rate = float(sample_rate)
        self.stall_threshold = stall_threshold
        self._sinks: list[RequestSink] = list(sinks)
        # The record file takes the request's line, encoded (msgspec) as the request ends:
        # cheaper than the record itself, and a queue of bytes holds nothing the garbage
        # collector must walk, nor the trace.
        self._writer: FileWriter | None = None
        self._submit: Callable[[bytes], None] | None = None
        if file is not None:
            if max_bytes is _FROM_ENV:
                max_bytes = _env_number(
                    "LOOPWATCH_MAX_BYTES", None, "a positive whole number of bytes",
                    int, lambda n: n > 0,
                )  # fmt: skip
            if backup_count is None:
                backup_count = _env_number(
                    "LOOPWATCH_BACKUP_COUNT", 5, "a whole number of files, at least 1",
                    int, lambda n: n >= 1,
                )  # fmt: skip
            writer = self._writer = writer_for(
                os.fspath(file), queue_size, max_bytes, backup_count or 0
            )
            self._submit = writer.submit
            state.add_sink(writer.submit)
        self._spans: Spans | None = None
        if spans:
            from .export.otel import Spans

            self._spans = Spans(
                app, tracer_provider, query_spans=query_spans, query_text=query_text
            )
        self._metrics: Metrics | None = None
        if metrics:
            from .export.otel_metrics import Metrics

            self._metrics = Metrics(meter_provider)
        self._on = _Exporting()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                # Watch the loop from start-up: a task the app starts there can stall it.
                try:
                    loop = asyncio.get_running_loop()
                    if type(loop.get_task_factory()) is not TaskFactory:
                        self._start_watching(loop)
                except Exception as exc:
                    _failures.failed("starting to watch the event loop", exc)
            if scope["type"] == "lifespan" and self._writer is not None:
                send = _writing_at_shutdown(send, self._writer)
            await self.app(scope, receive, send)
            return
        outer = current.get()
        if outer is not None and outer.open:  # an outer LoopWatch records this request
            await self.app(scope, receive, send)
            return
        # Otherwise ``outer`` is None, or a request that ended: the server made this one's
        # task from inside it (keep-alive, pipelining), so the context is carried over.

        try:
            loop = asyncio.get_running_loop()
            st = state
            if type(loop.get_task_factory()) is not TaskFactory:  # a loop not seen yet
                first = st.loop_thread is None
                self._start_watching(loop)
                if first:
                    learn_base()
            if self.sample_rate < 1.0 and random() >= self.sample_rate:
                trace = None
            else:
                trace = Trace(time.time(), perf_counter_ns(), scope["method"], scope["path"])
                trace.id_prefix = st.prefix
                trace.seq = next(st.ids)
                trace.scope = scope
        except Exception as exc:
            _failures.failed("starting a request trace", exc)
            await self.app(scope, receive, send)
            return
        st.in_flight += 1
        if trace is None:  # not sampled: counted, nothing more
            try:
                await self.app(scope, receive, send)
            finally:
                st.in_flight -= 1
                st.requests += 1
            return

        on = self._on
        if on.tick != st.ticks:
            self._check_otel(st.ticks)
        if on.spans:
            try:
                trace.otel = self._spans.begin(scope, outer)  # type: ignore[union-attr]
            except Exception as exc:
                _failures.failed("starting the request's span", exc)

        expect_trailers = False

        async def send_final(message: Message) -> None:
            if trace.otel is not None and trace.otel.span is None:
                # Another middleware's server span (OpenTelemetry's ASGI one) ends with
                # this message: put our figures on it while it is still open.
                self._end(trace, scope, root_path, None)
            await send(message)
            if trace.open:
                self._end(trace, scope, root_path, None)

        def send_wrapper(message: Message) -> Awaitable[None]:
            # A plain function: a message that does not end the response goes straight
            # to the server's send, with no coroutine of ours around it.
            nonlocal expect_trailers
            kind = message["type"]
            if kind == "http.response.start":
                if self.server_timing and trace.status is None:  # off: this check only
                    message = self._with_server_timing(message, trace)
                trace.status = message.get("status")
                expect_trailers = bool(message.get("trailers", False))
                final = False
            elif kind == "http.response.body" or kind == "http.response.zerocopysend":
                final = not message.get("more_body", False) and not expect_trailers
            elif kind == "http.response.trailers":
                final = not message.get("more_trailers", False)
            else:
                final = kind == "http.response.pathsend"
            return send_final(message) if final else send(message)

        root_path = trace.root_path = scope.get("root_path", "")
        token = current.set(trace)
        try:
            app_call = self.app(scope, receive, send_wrapper)
            if type(app_call) is not CoroutineType:  # an app may return any awaitable
                app_call = _as_coroutine(app_call)
            await StepTimer(app_call, trace)
        except BaseException as exc:
            if trace.open:
                if trace.status is None:
                    trace.status = 500  # what an ASGI server sends for an app that fails
                self._end(trace, scope, root_path, exc)
            raise
        finally:
            if trace.otel is not None:
                trace.otel.detach()
            try:  # noqa: SIM105 (contextlib.suppress costs an object per request)
                current.reset(token)
            except ValueError:
                # Closed from another context (the GC finalising a dropped task): there
                # is nothing of ours to restore in that context.
                pass
        if trace.open:  # the app returned without a final body (e.g. it never responded)
            self._end(trace, scope, root_path, None)

    def _with_server_timing(self, message: Message, trace: Trace) -> Message:
        """The response's first start message with the ``Server-Timing`` header added;
        should that fail, ``message`` as the app sent it."""
        try:
            return _server_timing.with_header(message, trace)
        except Exception as exc:
            _failures.failed("adding the Server-Timing header", exc)
            return message

    def _check_otel(self, tick: int) -> None:
        """Look for an SDK's tracer and meter providers (made once found: the meter's
        instruments then exist before the request's first acquire)."""
        on = self._on
        on.tick = tick
        if self._spans is not None and not on.spans:
            try:
                on.spans = self._spans.tracer() is not None
            except Exception as exc:
                _failures.failed("starting the request's span", exc)
        if self._metrics is not None and not on.metrics:
            try:
                on.metrics = self._metrics.active()
            except Exception as exc:
                _failures.failed("making the metric instruments", exc)

    def _start_watching(self, loop: asyncio.AbstractEventLoop) -> None:
        """Time the steps of ``loop``, a loop not seen yet, and watch it: the process's
        first loop starts the sampler and the watchdog, a later one takes them over."""
        install_task_factory(loop)
        if state.loop_thread is None:
            state.start_watching(loop, self.sample_interval, self.stall_threshold)
        else:
            state.watch_new_loop(loop)

    def _end(
        self, trace: Trace, scope: Scope, root_path: str, raised: BaseException | None
    ) -> None:
        trace.close()
        st = state
        st.in_flight -= 1
        st.requests += 1
        trace.error = None if raised is None else type(raised).__name__
        trace.rss = st.rss
        trace.pid = st.pid
        try:
            trace.route = _routes.route_template(scope, root_path)
            if trace.blocker is not None:
                trace.blocked_by = _blocked_by(trace.blocker, trace.blocked_ns)
            # Let go of what only a running request needs: the scope (its headers and
            # state) and the trace of its blocker would otherwise live until the writer
            # thread takes this trace, and along a chain of blockers, longer.
            trace.scope = trace.blocker = None
            if self._submit is not None:
                self._submit(trace.line(None if self.sample_rate == 1.0 else self.sample_rate))
            metrics = self._metrics if self._on.metrics else None
            if not self._sinks and trace.otel is None and metrics is None:
                return
            record = trace.to_record()
            record.sample_rate = self.sample_rate
        except Exception as exc:
            _failures.failed("recording a request", exc)
            return
        if trace.otel is not None:
            try:
                trace.otel.end(record, raised)
            except Exception as exc:
                _failures.failed("ending the request's span", exc)
        if metrics is not None:
            try:
                metrics.record(record, None if raised is None else error_type(raised))
            except Exception as exc:
                _failures.failed("recording request metrics", exc)
        for sink in self._sinks:
            try:
                sink(record)
            except Exception as exc:
                _failures.failed(f"request sink {getattr(sink, '__qualname__', sink)!r}", exc)


class _Exporting:
    """Whether an SDK's tracer and meter providers are there to export to. Looked up on
    the first request, then once per sampler tick (0.5 s) while one is missing, so an
    app that exports nothing pays one comparison per request (a look-up reads
    ``os.environ`` while no provider is set)."""

    __slots__ = ("metrics", "spans", "tick")

    def __init__(self) -> None:
        self.tick = -1
        self.spans = False
        self.metrics = False


def _writing_at_shutdown(send: Send, writer: FileWriter) -> Send:
    """``send`` for the lifespan scope: write the queue before telling the server that
    shutdown is complete. Requests finished during a graceful shutdown are then in the file
    even where the process ends without running ``atexit`` handlers (uvicorn >= 0.29
    re-raises the signal; its gunicorn worker too)."""

    async def send_wrapper(message: Message) -> None:
        if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            # Blocking the loop here is deliberate and bounded: the server serves nothing
            # any more, and a thread pool may already be shutting down.
            try:
                writer.sync(SHUTDOWN_WAIT_S)
            except Exception as exc:
                _failures.failed("writing the record file at shutdown", exc)
        await send(message)

    return send_wrapper


async def _as_coroutine(awaitable: Any) -> Any:
    return await awaitable


def _blocked_by(held: Held, overlap_ns: int) -> BlockedBy:
    """Name what held the loop while a request waited (its route, if it still runs)."""
    ident, method, route = held.owner()
    return BlockedBy(ident, method, route, overlap_ns // 1000 / 1000, held.cpu_ns // 1000 / 1000)


def _flag(raw: str) -> bool:
    """An on/off setting's value from the environment."""
    word = raw.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _env_number(
    name: str, default: Any, what: str, parse: Callable[[str], Any], valid: Callable[[Any], bool]
) -> Any:
    """A setting from the environment, or ``default`` when it is unset. A value that is
    not ``what`` is logged once (the ``loopwatch`` logger) and the default used: a typo in
    a deployment's environment must not take the app down with it."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = parse(raw)
        if valid(value):
            return value
    except (ValueError, OverflowError):
        pass
    _failures.failed(
        f"reading {name}",
        ValueError(f"{name} must be {what}, not {raw!r}: using the default, {default!r}"),
    )
    return default
