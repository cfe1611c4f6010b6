"""The optional C extension (``_speedups``, built from ``_speedups.pyx`` where a C
compiler was found at install), or None: not built, or ``LOOPWATCH_PURE_PYTHON`` set to
anything but ``""``, ``0``, ``false``, ``no`` or ``off``, or built from another version
of the source (``INTERFACE`` differs: a stale build in a source tree). The Python code is
the reference and the fallback for everything it holds."""

from __future__ import annotations

import contextlib
import os
from types import ModuleType

INTERFACE = 2  # what _speedups.pyx must declare: raised whenever what it offers changes

speedups: ModuleType | None = None
if os.environ.get("LOOPWATCH_PURE_PYTHON", "").lower() in ("", "0", "false", "no", "off"):
    with contextlib.suppress(ImportError):  # not built: the Python path
        from . import _speedups as speedups
    if getattr(speedups, "INTERFACE", None) != INTERFACE:
        speedups = None
