"""Exactly once under crashes and stalls: retried updates apply once, whatever fails meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis.asyncio

from konnichiwa.embedded import valkey_server
from tests.support import (
    FULL_AUTH,
    FULL_KEY,
    ServiceProcess,
    drained_readiness,
    paused,
    pid_from_file,
    running_service,
)

CLIENTS = 24
STALLS = 3  # Redis paused this many times, 2 s each
KILLS = 4  # workers killed with SIGKILL
RETRY_PAUSE = 0.05


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Valkey of this test's own, to pause: its URL and pidfile."""
    with valkey_server(tmp_path / "valkey") as url:
        yield url, tmp_path / "valkey" / "valkey.pid"


@contextlib.contextmanager
def two_services(
    tmp_path: Path, redis_url: str, database_url: str
) -> Iterator[list[ServiceProcess]]:
    """Two servers of two workers each on one Redis and Postgres."""
    environment = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "API_KEY": FULL_KEY}
    with (
        running_service(tmp_path / "a.log", environment, "--workers", "2") as first,
        running_service(tmp_path / "b.log", environment, "--workers", "2") as second,
    ):
        yield [first, second]


class Tally:
    """What the clients saw: definite answers by key, and every other outcome by kind."""

    def __init__(self) -> None:
        self.applied: dict[str, int] = {}  # key -> the seq its first answer named
        self.replayed = 0
        self.retries: Counter[str] = Counter()


async def update_until_definite(
    session: aiohttp.ClientSession, urls: list[str], key: str, tally: Tally
) -> None:
    """POST one increment with its Idempotency-Key, on either server, until a 200."""
    headers = {**FULL_AUTH, "Idempotency-Key": key}
    for attempt in range(10_000):
        url = urls[(hash(key) + attempt) % len(urls)]
        try:
            async with session.post(url + "/update", json={"increment": 1}, headers=headers) as r:
                body = await r.json(content_type=None)
                if r.status == 200:
                    tally.replayed += r.headers.get("Idempotent-Replayed") == "true"
                    seq = body["seq"]
                    assert tally.applied.setdefault(key, seq) == seq, "two answers for one key"
                    return
                assert r.status in (409, 429, 503), (r.status, body)
                tally.retries[body.get("type", str(r.status))] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.retries[type(exc).__name__] += 1
        await asyncio.sleep(RETRY_PAUSE)
    raise AssertionError(f"no definite answer for {key}")


async def chaos(services: list[ServiceProcess], valkey_pid: int) -> None:
    """Kill workers and pause Redis, in a shuffled order, while the clients run."""
    faults = ["kill"] * KILLS + ["stall"] * STALLS
    random.Random(7).shuffle(faults)
    for number, fault in enumerate(faults):
        await asyncio.sleep(1.5)
        if fault == "kill":
            workers = services[number % len(services)].workers()
            if workers:
                workers[0].send_signal(signal.SIGKILL)
        else:
            with paused(valkey_pid):
                await asyncio.sleep(2)


@contextlib.asynccontextmanager
async def clients() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


async def test_retried_updates_apply_exactly_once_through_kills_and_stalls(
    tmp_path: Path, valkey: tuple[str, Path], database_url: str
) -> None:
    redis_url, pidfile = valkey
    tally = Tally()
    with two_services(tmp_path, redis_url, database_url) as services:
        urls = [service.url for service in services]
        started = time.monotonic()
        async with clients() as session:
            faults = asyncio.create_task(chaos(services, pid_from_file(pidfile)))
            numbers = itertools.count()

            async def client() -> None:  # new keys for as long as the faults go on
                while not faults.done():
                    await update_until_definite(session, urls, f"k{next(numbers)}", tally)

            await asyncio.gather(*(client() for _ in range(CLIENTS)))
            await faults
        took = time.monotonic() - started
        assert await drained_readiness(urls[0], within=30) is not None

    connection = redis.asyncio.Redis.from_url(redis_url)
    try:
        state = await connection.hgetall("{konnichiwa:dev}:state")
    finally:
        await connection.aclose()
    database = await asyncpg.connect(database_url)
    try:
        rows = await database.fetch("SELECT seq, old_counter, new_counter FROM audit_log")
    finally:
        await database.close()

    updates = next(numbers)
    print(f"{updates} updates in {took:.1f} s: {tally.replayed} replayed, retries {tally.retries}")
    assert len(tally.applied) == updates  # every key got a definite answer
    assert len(set(tally.applied.values())) == updates  # each its own change
    assert int(state[b"counter"]) == updates  # 0 lost, 0 applied twice
    assert int(state[b"seq"]) == updates
    assert len(rows) == updates
    assert {row["seq"] for row in rows} == set(tally.applied.values())
    assert all(row["new_counter"] == row["old_counter"] + 1 for row in rows)
    assert sum(tally.retries.values()) > 0  # the faults were felt
