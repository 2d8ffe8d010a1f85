"""Is there capacity left? Host, worker, traffic and dependency figures for the whole service.

Nothing here blocks a handler for long. Each worker runs one sampler: once a second it reads
psutil on the loop (about 1 ms of /proc reads), writes its own process figures into its
scoreboard slot, and takes the readiness check's answer for Redis, Postgres and the audit
backlog. `cpu_percent` is primed when the worker starts, so even the first answer is a real
figure. `/inspect` then only copies
the latest samples and adds up every worker's scoreboard slot (see scoreboard.py for why shared
memory): far under a millisecond of CPU, and service-wide whichever worker answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, NamedTuple

import psutil
from aiohttp import web

from konnichiwa import __version__
from konnichiwa.background import running
from konnichiwa.coalesce import CoalescedRead
from konnichiwa.health import check_dependencies
from konnichiwa.postgres import pg_pool
from konnichiwa.redis_store import redis_client
from konnichiwa.schemas import (
    AuditBacklog,
    Dependencies,
    DependencyCheck,
    DependencyFigures,
    Disk,
    Host,
    Inspection,
    Latency,
    Memory,
    Network,
    Pool,
    ServiceFigures,
    Swap,
    Traffic,
    WorkerFigures,
    encode,
    json_response,
    rfc3339,
)
from konnichiwa.scoreboard import (
    STATUS_CLASSES,
    Cell,
    Scoreboard,
    WorkerSlot,
    percentile,
    scoreboard,
    worker_slot,
)
from konnichiwa.settings import Settings, settings_key

log = logging.getLogger("konnichiwa.capacity")

SAMPLE_SECONDS: Final = 1.0
PRIME_SECONDS: Final = 0.1  # cpu_percent compares with its previous call: give it a base


class DependencySample(NamedTuple):
    checks: dict[str, DependencyCheck]
    backlog: AuditBacklog | None
    sampled_at: float


class Sampler:
    """One worker's background sampler; `host` and `dependencies` are its latest samples."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.slot: WorkerSlot = app[worker_slot]
        self.process = psutil.Process()
        state_dir = app[settings_key].state_dir
        self.data_path = state_dir.resolve() if state_dir.is_dir() else Path("/")
        self.hostname = socket.gethostname()
        self.boot_time = psutil.boot_time()
        self.host: Host
        self.dependencies: DependencySample

    async def start(self) -> None:
        """Prime the CPU counters, then take the first sample."""
        self.process.cpu_percent(None)
        psutil.cpu_percent(None)
        psutil.cpu_percent(None, percpu=True)
        await asyncio.sleep(PRIME_SECONDS)
        await self.sample(lag=0.0)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + SAMPLE_SECONDS
            await asyncio.sleep(SAMPLE_SECONDS)
            try:
                await self.sample(lag=max(loop.time() - due, 0.0))
            except Exception:  # a sampler that dies would leave the figures frozen
                log.exception("sampling failed; trying again in %.0f s", SAMPLE_SECONDS)

    async def sample(self, lag: float) -> None:
        self.slot.set(Cell.LOOP_LAG_US, int(lag * 1e6))
        # On the loop, not in a thread: it is ~1 ms of /proc reads, and a thread would take the GIL
        # back from the loop after each of its ~60 system calls, stalling requests each time.
        self.host = self._sample_host()
        self.dependencies = await self._sample_dependencies()

    def _sample_host(self) -> Host:
        """psutil reads of this process and the host; this worker's figures go into its slot."""
        process = self.process
        with process.oneshot():
            slot = self.slot
            slot.set(Cell.RSS, process.memory_info().rss)
            slot.set(Cell.CPU_CENTIPERCENT, round(process.cpu_percent(None) * 100))
            cpu = process.cpu_times()
            slot.set(Cell.CPU_SECONDS_US, int((cpu.user + cpu.system) * 1e6))
            slot.set(Cell.THREADS, process.num_threads())
            slot.set(Cell.FDS, process.num_fds())
            slot.set(Cell.CONNECTIONS, open_sockets(process))
        memory, swap = psutil.virtual_memory(), psutil.swap_memory()
        disk, network = psutil.disk_usage(str(self.data_path)), psutil.net_io_counters()
        now = time.time()
        return Host(
            hostname=self.hostname,
            boot_time=rfc3339(datetime.fromtimestamp(self.boot_time, UTC)),
            uptime_seconds=round(now - self.boot_time, 3),
            cpu_count=psutil.cpu_count() or 1,
            cpu_percent=psutil.cpu_percent(None),
            cpu_percent_per_core=psutil.cpu_percent(None, percpu=True),
            load_average=[round(load, 2) for load in os.getloadavg()],
            memory=Memory(memory.total, memory.available, memory.used, memory.percent),
            swap=Swap(swap.total, swap.used, swap.percent),
            disk=Disk(str(self.data_path), disk.total, disk.used, disk.free, disk.percent),
            network=Network(
                network.bytes_sent, network.bytes_recv, network.packets_sent, network.packets_recv
            ),
        )

    async def _sample_dependencies(self) -> DependencySample:
        app = self.app
        checks, backlog = await check_dependencies(app)
        pool = app[redis_client].connection_pool
        # redis-py has no public pool gauges that hold across its 6-8 releases; these sets are
        # what its own `get_connection_count` reads.
        self.slot.set(Cell.REDIS_IN_USE, len(pool._in_use_connections))
        self.slot.set(Cell.REDIS_IDLE, len(pool._available_connections))
        postgres = app[pg_pool]
        self.slot.set(Cell.POSTGRES_IN_USE, postgres.get_size() - postgres.get_idle_size())
        self.slot.set(Cell.POSTGRES_IDLE, postgres.get_idle_size())
        return DependencySample(checks, backlog, time.time())


