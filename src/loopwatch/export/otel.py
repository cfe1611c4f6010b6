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
outside or inside LoopWatch), loopwatch adds its attributes, the route and the route's name
to that span instead. Which span that is, is decided from facts that cannot be stale: a
request's context may have been carried over from the connection's previous request (the
server made its task from inside that one), and a span current then is not this request's.
With no SDK tracer provider configured, nothing is done per request beyond one type check.
"""

from __future__ import annotations

from time import perf_counter_ns, time_ns
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry import trace as trace_api
from opentelemetry.trace import ProxyTracerProvider, SpanKind, Status, StatusCode

from .._capture.watchdog import stall_listeners
from .._version import __version__
from ..record import Frame, RequestRecord, Stall, error_type
from ..renderers.timeline import render_bar
from .sql import QueryText, operation_name, sanitize

if TYPE_CHECKING:
    from .._capture.trace import Trace
    from ..timing import Timed

_KNOWN_METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
)
_PROPAGATED = frozenset((b"traceparent", b"tracestate", b"baggage"))
# The modules of the ASGI middlewares that make a server span of their own.
_OTEL_ASGI_MODULES = ("opentelemetry.instrumentation.asgi", "starlette.middleware.opentelemetry")
# db.system.name values whose query text is SQL, which sanitize() can clean.
_SQL_SYSTEMS = frozenset(
    ("postgresql", "mysql", "mariadb", "sqlite", "oracle.db", "microsoft.sql_server", "other_sql")
)
TIMELINE_COLUMNS = 40
STALL_EVENT = "loopwatch.stall"


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
        # An OpenTelemetry ASGI middleware inside LoopWatch makes the server span.
        self._asgi_inside = _has_otel_asgi(app)

    def tracer(self) -> Any:
        """The tracer, or None while no SDK tracer provider is configured. Looking the
        global provider up reads ``os.environ`` while none is set: LoopWatch asks at most
        once per sampler tick until there is one (middleware._Exporting)."""
        if self._tracer is not None:
            return self._tracer
        provider = self._provider or trace_api.get_tracer_provider()
        if isinstance(provider, (ProxyTracerProvider, trace_api.NoOpTracerProvider)):
            return None  # no SDK: cost nothing
        self._tracer = provider.get_tracer("loopwatch", __version__)
        if _stalled not in stall_listeners:
            stall_listeners.append(_stalled)
        return self._tracer

    def begin(self, scope: dict[str, Any], carried: Trace | None = None) -> RequestSpans | None:
        """The request's spans. ``carried`` is the closed trace of an earlier request when
        this one runs in a context carried over from it, else None."""
        tracer = self.tracer()
        if tracer is None:
            return None
        context = otel_context.get_current()
        current = trace_api.get_current_span(context)
        # The context of an earlier request on this connection (uvicorn starts the next
        # request from inside the previous one when it resumes reading or takes a
        # pipelined request): neither its span nor its baggage is this request's.
        stale = carried is not None and not _started_after(current, _end_unix_ns(carried))
        if stale:
            context = otel_context.Context()
            current = trace_api.INVALID_SPAN
        if self._asgi_inside:
            # Its server span is made further in, so after now: found when needed. Made
            # in a clean context, not as a child of the earlier request's span.
            token = otel_context.attach(context) if stale else None
            return RequestSpans(self, tracer, None, token, since=time_ns())
        if _is_server(current):  # made for this request by a middleware outside: enrich it
            return RequestSpans(self, tracer, None, None, host=current)
        parent = _extract(scope, context)
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

    __slots__ = ("_host", "_since", "_token", "owner", "span", "tracer")

    def __init__(
        self,
        owner: Spans,
        tracer: Any,
        span: Any,
        token: Any,
        host: Any = None,
        since: int = 0,
    ) -> None:
        self.owner = owner
        self.tracer = tracer
        self.span = span  # ours, or None when another middleware made the server span
        self._token = token
        # Another middleware's server span, current when the request reached us; None
        # while one made inside LoopWatch (started after ``since``) is not yet found.
        self._host = host
        self._since = since

    def _server(self) -> Any:
        if self.span is not None:
            return self.span
        if self._host is None:
            # Made inside LoopWatch: current while the app runs, unless the app made a
            # span of its own current. Kept once found, for the end of the request.
            current = trace_api.get_current_span()
            if not (_is_server(current) and _started_after(current, self._since)):
                return trace_api.INVALID_SPAN
            self._host = current
        return self._host

    def detach(self) -> None:
        """Stop being the current span (the middleware calls this as the app returns)."""
        if self._token is not None:
            token, self._token = self._token, None
            otel_context.detach(token)  # logs, never raises, when closed from elsewhere

    def end(self, record: RequestRecord, exc: BaseException | None = None) -> None:
        """Put the request's figures on the server span; end it if it is ours. ``exc`` is
        the exception the app raised, if it did."""
        span = self._server()
        if not span.is_recording():
            return
        attributes = _loopwatch_attributes(record)
        ours = self.span is not None
        if record.route:
            attributes["http.route"] = record.route
            # Another middleware's span keeps a name its hooks gave it: only its name
            # from the raw path (OpenTelemetry's ASGI middleware's) or the method alone
            # gives way to the low-cardinality one.
            if ours or _named_by_path(span, record):
                span.update_name(f"{_name_method(record.method)} {record.route}")
        if ours:  # the HTTP attributes known only now, and its end
            if record.status is not None:
                attributes["http.response.status_code"] = record.status
            if exc is not None:
                error: str | None = error_type(exc)
            elif record.status is not None and record.status >= 500:
                error = str(record.status)
            else:
                error = record.error
            if error is not None:
                attributes["error.type"] = error
                span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attributes)  # one call: the SDK validates and locks per call
        if ours:
            span.end()

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
        operation = _describe(attributes, text, operation, self.owner.query_text)
        name = _client_name(operation, attributes, "postgresql")
        return self.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)

    def query_end(self, span: Any, exc: BaseException | None) -> None:
        if span is None:
            return
        if exc is not None:
            # Only a SQLSTATE PostgreSQL sent: asyncpg's client-side errors carry one on
            # their class (DataError: 22000) but never reached the server.
            _failed(span, exc, vars(exc).get("sqlstate"))
        span.end()

    def timed_span(
        self, block: Timed, start_ns: int, end_ns: int, exc: BaseException | None
    ) -> None:
        """The span of a finished :func:`loopwatch.timed` block: a client span for a
        statement (when query spans are on), an internal one for a pool wait."""
        if block.kind == "db" and not self.owner.query_spans:
            return
        attributes: dict[str, Any] = {}
        system = block.system
        if system is not None:
            attributes["db.system.name"] = system
        if block.attributes:
            attributes.update(block.attributes)
        if block.kind == "pool":
            span, offset = self._past("pool acquire", SpanKind.INTERNAL, attributes, start_ns)
        else:
            text = block.query() if callable(block.query) else block.query
            sql = system is None or system in _SQL_SYSTEMS  # only SQL can be sanitized
            operation = _describe(attributes, text, block.operation, self.owner.query_text, sql)
            name = _client_name(operation, attributes, system or "query")
            span, offset = self._past(name, SpanKind.CLIENT, attributes, start_ns)
        if exc is not None:
            _failed(span, exc, getattr(exc, "sqlstate", None))
        span.end(end_time=end_ns + offset)

    def waited(self, kind: str, start_ns: int, end_ns: int, connection: Any = None) -> None:
        """A span for a wait known only once it is over (pool acquire, cursor batch)."""
        if kind == "db" and not self.owner.query_spans:
            return
        attributes: dict[str, Any] = {"db.system.name": "postgresql", **_target(connection)}
        if kind == "pool":
            span, offset = self._past("pool acquire", SpanKind.INTERNAL, attributes, start_ns)
        else:
            attributes["db.operation.name"] = "FETCH"
            span, offset = self._past("FETCH", SpanKind.CLIENT, attributes, start_ns)
        span.end(end_time=end_ns + offset)

    def _past(
        self, name: str, kind: SpanKind, attributes: dict[str, Any], start_ns: int
    ) -> tuple[Any, int]:
        """A span that started at ``start_ns`` (``perf_counter_ns``), made now; and what
        turns a ``perf_counter_ns`` reading into the spans' clock, for its end."""
        offset = time_ns() - perf_counter_ns()
        span = self.tracer.start_span(
            name, kind=kind, attributes=attributes, start_time=start_ns + offset
        )
        return span, offset


