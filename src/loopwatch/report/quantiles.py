"""Sorting a million numbers, and their order statistics, without a list of them all.

``sorted()`` of an array of a million doubles builds a list of a million float objects,
32 MB, and an argsort as much again in ints and keys: more than the whole report is
allowed to grow by. So the values are sorted in parts, each kept as an array (8 bytes a
value): for percentiles, the k-th smallest value of all of them is found across the
sorted parts (:func:`kth`); times, which a record file holds nearly in order, are sorted
part after part, each merged into those before where the two overlap
(:func:`sorted_array`, :func:`argsort`).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from itertools import chain, islice
from typing import Any

PARTS = 8  # values are sorted this many parts at a time, at most
RUN = 1 << 16  # nearly sorted times are sorted this many at a time
# From this many requests on, the sorts and sweeps are numpy's (:mod:`.vector`): below,
# importing numpy (0.1 s) would take longer than the plain Python here.
VECTOR_FROM = 50_000


def vectorised(n: int) -> bool:
    """Whether ``n`` values are worked out by :mod:`.vector` (numpy)."""
    if n < VECTOR_FROM:
        return False
    try:
        from . import vector  # noqa: F401
    except ImportError:  # (a dependency, but the plain Python still works without it)
        return False
    return True


def sorted_parts(values: Iterable[float], n: int) -> list[array[float]]:
    """The ``n`` values, sorted in at most PARTS parts."""
    size = max(1, -(-n // PARTS))
    it = iter(values)
    parts = []
    while part := sorted(islice(it, size)):
        parts.append(array("d", part))
    return parts


def kth(parts: Sequence[Sequence[float]], k: int) -> float:
    """The ``k``-th smallest value (from 0) of the values of the sorted ``parts``.

    Each round counts the values below a pivot, the middle value of one part: the
    weighted median of the parts' middle values, so that a quarter of the values still
    in question at least are left out by the next round."""
    lo = [0] * len(parts)  # in each part, the values before lo are below the answer,
    hi = [len(p) for p in parts]  # ... and those from hi on above it
    while True:
        spans = list(zip(parts, lo, hi, strict=True))
        middles = sorted((p[(a + b) // 2], b - a) for p, a, b in spans if a < b)
        half, weight, pivot = sum(w for _, w in middles) / 2, 0, middles[0][0]
        for value, w in middles:
            weight += w
            if weight >= half:
                pivot = value
                break
        below = [bisect_left(p, pivot, a, b) for p, a, b in spans]
        upto = [bisect_right(p, pivot, a, b) for p, a, b in spans]
        if k < sum(below):
            hi = below
        elif k >= sum(upto):
            lo = upto
        else:
            return pivot


def percentiles(parts: Sequence[Sequence[float]], pcts: Iterable[int]) -> list[float]:
    """summary.percentile() of the values of the sorted ``parts``, at each of ``pcts``."""
    n = sum(map(len, parts))
    if n == 0:
        return [0.0 for _ in pcts]
    return [kth(parts, max(1, (pct * n + 99) // 100) - 1) for pct in pcts]


def largest(parts: Sequence[Sequence[float]]) -> float:
    return max((p[-1] for p in parts if p), default=0.0)


def merged(parts: Iterable[Sequence[float]]) -> list[float]:
    """The values of the sorted ``parts``, as one sorted list (for a few of them)."""
    return sorted(chain.from_iterable(parts))


def sorted_array(values: Sequence[float]) -> array[float]:
    """``array("d", sorted(values))``, without a list of all the values when each is
    at most about RUN places from where it belongs."""
    out: array[float] = array("d")
    for k in range(0, len(values), RUN):
        part = sorted(values[k : k + RUN])
        if not _merge_into(out, part, None):
            return array("d", sorted(values))
    return out


def argsort(keys: Sequence[float]) -> array[int]:
    """``sorted(range(len(keys)), key=keys.__getitem__)``, as sorted_array() sorts."""
    out: array[int] = array("q")
    for k in range(0, len(keys), RUN):
        part = sorted(range(k, min(len(keys), k + RUN)), key=keys.__getitem__)
        if not _merge_into(out, part, keys.__getitem__):
            return array("q", sorted(range(len(keys)), key=keys.__getitem__))
    return out


def _merge_into(out: array[Any], part: list[Any], key: Callable[[Any], float] | None) -> bool:
    """Merge the sorted ``part`` into the sorted ``out`` (``part`` coming after it: of
    equal keys, those of ``out`` first); False, with ``out`` unchanged, when the two
    overlap by more than RUN values."""
    if out and part and _at(out, -1, key) > _at(part, 0, key):
        start = bisect_right(out, _at(part, 0, key), key=key)
        if len(out) - start > RUN:
            return False
        tail = out[start:]
        del out[start:]
        end = bisect_right(part, _at(tail, -1, key), key=key)
        out.extend(sorted(chain(tail, part[:end]), key=key))
        del part[:end]
    out.extend(part)
    return True


def _at(values: Sequence[Any], i: int, key: Callable[[Any], float] | None) -> float:
    return values[i] if key is None else key(values[i])
