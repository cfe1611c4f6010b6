"""The sync counterfactual, and the async side as measured.

How many sync worker processes (one request at a time each) would serve the recorded
traffic: at the async processes' p95 latency (the headline), at their throughput, and
with no request ever queuing. The first two come from replaying the recorded arrivals
and service times through W workers (:mod:`.queueing`); the model, its assumptions and
where they break are in docs/capacity.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..renderers.text import fmt_bytes, fmt_count, fmt_ms, paint, wrap
from .queueing import SyncWorkers
from .summary import Summary

X = "\u00d7"  # the multiplication sign


@dataclass(frozen=True)
class Capacity:
    """Sync workers for the traffic, each side's memory, the async side's headroom.

    Worker counts are processes; bytes are bytes; ``loop_busy_max`` is a share (0-1).
    """

    same_latency: int | None  # sync workers whose replayed p95 is within the measured
    same_throughput: int | None  # ... whose replay serves it in the same busy time
    no_queueing: int  # the most requests in flight at once: a worker each
    no_queueing_p95: int  # the p95 of the in-flight count seen at each start
    p95_ms: float  # the async side's p95 wall time
    throughput: float  # requests per second of busy time (any request in flight)
    worker_rss: int | None  # one sync worker: the smallest RSS of this app's processes
    worker_uss: int | None  # ... and its unique memory (USS)
    async_processes: int
    async_rss: int | None  # the async processes' peak RSS, added up
    async_uss: int | None  # ... and their peak USS
    loop_busy_max: float | None  # the busiest sample of any process's loop
    connections_used: int | None  # the most DB connections in use at once, added up
    connections_max: int | None  # the pools' sizes, added up

    @classmethod
    def of(cls, s: Summary, sync: SyncWorkers) -> Capacity:
        procs = s.processes
        low = [p.rss_low for p in procs if p.rss_low is not None]
        uss = [p.uss_low for p in procs if p.uss_low is not None]
        peaks = [p.rss_peak for p in procs if p.rss_peak is not None]
        uss_peaks = [p.uss_peak for p in procs if p.uss_peak is not None]
        busy = [p.loop_busy_max for p in procs if p.loop_busy_max is not None]
        used = [p.connections_used for p in procs if p.connections_used is not None]
        size = [p.connections_max for p in procs if p.connections_max is not None]
        busy_s = s.in_flight.busy_s
        return cls(
            same_latency=sync.same_latency,
            same_throughput=sync.same_throughput,
            no_queueing=s.in_flight.peak,
            no_queueing_p95=s.in_flight.p95,
            p95_ms=s.wall.p95,
            throughput=s.requests / busy_s if busy_s > 0 else 0.0,
            worker_rss=min(low) if low else None,
            worker_uss=min(uss) if uss else None,
            async_processes=max(1, len(procs)),
            async_rss=sum(peaks) if peaks else None,
            async_uss=sum(uss_peaks) if uss_peaks else None,
            loop_busy_max=max(busy) if busy else None,
            connections_used=sum(used) if used else None,
            connections_max=sum(size) if size else None,
        )

    def sync_bytes(self, workers: int | None) -> int | None:
        """``workers`` sync workers that each import the app (gunicorn without
        ``--preload``): one whole process, then each further worker's unique memory."""
        rss, uss = self.worker_rss, self.worker_uss
        if workers is None or rss is None:
            return None
        if uss is None:  # unique memory unknown: no sharing, the upper bound
            return workers * rss
        return rss + (workers - 1) * min(uss, rss)

    def headroom(self) -> float | None:
        """How many times this traffic one process's loop would take at its busiest
        sample before it is busy all the time (the database permitting)."""
        busy = self.loop_busy_max
        return None if busy is None or busy <= 0 else 1 / busy

    def to_json(self) -> dict[str, Any]:
        rss = self.worker_rss
        room = self.headroom()
        old_peak = None if rss is None else self.no_queueing * rss
        old_shared = self.sync_bytes(self.no_queueing) if self.worker_uss is not None else None
        return {
            "sync_workers_same_latency": self.same_latency,
            "sync_workers_same_throughput": self.same_throughput,
            "sync_workers_no_queueing": self.no_queueing,
            "sync_workers_no_queueing_p95": self.no_queueing_p95,
            "async_p95_ms": round(self.p95_ms, 3),
            "async_throughput_rps": round(self.throughput, 3),
            "sync_worker_rss_bytes": rss,
            "sync_worker_uss_bytes": self.worker_uss,
            "sync_preload": False,
            "sync_bytes_same_latency": self.sync_bytes(self.same_latency),
            "sync_bytes_same_throughput": self.sync_bytes(self.same_throughput),
            "sync_bytes_no_queueing": self.sync_bytes(self.no_queueing),
            "async_processes": self.async_processes,
            "async_bytes": self.async_rss,
            "async_uss_bytes": self.async_uss,
            "loop_busy_max": self.loop_busy_max,
            "loop_headroom": None if room is None else round(room, 2),
            "db_connections_used_max": self.connections_used,
            "db_connections_max": self.connections_max,
            # Deprecated (0.x): the no-queueing figures under their old names; removed in
            # the next release.
            "sync_workers_peak": self.no_queueing,
            "sync_workers_p95": self.no_queueing_p95,
            "worker_rss_bytes": rss,
            "worker_uss_bytes": self.worker_uss,
            "sync_bytes_peak": old_peak,
            "sync_bytes_p95": None if rss is None else self.no_queueing_p95 * rss,
            "sync_shared_bytes_peak": old_shared,
            "sync_shared_bytes_p95": (
                self.sync_bytes(self.no_queueing_p95) if self.worker_uss is not None else None
            ),
            "sync_to_async_memory": _ratio(old_peak, self.async_rss),
            "sync_shared_to_async_memory": _ratio(old_shared, self.async_rss),
        }


