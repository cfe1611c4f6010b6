"""The timeline renderer: exact text from hand-built records."""

from __future__ import annotations

import random
import re
import time

import pytest

from loopwatch.record import RequestRecord
from loopwatch.renderers import timeline
from loopwatch.renderers.timeline import render_bar, render_timeline

T0 = 1_000.0  # unix seconds; every request below starts a whole number of ms after this

ANSI = re.compile(r"\x1b\[[0-9;]*m")

LEGEND = (
    "\n"
    "  █ CPU on the event loop   ░ awaiting the database\n"
    "  ▒ waiting for a pool connection\n"
    "  ▓ waiting for the event loop   · other waiting"
)


def req(
    at_ms: float,
    wall_ms: float,
    *segments: tuple[str, float, float],
    method: str = "GET",
    path: str = "/",
    route: str | None = "/",
    status: int | None = 200,
    error: str | None = None,
) -> RequestRecord:
    return RequestRecord(
        id="r",
        pid=1,
        start=T0 + at_ms / 1000,
        method=method,
        path=path,
        route=route,
        status=status,
        wall_ms=wall_ms,
        cpu_ms=0.0,
        db_ms=0.0,
        pool_wait_ms=0.0,
        db_queries=0,
        rss_bytes=None,
        segments=segments,
        error=error,
    )


def one_row(*segments: tuple[str, float, float], wall_ms: float = 20) -> str:
    """The bar line of one request drawn at width 51: its wall time over 20 columns."""
    return render_timeline([req(0, wall_ms, *segments)], 51).splitlines()[1]


def test_staircase_of_concurrent_requests() -> None:
    requests = [
        req(10 * i, 50, ("cpu", 0, 4), ("db", 4, 46), ("cpu", 46, 50), route="/items/{id}")
        for i in range(5)
    ]
    assert render_timeline(requests, 86) == (
        "  time ──▶  0ms       20ms      40ms      60ms      80ms\n"
        "  Req 1:    ██░░░░░░░░░░░░░░░░░░░░░██                      GET /items/{id} 200  50.0ms\n"
        "  Req 2:         ██░░░░░░░░░░░░░░░░░░░░░██                 GET /items/{id} 200  50.0ms\n"
        "  Req 3:              ██░░░░░░░░░░░░░░░░░░░░░██            GET /items/{id} 200  50.0ms\n"
        "  Req 4:                   ██░░░░░░░░░░░░░░░░░░░░░██       GET /items/{id} 200  50.0ms\n"
        "  Req 5:                        ██░░░░░░░░░░░░░░░░░░░░░██  GET /items/{id} 200  50.0ms\n"
        "\n"
        "  █ CPU on the event loop   ░ awaiting the database   ▒ waiting for a pool connection\n"
        "  ▓ waiting for the event loop   · other waiting"
    )


def test_pool_wait_is_medium_shade() -> None:
    out = render_timeline(
        [
            req(
                0,
                20,
                ("cpu", 0, 2),
                ("pool", 2, 10),
                ("cpu", 10, 12),
                ("db", 12, 18),
                ("cpu", 18, 20),
            )
        ],
        51,
    )
    assert out == (
        "  time ──▶  0ms       10ms      20ms\n"
        "  Req 1:    ██▒▒▒▒▒▒▒▒██░░░░░░██  GET / 200  20.0ms\n" + LEGEND
    )


def test_loop_wait_is_dark_shade_and_red() -> None:
    row = one_row(("cpu", 0, 2), ("db", 2, 8), ("loop", 8, 14), ("cpu", 14, 20))
    assert row == "  Req 1:    ██░░░░░░▓▓▓▓▓▓██████  GET / 200  20.0ms"
    rec = req(0, 20, ("cpu", 0, 2), ("db", 2, 8), ("loop", 8, 14), ("cpu", 14, 20))
    ascii_row = render_timeline([rec], 51, ascii=True).splitlines()[1]
    assert ascii_row == "  Req 1:    ##......======######  GET / 200  20.0ms"
    assert "\x1b[31m▓▓▓▓▓▓\x1b[0m" in render_timeline([rec], 51, color=True)


