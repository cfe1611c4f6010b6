"""A real OTLP/HTTP receiver for tests: decodes what an exporter sends over the wire.

``with receiver() as rx:`` serves ``rx.endpoint`` (``http://127.0.0.1:PORT``) from a background
thread, accepts ``POST /v1/traces`` and ``POST /v1/metrics`` with ``application/x-protobuf``
bodies (plain, gzip or deflate), decodes them with opentelemetry-proto and answers ``200`` with
an empty ``Export*ServiceResponse``, as a collector does. ``rx.spans()``, ``rx.metrics()`` and
``rx.requests()`` return what arrived so far; ``rx.wait_for(predicate, timeout)`` polls.
"""

from __future__ import annotations

import contextlib
import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus

PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    kind: str  # "SERVER", "CLIENT", "INTERNAL", ...
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    attributes: dict[str, Any]
    status: str  # "UNSET", "OK", "ERROR"
    status_message: str
    start_unix_nano: int
    end_unix_nano: int
    resource: dict[str, Any]
    scope: str


@dataclass(frozen=True)
class DataPoint:
    attributes: dict[str, Any]
    value: float | int | None = None  # gauge and sum points
    count: int | None = None  # histogram points
    sum: float | None = None
    bucket_counts: tuple[int, ...] = ()
    explicit_bounds: tuple[float, ...] = ()


@dataclass(frozen=True)
class ReceivedMetric:
    name: str
    unit: str
    description: str
    type: str  # "gauge", "sum", "histogram", "exponential_histogram", "summary"
    data_points: tuple[DataPoint, ...]
    resource: dict[str, Any]
    scope: str
    monotonic: bool | None = None  # sums only


@dataclass(frozen=True)
class ReceivedRequest:
    path: str
    content_type: str
    content_encoding: str
    size: int  # bytes on the wire
    status: int  # what the receiver answered


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return getattr(value, kind)  # string, bool, int, double or bytes


def attributes_of(attributes: Any) -> dict[str, Any]:
    kvs: list[KeyValue] = list(attributes)
    return {kv.key: any_value(kv.value) for kv in kvs}


def decode_spans(body: bytes) -> list[ReceivedSpan]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = []
    for rs in request.resource_spans:
        resource = attributes_of(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    ReceivedSpan(
                        name=s.name,
                        kind=PbSpan.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        attributes=attributes_of(s.attributes),
                        status=PbStatus.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"),
                        status_message=s.status.message,
                        start_unix_nano=s.start_time_unix_nano,
                        end_unix_nano=s.end_time_unix_nano,
                        resource=resource,
                        scope=ss.scope.name,
                    )
                )
    return out


def _point(p: Any, kind: str) -> DataPoint:
    attributes = attributes_of(p.attributes)
    if kind in ("gauge", "sum"):
        which = p.WhichOneof("value")
        return DataPoint(attributes, value=getattr(p, which) if which else None)
    if kind == "histogram":
        return DataPoint(
            attributes,
            count=p.count,
            sum=p.sum,
            bucket_counts=tuple(p.bucket_counts),
            explicit_bounds=tuple(p.explicit_bounds),
        )
    return DataPoint(attributes, count=p.count, sum=p.sum)  # exponential histogram, summary


def decode_metrics(body: bytes) -> list[ReceivedMetric]:
    request = ExportMetricsServiceRequest()
    request.ParseFromString(body)
    out = []
    for rm in request.resource_metrics:
        resource = attributes_of(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data") or ""
                data = getattr(m, kind) if kind else None
                points = tuple(_point(p, kind) for p in data.data_points) if data else ()
                out.append(
                    ReceivedMetric(
                        name=m.name,
                        unit=m.unit,
                        description=m.description,
                        type=kind,
                        data_points=points,
                        resource=resource,
                        scope=sm.scope.name,
                        monotonic=data.is_monotonic if kind == "sum" else None,
                    )
                )
    return out


@dataclass
class Receiver:
    endpoint: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _spans: list[ReceivedSpan] = field(default_factory=list)
    _metrics: list[ReceivedMetric] = field(default_factory=list)
    _requests: list[ReceivedRequest] = field(default_factory=list)

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def metrics(self) -> list[ReceivedMetric]:
        """Every metric of every export, in arrival order (cumulative metrics repeat)."""
        with self._lock:
            return list(self._metrics)

    def latest_metrics(self) -> dict[str, ReceivedMetric]:
        """The last export's view of each metric, by name."""
        return {m.name: m for m in self.metrics()}

    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    def wait_for(self, predicate: Callable[[Receiver], Any], timeout: float = 10.0) -> Any:
        """Poll until ``predicate(self)`` is truthy and return it; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate(self)
            if result:
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"receiver: condition not met in {timeout} s; got {len(self.spans())} spans, "
                    f"metrics {sorted({m.name for m in self.metrics()})}"
                )
            time.sleep(0.05)

    def _add(self, request: ReceivedRequest, spans: list[Any], metrics: list[Any]) -> None:
        with self._lock:
            self._requests.append(request)
            self._spans.extend(spans)
            self._metrics.extend(metrics)


def _decompress(body: bytes, encoding: str) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


def _handler(rx: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as exporters' sessions expect

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip()
            encoding = self.headers.get("Content-Encoding", "").strip().lower()
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            spans: list[ReceivedSpan] = []
            metrics: list[ReceivedMetric] = []
            response = b""
            if path not in ("/v1/traces", "/v1/metrics"):
                status = 404
            elif content_type != PROTOBUF:
                status = 415
            else:
                try:
                    raw = _decompress(body, encoding)
                    if path == "/v1/traces":
                        spans = decode_spans(raw)
                        response = ExportTraceServiceResponse().SerializeToString()
                    else:
                        metrics = decode_metrics(raw)
                        response = ExportMetricsServiceResponse().SerializeToString()
                    status = 200
                except Exception:
                    status = 400
            rx._add(
                ReceivedRequest(path, content_type, encoding, len(body), status), spans, metrics
            )
            self.send_response(status)
            self.send_header("Content-Type", PROTOBUF)
            self.send_header("Content-Length", str(len(response)))
            self.end_headers()
            self.wfile.write(response)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the tests assert on what arrived

    return Handler


@contextlib.contextmanager
def receiver() -> Iterator[Receiver]:
    """An OTLP/HTTP receiver on 127.0.0.1 (a free port) for the ``with`` block."""
    rx = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(rx))
    server.daemon_threads = True
    rx.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        yield rx
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
