"""A small keep-alive HTTP/1.1 load generator: a fixed number of GETs over N connections.

    python loadgen.py PORT PATH REQUESTS CONNECTIONS

Prints {"rps": ..., "seconds": ...}. Raw asyncio streams, uvloop when installed; it only
needs to outrun one server process, and keeps its own CPU off the server's core.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def worker(port: int, request: bytes, todo: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while todo:
            todo.pop()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected response: {head[:40]!r}")
            await reader.readexactly(length)
    finally:
        writer.close()


async def run(port: int, path: str, requests: int, connections: int) -> float:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    todo = list(range(requests))
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(port, request, todo) for _ in range(connections)))
    return time.perf_counter() - t0


def main() -> None:
    port, path, requests, connections = (
        int(sys.argv[1]),
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
    )
    try:
        import uvloop

        seconds = uvloop.run(run(port, path, requests, connections))
    except ImportError:
        seconds = asyncio.run(run(port, path, requests, connections))
    print(json.dumps({"rps": requests / seconds, "seconds": seconds}))


if __name__ == "__main__":
    main()
