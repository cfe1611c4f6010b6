"""The sync counterfactual: worker processes needed for the concurrency observed.

A sync worker serves one request at a time, so serving N requests at once without
queuing takes N workers, each about one process of this app. The model and its limits
are in docs/capacity.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..renderers.text import fmt_bytes, fmt_count, paint, wrap
from .summary import Summary

X = "\u00d7"  # the multiplication sign


@dataclass(frozen=True)
class Capacity:
    workers_peak: int  # sync workers for the peak in-flight count
    workers_p95: int
    worker_rss: int | None  # one worker: the smallest RSS measured of this app's processes
    worker_uss: int | None  # its unique memory, where known (fork sharing)
    async_processes: int
    async_rss: int | None  # the async processes' peak RSS, added up
    loop_busy_max: float | None

    @classmethod
    def of(cls, s: Summary) -> Capacity:
        low = [p.rss_low for p in s.processes if p.rss_low is not None]
        uss = [p.uss_low for p in s.processes if p.uss_low is not None]
        peaks = [p.rss_peak for p in s.processes if p.rss_peak is not None]
        busy = [p.loop_busy_max for p in s.processes if p.loop_busy_max is not None]
        return cls(
            workers_peak=s.in_flight.peak,
            workers_p95=s.in_flight.p95,
            worker_rss=min(low) if low else None,
            worker_uss=min(uss) if uss else None,
            async_processes=max(1, len(s.processes)),
            async_rss=sum(peaks) if peaks else None,
            loop_busy_max=max(busy) if busy else None,
        )

    def sync_bytes(self, workers: int) -> int | None:
        """No sharing: every worker holds a whole process (the upper bound)."""
        return None if self.worker_rss is None else workers * self.worker_rss

    def shared_bytes(self, workers: int) -> int | None:
        """Forked workers share copy-on-write pages: one RSS, then a USS per extra worker."""
        if self.worker_rss is None or self.worker_uss is None:
            return None
        return self.worker_rss + (workers - 1) * min(self.worker_uss, self.worker_rss)

    def to_json(self) -> dict[str, Any]:
        sync, shared = self.sync_bytes(self.workers_peak), self.shared_bytes(self.workers_peak)
        return {
            "sync_workers_peak": self.workers_peak,
            "sync_workers_p95": self.workers_p95,
            "worker_rss_bytes": self.worker_rss,
            "worker_uss_bytes": self.worker_uss,
            "sync_bytes_peak": sync,
            "sync_bytes_p95": self.sync_bytes(self.workers_p95),
            "sync_shared_bytes_peak": shared,
            "sync_shared_bytes_p95": self.shared_bytes(self.workers_p95),
            "async_processes": self.async_processes,
            "async_bytes": self.async_rss,
            "sync_to_async_memory": _ratio(sync, self.async_rss),
            "sync_shared_to_async_memory": _ratio(shared, self.async_rss),
            "loop_busy_max": self.loop_busy_max,
        }


def _ratio(a: int | None, b: int | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def render(c: Capacity, width: int, color: bool) -> str:
    lines = wrap(
        "Capacity: the workers to serve the same concurrency without queuing",
        width,
        "",
        "  ",
    )
    lines = [paint(line, "1", color) for line in lines]
    n, p95 = c.workers_peak, c.workers_p95
    rss = c.worker_rss
    rows: list[tuple[str, str, str, str]] = []  # label, count, the rest, colour
    if rss is None:
        rest = f"(p95: {fmt_count(p95, 'worker')}); process memory was not measured"
    else:
        total, total_p95 = fmt_bytes(n * rss), fmt_bytes(p95 * rss)
        rest = f"{X} ~{fmt_bytes(rss)} = ~{total}   (p95: {fmt_count(p95, 'worker')}, ~{total_p95})"
    rows.append(("SYNC  (one request per worker):", f"{n:,}", _noun(n, "worker") + rest, "31"))
    shared = c.shared_bytes(n)
    if shared is not None and n > 1:
        uss = fmt_bytes(min(c.worker_uss or 0, rss or 0))
        rest = f"~{fmt_bytes(rss or 0)} + {n - 1:,} {X} {uss} unique (USS) = ~{fmt_bytes(shared)}"
        rows.append(("      forked from one parent:", "", rest, "33"))
    k = c.async_processes
    who = "this process" if k == 1 else "these processes"
    if c.async_rss is None:
        rest = "memory not measured"
    elif k == 1:
        rest = f"{X} {fmt_bytes(c.async_rss)}"
    else:
        rest = f"{X} ~{fmt_bytes(c.async_rss / k)} = {fmt_bytes(c.async_rss)}"
    rows.append((f"ASYNC ({who}, measured):", f"{k:,}", _noun(k, "process") + rest, "32"))
    label_w = max(len(r[0]) for r in rows)
    count_w = max(len(r[1]) for r in rows)
    for label, count, rest, sgr in rows:
        lines += _row(label.ljust(label_w), f"{count:>{count_w}} {rest}", sgr, width, color)
    sync_bytes = c.sync_bytes(n)
    if sync_bytes is not None and c.async_rss:
        ratio = f"Sync would take {sync_bytes / c.async_rss:.1f}{X} the memory measured"
        if shared is not None and n > 1:
            ratio += f" ({shared / c.async_rss:.1f}{X} with fork sharing)"
        lines += wrap(ratio + ".", width, "  ", "    ")
    if c.loop_busy_max is not None and c.loop_busy_max >= 0.8:
        lines += wrap(
            f"The event loop was busy up to {c.loop_busy_max:.0%} of the time: at more "
            "concurrency requests would queue for the CPU, in any model.",
            width,
            "  ",
            "    ",
        )
    return "\n".join(lines) + "\n"


def _noun(n: int, noun: str) -> str:
    return fmt_count(n, noun).split(" ", 1)[1] + " "


def _row(label: str, text: str, sgr: str, width: int, color: bool) -> list[str]:
    """``label`` and ``text`` on one line when they fit, else ``text`` on the lines below."""
    if len(label) + len(text) + 5 <= width:
        return [f"  {paint(label, sgr, color)}   {text}"]
    head = [paint(line, sgr, color) for line in wrap(label.strip(), width, "  ", "  ")]
    return head + wrap(text.strip(), width, "    ", "    ")
