"""The scoreboard: shared between mappings, kept across a worker's replacement, read in windows."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from konnichiwa.endpoint import endpoint, no_route
from konnichiwa.scoreboard import (
    BOUNDS,
    BUCKETS,
    HEADER_CELLS,
    WORKER_CELLS,
    Cell,
    RouteCell,
    Scoreboard,
    ScoreboardFile,
    percentile,
    slot_cells,
)


def _histogram(**counts: int) -> list[int]:
    """A histogram with counts in the buckets whose upper bound is named (b0_001 is 1 ms)."""
    histogram = [0] * BUCKETS
    for name, count in counts.items():
        histogram[BOUNDS.index(float(name[1:].replace("_", ".")))] = count
    return histogram


@pytest.mark.parametrize(
    ("histogram", "fraction", "expected"),
    [
        ([0] * BUCKETS, 0.5, None),
        (_histogram(b0_001=10), 0.5, 0.00085),  # halfway between 0.7 ms and 1 ms
        (_histogram(b0_001=10), 1.0, 0.001),
        (_histogram(b0_0001=1), 0.5, 0.00005),  # the first bucket starts at 0
        (_histogram(b0_001=90, b0_1=10), 0.95, 0.085),
        (_histogram(b0_001=99, b0_1=1), 0.5, 0.0007 + 0.0003 * 50 / 99),
        ([0] * (BUCKETS - 1) + [4], 0.99, 10.0),  # beyond 10 s: the last bound
    ],
)
def test_percentile(histogram: list[int], fraction: float, expected: float | None) -> None:
    assert percentile(histogram, fraction) == (
        None if expected is None else pytest.approx(expected)
    )


def test_a_replacement_worker_keeps_the_counts(tmp_path: Path) -> None:
    file = ScoreboardFile(tmp_path / "scoreboard", slots=2, routes=3)
    file.create()
    supervisor, first, replacement = (Scoreboard.open(file) for _ in range(3))
    first.slot(1).claim()
    first.slot(1).set(Cell.IN_FLIGHT, 7)
    first.cells[HEADER_CELLS + slot_cells(file.routes) + WORKER_CELLS] = 42  # slot 1, route 0, 1xx
    assert supervisor.worker(1)[Cell.IN_FLIGHT] == 7, "another mapping sees the writes"
    replacement.slot(1).claim()
    assert supervisor.worker(1)[Cell.IN_FLIGHT] == 0
    assert supervisor.route_totals()[0][0] == 42
    assert supervisor.worker(0)[Cell.PID] == 0, "slot 0 never started"
    assert abs(supervisor.started - time.time()) < 60


async def _count_requests(aiohttp_client: AiohttpClient, board: Scoreboard) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound

    slot = board.slot(0)
    app = web.Application()
    app.router.add_get("/ok", endpoint(ok, slot, 0))
    app.router.add_get("/missing", endpoint(missing, slot, 1))
    app.router.add_route("*", "/{path:.*}", endpoint(no_route, slot, 1))
    client = await aiohttp_client(app)
    for path, times in (("/ok", 3), ("/missing", 2), ("/elsewhere", 1)):
        for _ in range(times):
            await client.get(path)


async def test_requests_counted_by_route_status_and_window(aiohttp_client: AiohttpClient) -> None:
    board = Scoreboard.private(routes=2)
    await _count_requests(aiohttp_client, board)
    ok, other = board.route_totals()
    assert ok[: RouteCell.SUM] == [0, 3, 0, 0, 0]
    assert other[: RouteCell.SUM] == [0, 0, 0, 3, 0]  # a raised 404 and a route nobody added
    assert sum(ok[RouteCell.HISTOGRAM :]) == 3
    assert ok[RouteCell.SUM] > 0, "latency sum in microseconds"
    assert board.worker(0)[Cell.IN_FLIGHT] == 0
    now = time.monotonic()
    assert [w.requests for w in board.windows((10, 60), now)] == [6, 6]
    assert [w.requests for w in board.windows((10, 60), now + 30)] == [0, 6]
    assert [w.requests for w in board.windows((10, 60), now + 61)] == [0, 0]
