"""What a helper process (:mod:`.helper`) works out while the report's own does the rest.

The sync workers' replays take longest, and need only the start, wall and service
times: they go to the helper that read the second part of the file, if there is one
(:mod:`.split`), as jobs it runs one after the other.

Where numpy works out the rest (:mod:`.vector`, many requests), this process is left
with less to do than the replays take: the helper sorts the traffic, sends how many
requests were in service at once (a short list), and searches for the sync workers of
the same throughput, while this one searches for those of the same latency (whose
replays, where few requests queue, are mostly worked out a whole array at a time:
vector.OnTime).

Otherwise, it sorts the requests' spans for the replays, and sends them back for
in_flight() once the search for the sync workers of the same throughput is done: by then
this process, which sorts the route times meanwhile, has freed the memory to take them
(and reads them at once: a result the helper writes while this process is busy holds the
helper up, the pipe being small); then it searches for those of the same latency.

Without a helper, or if it fails, this process works it all out itself.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, replace

from .helper import HelperError
from .quantiles import vectorised
from .queueing import (
    SyncWorkers,
    Traffic,
    concurrency,
    same_latency,
    same_throughput,
    traffic_of,
)
from .reading import Reading
from .sweep import Spans, busy
from .sweep import spans as _spans


def start(r: Reading) -> None:
    """Give the helper, if there is one, the requests' times."""
    if r.helper is not None:
        # Where numpy sorts them (:mod:`.vector`), this process sorts the spans sooner
        # than it would be sent them, and searches for the sync workers of the same
        # latency itself while the helper searches for those of the same throughput.
        r.helper_spans = not vectorised(len(r.start))
        try:
            r.helper.submit(prepare, r.start, r.wall, r.service, r.helper_spans)
            r.helper_skip = 1  # (prepare()'s result: nothing)
            if r.helper_spans:
                r.helper.submit(throughput)
                r.helper_skip += 1  # (throughput()'s: latency()'s will have it)
                r.helper.submit(sorted_spans)
            else:
                r.helper.submit(crowding)
                r.helper.submit(throughput)
        except OSError:  # it is gone
            r.close_helper()


def give_p95(r: Reading, p95_s: float) -> None:
    """Give the helper the p95 wall time (s), once known, if it is to search for the
    sync workers of the same latency."""
    if r.helper is not None and r.helper_spans:
        try:
            r.helper.submit(latency, p95_s)
        except OSError:
            r.close_helper()


def spans(r: Reading) -> Spans | None:
    """The spans the helper sorted, or None if it was not asked for them (or failed:
    then there is no helper any more)."""
    if r.helper is None or not r.helper_spans:
        return None
    try:
        _skip(r)
        found: Spans = r.helper.result()
    except HelperError:
        r.close_helper()
        return None
    return found


def sync_workers(r: Reading, p95_s: float) -> SyncWorkers | None:
    """The sync workers, found by the helper or with it, or None (and no helper) if it
    failed."""
    if r.helper is None:
        return None
    try:
        if r.helper_spans:
            _skip(r)
            sync: SyncWorkers = r.helper.result()
            return sync
        # (the helper searching for those of the same throughput meanwhile)
        _skip(r)
        crowd: tuple[int, list[int]] = r.helper.result()
        t = traffic_of(r.start, r.service, 0.0, p95_s)
        same_p95 = same_latency(t, crowd)
        del t
        found: int = r.helper.result()
    except HelperError:
        r.close_helper()
        return None
    return SyncWorkers(found, same_p95)


def _skip(r: Reading) -> None:
    """Read the results the helper sends before the one wanted next."""
    assert r.helper is not None
    while r.helper_skip:
        r.helper.result()
        r.helper_skip -= 1


# --- the jobs, run in the helper ----------------------------------------------------------


@dataclass
class _Kept:
    """In a helper process: what the jobs found, for the jobs after them."""

    traffic: Traffic
    spans: Spans
    crowd: tuple[int, list[int]] = (0, [])
    same_throughput: int = 0


_kept: list[_Kept] = []


def prepare(
    starts: array[float], walls: array[float], services: array[float], keep: bool = True
) -> None:
    """The traffic, with the async side's busy time as in_flight() finds it, and the
    requests' spans (kept for sorted_spans() if ``keep``)."""
    t = traffic_of(starts, services, 0.0, 0.0)
    del services
    found = _spans(starts, walls, t.arrivals)
    t = replace(t, busy_s=busy(found.starts, found.ends))
    _kept[:] = [_Kept(t, found if keep else Spans(array("d"), array("d"), found.empty))]


def crowding() -> tuple[int, list[int]]:
    """concurrency() of the traffic."""
    kept = _kept[0]
    kept.crowd = concurrency(kept.traffic)
    return kept.crowd


def throughput() -> int:
    """same_throughput() of the traffic."""
    kept = _kept[0]
    if not kept.crowd[1]:
        kept.crowd = concurrency(kept.traffic)
    kept.same_throughput = same_throughput(kept.traffic, kept.crowd)
    return kept.same_throughput


def sorted_spans() -> Spans:
    return _kept[0].spans


def latency(p95_s: float) -> SyncWorkers:
    """The sync workers of the traffic."""
    kept = _kept.pop()
    return SyncWorkers(
        kept.same_throughput, same_latency(replace(kept.traffic, p95_s=p95_s), kept.crowd)
    )
