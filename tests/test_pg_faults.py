"""A stalled Postgres against `konnichiwa serve --workers 2` as a real process: the reads that
need it fail fast while probes hammer readiness, everything else keeps serving, nothing is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple

import aiohttp
import asyncpg
import pytest

from tests.support import (
    FULL_AUTH,
    FULL_KEY,
    ServiceProcess,
    drained_readiness,
    paused,
    running_service,
)

pytestmark = pytest.mark.slow

STALL_SECONDS: Final = 25.0
PROBES: Final = 100
FAST: Final = 1.5  # what "at once" means for an answer while Postgres is stalled
HISTORY: Final = 1500  # changes: the oldest /logs page is then in Postgres alone


class Answer(NamedTuple):
    path: str
    status: int
    seconds: float
    body: Any


@pytest.fixture
def service(
    tmp_path: Path, redis_url: str, own_postgres: tuple[str, int]
) -> Iterator[ServiceProcess]:
    environment = {"REDIS_URL": redis_url, "DATABASE_URL": own_postgres[0], "API_KEY": FULL_KEY,
                   "RATE_LIMIT_WRITES": "1000000/10s"}  # fmt: skip
    with running_service(tmp_path / "serve.log", environment, "--workers", "2") as running:
        yield running


async def _get(session: aiohttp.ClientSession, url: str, path: str) -> Answer:
    started = time.monotonic()
    async with session.get(url + path) as reply:
        body = await reply.json(content_type=None) if path != "/" else await reply.text()
        return Answer(path, reply.status, time.monotonic() - started, body)


async def _post(session: aiohttp.ClientSession, url: str, path: str, body: object) -> int:
    async with session.post(url + path, json=body) as reply:
        await reply.read()
        return reply.status


async def _make_history(session: aiohttp.ClientSession, url: str) -> None:
    for name in ("Aiko", "Botan", "Chiyo"):
        user = {"name": name, "email": f"{name.lower()}@example.com"}
        assert await _post(session, url, "/user", user) == 201
    for _ in range(HISTORY // 50):
        updates = [_post(session, url, "/update", {"increment": 1}) for _ in range(50)]
        assert await asyncio.gather(*updates) == [200] * 50
    assert await drained_readiness(url, within=30) is not None


async def _probes(url: str, deadline: float) -> list[Answer]:
    """PROBES clients asking readiness twice a second each, unauthenticated, until
    `deadline`."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def probe() -> list[Answer]:
            answers = []
            while time.monotonic() < deadline:
                answers.append(await _get(session, url, "/health/ready"))
                await asyncio.sleep(0.5)
            return answers

        rounds = await asyncio.gather(*(probe() for _ in range(PROBES)))
    return [answer for answers in rounds for answer in answers]


async def _updates(session: aiohttp.ClientSession, url: str, deadline: float) -> list[int]:
    statuses = []
    while time.monotonic() < deadline:
        statuses.append(await _post(session, url, "/update", {"increment": 1}))
        await asyncio.sleep(0.02)
    return statuses


async def _reads(
    session: aiohttp.ClientSession, url: str, deadline: float
) -> tuple[list[Answer], list[Answer]]:
    """Rounds of reads, at least one, until `deadline`: (those that need Postgres, the others)."""
    postgres, others = [], []
    while True:
        newest = await _get(session, url, "/logs?limit=100")  # from the outbox
        others += [newest, await _get(session, url, "/status"), await _get(session, url, "/")]
        oldest = f"/logs?limit=100&page={newest.body['total_pages']}"
        postgres += [await _get(session, url, path) for path in ("/users", "/users/1", oldest)]
        if time.monotonic() >= deadline:
            return postgres, others
        await asyncio.sleep(0.2)


async def _first_success(session: aiohttp.ClientSession, url: str, path: str) -> float:
    """Seconds until `path` answers 200 (polled; at most 30)."""
    started = time.monotonic()
    while (await _get(session, url, path)).status != 200:
        assert time.monotonic() - started < 30, f"{path} did not recover"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _audit_rows(database_url: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetch("SELECT seq, old_counter, new_counter FROM audit_log "
                                      "ORDER BY seq")  # fmt: skip
    finally:
        await connection.close()


async def test_a_stalled_postgres_fails_its_reads_fast_and_loses_nothing(
    service: ServiceProcess, own_postgres: tuple[str, int]
) -> None:
    database_url, postmaster = own_postgres
    url = service.url
    async with aiohttp.ClientSession(headers=FULL_AUTH) as session:
        await _make_history(session, url)
        before, _ = await _reads(session, url, time.monotonic())
        assert {answer.status for answer in before} == {200}
        with paused(postmaster):
            deadline = time.monotonic() + STALL_SECONDS
            probes = asyncio.ensure_future(_probes(url, deadline))
            updates = asyncio.ensure_future(_updates(session, url, deadline))
            stalled, unaffected = await _reads(session, url, deadline)
            during = await updates
            probed = await probes
        recovery = await _first_success(session, url, "/users")
        after, _ = await _reads(session, url, time.monotonic())
        assert {answer.status for answer in after} == {200}
        assert await drained_readiness(url, within=30) is not None
        async with session.get(url + "/status") as reply:
            changes = (await reply.json())["counter"]  # each change added 1

    assert {answer.status for answer in stalled} == {503}
    assert {answer.status for answer in unaffected} == {200}
    # A busy host delays every answer alike: the stall may add at most FAST to the slowest answer
    # that did not need Postgres.
    bound = FAST + max(answer.seconds for answer in unaffected)
    assert max(stalled, key=lambda answer: answer.seconds).seconds < bound
    assert during == [200] * len(during)
    assert len(during) > STALL_SECONDS * 10
    assert changes == HISTORY + len(during)
    assert len(probed) > PROBES * STALL_SECONDS / 2  # the probes kept coming
    assert max(probed, key=lambda answer: answer.seconds).seconds < bound
    assert probed[-1].status == 503
    assert recovery < 5
    rows = await _audit_rows(database_url)
    assert [row["seq"] for row in rows] == list(range(1, changes + 1))  # 0 lost, none twice
    assert all(row["new_counter"] == row["seq"] for row in rows)