def _describe(
    attributes: dict[str, Any],
    text: str | None,
    operation: str | None,
    mode: QueryText,
    sql: bool = True,
) -> str | None:
    """Put a query's ``db.query.text`` (per ``mode``; sanitized only when ``sql``, and
    then even for ``"raw"``: the operation is read from the clean text, past any leading
    comment, cached by the text as statements repeat) and ``db.operation.name`` in
    ``attributes``; return the operation."""
    if text is not None:
        clean = sanitize(text) if sql else None
        if not operation and clean is not None:
            operation = operation_name(clean)
        if mode == "raw":
            attributes["db.query.text"] = text
        elif mode == "sanitized" and clean is not None:  # no literal is left in it
            attributes["db.query.text"] = clean
    if operation:
        attributes["db.operation.name"] = operation
    return operation


def _client_name(operation: str | None, attributes: dict[str, Any], fallback: str) -> str:
    """A client span's name: ``{db.operation.name} {db.namespace}``, or what there is."""
    namespace = attributes.get("db.namespace")
    return f"{operation} {namespace}" if operation and namespace else operation or fallback


def _failed(span: Any, exc: BaseException, sqlstate: Any) -> None:
    """Mark a query's span failed with ``exc``; ``sqlstate``: one PostgreSQL sent."""
    span.set_attribute("error.type", error_type(exc))
    if isinstance(sqlstate, str):
        span.set_attribute("db.response.status_code", sqlstate)
    span.set_status(Status(StatusCode.ERROR))