def _ratio(a: int | None, b: int | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def render(c: Capacity, width: int, color: bool) -> str:
    head = "Capacity: sync workers (one request at a time each) for this traffic"
    lines = [paint(line, "1", color) for line in wrap(head, width, "", "  ")]
    rows: list[tuple[str, str, str]] = []  # label, count, the rest
    mem = c.sync_bytes(c.same_latency)
    rows.append(
        (
            f"SYNC  same p95 latency ({fmt_ms(c.p95_ms)}):",
            _count(c.same_latency, "worker"),
            "" if mem is None else f"~{fmt_bytes(mem)}",
        )
    )
    mem = c.sync_bytes(c.same_throughput)
    rows.append(
        (
            f"      same throughput ({c.throughput:,.0f} req/s):",
            _count(c.same_throughput, "worker"),
            "" if mem is None else f"~{fmt_bytes(mem)}",
        )
    )
    rows.append(
        (
            "      no request ever queuing:",
            _count(c.no_queueing, "worker"),
            f"(the most in flight at once; p95: {c.no_queueing_p95:,})",
        )
    )
    k = c.async_processes
    if c.async_rss is None:
        rest = "memory not measured"
    else:
        rest = f"{fmt_bytes(c.async_rss)}" + (" in all" if k > 1 else "")
    rows.append(("ASYNC measured:", _count(k, "process"), rest))
    label_w = max(len(r[0]) for r in rows)
    count_w = max(len(r[1]) for r in rows)
    for i, (label, count, rest) in enumerate(rows):
        sgr = "31" if i < 3 else "32"
        lines += _row(
            label.ljust(label_w), f"{count:>{count_w}}  {rest}".rstrip(), sgr, width, color
        )
    notes = []
    if c.worker_rss is not None:
        if c.worker_uss is not None:
            uss = fmt_bytes(min(c.worker_uss, c.worker_rss))
            notes.append(
                "Sync memory: each worker imports the app (no --preload): "
                f"{fmt_bytes(c.worker_rss)} for the first, {uss} unique (USS) for each "
                "further one; forked after --preload they share more."
            )
        else:
            notes.append(
                f"Sync memory: {fmt_bytes(c.worker_rss)} a worker, no sharing (USS not measured)."
            )
    asynchronous = []
    if c.connections_used is not None and c.connections_max is not None:
        asynchronous.append(
            f"at most {c.connections_used:,} of its {c.connections_max:,} pooled database "
            "connections were in use at once"
        )
    room = c.headroom()
    if room is not None and c.loop_busy_max is not None:
        if c.loop_busy_max >= 0.8:
            asynchronous.append(
                f"its event loop was busy up to {c.loop_busy_max:.0%} of a sample: at more "
                "traffic requests queue for the CPU, in either model"
            )
        else:
            asynchronous.append(
                f"its loop was busy at most {c.loop_busy_max:.0%} of a sample, so one "
                f"process takes ~{room:.1f}{X} this traffic before its loop is busy all "
                "the time (the database permitting)"
            )
    if asynchronous:
        notes.append("Async side: " + "; ".join(asynchronous) + ".")
    for note in notes:
        lines += wrap(note, width, "  ", "    ")
    return "\n".join(lines) + "\n"


def _count(n: int | None, noun: str) -> str:
    return "?" if n is None else fmt_count(n, noun)


def _row(label: str, text: str, sgr: str, width: int, color: bool) -> list[str]:
    """``label`` and ``text`` on one line when they fit, else ``text`` on the lines below."""
    if len(label) + len(text) + 5 <= width:
        return [f"  {paint(label, sgr, color)}   {text}"]
    head = [paint(line, sgr, color) for line in wrap(label.strip(), width, "  ", "  ")]
    return head + wrap(text.strip(), width, "    ", "    ")
