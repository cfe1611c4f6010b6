"""loopwatch's own failures: caught, counted, logged once per kind, never raised into the app."""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("loopwatch")

_lock = threading.Lock()
_counts: dict[str, int] = {}


def failed(where: str, exc: BaseException | None = None, detail: str = "") -> None:
    """Count one failure of kind ``where``; the first of each kind is logged."""
    with _lock:
        n = _counts.get(where, 0) + 1
        _counts[where] = n
    if n == 1:
        logger.error(
            "loopwatch: %s failed%s%s; the app is unaffected, further failures of this kind "
            "are counted but not logged.",
            where,
            f": {detail}" if detail else "",
            f" ({type(exc).__name__}: {exc})" if exc is not None else "",
        )


def total() -> int:
    """All failures counted in this process so far."""
    with _lock:
        return sum(_counts.values())


def counts() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def reset() -> None:
    """Forget the counts (a forked child starts its own)."""
    global _lock
    _lock = threading.Lock()
    _counts.clear()
