"""The first pass's typed fast path: a request line it takes is one the reference parser
accepts, with the values the reference parser reads; what it leaves, the slow path
decides, so that reading a file gives what reading it all through the reference parser
gives, malformed lines and their reasons included."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopwatch.record import Meta, RecordError, RequestRecord
from loopwatch.report import fastpath, firstpass, sources
from loopwatch.report.fastpath import Request, decode_block, decode_line, segments_run_forwards

from .readings import read, snapshot

T0 = 1_800_000_000.0
BIG = 10**400


def base(n: int, rng: random.Random) -> dict[str, Any]:
    """A valid request line's object, its numbers drawn at random."""
    segments = []
    at = 0.0
    for _ in range(rng.randint(0, 5)):
        step = round(rng.expovariate(1.0), rng.choice([1, 3, 6, 17]))
        segments.append([rng.choice(["cpu", "db", "pool", "loop"]), at, at + step])
        at += step
    d = RequestRecord(
        id=f"r{n}",
        pid=rng.choice([1, 2, 40001, 2**62]),
        start=T0 + rng.uniform(0, 1000),
        method=rng.choice(["GET", "POST", "get"]),
        path=f"/items/{n}",
        route=rng.choice(["/items/{item_id}", "/", None, "/caf\u00e9"]),
        status=rng.choice([200, 404, 500, None]),
        wall_ms=at + rng.random(),
        cpu_ms=rng.uniform(0, at + 1),
        db_ms=rng.choice([0.0, 1, rng.uniform(0, 100)]),
        pool_wait_ms=rng.choice([0.0, rng.uniform(0, 10)]),
        db_queries=rng.choice([0, 1, 3]),
        rss_bytes=rng.choice([None, 52_000_000, 0]),
        loop_wait_ms=rng.choice([0.0, 0.0, 2.5]),
        db_statements=rng.choice([None, 2]),
        error=rng.choice([None, None, "ValueError"]),
    ).to_dict()
    d["segments"] = segments
    return d


ODD: list[Any] = [None, True, False, -1, 0, 7, 1.5, -0.0, 2e10, 1e308, math.nan, math.inf]
ODD += [BIG, -BIG, 2**63, 2**64, 2**40 + 1, "x", "", [], {}, [1, 2, 3], 1e-400]
SEGMENTS: list[Any] = [
    ["cpu", 2.0, 1.0],
    ["cpu", 0, 1],
    ["gpu", math.nan, "x"],  # a later kind: its numbers are not read
    ["cpu", True, 1.0],
    ["cpu", 0.0, math.inf],
    ["cpu", 0.0],
    ["cpu", 0.0, 1.0, 2.0],
    [1, 0.0, 1.0],
    ["cpu", 0.0, BIG],
    ["loop", 1.0, 1.0],
    ["db", -0.0, 0.0],
    "cpu",
    None,
]
TEXTS = [  # lines as text, where json.dumps would not write them
    '{{"type":"request",{body},"type":"process"}}',
    '{{"type":"process",{body},"type":"request"}}',
    '{{"type":"request",{body},"type":"request"}}',
    '{{"t\\u0079pe":"request",{body}}}',
    '{{"type":"req\\u0075est",{body}}}',
    '{{"type":"request",{body},"w\\u0061ll_ms":3.5}}',
    '{{"type":"request",{body},"wall_ms":-1}}',
    '{{"type":"request",{body},"route":"\\ud800"}}',
    '{{"type":"request",{body},"extra":"\\ud800"}}',
    '{{"type":"request",{body},"extra":NaN}}',
    '{{"type":"request",{body},"extra":1e999}}',
    '{{"type":"request",{body},"extra":[[[[[[[[[[{{}}]]]]]]]]]]}}',
    '\ufeff{{"type":"request",{body}}}',
    '  {{"type":"request",{body}}}\r',
    '{{"type":"request",{body}}} {{}}',
    '{{"type":"request",{body}}},',
    '{{"type":"request",{body}}},{{"type":"request",{body}}}',
    '{{"type":"request",{body}}}\n',
    '[{{"type":"request",{body}}}]',
    '{{"type":"request",{body},}}',
    '{{"type":"request",{body},"extra":"a\tb"}}',
    "{{{body}}}",
    '{{"type":null,{body}}}',
    '{{"type":"meta","version":1,"pid":1,"started":1.0}}',
    '{{"type":"meta","version":2,"pid":2,"started":1.0}}',  # pid 2's next lines: skipped
    '{{"type":"meta","version":1,"pid":2,"started":1.0}}',  # ... until this one
    '{{"type":"process","time":1.0,"pid":1,"rss_bytes":null,"uss_bytes":null}}',
    '{{"type":"future",{body}}}',
    "",
    "   ",
    "1",
    "null",
]


