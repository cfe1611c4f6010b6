"""Exporters: the record file, OpenTelemetry spans and metrics, the Server-Timing header."""
