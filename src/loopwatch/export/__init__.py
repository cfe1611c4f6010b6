"""Exporters: the record file, OpenTelemetry spans and metrics."""
