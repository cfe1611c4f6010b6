"""What the event loop was doing between a request's steps: busy stretches and who held it.

Loop wait is time a request could have continued but the loop was running something
else. When a request resumes, the reply (or connection, or timer) it waited for arrived
at some moment loopwatch cannot see from user space on every loop. What it can see is
when the loop cannot have been idle: during every step it times, and between two timed
steps when the loop thread stayed on the CPU all along (its thread CPU clock advanced as
much as the wall clock). A loop that is idle sits in ``epoll_wait``, off the CPU. So:

- the *busy stretch* before a resume starts at the end of the last gap between timed
  steps in which the loop thread was off the CPU for more than ``IDLE_NS`` *and* went to
  sleep of its own accord (a voluntary context switch, as ``epoll_wait`` makes). Off
  the CPU without one, it was preempted by another process: busy all the same, only
  slower (on a shared machine the loop thread loses the CPU for milliseconds at a time);
- a reply that had arrived before that moment would have ended the idleness, so it
  arrived after it, and the request's loop wait is at most the part of its suspension
  that lies in the busy stretch: ``resume - max(suspended, busy stretch start)``.

This is an upper bound, tight when one long step held the loop (the case that matters),
loose by at most the true awaited time when many short steps keep the loop busy without
a break. Everything here runs on the loop thread, in the step timer, and costs a few
attribute reads and writes per step; long steps (``LONG_NS`` and more) are kept in a
small ring to name who held the loop.
"""

from __future__ import annotations

import resource
from collections import deque
from typing import TYPE_CHECKING, Any

from .. import _failures
from . import routes as _routes
from .compiled import speedups

# Off the CPU for longer than this between two timed steps: the loop may have been idle.
# Below it: preemption by another thread or the loop's own syscalls, not idleness.
IDLE_NS = 500_000
# Steps at least this long are remembered, to name who held the loop.
LONG_NS = 1_000_000
# A request whose loop wait reaches this names the step that held the loop longest.
BLOCKED_NS = 5_000_000
# Loop waits shorter than this are the loop's own cost of resuming a task: not counted.
MIN_WAIT_NS = 50_000
# Loop waits shorter than this are counted (in loop_wait_ms, and taken out of db_ms and
# pool_wait_ms) but not drawn: no segment of their own, no split of a db or pool one. A
# timeline column is wider at any usual width, and most waits under load are this short.
SEGMENT_NS = 1_000_000
RING = 256

_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)  # Linux


def voluntary_switches() -> int:
    """The loop thread's voluntary context switches so far (-1 where unknown, every
    time: then every gap off the CPU counts as possibly idle)."""
    if _RUSAGE_THREAD is None:
        return -1
    return resource.getrusage(_RUSAGE_THREAD).ru_nvcsw


class Held:
    """A long stretch the loop spent on one thing: a timed step (``trace`` is its request,
    or None for a step after its request ended) or untimed work (``trace`` None)."""

    __slots__ = ("cpu_ns", "end", "start", "trace")

    def __init__(self, start: int, end: int, cpu_ns: int, trace: Any) -> None:
        self.start = start
        self.end = end
        self.cpu_ns = cpu_ns
        self.trace = trace

    def owner(self) -> tuple[str | None, str | None, str | None]:
        """The id, method and route of the request whose step it was (Nones for none);
        the route as far as it is known while that request still runs."""
        trace = self.trace
        if trace is None:
            return None, None, None
        # (A request lets go of its scope when it ends.)
        route = _routes.route_template(trace.scope, trace.root_path) if trace.open else trace.route
        return f"{trace.id_prefix}-{trace.seq}", trace.method, route


class _PyMonitorState:
    """The clocks every step reads and writes: LoopMonitor's base. Compiled, the C step
    timer holds them as C integers (``_speedups.MonitorState``)."""

    __slots__ = ("busy_w0", "last_c1", "last_w1", "run_w0")

    busy_w0: int
    last_c1: int
    last_w1: int
    run_w0: int


if TYPE_CHECKING:
    _MonitorState = _PyMonitorState
else:
    _MonitorState = _PyMonitorState if speedups is None else speedups.MonitorState


class LoopMonitor(_MonitorState):
    """Process-wide: one event loop thread per process is what servers run."""

    __slots__ = (
        "held",
        "slept",
        "unseen_w0",
        "watchdog",
    )

    def __init__(self) -> None:
        self.busy_w0 = 0  # perf_counter_ns at the start of the current busy stretch
        self.last_w1 = 0  # wall and thread CPU clocks at the end of the last timed step
        self.last_c1 = 0
        # Voluntary context switches at the last look (a gap off the CPU, a long step's
        # end): unchanged since, the loop thread has not slept of its own accord.
        self.slept = -1
        self.run_w0 = 0  # start of the timed step running now; 0 when none runs
        # Set by the watchdog: the loop has been stuck since then in work no step timer
        # sees (a callback, a task outside requests), so that gap was not idleness.
        self.unseen_w0 = 0
        self.held: deque[Held] = deque(maxlen=RING)
        self.watchdog: Any = None  # the process's Watchdog, once started

    def long_step(self, w0: int, w1: int, cpu_ns: int, trace: Any) -> None:
        """A timed step of ``trace`` held the loop from ``w0`` to ``w1`` (LONG_NS or more)."""
        held = Held(w0, w1, cpu_ns, trace)
        self.held.append(held)
        self.slept = voluntary_switches()  # a blocking step's own sleep is not idleness
        dog = self.watchdog
        if dog is not None and w1 - w0 >= dog.threshold_ns:
            try:
                dog.step_stalled(held)
            except Exception as exc:
                _failures.failed("recording a stall", exc)

    def gap(self, w0: int, c0: int) -> None:
        """A timed step starts at ``w0``/``c0``: was the loop idle since the last one?"""
        last_w1 = self.last_w1
        off = (w0 - last_w1) - (c0 - self.last_c1)
        if off > IDLE_NS or off < -IDLE_NS:  # (negative: another thread's clock)
            slept = voluntary_switches()
            if slept == self.slept and slept >= 0 and off > 0:
                return  # preempted, not idle: the busy stretch goes on
            self.slept = slept
            unseen = self.unseen_w0
            if unseen and unseen >= last_w1:
                self.busy_w0 = unseen  # stuck, not idle: see watchdog
                self.held.append(Held(unseen, w0, c0 - self.last_c1, None))
                self.unseen_w0 = 0
            else:
                self.busy_w0 = w0
        elif w0 - last_w1 >= LONG_NS and last_w1:
            # Untimed work held the loop, on the CPU: a callback, a task outside requests.
            self.held.append(Held(last_w1, w0, c0 - self.last_c1, None))

    def holder(self, start: int, end: int) -> tuple[Held | None, int]:
        """The long stretch that overlaps ``start``-``end`` most, and by how much (ns)."""
        best, most = None, 0
        for h in reversed(self.held):  # (only the loop thread adds to it)
            if h.end <= start:
                break
            overlap = min(h.end, end) - max(h.start, start)
            if overlap > most:
                best, most = h, overlap
        return best, most


monitor = LoopMonitor()
