"""Every worker's traffic counters and figures in shared memory, so any worker can report them all.

The supervisor makes one small file (in /dev/shm where there is one: memory, never the disk) with
a fixed-layout slot of 64-bit integers per worker and hands each worker its slot number; a worker
that replaces a dead one carries on counting in the same slot. Why shared memory rather than
Redis: counting runs on every request of a service doing ~15k requests/s, so it must not touch
the network, await or lock; each slot has exactly one writer, aligned 64-bit stores are atomic,
and a worker answering /inspect or /metrics sums every slot in microseconds — exactly, and still
when Redis is down. A reader may miss an increment that is happening as it reads; nothing more.

A slot holds the worker's figures (pid, RSS, CPU, ... written by its sampler once a second), per
route its responses by status class, latency sum and latency histogram, and a ring of the last 64
seconds' latency histograms for the request rates and percentiles of the last 10 and 60 seconds.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import functools
import mmap
import operator
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final, NamedTuple

from aiohttp import web

# Latency bucket upper bounds in seconds: 1, 1.5, 2, 3, 5, 7 per decade from 0.1 ms to 10 s
# (fine enough for percentiles within a third of their value), then one bucket for the rest.
BOUNDS: Final = (
    *(
        float(f"{mantissa}e{exponent}")
        for exponent in range(-4, 1)
        for mantissa in (1, 1.5, 2, 3, 5, 7)
    ),
    10.0,
)
BUCKETS: Final = len(BOUNDS) + 1
STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
# The status class's place by the status's first digit (aiohttp allows 100-999: 6xx-9xx count as
# 5xx), a lookup rather than clamping arithmetic on every request.
_CLASS_OF_HUNDREDS: Final = (0, 0, 1, 2, 3, 4, 4, 4, 4, 4)
RING_SECONDS: Final = 64  # more than the longest window (60 s)

# Where the AWS cache's answers came from (konnichiwa.coalesce.Cached.status), counted in order.
AWS_CACHE_RESULTS: Final = ("hit", "miss", "stale")


class Cell(enum.IntEnum):
    """A worker's figures, one 64-bit integer each at the start of its slot, by offset."""

    PID = 0  # the worker's process id; 0 while no worker has claimed the slot
    STARTED_US = 1  # when the worker started (Unix time, µs)
    IN_FLIGHT = 2  # requests being answered
    RSS = 3  # resident memory (bytes); the sampler writes RSS to CONNECTIONS once a second
    CPU_CENTIPERCENT = 4  # CPU use, hundredths of a percent
    CPU_SECONDS_US = 5  # CPU time used (µs)
    THREADS = 6
    FDS = 7  # open file descriptors
    CONNECTIONS = 8  # open sockets
    LOOP_LAG_US = 9  # how late the event loop woke up at the last sample (µs)
    REDIS_IN_USE = 10  # the Redis pool's connections lent out, then idle
    REDIS_IDLE = 11
    POSTGRES_IN_USE = 12  # the Postgres pool's, likewise
    POSTGRES_IDLE = 13
    RATE_LIMITER_DOWN = 14  # 1 while the rate limiter cannot reach Redis
    UNCHECKED_ADMITTED = 15  # reads admitted while the rate limiter could not check (fail open)
    UNCHECKED_REFUSED = 16  # writes refused while it could not check (fail closed)
    AWS_CACHE = 17  # the AWS cache's answers, a cell per AWS_CACHE_RESULTS entry, in order
    RATE_LIMITED = AWS_CACHE + len(
        AWS_CACHE_RESULTS
    )  # 429s, a cell per konnichiwa.ratelimit.POLICIES entry, in order


WORKER_CELLS: Final = 32
# The cells the rate limiter counts in, by the names konnichiwa.ratelimit imports.
RATE_LIMITED: Final = Cell.RATE_LIMITED
RATE_LIMITER_DOWN: Final = Cell.RATE_LIMITER_DOWN
UNCHECKED_ADMITTED: Final = Cell.UNCHECKED_ADMITTED
UNCHECKED_REFUSED: Final = Cell.UNCHECKED_REFUSED


class RouteCell(enum.IntEnum):
    """A route's cells in a slot, by offset from the route's first."""

    STATUS = 0  # responses, a cell per STATUS_CLASSES entry
    SUM = len(STATUS_CLASSES)  # the latency sum (µs)
    HISTOGRAM = SUM + 1  # the latency histogram, a cell per bucket (BUCKETS)


