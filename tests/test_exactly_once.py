"""Exactly once under crashes and stalls: a retried request applies once, whatever fails."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import aiohttp
import asyncpg
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

UPDATE_CLIENTS, USER_CLIENTS = 20, 4
STALLS = 3  # Redis paused this many times, 2 s each
KILLS = 4  # workers killed with SIGKILL
RETRY_PAUSE = 0.05


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
        self.applied: dict[str, int] = {}  # key -> the seq or user id its first answer named
        self.replayed = 0
        self.retries: Counter[str] = Counter()


async def until_definite(
    session: aiohttp.ClientSession, urls: list[str], request: Request, tally: Tally
) -> None:
    """POST a request with its Idempotency-Key, on either server in turn, until it succeeds."""
    path, body, key, identity = request
    headers = {**FULL_AUTH, "Idempotency-Key": key}
    for attempt in range(10_000):
        url = urls[(hash(key) + attempt) % len(urls)]
        try:
            async with session.post(url + path, json=body, headers=headers) as reply:
                answer = await reply.json(content_type=None)
                if reply.status in (200, 201):
                    tally.replayed += reply.headers.get("Idempotent-Replayed") == "true"
                    first = tally.applied.setdefault(key, answer[identity])
                    assert first == answer[identity], "two answers for one key"
                    return
                assert reply.status in (429, 503), (reply.status, answer)
                tally.retries[answer.get("type", str(reply.status))] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.retries[type(exc).__name__] += 1
        await asyncio.sleep(RETRY_PAUSE)
    raise AssertionError(f"no definite answer for {key}")


class Request(NamedTuple):
    path: str
    body: dict[str, object]
    key: str
    identity: str  # the answer's field naming what it made


def update(number: int) -> Request:
    return Request("/update", {"increment": 1}, f"update-{number}", "seq")


def user(number: int) -> Request:
    return Request(
        "/user", {"name": "Yuki", "email": f"yuki{number}@example.jp"}, f"user-{number}", "id"
    )


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


async def test_retried_requests_apply_exactly_once_through_kills_and_stalls(
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

            async def client(make: Callable[[int], Request]) -> None:  # while faults go on
                while not faults.done():
                    await until_definite(session, urls, make(next(numbers)), tally)

            await asyncio.gather(
                *(client(update) for _ in range(UPDATE_CLIENTS)),
                *(client(user) for _ in range(USER_CLIENTS)),
            )
            await faults
        took = time.monotonic() - started
        for service in services:  # a killed worker's replacement may still be starting
            await asyncio.to_thread(service.wait_until_serving)
        assert await drained_readiness(urls[0], within=30) is not None

    connection = redis.asyncio.Redis.from_url(redis_url)
    try:
        state = await connection.hgetall("{konnichiwa:dev}:state")
    finally:
        await connection.aclose()
    database = await asyncpg.connect(database_url)
    try:
        rows = await database.fetch("SELECT seq, old_counter, new_counter FROM audit_log")
        users = await database.fetch("SELECT id, email FROM users")
        kept_answers = await database.fetchval("SELECT count(*) FROM idempotency_records")
    finally:
        await database.close()

    seqs = {seq for key, seq in tally.applied.items() if key.startswith("update")}
    ids = {user_id for key, user_id in tally.applied.items() if key.startswith("user")}
    print(
        f"{len(seqs)} updates and {len(ids)} users in {took:.1f} s: {tally.replayed} replayed, "
        f"retries {dict(tally.retries)}"
    )
    assert len(tally.applied) == next(numbers)  # every key got a definite answer
    assert int(state[b"counter"]) == int(state[b"seq"]) == len(seqs)  # 0 lost, 0 twice
    assert {row["seq"] for row in rows} == seqs
    assert len(rows) == len(seqs)
    assert all(row["new_counter"] == row["old_counter"] + 1 for row in rows)
    assert {row["id"] for row in users} == ids
    assert len(users) == kept_answers == len(ids)
    assert sum(tally.retries.values()) > 0  # the faults were felt
