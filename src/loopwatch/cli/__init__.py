"""The ``loopwatch`` command: ``report`` reads record files, ``demo`` shows it working."""

from .main import main, render, run

__all__ = ["main", "render", "run"]