ROUTE_CELLS: Final = RouteCell.HISTOGRAM + BUCKETS
# As plain ints for the per-request path, where looking up an enum member costs ~60 ns each.
_SUM_AT: Final = int(RouteCell.SUM)
_HISTOGRAM_AT: Final = int(RouteCell.HISTOGRAM)
# A ring row: the second (of the monotonic clock, which all processes share) and its histogram.
RING_ROW: Final = 1 + BUCKETS
# The file starts with the service's start (wall clock, µs).
HEADER_CELLS: Final = 1
CELL: Final = 8
# What a ring row's histogram is reset to when its second comes round again.
EMPTY_RING_ROW: Final = memoryview(bytes(CELL * BUCKETS)).cast("q")


@dataclasses.dataclass(frozen=True)
class ScoreboardFile:
    """Where the supervisor's scoreboard is and its shape: what a worker needs to open it."""

    path: Path
    slots: int
    routes: int

    def size(self) -> int:
        return CELL * (HEADER_CELLS + self.slots * slot_cells(self.routes))

    def create(self) -> None:
        """Make the file, zeroed, with the header filled in (the supervisor does this once)."""
        with open(self.path, "wb") as file:
            file.truncate(self.size())
        board = Scoreboard.open(self)
        board.start()
        board.close()


def slot_cells(routes: int) -> int:
    return WORKER_CELLS + routes * ROUTE_CELLS + RING_SECONDS * RING_ROW


