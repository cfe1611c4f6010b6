"""What the first pass keeps for the Loop section: stalls, loop samples and loop waits.

As the rest of pass 1, only numbers in flat arrays: a recording of a blocked loop can
hold a stall and several loop-wait segments per request, a million of each. Code
locations and routes repeat, so each distinct one is kept once and stalls point at it.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..record import Frame, ProcessSample, Stall
from ..renderers.text import clean

MAX_LOCATIONS = 1000  # distinct stall locations kept apart; the rest share one
MAX_STALL_ROUTES = 1000
OTHER_LOCATION: Frame = ("(other locations)", 0, "", False)
OTHER_ROUTE = "(other routes)"

_NAN = float("nan")


@dataclass
class LoopAcc:
    """Pass 1's loop figures. Times are Unix seconds, durations milliseconds; NaN is
    "not measured" in the sample arrays."""

    sample_time: array[float] = field(default_factory=lambda: array("d"))
    sample_busy: array[float] = field(default_factory=lambda: array("d"))  # share, 0-1
    sample_lag: array[float] = field(default_factory=lambda: array("d"))  # ms
    # For the time series (``series``): whose sample, and its other figures (-1: unknown).
    sample_pid: array[int] = field(default_factory=lambda: array("q"))
    sample_in_flight: array[int] = field(default_factory=lambda: array("q"))
    sample_rss: array[int] = field(default_factory=lambda: array("q"))
    sample_uss: array[int] = field(default_factory=lambda: array("q"))
    stall_time: array[float] = field(default_factory=lambda: array("d"))
    stall_ms: array[float] = field(default_factory=lambda: array("d"))
    stall_cpu: array[float] = field(default_factory=lambda: array("d"))  # ms
    stall_cpu_bound: array[int] = field(default_factory=lambda: array("b"))  # its cause
    stall_pid: array[int] = field(default_factory=lambda: array("q"))
    stall_loc: array[int] = field(default_factory=lambda: array("I"))  # into locations
    stall_route: array[int] = field(default_factory=lambda: array("I"))  # into routes
    locations: list[Frame | None] = field(default_factory=lambda: [None])  # 0: unknown
    routes: list[str | None] = field(default_factory=lambda: [None])  # 0: no request
    # The "loop" segments of every request in the time filters (whatever its route: a
    # stall delays requests of other routes too), absolute, with a request number.
    seg_pid: array[int] = field(default_factory=lambda: array("q"))
    seg_start: array[float] = field(default_factory=lambda: array("d"))
    seg_end: array[float] = field(default_factory=lambda: array("d"))
    seg_request: array[int] = field(default_factory=lambda: array("I"))
    delayable: int = 0  # requests whose loop segments were kept
    _loc_index: dict[Frame | None, int] = field(default_factory=lambda: {None: 0})
    _route_index: dict[str | None, int] = field(default_factory=lambda: {None: 0})

    def add_sample(self, s: ProcessSample) -> None:
        self.sample_time.append(s.time)
        self.sample_busy.append(_NAN if s.loop_busy is None else s.loop_busy)
        self.sample_lag.append(_NAN if s.loop_lag_ms is None else s.loop_lag_ms)
        self.sample_pid.append(s.pid)
        self.sample_in_flight.append(_known(s.in_flight))
        self.sample_rss.append(_known(s.rss_bytes))
        self.sample_uss.append(_known(s.uss_bytes))

    def add_stall(self, s: Stall) -> None:
        self.stall_time.append(s.time)
        self.stall_ms.append(s.duration_ms)
        self.stall_cpu.append(s.cpu_ms)
        self.stall_cpu_bound.append(s.cause == "cpu")
        self.stall_pid.append(s.pid)
        self.stall_loc.append(self._location(s.location))
        self.stall_route.append(self._route(s.route))

    def add_loop_segments(
        self, pid: int, start: float, segments: Iterable[tuple[str, float, float]]
    ) -> None:
        """Keep a request's ``("loop", a, b)`` segments, from a request line the
        reference parser accepts (its known kinds are checked)."""
        kept = False
        for kind, a, b in segments:
            if kind != "loop":
                continue
            self.seg_pid.append(pid)
            self.seg_start.append(start + a / 1000)
            self.seg_end.append(start + b / 1000)
            self.seg_request.append(self.delayable)
            kept = True
        if kept:
            self.delayable += 1

    def can_extend(self, other: LoopAcc) -> bool:
        """Whether :meth:`extend` keeps apart every location and route reading on would."""
        new_locations = sum(1 for v in other.locations if v not in self._loc_index)
        new_routes = sum(1 for v in other.routes if v not in self._route_index)
        return (
            len(other.locations) < MAX_LOCATIONS
            and len(other.routes) < MAX_STALL_ROUTES
            and len(self.locations) + new_locations <= MAX_LOCATIONS
            and len(self.routes) + new_routes <= MAX_STALL_ROUTES
        )

    def extend(self, other: LoopAcc) -> None:
        """Add what ``other`` kept of the lines after those this one kept."""
        self.sample_time += other.sample_time
        self.sample_busy += other.sample_busy
        self.sample_lag += other.sample_lag
        self.sample_pid += other.sample_pid
        self.sample_in_flight += other.sample_in_flight
        self.sample_rss += other.sample_rss
        self.sample_uss += other.sample_uss
        locations = [
            _intern(v, self._loc_index, self.locations, MAX_LOCATIONS, OTHER_LOCATION)
            for v in other.locations
        ]
        routes = [
            _intern(v, self._route_index, self.routes, MAX_STALL_ROUTES, OTHER_ROUTE)
            for v in other.routes
        ]
        self.stall_time += other.stall_time
        self.stall_ms += other.stall_ms
        self.stall_cpu += other.stall_cpu
        self.stall_cpu_bound += other.stall_cpu_bound
        self.stall_pid += other.stall_pid
        self.stall_loc.extend(map(locations.__getitem__, other.stall_loc))
        self.stall_route.extend(map(routes.__getitem__, other.stall_route))
        self.seg_pid += other.seg_pid
        self.seg_start += other.seg_start
        self.seg_end += other.seg_end
        self.seg_request.extend(map(self.delayable.__add__, other.seg_request))
        self.delayable += other.delayable

    def _location(self, frame: Frame | None) -> int:
        if frame is not None:
            frame = (clean(frame[0], 300), frame[1], clean(frame[2]), frame[3])
        return _intern(frame, self._loc_index, self.locations, MAX_LOCATIONS, OTHER_LOCATION)

    def _route(self, route: str | None) -> int:
        if route is not None:
            route = clean(route)
        return _intern(route, self._route_index, self.routes, MAX_STALL_ROUTES, OTHER_ROUTE)


def _known(value: int | None) -> int:
    """A sample's count or size for a signed 64-bit array: -1 when it is missing or out of
    range (negative, or past 2**62: no process holds that)."""
    return value if value is not None and 0 <= value < 1 << 62 else -1


def _intern(value: Any, index: dict[Any, int], values: list[Any], cap: int, other: Any) -> int:
    """The position of ``value`` in ``values``, added once; past ``cap`` distinct values
    the rest share ``other``."""
    i = index.get(value)
    if i is None:
        if len(values) >= cap:
            value = other
            i = index.get(value)
        if i is None:
            i = index[value] = len(values)
            values.append(value)
    return i
