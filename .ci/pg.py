"""A PostgreSQL for CI's further test runs, started with pgserver from the main venv.

    python .ci/pg.py DIR > DIR/dsn &   # writes the DSN, serves until SIGTERM

pgserver has no wheel for every Python the suite runs on (none for 3.13): those runs, and
the others too (a start each saved), reach this one through LOOPWATCH_TEST_DSN.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from loopwatch.cli.demo import database


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exit through the cleanup
    with database(None, Path(sys.argv[1])) as dsn:
        print(dsn, flush=True)
        while True:
            signal.pause()


if __name__ == "__main__":
    main()