def test_loop_wait_comes_right_after_cpu_in_precedence() -> None:
    # loop over db and pool: loop; cpu over loop: cpu
    assert one_row(("db", 0, 10), ("pool", 10, 20), ("loop", 5, 15), ("cpu", 12, 13)) == (
        "  Req 1:    ░░░░░▓▓▓▓▓▓▓█▓▓▒▒▒▒▒  GET / 200  20.0ms"
    )
    # a column half loop, half db: the tie goes to loop
    assert one_row(("loop", 0, 10.5), ("db", 10.5, 20)) == (
        "  Req 1:    ▓▓▓▓▓▓▓▓▓▓▓░░░░░░░░░  GET / 200  20.0ms"
    )


def test_cpu_step_narrower_than_a_column_still_shows() -> None:
    assert one_row(("db", 0, 20), ("cpu", 10.2, 10.3)) == (
        "  Req 1:    ░░░░░░░░░░█░░░░░░░░░  GET / 200  20.0ms"
    )


def test_column_shows_the_state_that_filled_most_of_it() -> None:
    # Column 5 is 0.4 ms cpu and 0.6 ms db; column 10 is 0.6 ms db and 0.4 ms pool.
    assert one_row(("cpu", 0, 5.4), ("db", 5.4, 10.6), ("pool", 10.6, 20)) == (
        "  Req 1:    █████░░░░░░▒▒▒▒▒▒▒▒▒  GET / 200  20.0ms"
    )


def test_cpu_inside_a_db_interval_counts_as_cpu() -> None:
    assert one_row(("db", 0, 20), ("cpu", 4, 10)) == (
        "  Req 1:    ░░░░██████░░░░░░░░░░  GET / 200  20.0ms"
    )


def test_in_flight_time_outside_any_segment_is_other_waiting() -> None:
    assert one_row(("cpu", 0, 2), ("db", 8, 18), ("cpu", 18, 20)) == (
        "  Req 1:    ██······░░░░░░░░░░██  GET / 200  20.0ms"
    )


def test_segments_beyond_wall_time_are_clipped() -> None:
    assert one_row(("db", 0, 10), ("cpu", 8, 30), ("db", 40, 50), wall_ms=10) == (
        "  Req 1:    ░░░░░░░░░░░░░░░░████  GET / 200  10.0ms"
    )


def test_rows_are_in_start_order() -> None:
    out = render_timeline([req(10, 10, ("db", 0, 10)), req(0, 10, ("cpu", 0, 10))], 51)
    assert out.splitlines()[1:3] == [
        "  Req 1:    ██████████            GET / 200  10.0ms",
        "  Req 2:              ░░░░░░░░░░  GET / 200  10.0ms",
    ]


def test_ascii_mode() -> None:
    out = render_timeline(
        [req(0, 20, ("cpu", 0, 2), ("pool", 2, 6), ("db", 8, 18), ("cpu", 18, 20))],
        51,
        ascii=True,
    )
    assert out == (
        "  time -->  0ms       10ms      20ms\n"
        "  Req 1:    ##%%%%  ..........##  GET / 200  20.0ms\n"
        "\n"
        "  # CPU on the event loop   . awaiting the database\n"
        "  % waiting for a pool connection\n"
        "  = waiting for the event loop\n"
        "  (space) other waiting"
    )


def test_ascii_mode_is_all_ascii() -> None:
    out = render_timeline([req(0, 0.5, ("cpu", 0, 0.5), route="/café/{id}")], 30, ascii=True)
    assert out.isascii()
    assert "500us" in out


def test_color_adds_escape_codes_without_changing_the_layout() -> None:
    requests = [
        req(0, 20, ("cpu", 0, 2), ("pool", 2, 6), ("db", 8, 18), ("cpu", 18, 20)),
        req(5, 10, ("db", 0, 10)),
    ]
    for ascii in (False, True):
        colored = render_timeline(requests, 51, ascii=ascii, color=True)
        assert "\x1b[1;33m██\x1b[0m" in colored or "\x1b[1;33m##\x1b[0m" in colored
        assert "\x1b[34m" in colored
        assert "\x1b[35m" in colored
        assert ANSI.sub("", colored) == render_timeline(requests, 51, ascii=ascii)


def test_no_escape_codes_without_color() -> None:
    out = render_timeline([req(0, 20, ("cpu", 0, 2), ("pool", 2, 6), ("db", 8, 18))], 51)
    assert "\x1b" not in out


