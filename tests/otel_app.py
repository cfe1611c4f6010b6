"""An app served by uvicorn in test_otlp's subprocesses, exporting over OTLP/HTTP.

It sets the OpenTelemetry SDK up the way a user would, from the standard environment
variables only: OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_TIMEOUT,
OTEL_EXPORTER_OTLP_*_COMPRESSION, OTEL_BSP_SCHEDULE_DELAY... The global providers are set
before LoopWatch is built, and shut down (flushing spans and metrics) as the app stops.
LOOPWATCH_TEST_DSN is the PostgreSQL to query; SECRET_OFFSET is added to the item id to
make the query's parameter (so that its value is known and found in no URL). ``POST /upload``
runs a query, then reads its body. With OTEL_ASGI_INSIDE set, OpenTelemetry's ASGI
middleware runs inside LoopWatch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from loopwatch import LoopWatch, create_pool

DSN = os.environ["LOOPWATCH_TEST_DSN"]
SECRET_OFFSET = int(os.environ.get("SECRET_OFFSET", "0"))

resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES apply
tracer_provider = TracerProvider(resource=resource)
tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
meter_provider = MeterProvider(
    resource=resource,
    metric_readers=[
        PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=500)
    ],
)
trace.set_tracer_provider(tracer_provider)
metrics.set_meter_provider(meter_provider)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    try:
        async with create_pool(DSN, min_size=1, max_size=2) as pool:
            app.state.pool = pool
            yield
    finally:
        # Flush what is buffered: the last spans and a final metrics collection.
        tracer_provider.shutdown()
        meter_provider.shutdown()


async def ready(request: Request) -> Response:
    return PlainTextResponse("ok")


async def item(request: Request) -> Response:
    value = request.path_params["item_id"] + SECRET_OFFSET
    got = await request.app.state.pool.fetchval("SELECT $1::int", value)
    return JSONResponse({"id": request.path_params["item_id"], "value": got})


async def upload(request: Request) -> Response:
    # The query first: meanwhile a large body fills uvicorn's buffer past its high-water
    # mark, so reading it resumes the paused transport from inside this request.
    await request.app.state.pool.fetchval("SELECT $1::int", SECRET_OFFSET)
    body = await request.body()
    return JSONResponse({"size": len(body)})


middleware = [Middleware(LoopWatch, file=None)]
if os.environ.get("OTEL_ASGI_INSIDE"):
    # OpenTelemetry's ASGI middleware inside LoopWatch makes the server spans.
    middleware.append(Middleware(OpenTelemetryMiddleware))

app = Starlette(
    routes=[
        Route("/ready", ready),
        Route("/items/{item_id:int}", item),
        Route("/upload", upload, methods=["POST"]),
    ],
    middleware=middleware,
    lifespan=lifespan,
)
