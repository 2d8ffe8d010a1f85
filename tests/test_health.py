"""Probes: liveness touches nothing; readiness names the dependency that is down, within ~1 s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import ClientResponse
from pytest_aiohttp import AiohttpClient

from konnichiwa.app import create_app
from konnichiwa.embedded import valkey_server
from konnichiwa.health import CHECK_TIMEOUT, FRESH_FOR
from konnichiwa.postgres import pg_pool
from konnichiwa.settings import Settings
from tests.support import Client, paused, pid_from_file

# The check's time-out, and the way there and back on a machine busy with the rest of the suite.
ANSWERED_WITHIN = CHECK_TIMEOUT + 0.5


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A Valkey server of this test's own, to pause without disturbing other tests."""
    with valkey_server(tmp_path / "valkey") as url:
        yield url, pid_from_file(tmp_path / "valkey" / "valkey.pid")


@pytest.fixture
def own_servers(
    own_valkey: tuple[str, int], own_postgres: tuple[str, int]
) -> dict[str, tuple[str, int]]:
    """(URL, pid) of a Redis and a Postgres of this test's own, by name."""
    return {"redis": own_valkey, "postgres": own_postgres}


async def test_liveness(client: Client) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert response.content_type == "text/plain"
    assert await response.text() == "ok"


async def test_ready(client: Client) -> None:
    response = await client.get("/health/ready")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "ready"
    assert {name: check["status"] for name, check in body["checks"].items()} == {
        "redis": "up",
        "postgres": "up",
    }
    assert all(check["latency_ms"] >= 0 for check in body["checks"].values())


@pytest.mark.slow
@pytest.mark.parametrize(("down", "up"), [("redis", "postgres"), ("postgres", "redis")])
async def test_ready_names_a_hung_dependency(
    aiohttp_client: AiohttpClient, settings: Settings, own_servers: dict[str, tuple[str, int]],
    down: str, up: str,
) -> None:  # fmt: skip
    urls = {"redis_url": own_servers["redis"][0], "database_url": own_servers["postgres"][0]}
    client = await aiohttp_client(create_app(settings.replace(**urls)))
    with paused(own_servers[down][1]):
        response, slowest = await _readiness_turns(client, 503)
        assert (await client.get("/health")).status == 200  # liveness never asks a dependency
    assert response is not None
    assert slowest < ANSWERED_WITHIN
    body = await response.json(content_type=None)
    assert body["checks"][down]["status"] == "down"
    assert body["checks"][up]["status"] == "up"
    assert down in str(body["detail"])
    assert up not in str(body["detail"])
    assert (await _readiness_turns(client, 200))[0] is not None  # recovered once it answers


async def _readiness_turns(client: Client, status: int) -> tuple[ClientResponse | None, float]:
    """The first readiness answer with `status` within the time an answer may be old (None if
    none came), and how long the slowest answer took."""
    deadline = time.monotonic() + FRESH_FOR + CHECK_TIMEOUT + 0.5
    slowest = 0.0
    while time.monotonic() < deadline:
        started = time.monotonic()
        response = await client.get("/health/ready")
        await response.read()
        slowest = max(slowest, time.monotonic() - started)
        if response.status == status:
            return response, slowest
        await asyncio.sleep(0.05)
    return None, slowest


async def test_a_burst_of_probes_costs_one_check(client: Client) -> None:
    pool = client.app[pg_pool]
    idle_size = pool.get_size()
    statuses = await asyncio.gather(*(_status(client, "/health/ready") for _ in range(100)))
    assert statuses == [200] * 100
    assert pool.get_size() == idle_size  # one check at a time: the pool never had to grow


async def _status(client: Client, path: str) -> int:
    return (await client.get(path)).status


@pytest.mark.slow
async def test_ready_names_a_stopped_redis(
    aiohttp_client: AiohttpClient, settings: Settings, tmp_path: Path
) -> None:
    with valkey_server(tmp_path / "stopped") as url:
        client = await aiohttp_client(create_app(settings.replace(redis_url=url)))
    response, _ = await _readiness_turns(client, 503)
    assert response is not None
    assert response.headers["Retry-After"] == "5"
    body = await response.json(content_type=None)
    assert body["checks"]["redis"]["status"] == "down"
