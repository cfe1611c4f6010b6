"""OpenTelemetry spans: a server span per request, a client span per query.

The capture code knows nothing of OpenTelemetry: the middleware asks :class:`Spans` for
an opaque per-request :class:`RequestSpans` handle, keeps it on the trace, and the asyncpg
proxies call its ``query_*`` hooks. Spans are live (the request span is the current span
while the app runs, so the app's own spans and outgoing calls nest under it) and follow
the stable HTTP and database semantic conventions; loopwatch's own figures go on the
server span under the ``loopwatch.`` prefix. A stall (a step that held the event loop
past the stall threshold) is an event on the server span of the request whose step it
was, with the blocking line in the stable ``code.*`` attributes.

When OpenTelemetry's ASGI instrumentation already makes the server span (its middleware
outside or inside LoopWatch), loopwatch adds its attributes to that span instead. With no
SDK tracer provider configured, nothing is done per request beyond one type check.
"""

from __future__ import annotations

from time import monotonic, perf_counter_ns, time_ns
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry import trace as trace_api
from opentelemetry.trace import ProxyTracerProvider, SpanKind, Status, StatusCode

from .._capture.watchdog import stall_listeners
from .._version import __version__
from ..record import Frame, RequestRecord, Stall
from ..renderers.timeline import render_bar
from .sql import QueryText, first_keyword, sanitize

_KNOWN_METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
)
_PROPAGATED = frozenset((b"traceparent", b"tracestate", b"baggage"))
TIMELINE_COLUMNS = 40
STALL_EVENT = "loopwatch.stall"
RECHECK_S = 1.0  # while no SDK provider is configured, look again this often


class Spans:
    """Span export for one middleware: the tracer provider (default: the global one)."""

    def __init__(
        self,
        app: Any,
        tracer_provider: Any = None,
        *,
        query_spans: bool = True,
        query_text: QueryText = "sanitized",
    ):
        self._provider = tracer_provider
        self.query_spans = query_spans
        self.query_text = query_text
        self._tracer: Any = None
        self._next_check = 0.0
        # OpenTelemetry's own ASGI middleware inside LoopWatch makes the server span.
        self._asgi_inside = _has_otel_asgi(app)

    def tracer(self) -> Any:
        """The tracer, or None while no SDK tracer provider is configured."""
        if self._tracer is not None:
            return self._tracer
        # Looking the global provider up reads os.environ while none is set: at most once
        # a second, so an app without an SDK pays nothing per request (a provider set up
        # later is picked up within a second).
        now = monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + RECHECK_S
        provider = self._provider or trace_api.get_tracer_provider()
        if isinstance(provider, (ProxyTracerProvider, trace_api.NoOpTracerProvider)):
            return None  # no SDK: cost nothing (checked again on the next request)
        self._tracer = provider.get_tracer("loopwatch", __version__)
        if _stalled not in stall_listeners:
            stall_listeners.append(_stalled)
        return self._tracer

    def begin(self, scope: dict[str, Any]) -> RequestSpans | None:
        tracer = self.tracer()
        if tracer is None:
            return None
        if self._asgi_inside:  # its server span is made further in: found when needed
            return RequestSpans(self, tracer, None, None)
        current = trace_api.get_current_span()
        if current.get_span_context().is_valid:  # enrich the existing server span
            return RequestSpans(self, tracer, None, None, current)
        parent = _extract(scope)
        span = tracer.start_span(
            _name_method(scope.get("method", "")),  # the route is added at the end
            context=parent,
            kind=SpanKind.SERVER,
            attributes=_request_attributes(scope),
        )
        token = otel_context.attach(trace_api.set_span_in_context(span, parent))
        return RequestSpans(self, tracer, span, token)


