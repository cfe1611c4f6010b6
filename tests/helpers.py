"""Helpers for tests: reading record files, stopping servers, burning CPU, spans kept in
memory by the apps served in the tests' subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any


class Server:
    def __init__(self, url: str, proc: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.proc = proc

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a record file, each one required to be whole JSON."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            assert line.endswith("\n"), f"line {n} is not terminated: {line!r}"
            out.append(json.loads(line))
    return out


def requests_in(path: Path) -> list[dict[str, Any]]:
    return [d for d in read_lines(path) if d["type"] == "request"]


def wait_for_requests(path: Path, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Records are written by a background thread; wait until ``n`` request lines are there."""
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if path.exists():
            found = requests_in(path)
            if len(found) >= n:
                return found
        time.sleep(0.05)
    raise AssertionError(f"expected {n} request records in {path}, found {len(found)}")


def requests_by_path(path: Path, n: int, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """The records of ``n`` requests sent by a test, by path, once written; the server's
    readiness checks (``/ready``, polled until it answers: maybe several) not counted."""
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if path.exists():
            found = [r for r in requests_in(path) if r["path"] != "/ready"]
            if len(found) >= n:
                return {r["path"]: r for r in found}
        time.sleep(0.05)
    raise AssertionError(f"expected {n} request records in {path}, found {len(found)}")


def gc_off_if_asked() -> None:
    """With ``GC_OFF`` set, turn this (an app's) process's garbage collector off. A
    collection is real CPU on the loop, charged to the step it interrupts (on Python 3.13
    a generation-1 pass took 3-6 ms in the middle of a request's 12 ms burn; a full one in
    the SQLAlchemy app, 50 ms): tests that hold a request's CPU to what its endpoint
    burned turn it off."""
    if os.environ.get("GC_OFF"):
        import gc

        gc.disable()


def burn_cpu(ms: float) -> float:
    """Spin until this thread has used ``ms`` of CPU; returns the CPU actually used (ms)."""
    start = time.thread_time_ns()
    target = start + int(ms * 1e6)
    x = 0
    while time.thread_time_ns() < target:
        for i in range(200):
            x += i * i
    return (time.thread_time_ns() - start) / 1e6


def in_memory_spans() -> Any:
    """Set a global SDK tracer provider that keeps every finished span in memory (for an
    app served in a test's subprocess); its exporter, for :func:`finished_spans`."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def finished_spans(exporter: Any) -> list[dict[str, Any]]:
    """The spans ``exporter`` kept, as JSON an app's endpoint returns to the test; none
    without an exporter."""
    if exporter is None:
        return []
    return [
        {
            "name": s.name,
            "kind": s.kind.name,
            "scope": s.instrumentation_scope.name if s.instrumentation_scope else None,
            "attributes": dict(s.attributes or {}),
            "status": s.status.status_code.name,
            "duration_ms": ((s.end_time or 0) - (s.start_time or 0)) / 1e6,
            "trace_id": s.context.trace_id,
            "parent": s.parent.span_id if s.parent else None,
        }
        for s in exporter.get_finished_spans()
    ]
