"""Stalls: steps that hold the event loop too long, with the line that blocks.

A daemon thread watches the loop thread. For a step the step timer is running it knows
the start, so it sleeps until the step would cross the stall threshold and, if the same
step still runs then, takes the loop thread's Python stack (``sys._current_frames()``)
while the step still blocks: the location is the blocking line, not the next ``await``.
A long stall is sampled again every threshold; distinct stacks are kept. The stall line
is written when the step ends, with its exact duration and CPU time.

Work no step timer sees (a ``call_soon`` callback, a task started outside any request)
shows as a loop that gives no sign of life: the lag probe, due every quarter threshold,
does not run. The watchdog then looks at the loop thread's stack: frames above the
loop's own (asyncio's, uvloop's) mean it is stuck in that code, not idle in ``epoll``.
Such a stall's start and end are the last and first signs of life around it (a step, a
probe run): an upper bound within one probe interval.

Nothing here runs on the request path while nothing stalls.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import threading
import time
from time import perf_counter_ns
from typing import Any

from .. import _failures
from ..record import Frame, Stall
from .loop import Held, monitor

DEFAULT_STALL_S = 0.1  # asyncio's own slow_callback_duration
MAX_FRAMES = 64
MAX_STACKS = 8  # distinct stacks kept for one stall

_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the loopwatch package
_library_dirs = tuple(
    {
        os.path.abspath(p)
        for key in ("stdlib", "platstdlib", "purelib", "platlib")
        if (p := sysconfig.get_paths().get(key))
    }
)
_loop_dirs: tuple[str, ...] = ()


def _find_loop_dirs() -> None:
    """The folders of asyncio and (once imported) uvloop: the loop's own code."""
    global _loop_dirs
    found = []
    for name in ("asyncio", "uvloop"):
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            found.append(os.path.dirname(os.path.abspath(path)))
    _loop_dirs = tuple(found)


def _is_project(filename: str) -> bool:
    if filename.startswith("<") or filename.startswith(_here):
        return False
    return not filename.startswith(_library_dirs)


def _is_loop_code(filename: str) -> bool:
    """The event loop's own machinery: asyncio, uvloop, selectors."""
    return filename.startswith(_loop_dirs) or filename.endswith(os.sep + "selectors.py")


def stack_of(frame: Any) -> tuple[Frame, ...]:
    """The frames above the loop's own machinery, innermost last; empty when the loop
    thread runs no Python code of its own (idle in ``epoll``, or in the loop's C code)."""
    out: list[Frame] = []
    while frame is not None and len(out) < MAX_FRAMES:
        code = frame.f_code
        filename = code.co_filename
        if _is_loop_code(filename) or frame is _base_frame:
            break
        out.append((filename, frame.f_lineno, code.co_name, _is_project(filename)))
        frame = frame.f_back
    out.reverse()
    return tuple(out)


# The frame that runs the loop (``asyncio.run``'s, or a script's own) when its frames are
# not asyncio's: uvloop runs the loop in C, so a task's outermost coroutine frame sits on
# it. Learned from the first request (see learn_base).
_base_frame: Any = None


def learn_base() -> None:
    """Called on the loop thread inside a request: remember the frame under the tasks."""
    global _base_frame
    frame: Any = sys._getframe(1)
    while frame is not None and frame.f_code.co_flags & 0x80:  # CO_COROUTINE
        frame = frame.f_back
    if frame is not None and not _is_loop_code(frame.f_code.co_filename):
        # Not asyncio's Handle._run: the loop's C code called the task, from this frame.
        _base_frame = frame


