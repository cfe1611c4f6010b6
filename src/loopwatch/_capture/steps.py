"""Timing a request's steps on the event loop.

A *step* is one stretch of a coroutine running on the loop between two suspensions.
:class:`StepTimer` drives a coroutine with ``send``/``throw`` itself and reads the wall
clock and the thread CPU clock around every step. It is both an awaitable (the
middleware awaits it around the app) and a coroutine (the task factory hands it to
``asyncio.Task`` for tasks a request spawns), so a request's CPU is its own even when
its work runs in anyio task groups, ``gather`` or ``create_task``.

Where the extension is built, ``StepTimer`` is its C twin (``_speedups.StepTimer``): the
same reads, writes and calls, without a Python call and a StopIteration per step; the
class here is the reference and the fallback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from contextvars import Context
from time import perf_counter_ns, thread_time_ns
from types import TracebackType
from typing import Any

from . import loop as _loop
from . import trace as _trace
from .loop import IDLE_NS, LONG_NS, MIN_WAIT_NS, monitor
from .trace import IDLE, Trace, current


class StepTimer(Coroutine[Any, Any, Any]):
    """Wrap a coroutine and charge each of its steps to ``trace`` while the trace is open."""

    __slots__ = ("_coro", "_trace")

    def __init__(self, coro: Coroutine[Any, Any, Any] | Generator[Any, Any, Any], trace: Trace):
        self._coro = coro
        self._trace = trace

    def send(self, value: Any = None) -> Any:
        trace = self._trace
        if trace.step_c0 != IDLE:  # a step already running, or the request over
            return self._coro.send(value)
        trace.step_w0 = w0 = perf_counter_ns()
        trace.step_c0 = c0 = thread_time_ns()
        # Trace.begin_step inlined, its common case without a call: the loop was neither
        # off the CPU nor held by untimed work since the last step, and this request did
        # not wait for it.
        m = monitor
        dw = w0 - m.last_w1
        off = dw - (c0 - m.last_c1)
        if off > IDLE_NS or off < -IDLE_NS or dw >= LONG_NS:
            m.gap(w0, c0)
        m.run_w0 = w0
        lw0 = trace.last_w1
        if m.busy_w0 > lw0:
            lw0 = m.busy_w0
        if w0 - lw0 >= MIN_WAIT_NS:
            trace.waited(lw0, w0)
        try:
            return self._coro.send(value)
        finally:
            # close() may have ended the step (and the request) from inside it.
            if trace.step_c0 == c0:
                trace.end_step(c0, w0)

    def throw(
        self,
        typ: type[BaseException] | BaseException,
        val: BaseException | object = None,
        tb: TracebackType | None = None,
    ) -> Any:
        # Callers use both the one-argument and the legacy three-argument form; hand the
        # inner coroutine a single exception object, the form every Python accepts.
        if isinstance(val, BaseException):
            exc = val
        elif isinstance(typ, BaseException):
            exc = typ
        else:
            exc = typ() if val is None else typ(val)
        if tb is not None:
            exc = exc.with_traceback(tb)
        trace = self._trace
        if trace.step_c0 != IDLE:
            return self._coro.throw(exc)
        trace.step_w0 = w0 = perf_counter_ns()
        trace.step_c0 = c0 = thread_time_ns()
        trace.begin_step(w0, c0)
        try:
            return self._coro.throw(exc)
        finally:
            if trace.step_c0 == c0:
                trace.end_step(c0, w0)

    def close(self) -> None:
        self._coro.close()

    __next__ = send  # how the awaiting coroutine (and a Task) sends None

    def __iter__(self) -> StepTimer:
        return self

    def __await__(self) -> StepTimer:
        return self

    # anyio and asyncio inspect a task's coroutine; show them the real one.
    @property
    def cr_running(self) -> bool:
        return bool(getattr(self._coro, "cr_running", False))

    @property
    def cr_suspended(self) -> bool:
        return bool(getattr(self._coro, "cr_suspended", False))

    @property
    def cr_frame(self) -> Any:
        return getattr(self._coro, "cr_frame", None)

    @property
    def cr_await(self) -> Any:
        return getattr(self._coro, "cr_await", None)

    @property
    def cr_code(self) -> Any:
        return getattr(self._coro, "cr_code", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._coro, name)

    def __repr__(self) -> str:
        return f"<loopwatch step timer of {self._coro!r}>"


class TaskFactory:
    """A loop task factory that charges tasks spawned during a request to that request.

    It chains the factory that was installed before it, so a user's own factory (or
    ``asyncio.eager_task_factory``) keeps working.
    """

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(
        self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
    ) -> asyncio.Future[Any]:
        context: Context | None = kwargs.get("context")
        trace = current.get() if context is None else context.get(current)
        if trace is not None and trace.open:
            coro = StepTimer(coro, trace)
        inner = self.inner
        if inner is None:
            return asyncio.Task(coro, loop=loop, **kwargs)
        task: asyncio.Future[Any] = inner(loop, coro, **kwargs)
        return task


# The step timer in C (``_speedups.StepTimer``: the same reads, writes and calls), where
# the extension was built and its clocks are the ones ``time`` reads; the class above is
# the reference and the fallback (``LOOPWATCH_PURE_PYTHON=1``).
PythonStepTimer = StepTimer


def configure() -> None:
    """Hand the compiled step timer the loop monitor and this version's thresholds (a
    benchmark that scales the ``*_NS`` constants calls it again)."""
    if COMPILED:
        _speedups.configure(
            monitor, _loop.IDLE_NS, _loop.LONG_NS, _loop.MIN_WAIT_NS,
            _trace.MERGE_GAP_NS, _trace.MAX_FLAT,
        )  # fmt: skip


def _same_clocks() -> bool:
    """Whether the extension's clocks read what ``perf_counter_ns`` and ``thread_time_ns``
    read (they do on Linux; elsewhere ``perf_counter`` may be another clock)."""
    for _ in range(3):  # (a preemption between two readings is not a disagreement)
        a = perf_counter_ns()
        w, c = _speedups.clocks()
        b = thread_time_ns()
        if a <= w <= perf_counter_ns() and abs(c - b) < 1_000_000:
            return True
    return False


COMPILED = False
if _trace.COMPILED:
    from . import _speedups

    if _same_clocks():
        Coroutine.register(_speedups.StepTimer)
        StepTimer = _speedups.StepTimer  # type: ignore[assignment,misc]
        COMPILED = True
        configure()


def install_task_factory(loop: asyncio.AbstractEventLoop) -> None:
    """Install the request-aware task factory on ``loop`` (idempotent, chains any other)."""
    existing = loop.get_task_factory()
    if type(existing) is not TaskFactory:
        loop.set_task_factory(TaskFactory(existing))
