"""The diagnosis a report leads with: where the requests waited, and what to do about it.

The rule (docs/report.md says the same):

- **The loop** is named when requests waited for it more than for the database and the
  pool together, and that wait is at least 5 % of all wall time; or when recorded stalls
  delayed other requests by at least 10 % of all wall time. The diagnosis names the stalls
  that delayed the most (route, code location, cost to others) and the kind of fix: off
  the loop, never a bigger pool.
- **The pool** is named, when the loop is not, if requests waited for a connection for at
  least 10 % of all wall time and longer than for the loop.
- Otherwise there is no diagnosis.
"""

from __future__ import annotations

from ..renderers.text import fmt_count, fmt_ms, paint, wrap
from .loop import LoopStats, StallGroup, who
from .summary import Summary

LOOP_SHARE = 0.05  # loop wait, of all wall time, before the loop is named
STALL_SHARE = 0.10  # delay stalls caused others, of all wall time
POOL_SHARE = 0.10
NAMED = 3  # stall locations a diagnosis names

_FIX = {
    "blocked": "Fix: move the blocking call off the loop (`await loop.run_in_executor(None, "
    "fn)` or `await anyio.to_thread.run_sync(fn)`), or use an async client for it.",
    "cpu": "Fix: move the computation off the loop: into a thread "
    "(`anyio.to_thread.run_sync`) when it releases the GIL (hashing, compression, NumPy), "
    "otherwise into a process pool (`loop.run_in_executor(ProcessPoolExecutor(), fn)`).",
}


def diagnose(s: Summary, loop: LoopStats, route_filtered: bool = False) -> list[str]:
    """Sentences, most important first; empty when nothing is wrong. ``route_filtered``:
    the report covers one route, so the stalls of other routes are not in ``loop``."""
    wall = s.wall_total
    if wall <= 0:
        return []
    delayed = sum(g.delayed_ms for g in loop.stalls)
    loop_bound = s.loop_total >= LOOP_SHARE * wall and s.loop_total > s.db_total + s.pool_total
    if loop_bound or delayed >= STALL_SHARE * wall:
        return _loop(s, loop, loop_bound, delayed, route_filtered)
    if s.pool_total >= POOL_SHARE * wall and s.pool_total > s.loop_total:
        return [
            f"The connection pool is where requests waited: {fmt_ms(s.pool_total)} in total "
            f"for a connection ({s.pool_total / wall:.0%} of wall time), against "
            f"{fmt_ms(s.loop_total)} for the event loop.",
            "Every connection was in use: a larger pool helps only if the database has "
            "capacity to spare; otherwise make the queries fewer or shorter, or hold "
            "connections for less time.",
        ]
    return []


def _loop(
    s: Summary, loop: LoopStats, loop_bound: bool, delayed: float, route_filtered: bool
) -> list[str]:
    wall = s.wall_total
    if loop_bound:
        out = [
            f"The event loop, not the database or the pool, is where requests waited: "
            f"{fmt_ms(s.loop_total)} in total ({s.loop_total / wall:.0%} of wall time), "
            f"against {fmt_ms(s.db_total)} awaiting the database and "
            f"{fmt_ms(s.pool_total)} waiting for a pool connection."
        ]
    else:
        out = [
            f"Steps that held the event loop delayed other requests by {fmt_ms(delayed)} in total."
        ]
    named = [g for g in loop.stalls if g.delayed_requests][:NAMED] or loop.stalls[:1]
    for g in named:
        out.append(_held(g))
    for cause in sorted({g.cause for g in named}):
        out.append(_FIX[cause])
    if not named:
        if route_filtered:
            out.append(
                "No stall of this route held it: run the report without --route to see what did."
            )
        elif loop.utilization is not None and loop.utilization >= 0.5:
            out.append(
                f"No single step held it long (no stalls recorded): the requests' own work "
                f"kept it busy {loop.utilization:.0%} of the time. Run more processes, or "
                "do less CPU work per request."
            )
        else:
            out.append(
                "No stall was recorded to say what held it: the requests' `blocked_by` "
                "in the record file names the steps they waited behind."
            )
    if loop_bound:
        out.append(
            "A bigger connection pool would not help: the requests were not waiting for one."
        )
    return out


def _held(g: StallGroup) -> str:
    holder = who(g.routes).replace(
        "no request", "work outside any request (a background task or a callback)"
    )
    holder = holder[0].upper() + holder[1:]
    where = (
        "at an unknown location (it ended before a stack was taken)"
        if g.location is None
        else f"at {g.where}"
    )
    times = "once" if g.count == 1 else f"{g.count:,} times"
    worst = f"worst {fmt_ms(g.max_ms)}" if g.count > 1 else fmt_ms(g.max_ms)
    how = "computing" if g.cause == "cpu" else "blocked, not computing"
    cost = (
        f"it delayed {fmt_count(g.delayed_requests, 'other request')} by "
        f"{fmt_ms(g.delayed_ms)} in total"
        if g.delayed_requests
        else "it delayed no other request"
    )
    return f"{holder} held the loop {times} ({worst}, {how}) {where}: {cost}."


def render(sentences: list[str], width: int, color: bool) -> str:
    """The diagnosis as text: a heading and one wrapped paragraph per sentence."""
    if not sentences:
        return ""
    lines = [paint("Diagnosis", "1", color)]
    for text in sentences:
        lines += wrap(text, width, "  ", "    ")
    return "\n".join(lines) + "\n"