def mutations(rng: random.Random) -> Iterator[bytes]:
    """Request lines: valid ones, and ones with a field missing, odd, or mangled."""
    for n in range(300):
        yield json.dumps(base(n, rng)).encode()
    d = base(0, rng)
    d["blocked_by"] = {"id": "x", "method": "GET", "route": None, "held_ms": 1, "cpu_ms": 0}
    keys = [k for k in d if k != "type"] + ["segments_dropped", "blocked_by.held_ms"]
    keys += ["blocked_by.route", "blocked_by.extra"]
    for key in keys:
        for value in [..., *ODD]:  # ...: left out
            e = json.loads(json.dumps(d))
            where, name = (e["blocked_by"], key.split(".")[1]) if "." in key else (e, key)
            if value is ...:
                where.pop(name, None)
            else:
                where[name] = value
            yield json.dumps(e).encode()
    for seg in SEGMENTS:
        e = json.loads(json.dumps(d))
        e["segments"].append(seg)
        yield json.dumps(e).encode()
    body = json.dumps({k: v for k, v in d.items() if k != "type"})[1:-1]
    for text in TEXTS:
        yield text.format(body=body).encode()
    yield json.dumps(d).encode().replace(b'"id": "r0"', b'"id": "r\xff"')
    yield json.dumps(d).encode()[:-1] + b', "extra": "\xff"}'
    yield json.dumps(d).encode()[:-1] + b', "extra": "\xed\xa0\x80"}'
    for _ in range(3000):  # bytes dropped, doubled, swapped in a valid line
        line = bytearray(json.dumps(base(0, rng), separators=(",", ":")).encode())
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(line))
            kind = rng.randrange(3)
            if kind == 0:
                del line[i]
            elif kind == 1:
                line.insert(i, line[i])
            else:
                line[i] = rng.choice(b'{}[]:,"0.-e\\ tfn\x00\xff')
        yield bytes(line)


def reference(line: bytes) -> RequestRecord | None:
    """The request the reference parser reads from ``line`` (whole JSON, as pass 1 reads
    lines), if it is one pass 1 counts: a plausible start, a pid in 64 bits."""
    try:
        d = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if type(d) is not dict or d.get("type") != "request":
        return None
    try:
        r = RequestRecord.from_dict(d)
    except (RecordError, OverflowError):
        return None
    return r if 0.0 <= r.start < 1e11 and -(2**63) <= r.pid < 2**63 else None


def fast(line: bytes) -> Request | None:
    value = decode_line(line)
    return value if type(value) is Request and segments_run_forwards([value]) else None


def lines() -> list[bytes]:
    return [x for x in mutations(random.Random(13)) if b"\n" not in x]


def test_a_line_the_fast_path_takes_the_reference_parser_reads_the_same() -> None:
    taken = 0
    for line in lines():
        q = fast(line)
        if q is None:
            continue
        taken += 1
        r = reference(line)
        assert r is not None, line
        got = (q.id, q.pid, q.start, q.method, q.path, q.route, q.status, q.error)
        assert got == (r.id, r.pid, r.start, r.method, r.path, r.route, r.status, r.error)
        got_ms = (q.wall_ms, q.cpu_ms, q.db_ms, q.pool_wait_ms, q.loop_wait_ms)
        assert got_ms == (r.wall_ms, r.cpu_ms, r.db_ms, r.pool_wait_ms, r.loop_wait_ms)
        assert (q.db_queries, q.db_statements) == (r.db_queries, r.db_statements)
        assert (q.rss_bytes, q.segments_dropped) == (r.rss_bytes, r.segments_dropped)
        assert tuple(q.segments) == r.segments
        ref_ms = (r.wall_ms, r.cpu_ms, r.db_ms, r.pool_wait_ms, r.loop_wait_ms)
        assert [math.copysign(1, v) for v in got_ms] == [math.copysign(1, v) for v in ref_ms]
    assert taken > 300  # (the valid ones at least)


