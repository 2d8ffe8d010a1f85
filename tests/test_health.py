"""Probes: liveness touches nothing; readiness names the dependency that is down, within 1 s."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient

from konnichiwa.app import create_app
from konnichiwa.embedded import postgres_server, valkey_server
from konnichiwa.settings import Settings
from tests.support import Client, paused, pid_from_file


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A Valkey server of this test's own, to pause without disturbing other tests."""
    with valkey_server(tmp_path / "valkey") as url:
        yield url, pid_from_file(tmp_path / "valkey" / "valkey.pid")


@pytest.fixture
def own_postgres(server_dir: Path) -> Iterator[tuple[str, int]]:
    pgdata = server_dir / "postgres"
    with postgres_server(pgdata) as url:
        yield url, pid_from_file(pgdata / "postmaster.pid")


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


async def _ready_while_paused(client: Client, pid: int) -> tuple[int, dict[str, object], float]:
    with paused(pid):
        started = time.monotonic()
        response = await client.get("/health/ready")
        elapsed = time.monotonic() - started
        body = await response.json(content_type=None)
    return response.status, body, elapsed


@pytest.mark.parametrize(("down", "up"), [("redis", "postgres"), ("postgres", "redis")])
async def test_ready_names_a_hung_dependency(
    aiohttp_client: AiohttpClient, settings: Settings, own_servers: dict[str, tuple[str, int]],
    down: str, up: str,
) -> None:  # fmt: skip
    urls = {"redis_url": own_servers["redis"][0], "database_url": own_servers["postgres"][0]}
    client = await aiohttp_client(create_app(settings.replace(**urls)))
    pid = own_servers[down][1]
    status, body, elapsed = await _ready_while_paused(client, pid)
    assert status == 503
    assert elapsed < 1.0
    assert body["checks"][down]["status"] == "down"  # type: ignore[index]
    assert body["checks"][up]["status"] == "up"  # type: ignore[index]
    assert down in str(body["detail"])
    assert up not in str(body["detail"])
    assert (await client.get("/health")).status == 200  # liveness never asks a dependency
    assert (await client.get("/health/ready")).status == 200  # recovered once it answers


async def test_ready_names_a_stopped_redis(
    aiohttp_client: AiohttpClient, settings: Settings, tmp_path: Path
) -> None:
    with valkey_server(tmp_path / "stopped") as url:
        client = await aiohttp_client(create_app(settings.replace(redis_url=url)))
    response = await client.get("/health/ready")
    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    body = await response.json(content_type=None)
    assert body["checks"]["redis"]["status"] == "down"
