"""The compiled request line (``_capture/_speedups.pyx``) writes, byte for byte, what the
Python reference (``Trace.python_line``) writes; ``LOOPWATCH_PURE_PYTHON=1`` turns it off.

CI runs the suite twice: built (every line in every other test is then the compiled
one) and with ``LOOPWATCH_PURE_PYTHON=1`` (every line the Python one).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from loopwatch._capture import trace as trace_module
from loopwatch._capture.loop import SEGMENT_NS
from loopwatch._capture.trace import MAX_FLAT, Trace
from loopwatch.record import BlockedBy, RequestRecord

PURE = os.environ.get("LOOPWATCH_PURE_PYTHON", "") not in ("", "0")
MS = 1_000_000
ODD_TEXT = ["/", "/items/42", "/caf\u00e9", "/\u2028", "/a\"b\\c", "/\x00\x1b\x7f", "/\udcff",
            "/\U0001f600", "", "GET", "/\n\r\t\b\f\x1f", "/a b~"]  # fmt: skip


def _speedups() -> object:
    try:
        from loopwatch._capture import _speedups
    except ImportError:
        pytest.skip("the compiled extension is not built here (no C compiler at install)")
    return _speedups


def _random_trace(rng: random.Random) -> Trace:
    start = rng.choice([0, 1_000_000_000, 25_557_200_630_440])
    end = start + rng.choice([0, 1, 999, 1000, 1001, rng.randint(0, 50 * MS)])
    unix = rng.choice([1.7e9, 1796049863.7418294, 0.0, 1e-7, 1e-4, 9.99e-5, 1e16, 9.9e15, -2.5])
    t = Trace(unix, start, "GET", "/")
    odd = rng.random() < 0.3  # text that needs escaping, or is beyond ASCII
    t.method = rng.choice(["GET", "POST", "BREW", "g\u00e9t"] if odd else ["GET", "POST"])
    t.path = rng.choice(ODD_TEXT) if odd else "/items/42"
    t.route = rng.choice([None, "/items/{id}", *ODD_TEXT] if odd else [None, "/items/{id}"])
    t.status = rng.choice([None, 200, 404, 500, 599, 0])
    t.id_prefix = rng.choice(["6135fbad", "ab12cd34"])
    t.seq = rng.choice([1, 4999, 2**40])
    t.pid = rng.choice([1, 41001, 2**31])
    t.rss = rng.choice([None, 0, 50_000_000, 2**40])
    t.error = rng.choice([None, None, "CancelledError", "Boom\u00e9" if odd else "Boom"])
    t.end_ns = end
    t.cpu_ns = rng.randint(0, max(end - start, 1))
    t.loop_ns = rng.randint(0, max(end - start, 1))
    t.queries = rng.choice([0, 1, 3, 1000])
    t.statements = rng.choice([0, 1, 2])
    t.dropped = rng.choice([0, 0, 0, 7])
    if rng.random() < 0.2:
        t.blocked_by = BlockedBy(
            rng.choice([None, "ab-1"]), rng.choice([None, "GET"]),
            rng.choice([None, "/r", "/\u00e9"]), rng.randint(0, 10**6) / 1000,
            rng.randint(0, 10**6) / 1000,
        )  # fmt: skip
    span = max(end - start, 1)
    now = start
    for _ in range(rng.choice([0, 1, 2, 3, 12])):  # loop waits: disjoint, in time order
        now += rng.randint(0, span // 4 + 1)
        length = rng.choice([rng.randint(1, SEGMENT_NS - 1), rng.randint(0, 3 * MS)])
        t.waited(now, now + length)
        now += length
    cpu_points = sorted(rng.sample(range(start, start + span + 1), min(span + 1, 6)))
    t.cpu = cpu_points[: 2 * rng.randint(0, len(cpu_points) // 2)]
    for kind in (t.db, t.pool):
        for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 5])):
            a = start + rng.randint(-MS, span + 100_000)
            if kind and rng.random() < 0.3:
                a = rng.choice(kind)  # touching another interval, or sharing its end
            kind += [a, a + rng.choice([rng.randint(0, 50_000), rng.randint(0, 5 * MS)])]
    t.open = False
    return t


@pytest.mark.skipif(PURE, reason="LOOPWATCH_PURE_PYTHON is set")
def test_the_compiled_line_is_the_python_line_byte_for_byte() -> None:
    speedups = _speedups()
    rng = random.Random(3)
    compiled = 0
    for i in range(5000):
        t = _random_trace(rng)
        rate = rng.choice([None, None, 0.1, 0.25, 1e-3])
        python = t.python_line(rate)
        fast = speedups.request_line(t, rate, SEGMENT_NS)  # type: ignore[attr-defined]
        blocked = t.blocked_by
        texts = [t.method, t.path, t.route, t.error]
        texts += [] if blocked is None else [blocked.id, blocked.method, blocked.route]
        if not all(x is None or x.isascii() for x in texts):
            # Text beyond ASCII: the Python path escapes it as json.dumps does.
            assert fast is None, i
            continue
        compiled += 1
        assert fast == python, (i, fast, python)
        assert fast.isascii()
        assert json.loads(fast) == RequestRecord.from_dict(json.loads(python)).to_dict() | (
            {} if rate is None else {"sample_rate": rate}
        )
    assert compiled > 2000, compiled


@pytest.mark.skipif(PURE, reason="LOOPWATCH_PURE_PYTHON is set")
def test_the_compiled_line_leaves_what_it_cannot_bound_to_python() -> None:
    speedups = _speedups()
    t = _random_trace(random.Random(1))
    t.status = "200"  # an app may send anything as the status: msgspec writes it
    assert speedups.request_line(t, None, SEGMENT_NS) is None  # type: ignore[attr-defined]
    assert t.line() == t.python_line()
    long = _random_trace(random.Random(2))
    long.cpu, long.db, long.pool, long.loop = [], [], [], []
    long.start_ns, long.end_ns = 0, 10 * MAX_FLAT * MS
    for i in range(MAX_FLAT):  # intervals past the cap: drawn as the Python path caps them
        long.add(long.db, i * 2 * MS, i * 2 * MS + MS)
        long.waited(i * 2 * MS + MS, i * 2 * MS + MS + 10)
    long.open = False
    assert long.line() == long.python_line()


def test_the_line_is_the_compiled_one_unless_pure_python_is_asked_for() -> None:
    if PURE:
        assert trace_module.COMPILED is False
    else:
        _speedups()
        assert trace_module.COMPILED is True
    # And the switch itself, in a fresh interpreter either way.
    code = "from loopwatch._capture import trace; print(trace.COMPILED)"
    env = {**os.environ, "LOOPWATCH_PURE_PYTHON": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_the_step_timer_is_the_compiled_one_unless_pure_python_is_asked_for() -> None:
    from loopwatch._capture import steps

    if PURE:
        assert steps.StepTimer is steps.PythonStepTimer
    else:
        assert steps.StepTimer is _speedups().StepTimer  # type: ignore[attr-defined]
    code = "from loopwatch._capture import steps; print(steps.COMPILED)"
    env = {**os.environ, "LOOPWATCH_PURE_PYTHON": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def _timers() -> list[object]:
    from loopwatch._capture import steps

    timers: list[object] = [steps.PythonStepTimer]
    if steps.COMPILED:
        timers.append(steps.StepTimer)
    return timers


@pytest.mark.parametrize("timer", _timers(), ids=lambda t: t.__module__.rsplit(".", 1)[-1])
def test_both_step_timers_time_every_step_and_pass_everything_through(timer: type) -> None:
    import asyncio
    import time

    from loopwatch._capture.loop import monitor
    from loopwatch._capture.trace import IDLE

    async def work(n: int) -> tuple[str, int]:
        for _ in range(n):
            await asyncio.sleep(0.002)  # (past the merge gap: one interval a step)
        return ("done", n)

    async def fails() -> None:
        await asyncio.sleep(0.002)
        raise KeyError("inner")

    async def cancelled(started: asyncio.Event) -> None:
        started.set()
        await asyncio.sleep(10)

    async def main() -> None:
        t = Trace(time.time(), time.perf_counter_ns(), "GET", "/")
        assert await timer(work(3), t) == ("done", 3)  # a return value comes through
        assert t.step_c0 == IDLE
        assert monitor.run_w0 == 0
        assert len(t.cpu) == 2 * 4, t.cpu  # four steps: three sleeps and the return
        assert all(a <= b for a, b in zip(t.cpu, t.cpu[1:], strict=False))
        assert 0 < t.cpu_ns <= t.cpu[-1] - t.cpu[0]
        assert t.last_w1 == t.cpu[-1]
        with pytest.raises(KeyError, match="inner"):
            await timer(fails(), t)
        assert t.step_c0 == IDLE
        assert len(t.cpu) == 2 * 6
        # throw(): cancelling a task whose coroutine is a step timer times that step too.
        started = asyncio.Event()
        task = asyncio.Task(timer(cancelled(started), t))
        await started.wait()
        last = t.last_w1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert t.step_c0 == IDLE
        assert t.last_w1 > last  # the step the cancellation ran was timed too
        # (two intervals, or fewer where a step began within MERGE_GAP_NS of the last)
        assert 2 * 7 <= len(t.cpu) <= 2 * 8
        # A timer inside a running step of the same trace stays out of the way.
        drawn = len(t.cpu)
        t.step_c0 = 12345
        assert await timer(work(0), t) == ("done", 0)
        assert t.step_c0 == 12345
        assert len(t.cpu) == drawn
        t.step_c0 = IDLE

    asyncio.run(main())
