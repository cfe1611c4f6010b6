"""``python -m loopwatch``: the same as the ``loopwatch`` command."""

from .cli import run

run()