def test_the_fast_path_leaves_the_lines_the_reference_parser_reads_differently() -> None:
    # The other way round: what the reference accepts but the fast path leaves is what
    # the slow path is for. It must not be every line.
    left = [x for x in lines() if reference(x) is not None and fast(x) is None]
    assert 0 < len(left) < 200


def test_a_block_decodes_as_its_lines_do() -> None:
    rng = random.Random(5)
    corpus = lines()
    for _ in range(3000):
        block = rng.sample(corpus, rng.randint(1, 4))
        data = b"".join(x + b"\n" for x in block)
        values = decode_block(data, len(block))
        if values is not None:
            assert values == [decode_line(x) for x in block], block
        else:
            assert any(decode_line(x) is None for x in block), block


# Bytes read (and decoded) at a time, and the share of blocks decoded whole.
@pytest.mark.parametrize(("block", "whole"), [(600, 0.1), (1 << 16, 0.0)])
def test_a_file_reads_as_if_every_line_went_through_the_reference_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int, whole: float
) -> None:
    # Blocks of a few lines: many blocks whole, and among them the lines the fast path
    # decodes but must not keep, like a segment running backwards.
    corpus = lines()
    random.Random(3).shuffle(corpus)
    valid = [x for x in corpus if reference(x) is not None]
    corpus = [x for pair in zip(corpus, valid * 4, strict=False) for x in pair]
    meta = Meta(pid=1, started=T0).to_json().encode()
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"".join(x + b"\n" for x in [meta, *corpus]))
    monkeypatch.setattr(sources, "BLOCK", block)
    blocks = []
    monkeypatch.setattr(firstpass, "decode_block", _recording(blocks))
    got = snapshot(read([str(path)]))
    assert sum(v is not None for v in blocks) >= len(blocks) * whole
    # As the first pass read every line before it had a fast path: through json and the
    # reference parser's checks.
    monkeypatch.setattr(firstpass, "decode_block", lambda data, n: None)
    monkeypatch.setattr(firstpass, "decode_line", lambda line: None)
    reading = read([str(path)])
    assert got == snapshot(reading)
    accepted = list(readable(corpus))
    assert reading.files[0].requests == len(accepted)
    assert list(reading.start) == [r.start for r in accepted]


def readable(lines: list[bytes]) -> Iterator[RequestRecord]:
    """The requests reference() reads, but for those of a process whose meta line said
    it wrote another version of the format."""
    other: set[int] = set()
    for line in lines:
        r = reference(line)
        if r is not None and r.pid not in other:
            yield r
        elif line.startswith(b'{"type":"meta"'):
            d = json.loads(line)
            (other.add if d["version"] != 1 else other.discard)(d["pid"])


def _recording(blocks: list[Any]) -> Any:
    def decode(data: bytes, n: int) -> list[Any] | None:
        values = fastpath.decode_block(data, n)
        blocks.append(values)
        return values

    return decode


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("wall_ms", True),
        ("wall_ms", math.nan),
        ("pid", 2**63),
        ("segments", [["cpu", 2.0, 1.0]]),  # typed, then found to run backwards
        ("segments", [["cpu", "x", 1.0]]),
        ("route", 5),
        ("start", 1e12),
    ],
)
def test_a_malformed_request_is_given_the_reference_parser_s_reason(
    tmp_path: Path, field: str, value: Any
) -> None:
    rng = random.Random(1)
    good = [json.dumps(base(n, rng)) for n in range(3)]
    bad = base(3, rng)
    bad[field] = value
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join([Meta(pid=1, started=T0).to_json(), *good, json.dumps(bad)]) + "\n")
    info = read([str(path)]).files[0]
    try:
        record = RequestRecord.from_dict(json.loads(json.dumps(bad)))
    except RecordError as exc:
        why = str(exc).rstrip(".")
    else:
        why = (
            "field 'pid' is not a process id"
            if record.pid >= 2**63
            else "field 'start' is not a plausible Unix time"
        )
    assert (info.malformed, info.first_malformed) == (1, f"line 5: {why}")