def _loopwatch_attributes(record: RequestRecord) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "loopwatch.cpu_ms": record.cpu_ms,
        "loopwatch.db_ms": record.db_ms,
        "loopwatch.pool_wait_ms": record.pool_wait_ms,
        "loopwatch.loop_wait_ms": record.loop_wait_ms,
        "loopwatch.db_queries": record.db_queries,
        "loopwatch.timeline": render_bar(record, TIMELINE_COLUMNS),
    }
    if record.db_statements is not None:
        attributes["loopwatch.db_statements"] = record.db_statements
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


def _is_server(span: Any) -> bool:
    """A server span still open (an SDK span: the API's spans do not tell their kind)."""
    return getattr(span, "kind", None) is SpanKind.SERVER and span.is_recording()


def _started_after(span: Any, unix_ns: int) -> bool:
    """Whether ``span`` started at or after ``unix_ns``; False when it does not tell."""
    start = getattr(span, "start_time", None)
    return isinstance(start, int) and start >= unix_ns


def _end_unix_ns(trace: Trace) -> int:
    """When a closed request trace ended, on the clock spans are timed with."""
    return round(trace.start_unix * 1e9) + trace.end_ns - trace.start_ns


def _named_by_path(span: Any, record: RequestRecord) -> bool:
    """Whether a span's name is its method, alone or followed by the raw path."""
    name = getattr(span, "name", None)
    if not isinstance(name, str):
        return False
    method, _, rest = name.partition(" ")
    methods = (record.method, record.method.upper(), _name_method(record.method))
    return method in methods and rest in ("", record.path)


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


def _extract(scope: dict[str, Any], context: Any) -> Any:
    """The parent of the request's span: the incoming trace context, over ``context``."""
    carrier = {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in scope.get("headers", ())
        if k in _PROPAGATED
    }
    return propagate.extract(carrier, context) if carrier else context


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
    """Whether an OpenTelemetry ASGI middleware (OpenTelemetry's, or Starlette's own since
    Starlette 1.0) is in the chain of apps below LoopWatch."""
    for _ in range(32):
        if app is None:
            return False
        module = type(app).__module__
        if module.startswith(_OTEL_ASGI_MODULES):
            return True
        app = getattr(app, "app", None)
    return False


__all__ = ["RequestSpans", "Spans"]
