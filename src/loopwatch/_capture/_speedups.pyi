from typing import Any

INTERFACE: int

def request_line(trace: Any, sample_rate: float | None, segment_ns: int) -> bytes | None: ...

class StepState:
    cpu_ns: int
    last_w1: int
    step_c0: int
    step_w0: int

class MonitorState:
    busy_w0: int
    last_c1: int
    last_thread: int
    last_w1: int
    run_w0: int

def configure(
    monitor: Any,
    idle_ns: int,
    long_ns: int,
    min_wait_ns: int,
    merge_gap_ns: int,
    max_flat: int,
    adjacent_ns: int,
) -> None: ...
def clocks() -> tuple[int, int]: ...

class StepTimer:
    def __init__(self, coro: Any, trace: Any) -> None: ...
    def send(self, value: Any = None) -> Any: ...
    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any: ...
    def close(self) -> None: ...
    def __next__(self) -> Any: ...
    def __iter__(self) -> StepTimer: ...
    def __await__(self) -> StepTimer: ...