class Watchdog:
    """The watchdog thread of a process (started once, again in a forked child)."""

    def __init__(self, loop_thread: int, threshold_s: float, sinks: list[Any]) -> None:
        _find_loop_dirs()  # the server has imported its loop by now
        self.watch_thread(loop_thread)
        self.threshold_ns = int(threshold_s * 1e9)
        self.sinks = sinks
        self.probe_w = 0  # perf_counter_ns and loop thread CPU at the probe's last run
        self.probe_c = 0
        self.probe_interval = min(0.1, max(0.01, threshold_s / 4))
        self.stuck = False  # an untimed stall is being watched
        self.revived = 0
        # (step start, [stacks], [looks, running]) of the timed step sampled last: the
        # loop thread takes it when that step ends.
        self.samples: tuple[int, list[tuple[Frame, ...]], list[int]] = (0, [], [0, 0])
        self._thread = threading.Thread(target=self._run, name="loopwatch-watchdog", daemon=True)
        self._thread.start()

    def watch_thread(self, loop_thread: int) -> None:
        """Watch the event loop running on this thread (called on it): at start, and when
        the process runs a new loop (the next ``asyncio.run``, a server restarted in-process)."""
        self.loop_thread = loop_thread
        self._stat_path = f"/proc/self/task/{threading.get_native_id()}/stat"
        self.probe_w = perf_counter_ns()  # a fresh sign of life: the old loop's is stale

    # --- on the loop thread ---------------------------------------------------------

    def probed(self) -> None:
        """The lag probe ran: a sign of life of the loop."""
        self.probe_w = w = perf_counter_ns()
        self.probe_c = time.thread_time_ns()
        if self.stuck and not self.revived:
            self.revived = w  # the first sign of life after an untimed stall

    def step_stalled(self, held: Held) -> None:
        """A timed step of ``held.trace`` ran past the threshold: write its stall line."""
        w0 = held.start
        start_s = time.time() - (perf_counter_ns() - w0) / 1e9
        s_w0, stacks, looks = self.samples
        if s_w0 != w0:
            stacks, looks = [], [0, -1]
        trace = held.trace
        ident, method, route = held.owner()
        stall = Stall(
            time=round(start_s, 6),
            pid=os.getpid(),
            duration_ms=(held.end - w0) // 1000 / 1000,
            cpu_ms=held.cpu_ns // 1000 / 1000,
            id=ident,
            method=method,
            route=route,
            stacks=tuple(stacks),
            cause=_cause(looks, held.cpu_ns, held.end - w0),
        )
        self._emit(stall, trace)

    # --- on the watchdog thread -------------------------------------------------------

    def _run(self) -> None:
        threshold = self.threshold_ns
        idle_wait = min(threshold // 2, int(self.probe_interval * 1e9))
        unseen: list[Any] = []  # [start w, start c, detected at, stacks] of an untimed stall
        while True:
            try:
                wait = idle_wait
                now = perf_counter_ns()
                m = monitor
                w0 = m.run_w0
                if unseen:
                    if self._alive_since(unseen[2]):
                        self._end_unseen(unseen)
                        unseen = []
                    else:
                        self._sample_unseen(unseen)
                        wait = threshold
                elif w0:
                    due = w0 + threshold
                    if now >= due:
                        self._sample_step(w0)
                        wait = threshold
                    else:
                        wait = due - now
                else:
                    last = max(m.last_w1, self.probe_w)
                    overdue = now - self.probe_w > self.probe_interval * 1e9 + threshold // 4
                    if last and overdue and now - last >= threshold:
                        unseen = self._detect_unseen(last, now)
                time.sleep(wait / 1e9)
            except Exception as exc:  # a bug of ours must not end the watching
                _failures.failed("stall watchdog", exc)
                time.sleep(1.0)

    def _stack(self) -> tuple[Frame, ...]:
        frame = sys._current_frames().get(self.loop_thread)
        return stack_of(frame) if frame is not None else ()

    def _running(self) -> int:
        """1 if the loop thread is running or runnable, 0 if asleep, -1 if not known."""
        try:
            with open(self._stat_path, "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return -1
        return 1 if state == b"R" else 0

    def _sample_step(self, w0: int) -> None:
        stack = self._stack()
        running = self._running()
        if monitor.run_w0 != w0 or not stack:  # it ended meanwhile
            return
        s_w0, stacks, looks = self.samples
        if s_w0 != w0:
            self.samples = (w0, [stack], [1, running])
            return
        if stack not in stacks and len(stacks) < MAX_STACKS:
            stacks.append(stack)
        looks[0] += 1
        looks[1] = -1 if running < 0 or looks[1] < 0 else looks[1] + running

    def _detect_unseen(self, last: int, now: int) -> list[Any]:
        stack = self._stack()
        m = monitor
        if not stack or m.run_w0 or max(m.last_w1, self.probe_w) != last:
            return []  # idle, or it moved on
        start_c = self.probe_c if self.probe_w >= m.last_w1 else m.last_c1
        m.unseen_w0 = last  # the step timer's idle test: this gap was not idleness
        self.revived, self.stuck = 0, True
        return [last, start_c, now, [stack]]

    def _sample_unseen(self, unseen: list[Any]) -> None:
        stack = self._stack()
        stacks = unseen[3]
        if stack and stack not in stacks and len(stacks) < MAX_STACKS:
            stacks.append(stack)

    def _alive_since(self, t: int) -> bool:
        m = monitor
        return m.run_w0 > t or m.last_w1 > t or self.probe_w > t

    def _end_unseen(self, unseen: list[Any]) -> None:
        m = monitor
        start_w, start_c, _, stacks = unseen
        self.stuck = False
        ends = [t for t in (self.revived, m.run_w0, m.last_w1, self.probe_w) if t > start_w]
        end_w = min(ends) if ends else perf_counter_ns()
        cpu = thread_cpu_ns(self.loop_thread)
        cpu_ns = 0 if cpu is None else min(max(cpu - start_c, 0), end_w - start_w)
        stall = Stall(
            time=round(time.time() - (perf_counter_ns() - start_w) / 1e9, 6),
            pid=os.getpid(),
            duration_ms=(end_w - start_w) // 1000 / 1000,
            cpu_ms=cpu_ns // 1000 / 1000,
            stacks=tuple(stacks),
            timed=False,
        )
        if end_w - start_w >= self.threshold_ns:
            self._emit(stall, None)

    def _emit(self, stall: Stall, trace: Any) -> None:
        for sink in list(self.sinks):
            try:
                sink(stall)
            except Exception as exc:
                _failures.failed("recording a stall", exc)
        for listener in list(stall_listeners):
            try:
                listener(stall, trace)
            except Exception as exc:
                _failures.failed("stall listener", exc)


def _cause(looks: list[int], cpu_ns: int, wall_ns: int) -> str:
    """From the watchdog's looks at the thread (looks, of them running or runnable) when it
    could tell; a thread that was on the CPU for a third of the step and never seen
    asleep computed (the rest it waited to run on a busy machine)."""
    n, running = looks
    if n > 0 and running >= 0:
        return "cpu" if 2 * running >= n and 3 * cpu_ns >= wall_ns else "blocked"
    return ""


# Called with (stall, trace or None) for every stall: OpenTelemetry's span event and
# histogram. Empty unless OpenTelemetry is on.
stall_listeners: list[Any] = []


def thread_cpu_ns(thread_ident: int) -> int | None:
    """Another thread's CPU clock (the loop thread's, read from the sampler or the
    watchdog): the same on asyncio and uvloop, with no hook into either loop."""
    try:
        return time.clock_gettime_ns(time.pthread_getcpuclockid(thread_ident))
    except (AttributeError, OSError):
        return None
