"""Time series over the report's whole period: what the HTML report charts and the
Perfetto trace draws as counter tracks.

Made from pass 1's :class:`~.stalls.LoopAcc`: each process's ``process`` samples
(requests in flight, loop busy share, loop lag, RSS, USS; every ``sample_interval``, 0.5 s
by default, while requests run) and the ``stall`` lines. A recording of hours has tens of
thousands of samples a process, so each series is cut into at most :data:`MAX_POINTS`
equal stretches of time, keeping the most of each (the mean for the busy share): a chart
of it still shows every peak. The stalls kept are the :data:`MAX_STALLS` longest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..record import Frame
from .stalls import LoopAcc

MAX_POINTS = 1500  # per process and figure
MAX_STALLS = 2000


@dataclass(frozen=True)
class ProcessSeries:
    """One process's samples in time order, at most :data:`MAX_POINTS` of them.

    ``time`` is Unix seconds (the first sample of each stretch); ``in_flight`` the most
    requests in flight at a sample of the stretch; ``loop_busy`` the mean share (0-1) of
    wall time the loop's thread was on the CPU; ``loop_lag_ms`` the worst lag (ms);
    ``rss_bytes``/``uss_bytes`` the largest sizes. None: not measured (no psutil, a
    platform without USS, the first sample's busy share). ``samples`` counts the
    samples before they were put in stretches.
    """

    pid: int
    time: list[float]
    in_flight: list[int | None]
    loop_busy: list[float | None]
    loop_lag_ms: list[float | None]
    rss_bytes: list[int | None]
    uss_bytes: list[int | None]
    samples: int

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "samples": self.samples,
            "time": self.time,
            "in_flight": self.in_flight,
            "loop_busy": self.loop_busy,
            "loop_lag_ms": self.loop_lag_ms,
            "rss_bytes": self.rss_bytes,
            "uss_bytes": self.uss_bytes,
        }


@dataclass(frozen=True)
class StallPoint:
    """One stall: when its step started (Unix s), its process, how long it held the loop
    and the CPU it used (ms), ``cause`` (``"cpu"`` or ``"blocked"``), the route of the
    request whose step it was (None: outside requests) and its code location (the stall
    line's innermost project frame, ``file:line in function``; None: no stack taken)."""

    time: float
    pid: int
    duration_ms: float
    cpu_ms: float
    cause: str
    route: str | None
    where: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "pid": self.pid,
            "duration_ms": round(self.duration_ms, 3),
            "cpu_ms": round(self.cpu_ms, 3),
            "cause": self.cause,
            "route": self.route,
            "where": self.where,
        }


@dataclass(frozen=True)
class Series:
    """The processes' series (by pid) and the longest stalls (in time order);
    ``stall_count`` counts every stall in the report's scope."""

    processes: list[ProcessSeries]
    stalls: list[StallPoint]
    stall_count: int

    def to_json(self) -> dict[str, Any]:
        return {
            "processes": [p.to_json() for p in self.processes],
            "stalls": [s.to_json() for s in self.stalls],
            "stall_count": self.stall_count,
        }


def series_of(acc: LoopAcc, max_points: int = MAX_POINTS, max_stalls: int = MAX_STALLS) -> Series:
    """The time series of what pass 1 kept in ``acc``."""
    if max_points < 1 or max_stalls < 0:
        raise ValueError("series_of: max_points must be at least 1 and max_stalls at least 0.")
    n = len(acc.sample_pid)
    if n == 0:
        return Series([], _stalls(acc, max_stalls), len(acc.stall_time))
    import numpy as np  # (here: a report without samples need not import it)

    pid = np.frombuffer(acc.sample_pid, dtype=np.int64, count=n)
    time = np.frombuffer(acc.sample_time, dtype=np.float64, count=n)
    processes = []
    for p in np.unique(pid):
        rows = np.flatnonzero(pid == p)
        rows = rows[np.argsort(time[rows], kind="stable")]
        processes.append(_process(acc, int(p), rows, max_points))
    return Series(processes, _stalls(acc, max_stalls), len(acc.stall_time))


def _process(acc: LoopAcc, pid: int, rows: Any, max_points: int) -> ProcessSeries:
    import numpy as np

    time = np.frombuffer(acc.sample_time, dtype=np.float64)[rows]
    counts = {
        name: np.frombuffer(getattr(acc, name), dtype=np.int64)[rows].astype(np.float64)
        for name in ("sample_in_flight", "sample_rss", "sample_uss")
    }
    for values in counts.values():
        values[values < 0] = np.nan  # -1: not measured
    busy = np.frombuffer(acc.sample_busy, dtype=np.float64)[rows]
    lag = np.frombuffer(acc.sample_lag, dtype=np.float64)[rows]
    if len(rows) > max_points:
        # Equal stretches of time; each sample goes to the stretch it falls in.
        t0, t1 = float(time[0]), float(time[-1])
        bucket = np.minimum(((time - t0) / ((t1 - t0) or 1.0) * max_points).astype(np.int64),
                            max_points - 1)  # fmt: skip
        starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
        time = time[starts]
        counts = {k: _most(v, starts) for k, v in counts.items()}
        lag = _most(lag, starts)
        known = ~np.isnan(busy)
        total = np.add.reduceat(np.where(known, busy, 0.0), starts)
        seen = np.add.reduceat(known.astype(np.int64), starts)
        with np.errstate(invalid="ignore", divide="ignore"):
            busy = np.where(seen > 0, total / np.maximum(seen, 1), np.nan)
    return ProcessSeries(
        pid=pid,
        time=time.tolist(),
        in_flight=_ints(counts["sample_in_flight"]),
        loop_busy=_floats(busy, 4),
        loop_lag_ms=_floats(lag, 3),
        rss_bytes=_ints(counts["sample_rss"]),
        uss_bytes=_ints(counts["sample_uss"]),
        samples=len(rows),
    )


def _most(values: Any, starts: Any) -> Any:
    """The largest value of each stretch, NaN where none was measured."""
    import numpy as np

    return np.fmax.reduceat(values, starts)


def _ints(values: Any) -> list[int | None]:
    return [None if v != v else int(v) for v in values.tolist()]


def _floats(values: Any, digits: int) -> list[float | None]:
    return [None if v != v else round(v, digits) for v in values.tolist()]


def _stalls(acc: LoopAcc, most: int) -> list[StallPoint]:
    n = len(acc.stall_time)
    order = sorted(range(n), key=acc.stall_ms.__getitem__, reverse=True)[:most]
    order.sort(key=acc.stall_time.__getitem__)
    return [
        StallPoint(
            time=acc.stall_time[i],
            pid=acc.stall_pid[i],
            duration_ms=acc.stall_ms[i],
            cpu_ms=acc.stall_cpu[i],
            cause="cpu" if acc.stall_cpu_bound[i] else "blocked",
            route=acc.routes[acc.stall_route[i]],
            where=_where(acc.locations[acc.stall_loc[i]]),
        )
        for i in order
    ]


def _where(location: Frame | None) -> str | None:
    if location is None:
        return None
    file, line, function, _ = location
    return f"{file}:{line} in {function}" if line else file
