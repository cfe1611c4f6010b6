"""The Loop section: how busy the event loop was, how late it ran, and what held it.

Computed once from pass 1's :class:`~.stalls.LoopAcc` over the report's period (the
matched requests' first start to last end); rendered as text here and as ``loop`` in
``--json``. A stall *delayed* a request when one of the request's ``loop`` segments (time
it could have run but the loop was running something else) overlaps the stall on the
same process; the overlap is the delay.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from ..record import Frame
from ..renderers.text import fmt_count, fmt_ms, paint, wrap
from .stalls import LoopAcc
from .summary import percentile

SHOWN = 10  # stall locations listed in the text; JSON has them all


@dataclass(frozen=True)
class StallGroup:
    """The stalls at one code location. Durations in ms; ``routes`` holds None for
    stalls outside any request; ``delayed_requests`` counts other requests they held
    up, ``delayed_ms`` by how long in total."""

    location: Frame | None  # None: no stack was taken
    count: int
    total_ms: float
    max_ms: float
    cpu_ms: float
    routes: tuple[str | None, ...]
    delayed_requests: int
    delayed_ms: float
    cpu_bound: int  # stalls whose line says they computed (cause "cpu")

    @property
    def cause(self) -> str:
        """``"cpu"`` when most of its stalls computed, else ``"blocked"``: the stall lines'
        own word, which the watchdog took from the thread's state while it stalled."""
        return "cpu" if 2 * self.cpu_bound >= self.count else "blocked"

    @property
    def where(self) -> str:
        """``file:line in function``, or ``unknown location``."""
        if self.location is None:
            return "unknown location"
        file, line, function, _ = self.location
        return f"{file}:{line} in {function}" if line else file

    def to_json(self) -> dict[str, Any]:
        loc = self.location
        return {
            "location": None
            if loc is None
            else {"file": loc[0], "line": loc[1], "function": loc[2], "project": loc[3]},
            "count": self.count,
            "total_ms": round(self.total_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "cpu_ms": round(self.cpu_ms, 3),
            "cause": self.cause,
            "routes": list(self.routes),
            "delayed_requests": self.delayed_requests,
            "delayed_ms": round(self.delayed_ms, 3),
        }


@dataclass(frozen=True)
class LoopStats:
    """Loop health over the report's period. ``utilization`` is the mean busy share
    (0-1) of the process samples, None when none measured it; ``lag`` is p50, p99 and
    max of their loop lag (ms), None likewise; ``stalls`` by delay caused, then length."""

    utilization: float | None
    samples: int
    lag: tuple[float, float, float] | None
    stalls: list[StallGroup]

    @property
    def stall_count(self) -> int:
        return sum(g.count for g in self.stalls)

    def to_json(self) -> dict[str, Any]:
        lag = None
        if self.lag is not None:
            lag = dict(zip(("p50", "p99", "max"), (round(v, 3) for v in self.lag), strict=True))
        return {
            "utilization": None if self.utilization is None else round(self.utilization, 4),
            "samples": self.samples,
            "lag_ms": lag,
            "stall_count": self.stall_count,
            "stalls": [g.to_json() for g in self.stalls],
        }


def summarise_loop(acc: LoopAcc, first: float, last: float, slack: float) -> LoopStats:
    """The loop figures of [``first``, ``last``] (Unix s); samples up to ``slack`` s
    after ``last`` count too, as each describes the interval before it."""
    busy, lags = array("d"), array("d")
    samples = 0
    for t, b, lag in zip(acc.sample_time, acc.sample_busy, acc.sample_lag, strict=True):
        if first <= t <= last + slack:
            samples += 1
            if not math.isnan(b):
                busy.append(b)
            if not math.isnan(lag):
                lags.append(lag)
    lag_sorted = sorted(lags)
    return LoopStats(
        utilization=sum(busy) / len(busy) if busy else None,
        samples=samples,
        lag=(percentile(lag_sorted, 50), percentile(lag_sorted, 99), lag_sorted[-1])
        if lag_sorted
        else None,
        stalls=_groups(acc, first, last),
    )


def _groups(acc: LoopAcc, first: float, last: float) -> list[StallGroup]:
    segments = _by_pid(acc)
    groups: dict[int, dict[str, Any]] = {}
    for i, t in enumerate(acc.stall_time):
        ms = acc.stall_ms[i]
        end = t + ms / 1000
        if t > last or end < first:
            continue
        g = groups.setdefault(
            acc.stall_loc[i],
            {
                "n": 0,
                "total": 0.0,
                "max": 0.0,
                "cpu": 0.0,
                "routes": set(),
                "who": set(),
                "ms": 0.0,
                "cpu_bound": 0,
            },
        )
        g["n"] += 1
        g["cpu_bound"] += acc.stall_cpu_bound[i]
        g["total"] += ms
        g["max"] = max(g["max"], ms)
        g["cpu"] += acc.stall_cpu[i]
        g["routes"].add(acc.stall_route[i])
        found = segments.get(acc.stall_pid[i])
        if found is not None:
            starts, order, longest = found
            k = bisect_left(starts, t - longest)
            while k < len(starts) and starts[k] < end:
                j = order[k]
                overlap = min(acc.seg_end[j], end) - max(acc.seg_start[j], t)
                if overlap > 0:
                    g["ms"] += overlap * 1000
                    g["who"].add(acc.seg_request[j])
                k += 1
    out = [
        StallGroup(
            location=acc.locations[loc],
            count=g["n"],
            total_ms=g["total"],
            max_ms=g["max"],
            cpu_ms=g["cpu"],
            routes=tuple(acc.routes[r] for r in sorted(g["routes"])),
            delayed_requests=len(g["who"]),
            delayed_ms=g["ms"],
            cpu_bound=g["cpu_bound"],
        )
        for loc, g in groups.items()
    ]
    out.sort(key=lambda g: (-g.delayed_ms, -g.total_ms, g.where))
    return out


def _by_pid(acc: LoopAcc) -> dict[int, tuple[array[float], list[int], float]]:
    """Per pid: the loop segments' starts in order, their indices, the longest (s)."""
    order: dict[int, list[int]] = {}
    for j, pid in enumerate(acc.seg_pid):
        order.setdefault(pid, []).append(j)
    out = {}
    for pid, idx in order.items():
        idx.sort(key=acc.seg_start.__getitem__)
        starts = array("d", (acc.seg_start[j] for j in idx))
        longest = max(acc.seg_end[j] - acc.seg_start[j] for j in idx)
        out[pid] = (starts, idx, longest)
    return out


# --- rendering ----------------------------------------------------------------------------


def who(routes: tuple[str | None, ...]) -> str:
    """The routes of a stall group in words: ``route /a``, ``no request``, …"""
    named = [r for r in routes if r is not None]
    parts = []
    if named:
        parts.append(("route " if len(named) == 1 else "routes ") + ", ".join(named))
    if None in routes:
        parts.append("no request")
    return " and ".join(parts)


def render(s: LoopStats, width: int, color: bool) -> str:
    lines = [paint("Loop", "1", color)]
    if s.utilization is None and s.lag is None:
        health = "Busy share and lag: not measured in this period."
    else:
        if s.utilization is None:  # (the first sample has no interval to measure)
            busy = f"Busy share not measured ({fmt_count(s.samples, 'sample')})"
        else:
            busy = (
                f"Busy {s.utilization:.1%} of the time "
                f"(loop thread CPU, {fmt_count(s.samples, 'sample')})"
            )
        lag = (
            "not measured"
            if s.lag is None
            else "p50 {}, p99 {}, max {}".format(*map(fmt_ms, s.lag))
        )
        health = f"{busy}; lag {lag}."
    lines += wrap(health, width, "  ", "    ")
    if not s.stalls:
        lines += wrap(
            "No stalls: no step held the loop long enough to be recorded.", width, "  ", "    "
        )
        return "\n".join(lines) + "\n"
    total = sum(g.total_ms for g in s.stalls)
    head = f"{fmt_count(s.stall_count, 'stall')}, {fmt_ms(total)} in total, by code location:"
    lines += wrap(head, width, "  ", "    ")
    for g in s.stalls[:SHOWN]:
        lines += wrap(_group_line(g), width, "  - ", "    ")
    rest = s.stalls[SHOWN:]
    if rest:
        n = sum(g.count for g in rest)
        more = f"… and {fmt_count(len(rest), 'more location')}: {fmt_count(n, 'stall')}, "
        lines += wrap(more + f"{fmt_ms(sum(g.total_ms for g in rest))}.", width, "  ", "    ")
    return "\n".join(lines) + "\n"


def _group_line(g: StallGroup) -> str:
    cause = "CPU-bound" if g.cause == "cpu" else "blocked"
    worst = f", worst {fmt_ms(g.max_ms)}" if g.count > 1 else ""
    delayed = (
        f"delayed {fmt_count(g.delayed_requests, 'other request')} by {fmt_ms(g.delayed_ms)}"
        if g.delayed_requests
        else "delayed no other request"
    )
    return (
        f"{g.where}: {fmt_count(g.count, 'stall')}, {fmt_ms(g.total_ms)}{worst}, "
        f"CPU {fmt_ms(g.cpu_ms)} ({cause}), {who(g.routes)}; {delayed}."
    )