def test_axis_in_microseconds() -> None:
    out = render_timeline([req(0, 0.5, ("cpu", 0, 0.5))], 51)
    assert out.splitlines()[0] == "  time ──▶  0µs     200µs    400µs"


def test_axis_in_milliseconds() -> None:
    out = render_timeline([req(0, 20, ("cpu", 0, 20))], 51)
    assert out.splitlines()[0] == "  time ──▶  0ms       10ms      20ms"


def test_axis_in_seconds() -> None:
    out = render_timeline([req(0, 5000, ("cpu", 0, 5000))], 51)
    assert out.splitlines()[0] == "  time ──▶  0s  1s  2s   3s  4s  5s"


@pytest.mark.parametrize("wall_ms", [0.003, 0.7, 13, 480, 7_300, 86_400_000])
def test_axis_labels_never_touch(wall_ms: float) -> None:
    for width in (30, 51, 80, 200):
        axis = render_timeline([req(0, wall_ms, ("cpu", 0, wall_ms))], width).splitlines()[0]
        labels = axis.replace("time ──▶", "").split()
        assert labels[0] in ("0µs", "0ms", "0s")
        assert "  ".join(labels) in re.sub(r"   +", "  ", axis)  # at least two spaces apart
        assert re.fullmatch(r"( *\d+(µs|ms|s))+", axis.replace("time ──▶", ""))


def test_annotation_shortened_to_fit() -> None:
    requests = [
        req(0, 20, ("cpu", 0, 20), route="/api/v1/customers/{customer_id}/orders"),
        req(5, 10, ("cpu", 0, 10), method="DELETE", status=None, error="ConnectionResetError"),
    ]
    assert render_timeline(requests, 60) == (
        "  time ──▶  0ms   5ms   10ms  15ms  20ms\n"
        "  Req 1:    ████████████████████████  GET /api/v1/c…  20.0ms\n"
        "  Req 2:          ████████████        DELETE / Conn…  10.0ms\n" + LEGEND
    )


def test_narrow_width_keeps_wall_time_and_drops_indent() -> None:
    requests = [
        req(0, 20, ("cpu", 0, 20), route="/api/v1/customers/{customer_id}/orders"),
        req(5, 10, ("cpu", 0, 10)),
    ]
    assert render_timeline(requests, 30) == (
        "time ──▶  0ms       20ms\n"
        "Req 1:    ██████████    20.0ms\n"
        "Req 2:      ██████      10.0ms\n"
        "\n"
        "█ CPU on the event loop\n"
        "░ awaiting the database\n"
        "▒ waiting for a pool connecti…\n"
        "▓ waiting for the event loop\n"
        "· other waiting"
    )


def test_tiny_width_draws_bars_only() -> None:
    out = render_timeline([req(0, 20, ("cpu", 0, 20)), req(5, 10, ("db", 0, 10))], 8)
    assert out.splitlines()[:3] == ["0ms", "████████", "  ░░░░"]


def test_no_line_is_ever_wider_than_width() -> None:
    requests = [
        req(0, 20, ("cpu", 0, 2), ("pool", 2, 6), ("db", 6, 20), route="/a/" + "x" * 300),
        req(3, 0, method="PROPFIND", route=None, path="/p", status=None, error="E" * 80),
    ]
    for width in range(1, 130):
        for ascii in (False, True):
            out = render_timeline(requests, width, ascii=ascii, color=True)
            assert max(len(line) for line in ANSI.sub("", out).splitlines()) <= width


def test_width_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="width of at least 1"):
        render_timeline([req(0, 1)], 0)


def test_untrusted_strings_are_cleaned() -> None:
    bad = req(
        0,
        20,
        ("cpu", 0, 20),
        method="GE\x1b[31mT",
        path="/a\x00b\x1b]0;pwned\x07c\u202e",
        route=None,
        status=None,
        error="Timeout\x1b[2JError\n",
    )
    out = render_timeline([bad], 74)
    assert out.splitlines()[1] == (
        "  Req 1:    ███████████████████████████████  GET /abc TimeoutError  20.0ms"
    )
    assert "\x1b" not in out
    assert "\x00" not in out


def test_empty_input_is_one_line() -> None:
    assert render_timeline([], 80) == "No requests to draw."
    assert render_timeline([], 10) == "No reques…"


