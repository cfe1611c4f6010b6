"""One step of the step timer, in-process: what the compiled and the Python timers cost.

    python benchmarks/step_timer.py [--steps 100000] [--repeat 7]

Each measured call creates a step timer around a coroutine that returns at once and
sends it one value: one whole step, the clocks and the trace's interval list included.
Printed: ns per call, best of ``--repeat`` runs, next to the bare coroutine and four
clock reads for scale.
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable

from loopwatch._capture import steps
from loopwatch._capture.trace import Trace


async def _nothing() -> None:
    return None


def _bare() -> None:
    coro = _nothing()
    try:  # noqa: SIM105 (contextlib.suppress would add its own cost to what is timed)
        coro.send(None)
    except StopIteration:
        pass


def _clocks() -> None:
    time.thread_time_ns()
    time.thread_time_ns()
    time.perf_counter_ns()
    time.perf_counter_ns()


def _timed(timer: type, trace: Trace) -> Callable[[], None]:
    def step() -> None:
        trace.cpu.clear()
        coro = timer(_nothing(), trace)
        try:  # noqa: SIM105
            coro.send(None)
        except StopIteration:
            pass

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    trace = Trace(time.time(), time.perf_counter_ns(), "GET", "/")
    runs = [("bare coroutine", _bare), ("four clock reads", _clocks)]
    runs.append(("Python step timer", _timed(steps.PythonStepTimer, trace)))
    if steps.COMPILED:
        runs.append(("compiled step timer", _timed(steps.StepTimer, trace)))
    else:
        print("(the compiled step timer is not in use here)")
    for name, call in runs:
        best = min(timeit.repeat(call, number=args.steps, repeat=args.repeat))
        print(f"{name:22} {best / args.steps * 1e9:8.0f} ns")


if __name__ == "__main__":
    main()