def _map_file(path: Path, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class Window(NamedTuple):
    """The requests of the last `seconds` and their latency histogram."""

    seconds: float
    requests: int
    histogram: list[int]


class Scoreboard:
    """All slots, for reading; `slot(n)` writes one worker's."""

    __slots__ = ("_settled", "cells", "file", "memory")

    def __init__(self, file: ScoreboardFile, memory: mmap.mmap) -> None:
        self.file = file
        self.memory = memory
        self.cells = memoryview(memory).cast("q")
        # ((second, window lengths), the sums of each window's past seconds): see `windows`.
        self._settled: tuple[tuple[int, tuple[int, ...]], list[list[int]]] | None = None

    @classmethod
    def open(cls, file: ScoreboardFile) -> Scoreboard:
        return cls(file, _map_file(file.path, file.size()))

    @classmethod
    def private(cls, routes: int) -> Scoreboard:
        """A one-slot board in this process's own memory (a service run without a supervisor)."""
        file = ScoreboardFile(Path(os.devnull), 1, routes)  # backed by no file at all
        board = cls(file, mmap.mmap(-1, file.size()))
        board.start()
        return board

    def start(self) -> None:
        """Fill in the header of a new board: when the service started."""
        self.cells[0] = int(time.time() * 1e6)

    def close(self) -> None:
        self.cells.release()
        self.memory.close()

    @property
    def started(self) -> float:
        """When the service started (wall clock, seconds)."""
        return self.cells[0] / 1e6

    def slot(self, number: int) -> WorkerSlot:
        return WorkerSlot(self, number)

    def _base(self, number: int) -> int:
        return HEADER_CELLS + number * slot_cells(self.file.routes)

    def worker(self, number: int) -> Sequence[int]:
        """One worker's figures (index with Cell); a pid of 0 means never started."""
        base = self._base(number)
        return self.cells[base : base + WORKER_CELLS].tolist()

    def workers(self) -> Iterator[tuple[int, Sequence[int]]]:
        for number in range(self.file.slots):
            yield number, self.worker(number)

    def _route_cells(self) -> Iterator[memoryview]:
        width = self.file.routes * ROUTE_CELLS
        for number in range(self.file.slots):
            start = self._base(number) + WORKER_CELLS
            yield self.cells[start : start + width]

    def route_totals(self) -> list[list[int]]:
        """Per route, summed over workers: responses by status class, latency sum, histogram."""
        summed = _sum_columns(cells.tolist() for cells in self._route_cells())
        return [summed[at : at + ROUTE_CELLS] for at in range(0, len(summed), ROUTE_CELLS)]

    def status_totals(self) -> list[int]:
        """Responses by status class, summed over routes and workers (strided reads, no copies
        of the histograms: /inspect asks this on every call)."""
        return [
            sum(sum(cells[index::ROUTE_CELLS]) for cells in self._route_cells())
            for index in range(len(STATUS_CLASSES))
        ]

    def windows(self, lengths: Sequence[int], now: float | None = None) -> list[Window]:
        """For each length, the requests that finished in that many last seconds (this one too).

        Past seconds no longer change, so their sums are kept until the clock moves on to the
        next second; each call adds only the rows of the current second.
        """
        now = time.monotonic() if now is None else now
        current = int(now)
        key = (current, tuple(lengths))
        if self._settled is None or self._settled[0] != key:
            past = self._ring_rows(current)
            self._settled = (
                key,
                [
                    _sum_columns(histogram for age, histogram in past if 0 < age < length)
                    for length in lengths
                ],
            )
        fresh = [histogram for _, histogram in self._ring_rows(current, 1)]
        # A service younger than the window has not had all of it to serve requests in.
        served_for = max(time.time() - self.started, 1e-3)
        windows = []
        for length, settled in zip(lengths, self._settled[1], strict=True):
            histogram = _sum_columns([settled, *fresh] if settled else fresh) or [0] * BUCKETS
            covered = min(length - 1 + (now - current), served_for)
            windows.append(Window(covered, sum(histogram), histogram))
        return windows

    def _ring_rows(self, current: int, seconds: int = RING_SECONDS) -> list[tuple[int, list[int]]]:
        """(age in seconds, histogram) of every worker's ring rows of the last `seconds`."""
        ring_at = WORKER_CELLS + self.file.routes * ROUTE_CELLS
        rows = []
        for number in range(self.file.slots):
            start = self._base(number) + ring_at
            for second in range(current - seconds + 1, current + 1):
                row = start + (second % RING_SECONDS) * RING_ROW
                if self.cells[row] == second:
                    rows.append((current - second, self.cells[row + 1 : row + RING_ROW].tolist()))
        return rows


def _sum_columns(rows: Iterable[list[int]]) -> list[int]:
    """Element-wise sum of equal-length rows (C-level loops: `map` over `operator.add`)."""
    remaining = iter(rows)
    first = next(remaining, None)
    if first is None:
        return []
    return functools.reduce(
        lambda total, row: list(map(operator.add, total, row)), remaining, first
    )


def percentile(histogram: Sequence[int], fraction: float) -> float | None:
    """The latency (seconds) below which `fraction` of the requests fell, interpolated in-bucket."""
    total = sum(histogram)
    if total == 0:
        return None
    rank = fraction * total
    seen = 0
    for bucket, count in enumerate(histogram):
        if count and seen + count >= rank:
            low = BOUNDS[bucket - 1] if bucket > 0 else 0.0
            if bucket == len(BOUNDS):  # beyond the last bound: all we know is its lower end
                return low
            return low + (BOUNDS[bucket] - low) * (rank - seen) / count
        seen += count
    return BOUNDS[-1]


class WorkerSlot:
    """One worker's own slot: it alone writes here."""

    __slots__ = ("base", "cells", "in_flight", "ring_at", "routes_at")

    def __init__(self, board: Scoreboard, number: int) -> None:
        self.cells = board.cells
        self.base = board._base(number)
        self.in_flight = self.base + Cell.IN_FLIGHT
        self.routes_at = self.base + WORKER_CELLS
        self.ring_at = self.routes_at + board.file.routes * ROUTE_CELLS

    def claim(self) -> None:
        """Take the slot over; counts of a predecessor stay, its in-flight requests died with it."""
        self.set(Cell.PID, os.getpid())
        self.set(Cell.STARTED_US, int(time.time() * 1e6))
        self.set(Cell.IN_FLIGHT, 0)

    def set(self, field: int, value: int) -> None:
        self.cells[self.base + field] = value

    def count(self, field: int) -> None:
        self.cells[self.base + field] += 1

    def begin(self) -> float:
        """A request starts: count it in flight; its start on the monotonic clock."""
        self.cells[self.in_flight] += 1
        return time.monotonic()

    def finish(self, route: int, status: int, started: float) -> None:
        """Count a finished request by route and status, its latency, and the second it ended.

        Per request: a clock read, a bisect and a handful of integer stores into shared memory —
        no lock, await or I/O.
        """
        cells = self.cells
        cells[self.in_flight] -= 1
        now = time.monotonic()
        elapsed = now - started
        bucket = bisect.bisect_left(BOUNDS, elapsed)
        at = self.routes_at + ROUTE_CELLS * route
        cells[at + _CLASS_OF_HUNDREDS[status // 100]] += 1
        cells[at + _SUM_AT] += int(elapsed * 1e6)
        cells[at + _HISTOGRAM_AT + bucket] += 1
        second = int(now)
        row = self.ring_at + (second % RING_SECONDS) * RING_ROW
        if cells[row] != second:  # a new second: this row held one 64 s ago
            cells[row + 1 : row + RING_ROW] = EMPTY_RING_ROW
            cells[row] = second
        cells[row + 1 + bucket] += 1


scoreboard = web.AppKey("scoreboard", Scoreboard)
worker_slot = web.AppKey("worker_slot", WorkerSlot)