def test_zero_length_requests_at_one_instant() -> None:
    out = render_timeline([req(0, 0), req(0, 0, ("cpu", 0, 0))], 51)
    assert out == (
        "  time ──▶  0µs         500µs      1000µs\n"
        "  Req 1:    ·                        GET / 200  0µs\n"
        "  Req 2:    █                        GET / 200  0µs\n" + LEGEND
    )


def test_window_can_be_set() -> None:
    out = render_timeline(
        [req(0, 40, ("cpu", 0, 10), ("db", 10, 30), ("cpu", 30, 40))],
        51,
        start=T0 + 0.005,
        end=T0 + 0.025,
    )
    assert out.splitlines()[:2] == [
        "  time ──▶  0ms       10ms      20ms",
        "  Req 1:    █████░░░░░░░░░░░░░░░  GET / 200  40.0ms",
    ]


CUT_NOTE = (
    "  Time cut: a line +T starts a new axis, with its own scale, T after the first;\n"
    "  none of these requests was in flight in between."
)


def test_time_when_none_is_in_flight_longer_than_the_median_request_is_cut() -> None:
    requests = [
        req(0, 20, ("cpu", 0, 2), ("db", 2, 18), ("cpu", 18, 20)),
        req(10, 20, ("cpu", 0, 2), ("pool", 2, 8), ("db", 8, 18), ("cpu", 18, 20)),
        req(3000, 40, ("cpu", 0, 4), ("db", 4, 36), ("cpu", 36, 40)),
        req(3030, 20, ("loop", 0, 18), ("cpu", 18, 20)),
    ]
    # Each group keeps one axis for its rows (Req 1 and 2 overlap, so do 3 and 4); the
    # second starts over, on its own scale, and says how long after the first it starts.
    assert render_timeline(requests, 80) == (
        "  time ──▶  0ms     5ms     10ms     15ms    20ms    25ms    30ms\n"
        "  Req 1:    ███░░░░░░░░░░░░░░░░░░░░░░░░░░████                  GET / 200  20.0ms\n"
        "  Req 2:                    ████▒▒▒▒▒▒▒▒▒░░░░░░░░░░░░░░░░░███  GET / 200  20.0ms\n"
        "  +3.00s    0ms       10ms      20ms     30ms      40ms      50ms\n"
        "  Req 3:    ████░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░████            GET / 200  40.0ms\n"
        "  Req 4:                                 ▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓██  GET / 200  20.0ms\n"
        "\n"
        "  █ CPU on the event loop   ░ awaiting the database\n"
        "  ▒ waiting for a pool connection   ▓ waiting for the event loop\n"
        "  · other waiting\n" + CUT_NOTE
    )


def test_a_gap_no_longer_than_the_median_request_is_drawn_to_scale() -> None:
    requests = [
        req(0, 10, ("cpu", 0, 10)),
        req(20, 10, ("db", 0, 10)),
        req(40.5, 10, ("cpu", 0, 10)),
    ]
    out = render_timeline(requests, 60)
    assert out.splitlines()[:5] == [
        "  time ──▶  0ms       10ms     20ms      30ms",
        "  Req 1:    ██████████                     GET / 200  10.0ms",
        "  Req 2:                       ░░░░░░░░░░  GET / 200  10.0ms",  # 10 ms gap: kept
        "  +40.5ms   0ms   2ms   4ms  6ms   8ms   10ms",  # 10.5 ms gap: cut
        "  Req 3:    █████████████████████████████  GET / 200  10.0ms",
    ]


def test_cut_in_ascii_mode_is_all_ascii() -> None:
    out = render_timeline(
        [req(0, 0.1, ("cpu", 0, 0.1)), req(0.7, 0.1, ("cpu", 0, 0.1))], 60, ascii=True
    )
    assert out.isascii()
    assert out.splitlines()[:4] == [
        "  time -->  0us   20us  40us  60us  80us",
        "  Req 1:    ##############################  GET / 200  100us",
        "  +700us    0us   20us  40us  60us  80us",
        "  Req 2:    ##############################  GET / 200  100us",
    ]


