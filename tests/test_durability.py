"""The shipped Valkey configuration (embedded.VALKEY_CONFIG; compose.yaml and the ElastiCache
parameter group agree): no acknowledged update is lost when Valkey is killed, and a full Valkey
refuses changes with a 503, never evicting anything, and drains once Postgres takes the outbox."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg
import psutil
import pytest
import yaml
from redis.asyncio import Redis

from konnichiwa.embedded import VALKEY_CONFIG, valkey_server
from konnichiwa.schemas import MESSAGE_MAX_LENGTH
from tests.support import (
    FULL_AUTH,
    FULL_KEY,
    drained_readiness,
    free_port,
    paused,
    pid_from_file,
    running_service,
)

ROOT: Final = Path(__file__).parent.parent
SENDERS: Final = 32  # concurrent clients, each sending its next update once answered


async def _config(url: str) -> dict[str | None, str | None]:
    async with _redis(url) as client:
        return await client.config_get("*")


class Load:
    """SENDERS clients posting increments of 1 until stopped; the answers to those acknowledged."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.acknowledged: list[dict[str, Any]] = []
        self.refused = 0
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=SENDERS)
        async with aiohttp.ClientSession(connector=connector, headers=FULL_AUTH) as session:
            await asyncio.gather(*(self._send(session) for _ in range(SENDERS)))

    async def _send(self, session: aiohttp.ClientSession) -> None:
        while not self.stopping.is_set():
            try:
                async with session.post(self.url + "/update", json={"increment": 1}) as reply:
                    if reply.status == 200:
                        self.acknowledged.append(await reply.json())
                        continue
            except aiohttp.ClientError:
                pass  # not acknowledged: the connection broke
            self.refused += 1
            await asyncio.sleep(0.01)

    async def until_acknowledged(self, count: int, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while len(self.acknowledged) < count:
            assert time.monotonic() < deadline, f"only {len(self.acknowledged)} acknowledged"
            await asyncio.sleep(0.01)


async def _audit_rows(database_url: str) -> dict[int, int]:
    """The audit log as {seq: new_counter}."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT seq, new_counter FROM audit_log")
    finally:
        await connection.close()
    return {row["seq"]: row["new_counter"] for row in rows}


@pytest.mark.slow
async def test_no_acknowledged_update_is_lost_when_valkey_is_killed(
    tmp_path: Path, database_url: str
) -> None:
    valkey_dir = tmp_path / "valkey"
    port = free_port()  # the restarted Valkey listens where the service expects it
    with valkey_server(valkey_dir, port) as redis_url:
        config = await _config(redis_url)
        assert (config["appendonly"], config["appendfsync"]) == ("yes", "always")
        environment = _environment(redis_url, database_url)
        with running_service(tmp_path / "serve.log", environment, "--workers", "2") as service:
            load = Load(service.url)
            sending = asyncio.ensure_future(load.run())
            await load.until_acknowledged(1000)
            valkey = psutil.Process(pid_from_file(valkey_dir / "valkey.pid"))
            valkey.send_signal(signal.SIGKILL)  # mid-write: clients are waiting for answers
            await asyncio.to_thread(valkey.wait, 10)
            before_kill = len(load.acknowledged)
            with valkey_server(valkey_dir, port):  # replays its append-only file
                await load.until_acknowledged(before_kill + 1000)
                load.stopping.set()
                await sending
                assert await drained_readiness(service.url, within=30) is not None
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(service.url + "/status") as reply,
                ):
                    counter = (await reply.json())["counter"]
    rows = await _audit_rows(database_url)
    assert sorted(rows) == list(range(1, counter + 1))  # each change once, every +1 counted
    seqs = [answer["seq"] for answer in load.acknowledged]
    assert len(set(seqs)) == len(seqs)
    lost = [a for a in load.acknowledged if rows.get(a["seq"]) != a["new_state"]["counter"]]
    assert lost == []
    assert load.refused > 0  # the kill did hit requests


@pytest.mark.slow
async def test_a_full_valkey_refuses_changes_with_a_503_and_drains(
    tmp_path: Path, own_postgres: tuple[str, int]
) -> None:
    database_url, postmaster = own_postgres
    with (
        valkey_server(tmp_path / "valkey") as redis_url,
        running_service(tmp_path / "serve.log", _environment(redis_url, database_url)) as service,
    ):
        async with _redis(redis_url) as redis, aiohttp.ClientSession(headers=FULL_AUTH) as session:
            with paused(postmaster):  # the changes wait in the outbox
                for _ in range(60):
                    sent = [_increment(session, service.url) for _ in range(50)]
                    assert await asyncio.gather(*sent) == [200] * 50
                used = (await redis.info("memory"))["used_memory"]
                await redis.config_set("maxmemory", used - 64 * 1024)
                async with session.post(service.url + "/update", json={"counter": 0}) as full:
                    problem = await full.json(content_type=None)
                async with session.get(service.url + "/status") as reply:
                    status = await reply.json()
            assert full.status == 503
            assert problem["type"] == "/problems/store-full"
            assert "out of memory" in problem["detail"]
            assert status["counter"] == 3000  # reads still work; nothing was evicted
            # Postgres takes the outbox, and the consumer trims it below maxmemory.
            deadline = time.monotonic() + 20
            while await _increment(session, service.url) != 200:
                assert time.monotonic() < deadline, "the full Valkey did not drain"
                await asyncio.sleep(0.1)
        assert await drained_readiness(service.url, within=10) is not None
    assert sorted(await _audit_rows(database_url)) == list(range(1, 3002))


def _environment(redis_url: str, database_url: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "API_KEY": FULL_KEY,
            "RATE_LIMIT_WRITES": "1000000/10s"}  # fmt: skip


@contextlib.asynccontextmanager
async def _redis(url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


async def _increment(session: aiohttp.ClientSession, url: str) -> int:
    """Add 1 with the longest message there is: the outbox grows fast, and shrinks fast."""
    body = {"increment": 1, "message": "x" * MESSAGE_MAX_LENGTH}
    async with session.post(url + "/update", json=body) as reply:
        await reply.read()
        return reply.status


def _compose_valkey_options() -> dict[str, str]:
    command: list[str] = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["redis"][
        "command"
    ]
    return dict(zip(command[1::2], command[2::2], strict=True))


def test_every_stack_ships_the_same_valkey_policy() -> None:
    compose = _compose_valkey_options()
    for option in ("appendonly", "appendfsync", "maxmemory", "maxmemory-policy"):
        assert compose[f"--{option}"] == VALKEY_CONFIG[option]
    terraform = (ROOT / "deploy" / "terraform" / "ecs" / "data.tf").read_text()
    assert re.search(r'name\s*=\s*"maxmemory-policy"\s*\n\s*value\s*=\s*"noeviction"', terraform)
    assert "aws_elasticache_parameter_group.main.name" in terraform
