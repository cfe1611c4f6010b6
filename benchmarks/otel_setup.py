"""The OpenTelemetry SDK set-up shared by the span-exporting benchmark configurations.

A global SDK ``TracerProvider`` with a ``BatchSpanProcessor`` (its default settings) in
front of :class:`NullExporter`, an exporter that does nothing. The figures therefore
cover the instrumentation, the SDK's span objects and the batch processor (its queue and
worker thread), but no serialization and no network: what any exporter adds comes on
top, the same for every configuration.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class NullExporter(SpanExporter):
    """Accepts every batch and drops it: no serialization, no network."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def install(exporter: SpanExporter | None = None) -> TracerProvider:
    """Set a global SDK tracer provider exporting through ``exporter`` (default: none)."""
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter or NullExporter()))
    trace.set_tracer_provider(provider)
    return provider