def test_a_window_that_is_set_is_never_cut() -> None:
    requests = [req(0, 10, ("cpu", 0, 10)), req(1000, 10, ("cpu", 0, 10))]
    out = render_timeline(requests, 51, start=T0, end=T0 + 1.01)
    assert "+" not in out
    assert "Time cut" not in out
    assert out.splitlines()[1:3] == [
        "  Req 1:    █                     GET / 200  10.0ms",
        "  Req 2:                       █  GET / 200  10.0ms",
    ]


def test_cut_at_a_width_too_narrow_for_labels() -> None:
    requests = [req(0, 20, ("cpu", 0, 20)), req(3000, 20, ("db", 0, 20))]
    assert render_timeline(requests, 12).splitlines()[:5] == [
        "0ms   10ms",
        "████████████",
        "+3.00s",
        "0ms   10ms",
        "░░░░░░░░░░░░",
    ]


def test_no_line_with_cuts_is_ever_wider_than_width() -> None:
    requests = [
        req(0, 20, ("cpu", 0, 2), ("pool", 2, 6), ("db", 6, 20), route="/a/" + "x" * 300),
        req(5_000, 0.2, ("cpu", 0, 0.2), method="PROPFIND", status=None, error="E" * 80),
        req(86_400_000, 3, ("loop", 0, 3)),
    ]
    for width in range(1, 130):
        for ascii in (False, True):
            colored = render_timeline(requests, width, ascii=ascii, color=True)
            plain = ANSI.sub("", colored)
            assert plain == render_timeline(requests, width, ascii=ascii)
            assert max(len(line) for line in plain.splitlines()) <= width
            assert plain.count("Req ") in (0, 3)


def test_fast_enough_for_the_cli() -> None:
    requests = [
        req(
            i * 5,
            300,
            *((("cpu", "db", "pool")[j % 3], j * 10.0, j * 10.0 + 12) for j in range(30)),
        )
        for i in range(200)
    ]
    # The best of three runs: a busy shared machine once stretched a single one to 0.15 s.
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        out = render_timeline(requests, 200)
        best = min(best, time.perf_counter() - t)
    assert best < 0.1, best
    assert len(out.splitlines()) == 1 + 200 + 1 + 1


def test_render_bar_draws_a_request_over_its_own_wall_time() -> None:
    rec = req(0, 40, ("cpu", 0, 10), ("pool", 10, 15), ("db", 15, 35), ("cpu", 35, 40))
    assert render_bar(rec, 8) == "██▒░░░░█"
    assert render_bar(rec, 8, ascii=True) == "##%....#"
    # Gaps are other waiting; a CPU step shorter than a column still shows.
    assert render_bar(req(0, 80, ("cpu", 0, 1), ("cpu", 79.5, 80)), 8) == "█······█"
    assert render_bar(req(0, 0, ("cpu", 0, 0)), 4) == "█   "
    with pytest.raises(ValueError, match="columns must be at least 1"):
        render_bar(rec, 0)


def test_render_bar_shortcut_agrees_with_the_general_renderer() -> None:
    """render_bar takes a shortcut for rows drawn over their own wall time; on random
    rows (overlaps, gaps, segments outside the request, boundaries on column edges) it
    must draw exactly what the general row renderer draws."""
    rng = random.Random(4)
    shortcut = 0
    for _ in range(5000):
        wall = rng.choice([0.0, 0.0005, 0.05, 1.0, 3.7, 40.0, 123.4])
        n = rng.choice([1, 2, 7, 40, 41])
        segments = []
        for _ in range(rng.randint(0, 8)):
            a = rng.uniform(-0.1 * wall, 1.1 * wall)
            if rng.random() < 0.3:
                a = round(a / (wall / n)) * (wall / n) if wall else 0.0
            b = a + rng.choice([0.0, rng.uniform(0, wall * 0.3), wall / n, wall / (2 * n)])
            kind = rng.choice(["cpu", "db", "pool", "cpu", "loop", "other"])
            segments.append((kind, a, b))
        rec = req(0, wall, *segments)
        general = timeline._row_states(rec, 0.0, max(wall, 1e-3), n)
        assert render_bar(rec, n) == "".join(timeline._GLYPHS[s] for s in general), rec
        shortcut += timeline._own_row_states(rec.segments, wall, n) is not None if wall else 0
    assert shortcut > 3000  # the shortcut was actually exercised
