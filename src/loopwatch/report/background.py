"""What a helper process (:mod:`.helper`) works out while the report's own does the rest.

The sync workers' replays take longest, and need only the start, wall and service
times: they go to the helper that read the second part of the file, if there is one
(:mod:`.split`), as jobs it runs one after the other. It sorts the requests' spans for
the replays, and sends them back for in_flight() once the search for the sync workers
of the same throughput is done: by then this process, which sorts the route times
meanwhile, has freed the memory to take them (and reads them at once: a result the
helper writes while this process is busy holds the helper up, the pipe being small).
Without a helper, or if it fails, this process works it all out itself.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, replace

from .helper import HelperError
from .queueing import SyncWorkers, Traffic, concurrency, same_latency, same_throughput, traffic_of
from .reading import Reading
from .sweep import Spans, busy
from .sweep import spans as _spans


def start(r: Reading) -> None:
    """Give the helper, if there is one, the requests' times."""
    if r.helper is not None:
        try:
            r.helper.submit(prepare, r.start, r.wall, r.service)
            r.helper.submit(throughput)
            r.helper.submit(sorted_spans)
        except OSError:  # it is gone
            r.close_helper()


def give_p95(r: Reading, p95_s: float) -> None:
    """Give the helper the p95 wall time (s), once known."""
    if r.helper is not None:
        try:
            r.helper.submit(latency, p95_s)
        except OSError:
            r.close_helper()


def spans(r: Reading) -> Spans | None:
    """The spans the helper sorted, or None (and no helper) if it failed."""
    if r.helper is None:
        return None
    try:
        r.helper.result()  # prepare()'s: nothing
        r.helper.result()  # throughput()'s: nothing
        found: Spans = r.helper.result()
    except HelperError:
        r.close_helper()
        return None
    return found


def sync_workers(r: Reading) -> SyncWorkers | None:
    """The sync workers the helper found, or None (and no helper) if it failed."""
    if r.helper is None:
        return None
    try:
        sync: SyncWorkers = r.helper.result()
    except HelperError:
        r.close_helper()
        return None
    return sync


# --- the jobs, run in the helper ----------------------------------------------------------


@dataclass
class _Kept:
    """In a helper process: what the jobs found, for the jobs after them."""

    traffic: Traffic
    spans: Spans
    crowd: tuple[int, list[int]] = (0, [])
    same_throughput: int = 0


_kept: list[_Kept] = []


def prepare(starts: array[float], walls: array[float], services: array[float]) -> None:
    """The traffic, with the async side's busy time as in_flight() finds it, and the
    requests' spans."""
    t = traffic_of(starts, services, 0.0, 0.0)
    del services
    found = _spans(starts, walls, t.arrivals)
    _kept[:] = [_Kept(replace(t, busy_s=busy(found.starts, found.ends)), found)]


def throughput() -> None:
    """same_throughput() of the traffic."""
    kept = _kept[0]
    kept.crowd = concurrency(kept.traffic)
    kept.same_throughput = same_throughput(kept.traffic, kept.crowd)


def sorted_spans() -> Spans:
    return _kept[0].spans


def latency(p95_s: float) -> SyncWorkers:
    """The sync workers of the traffic."""
    kept = _kept.pop()
    return SyncWorkers(
        kept.same_throughput, same_latency(replace(kept.traffic, p95_s=p95_s), kept.crowd)
    )