def open_sockets(process: psutil.Process) -> int:
    """The sockets this process holds (clients, pools, the listener), from its descriptor table.

    Not psutil's `net_connections`: it parses the whole system's /proc/net tables in Python,
    ~15 ms with the GIL held, which stalled every request of the worker once a second.
    """
    try:
        entries = list(os.scandir("/proc/self/fd"))
    except FileNotFoundError:  # no procfs (macOS): the slow way
        return len(process.net_connections(kind="all"))
    count = 0
    for entry in entries:
        with contextlib.suppress(OSError):  # closed since the listing
            count += os.readlink(entry.path).startswith("socket:")
    return count


sampler = web.AppKey("capacity_sampler", Sampler)
# Concurrent /inspect requests share one rendering made after they arrived (see coalesce.py):
# under load a wave of operators' polls costs one pass over the scoreboard.
inspections = web.AppKey("inspections", CoalescedRead[bytes])


async def capacity_ctx(app: web.Application) -> AsyncIterator[None]:
    """Sample this worker's figures once a second while it serves."""
    sampling = app[sampler] = Sampler(app)

    async def render() -> bytes:
        return encode(inspection(app))

    app[inspections] = CoalescedRead(render)
    await sampling.start()
    async with running(sampling.run(), "capacity-sampler"):
        yield


def traffic(board: Scoreboard) -> Traffic:
    """Requests served, in flight, rates and latency percentiles, summed over every worker."""
    by_class = dict(zip(STATUS_CLASSES, board.status_totals(), strict=True))
    last_10s, last_60s = board.windows((10, 60))
    latency = [percentile(last_60s.histogram, q) for q in (0.5, 0.95, 0.99)]
    in_flight = sum(figures[Cell.IN_FLIGHT] for _, figures in board.workers())
    return Traffic(
        requests_served=sum(by_class.values()),
        requests_in_flight=in_flight,
        requests_per_second_10s=round(last_10s.requests / last_10s.seconds, 2),
        requests_per_second_60s=round(last_60s.requests / last_60s.seconds, 2),
        latency_60s=Latency(*(None if s is None else round(s * 1000, 3) for s in latency)),
        responses_by_status_class=by_class,
        errors=by_class["4xx"] + by_class["5xx"],
    )


def service(board: Scoreboard, settings: Settings) -> ServiceFigures:
    now = time.time()
    workers = [
        WorkerFigures(
            slot=number,
            pid=figures[Cell.PID],
            uptime_seconds=round(now - figures[Cell.STARTED_US] / 1e6, 3),
            rss_bytes=figures[Cell.RSS],
            cpu_percent=figures[Cell.CPU_CENTIPERCENT] / 100,
            threads=figures[Cell.THREADS],
            open_fds=figures[Cell.FDS],
            connections=figures[Cell.CONNECTIONS],
            requests_in_flight=figures[Cell.IN_FLIGHT],
            event_loop_lag_ms=round(figures[Cell.LOOP_LAG_US] / 1000, 3),
        )
        for number, figures in board.workers()
        if figures[Cell.PID]
    ]
    return ServiceFigures(
        version=__version__,
        role=settings.service_name,
        environment=settings.environment,
        uptime_seconds=round(now - board.started, 3),
        worker_count=len(workers),
        answered_by=os.getpid(),
        workers=workers,
    )


def dependencies(board: Scoreboard, sample: DependencySample) -> Dependencies:
    workers = [figures for _, figures in board.workers()]

    def figures(name: str, in_use: int, idle: int) -> DependencyFigures:
        check = sample.checks[name]
        pool = Pool(sum(w[in_use] for w in workers), sum(w[idle] for w in workers))
        return DependencyFigures(check.status, check.latency_ms, pool, check.detail)

    return Dependencies(
        redis=figures("redis", Cell.REDIS_IN_USE, Cell.REDIS_IDLE),
        postgres=figures("postgres", Cell.POSTGRES_IN_USE, Cell.POSTGRES_IDLE),
        audit_backlog=sample.backlog,
        event_loop_lag_ms=round(max(w[Cell.LOOP_LAG_US] for w in workers) / 1000, 3),
        sampled_at=rfc3339(datetime.fromtimestamp(sample.sampled_at, UTC)),
    )


def inspection(app: web.Application) -> Inspection:
    board, latest = app[scoreboard], app[sampler]
    return Inspection(
        host=latest.host,
        service=service(board, app[settings_key]),
        traffic=traffic(board),
        dependencies=dependencies(board, latest.dependencies),
    )


async def inspect(request: web.Request) -> web.Response:
    """Host, service, traffic and dependency figures for the whole service, every worker summed.

    Figures from psutil and the dependency checks are at most about a second old; traffic
    counts are exact up to the moment of asking.
    """
    return json_response(await request.app[inspections].get())