class RequestSpans:
    """One request's spans; the trace holds it, the middleware and proxies call it."""

    __slots__ = ("_host", "_token", "owner", "span", "tracer")

    def __init__(self, owner: Spans, tracer: Any, span: Any, token: Any, host: Any = None) -> None:
        self.owner = owner
        self.tracer = tracer
        self.span = span  # ours, or None when another middleware made the server span
        self._token = token
        # Another middleware's server span, current when the request reached us; None
        # when it is made inside LoopWatch: then it is the current span when needed.
        self._host = host

    def _server(self) -> Any:
        if self.span is not None:
            return self.span
        # Taken at the start when it can be: later the app's own spans may be current.
        return self._host if self._host is not None else trace_api.get_current_span()

    def detach(self) -> None:
        """Stop being the current span (the middleware calls this as the app returns)."""
        if self._token is not None:
            token, self._token = self._token, None
            otel_context.detach(token)  # logs, never raises, when closed from elsewhere

    def end(self, record: RequestRecord) -> None:
        """Put the request's figures on the server span; end it if it is ours."""
        span = self._server()
        if not span.is_recording():
            return
        attributes = _loopwatch_attributes(record)
        if self.span is not None:  # ours: the HTTP attributes known only now, and its end
            if record.route:
                span.update_name(f"{_name_method(record.method)} {record.route}")
                attributes["http.route"] = record.route
            if record.status is not None:
                attributes["http.response.status_code"] = record.status
            error = record.error or (
                str(record.status) if record.status is not None and record.status >= 500 else None
            )
            if error is not None:
                attributes["error.type"] = error
                span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attributes)  # one call: the SDK validates and locks per call
            span.end()
        else:
            span.set_attributes(attributes)

    def stalled(self, stall: Stall) -> None:
        """A step of this request held the loop past the stall threshold: an event on the
        server span, at the step's start. Called on the loop thread, inside that step."""
        span = self._server()
        if span.is_recording():  # not once the request has ended (a task it left behind)
            span.add_event(STALL_EVENT, _stall_attributes(stall), round(stall.time * 1e9))

    # --- queries -----------------------------------------------------------------------

    def query_start(self, text: str | None, operation: str | None, connection: Any) -> Any:
        if not self.owner.query_spans:
            return None
        attributes = {"db.system.name": "postgresql", **_target(connection)}
        if text is not None:
            # Sanitized even when the raw text is wanted: the operation is read from it,
            # past any leading comment. Cached by the text, as statements repeat.
            clean = sanitize(text)
            operation = operation or first_keyword(clean)
            mode = self.owner.query_text
            if mode == "sanitized":  # the parameters were never in it; now no literal is
                attributes["db.query.text"] = clean
            elif mode == "raw":
                attributes["db.query.text"] = text
        if operation:
            attributes["db.operation.name"] = operation
        namespace = attributes.get("db.namespace")
        name = f"{operation} {namespace}" if operation and namespace else operation or "postgresql"
        return self.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)

    def query_end(self, span: Any, exc: BaseException | None) -> None:
        if span is None:
            return
        if exc is not None:
            kind = type(exc)
            span.set_attribute("error.type", f"{kind.__module__}.{kind.__qualname__}")
            sqlstate = getattr(exc, "sqlstate", None)
            if isinstance(sqlstate, str):
                span.set_attribute("db.response.status_code", sqlstate)
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def waited(self, kind: str, start_ns: int, end_ns: int, connection: Any = None) -> None:
        """A span for a wait known only once it is over (pool acquire, cursor batch)."""
        if kind == "db" and not self.owner.query_spans:
            return
        now_unix, now_perf = time_ns(), perf_counter_ns()
        attributes: dict[str, Any] = {"db.system.name": "postgresql", **_target(connection)}
        name = "pool acquire" if kind == "pool" else "FETCH"
        if kind == "db":
            attributes["db.operation.name"] = "FETCH"
        span = self.tracer.start_span(
            name,
            kind=SpanKind.INTERNAL if kind == "pool" else SpanKind.CLIENT,
            attributes=attributes,
            start_time=now_unix - (now_perf - start_ns),
        )
        span.end(end_time=now_unix - (now_perf - end_ns))


