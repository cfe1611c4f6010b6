"""Process-wide state: request ids, in-flight count, and the background sampler.

The sampler thread reads the process's memory (RSS and USS, through psutil) and how
busy the event loop's thread was (its CPU clock, read from the sampler thread), so the
request path never pays for a psutil call. Every sample goes to the registered sinks as
a :class:`~loopwatch.record.ProcessSample`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import threading
import time
from collections.abc import Callable

import psutil

from .. import _failures
from ..record import ProcessSample
from .loop import monitor
from .watchdog import Watchdog, thread_cpu_ns

ProcessSink = Callable[[ProcessSample], None]
# Called by the sampler thread: (most connections in use at once, pool sizes) of a kind
# of instrumented pool, or None while there is none.
ConnectionSource = Callable[[], "tuple[int, int] | None"]
connection_sources: list[ConnectionSource] = []  # one per integration, added at its import

# With nothing happening, a sample is still written this often, so a reader can tell an
# idle process from a dead one without the file growing by two lines a second.
_IDLE_EVERY_S = 30.0


class ProcessState:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.prefix = secrets.token_hex(4)
        self.ids = itertools.count(1)
        self.in_flight = 0
        self.requests = 0
        # Sampler wake-ups: what the request path looks at to re-check, at most once a
        # sample, what is too costly to check per request (an OpenTelemetry provider).
        self.ticks = 0
        self.rss: int | None = None
        self.loop_thread: int | None = None
        self.loop_busy: float | None = None  # the latest sample's busy share
        self.loop_lag: float | None = None  # the latest sample's worst lag (s)
        self._lag_max = 0.0  # worst lag since the last sample (s), kept by the probe
        self.sinks: list[ProcessSink] = []
        self.interval = 0.5
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add_sink(self, sink: ProcessSink) -> None:
        if sink not in self.sinks:
            self.sinks.append(sink)

    def ensure_sampler(self, interval: float) -> None:
        """Start the sampler thread once per process (again in a forked child)."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is not None:
                return
            self.interval = interval
            # One quick reading now (once per process): the first requests must not end
            # before the sampler thread's first, slower sample.
            with contextlib.suppress(psutil.Error, OSError):
                self.rss = int(psutil.Process(self.pid).memory_info().rss)
            self._thread = threading.Thread(target=self._run, name="loopwatch-sampler", daemon=True)
            self._thread.start()

    def start_watching(
        self, loop: asyncio.AbstractEventLoop, sample_interval: float, stall_threshold: float
    ) -> None:
        """Once per process, on the loop thread: the sampler, the lag probe and the stall
        watchdog. The intervals (s) are the first caller's."""
        if self.loop_thread is not None:
            return
        self.loop_thread = threading.get_ident()
        self.ensure_sampler(sample_interval)
        dog = Watchdog(self.loop_thread, stall_threshold, self.sinks)
        monitor.watchdog = dog
        self.start_lag_probe(loop, dog.probe_interval, dog.probed)

    def watch_new_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """A loop this process did not run before, once watching has started: the lag probe
        moves to it, and the watchdog to its thread. Without this, the probe of a closed
        loop never runs again and the watchdog takes the new loop's idleness for a stall."""
        dog = monitor.watchdog
        if dog is None:
            return
        self.loop_thread = threading.get_ident()
        dog.watch_thread(self.loop_thread)
        self.start_lag_probe(loop, dog.probe_interval, dog.probed)

    def start_lag_probe(
        self, loop: asyncio.AbstractEventLoop, interval: float, alive: Callable[[], None]
    ) -> None:
        """Measure how late the loop runs a callback scheduled ``interval`` ahead: the
        scheduling lag every request on it suffers (any loop: no private hook). Each run
        calls ``alive``: the watchdog's sign of life."""

        def probe(expected: float) -> None:
            alive()
            now = loop.time()
            lag = max(0.0, now - expected)
            if lag > self._lag_max:
                self._lag_max = lag
            loop.call_at(now + interval, probe, now + interval)

        loop.call_soon(probe, loop.time())

    def _run(self) -> None:
        proc = psutil.Process(self.pid)
        last_wall = time.monotonic()
        last_cpu: int | None = None
        clock_thread: int | None = None
        last_requests = -1
        last_emit = 0.0
        while True:
            time.sleep(self.interval)
            self.ticks += 1
            try:
                rss, uss = _memory(proc)
                self.rss = rss
                now = time.monotonic()
                busy = None
                if self.loop_thread is not None:
                    if clock_thread != self.loop_thread:
                        clock_thread, last_cpu = self.loop_thread, None
                    cpu = thread_cpu_ns(clock_thread)
                    if cpu is not None and last_cpu is not None and now > last_wall:
                        busy = min(1.0, max(0.0, (cpu - last_cpu) / ((now - last_wall) * 1e9)))
                    last_cpu = cpu
                last_wall = now
                self.loop_busy = busy
                if self.loop_thread is not None:
                    self.loop_lag, self._lag_max = self._lag_max, 0.0
                active = self.requests != last_requests or self.in_flight > 0
                if not active and now - last_emit < _IDLE_EVERY_S:
                    continue
                last_requests, last_emit = self.requests, now
                used, size = _connections()
                sample = ProcessSample(
                    time=round(time.time(), 6),
                    pid=self.pid,
                    rss_bytes=rss,
                    uss_bytes=uss,
                    in_flight=self.in_flight,
                    loop_busy=None if busy is None else round(busy, 4),
                    loop_lag_ms=None if self.loop_lag is None else round(self.loop_lag * 1000, 3),
                    requests=self.requests,
                    db_connections_used_max=used,
                    db_connections_max=size,
                    dropped=_dropped(),
                    errors=_failures.total(),
                )
                for sink in list(self.sinks):
                    sink(sample)
            except Exception as exc:
                _failures.failed("process sampler", exc)


def _connections() -> tuple[int | None, int | None]:
    """The instrumented pools' most connections in use at once, and their sizes, added up."""
    used = size = None
    for source in list(connection_sources):
        got = source()
        if got is not None:
            used = got[0] + (used or 0)
            size = got[1] + (size or 0)
    return used, size


def _memory(proc: psutil.Process) -> tuple[int | None, int | None]:
    try:
        full = proc.memory_full_info()
        return int(full.rss), int(getattr(full, "uss", 0)) or None
    except (psutil.Error, OSError):
        try:
            return int(proc.memory_info().rss), None
        except (psutil.Error, OSError):
            return None, None


def _dropped() -> int:
    from ..export import writer as _writer

    return sum(w.dropped for w in list(_writer._live))


state = ProcessState()


def _after_fork() -> None:
    # Reset in place: other modules hold a reference to ``state``.
    sinks = state.sinks
    state.__init__()  # type: ignore[misc]
    state.sinks = sinks
    monitor.__init__()  # type: ignore[misc]
    _failures.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