def _loopwatch_attributes(record: RequestRecord) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "loopwatch.cpu_ms": record.cpu_ms,
        "loopwatch.db_ms": record.db_ms,
        "loopwatch.pool_wait_ms": record.pool_wait_ms,
        "loopwatch.loop_wait_ms": record.loop_wait_ms,
        "loopwatch.db_queries": record.db_queries,
        "loopwatch.timeline": render_bar(record, TIMELINE_COLUMNS),
    }
    if record.rss_bytes is not None:
        attributes["loopwatch.rss_bytes"] = record.rss_bytes
    blocked = record.blocked_by
    if blocked is not None:
        # The route, not loopwatch's request id: no span carries that id, so it would
        # lead nowhere in a tracing backend; the blocker's own span has the stall event.
        attributes["loopwatch.blocked_by.held_ms"] = blocked.held_ms
        if blocked.route is not None:
            attributes["loopwatch.blocked_by.route"] = blocked.route
    return attributes


def _stalled(stall: Stall, trace: Any) -> None:
    """The watchdog's stall listener: the event, for a stall in a request's step."""
    handle = getattr(trace, "otel", None)  # None outside requests, or with spans off
    if handle is not None:
        handle.stalled(stall)


def _stall_attributes(stall: Stall) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "loopwatch.stall.duration_ms": stall.duration_ms,
        "loopwatch.stall.cpu_ms": stall.cpu_ms,
        "loopwatch.stall.cause": stall.cause,
    }
    location = stall.location
    if location is not None:
        attributes["code.file.path"] = location[0]
        attributes["code.line.number"] = location[1]
        attributes["code.function.name"] = location[2]
    if stall.stacks:
        attributes["code.stacktrace"] = _format_stack(stall.stacks[0])
    return attributes


def _format_stack(stack: tuple[Frame, ...]) -> str:
    """As Python prints a stack (innermost last), without the source lines: reading them
    would be file I/O on the loop thread."""
    return "".join(f'  File "{file}", line {line}, in {name}\n' for file, line, name, _ in stack)


def _request_attributes(scope: dict[str, Any]) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": _method(scope.get("method", "")),
        "url.path": scope.get("path", ""),
        "url.scheme": scope.get("scheme", "http"),
    }
    if scope.get("http_version"):
        attributes["network.protocol.version"] = scope["http_version"]
    server = scope.get("server")
    if server and server[0]:
        attributes["server.address"] = server[0]
        if server[1] is not None:
            attributes["server.port"] = server[1]
    client = scope.get("client")
    if client and client[0]:
        attributes["client.address"] = client[0]
    return attributes


def _method(method: str) -> str:
    return method if method in _KNOWN_METHODS else "_OTHER"


def _name_method(method: str) -> str:
    """The method as a span name shows it: ``HTTP`` for one outside the standard set."""
    return method if method in _KNOWN_METHODS else "HTTP"


def _extract(scope: dict[str, Any]) -> Any:
    carrier = {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in scope.get("headers", ())
        if k in _PROPAGATED
    }
    return propagate.extract(carrier) if carrier else None


def _target(connection: Any) -> dict[str, Any]:
    """db.namespace, server.address and server.port of an asyncpg connection (or proxy)."""
    con = getattr(connection, "_con", connection)  # asyncpg's pool proxy holds the connection
    out: dict[str, Any] = {}
    database = getattr(getattr(con, "_params", None), "database", None)
    if isinstance(database, str):
        out["db.namespace"] = database
    addr = getattr(con, "_addr", None)
    if isinstance(addr, tuple) and len(addr) >= 2:
        out["server.address"], out["server.port"] = str(addr[0]), addr[1]
    elif isinstance(addr, str):  # a unix socket
        out["server.address"] = addr
    return out


def _has_otel_asgi(app: Any) -> bool:
    for _ in range(32):
        if app is None:
            return False
        if type(app).__module__.startswith("opentelemetry.instrumentation.asgi"):
            return True
        app = getattr(app, "app", None)
    return False


__all__ = ["RequestSpans", "Spans"]
