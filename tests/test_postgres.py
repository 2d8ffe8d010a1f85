"""Migrations: versioned, idempotent, safe when workers start at once; `konnichiwa migrate`; a
database serves the one deployment (environment and Redis) that first started on it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from konnichiwa.postgres import Deployment, DeploymentMismatch, migrate, migrations
from konnichiwa.redis_store import key_prefix
from konnichiwa.state import StateKeys
from tests.support import (
    FULL_AUTH,
    FULL_KEY,
    Servers,
    database_url_for,
    drained_readiness,
    free_port,
    running_service,
)


@pytest.fixture
async def empty_database(servers: Servers) -> AsyncIterator[str]:
    admin = await asyncpg.connect(servers.database_url)
    name = f"empty_{os.getpid()}"
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_url_for(servers.database_url, name)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


def test_migrations_are_numbered_without_gaps() -> None:
    versions = [m.version for m in migrations()]
    assert versions == list(range(1, len(versions) + 1))


async def _migrate_once(url: str) -> list[int]:
    connection = await asyncpg.connect(url)
    try:
        return await migrate(connection)
    finally:
        await connection.close()


async def test_concurrent_migrations_apply_each_version_once(empty_database: str) -> None:
    results = await asyncio.gather(*(_migrate_once(empty_database) for _ in range(6)))
    everything = [m.version for m in migrations()]
    assert sorted(results, key=len) == [[]] * 5 + [everything]
    connection = await asyncpg.connect(empty_database)
    try:
        rows = await connection.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == everything
        assert await connection.fetchval("SELECT to_regclass('audit_log') IS NOT NULL")
    finally:
        await connection.close()
    assert await _migrate_once(empty_database) == []


@pytest.mark.slow
def test_migrate_command(empty_database: str) -> None:
    environment = {**os.environ, "DATABASE_URL": empty_database, "REDIS_URL": "redis://unused"}
    command = [sys.executable, "-m", "konnichiwa", "migrate"]
    first = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    assert "applied migrations: [1" in first.stdout
    again = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    assert again.returncode == 0
    assert "up to date" in again.stdout


# --- One database, one deployment ---------------------------------------------------------------


class Start(NamedTuple):
    """What a start finds: the database's binding (environment, id), the id and whether state
    is in Redis, and the environment starting."""

    bound: tuple[str, str] | None
    held: str | None
    state: bool
    environment: str


QA = ("qa", "qa-deployment")
ANOTHER = "another-deployment"

# Starts that go ahead, and the id the database and Redis hold afterwards ("new": a fresh one).
ACCEPTED = [
    (Start(None, None, False, "qa"), "new"),  # a new deployment
    (Start(None, ANOTHER, False, "qa"), ANOTHER),  # a first start stopped before its commit
    (Start(QA, QA[1], True, "qa"), QA[1]),  # a restart
]
# Starts refused, and words of the refusal.
REFUSED = [
    (Start(None, ANOTHER, True, "qa"), "holds the state of deployment another-deployment"),
    (Start(QA, None, False, "prod"), "the qa environment, not of ENVIRONMENT=prod"),
    (Start(QA, ANOTHER, True, "qa"), "holds deployment another-deployment but"),
    (Start(QA, None, False, "qa"), "holds no deployment id"),  # a new or emptied Redis
]


async def _rows(database_url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table of the database, by table."""
    connection = await asyncpg.connect(database_url)
    try:
        tables = await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        found = {}
        for table in (t["tablename"] for t in tables):
            rows = await connection.fetch(f'SELECT * FROM "{table}"')  # noqa: S608  (catalog names)
            found[table] = sorted(tuple(row) for row in rows)
        return found
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def _starting(
    database_url: str, redis_url: str, start: Start
) -> AsyncIterator[tuple[asyncpg.Connection, Deployment]]:
    """A connection to the database and the deployment starting, as `start` finds them."""
    redis = Redis.from_url(redis_url)
    connection = await asyncpg.connect(database_url)
    deployment = Deployment(start.environment, redis)
    try:
        if start.bound is not None:
            await connection.execute(
                "INSERT INTO deployment (environment, id) VALUES ($1, $2)", *start.bound
            )
        if start.held is not None:
            await redis.set(deployment.key, start.held)
        if start.state:
            await redis.hset(StateKeys(start.environment).state, "seq", "7")
        yield connection, deployment
    finally:
        await connection.close()
        await redis.aclose()


@pytest.mark.parametrize(("start", "binding"), ACCEPTED)
async def test_a_start_binds_the_database_to_its_deployment(
    database_url: str, redis_url: str, start: Start, binding: str
) -> None:
    async with _starting(database_url, redis_url, start) as (connection, deployment):
        await migrate(connection, deployment)
        row = await connection.fetchrow("SELECT environment, id FROM deployment")
        assert row is not None
        assert row["environment"] == start.environment
        assert row["id"] == binding or (binding == "new" and len(row["id"]) == 32)
        assert await deployment.redis.get(deployment.key) == row["id"].encode()


@pytest.mark.parametrize(("start", "words"), REFUSED)
async def test_a_start_of_another_deployment_is_refused_and_writes_nothing(
    database_url: str, redis_url: str, start: Start, words: str
) -> None:
    async with _starting(database_url, redis_url, start) as (connection, deployment):
        before = await _rows(database_url)
        with pytest.raises(DeploymentMismatch, match=re.escape(words)) as refusal:
            await migrate(connection, deployment)
        assert "\n" not in str(refusal.value)
        assert await _rows(database_url) == before
        held = await deployment.redis.get(deployment.key)
        assert held == (None if start.held is None else start.held.encode())


async def _use_the_service(url: str) -> None:
    async with aiohttp.ClientSession(headers=FULL_AUTH) as session:
        for n in range(5):
            async with session.post(url + "/update", json={"increment": n}) as reply:
                assert reply.status == 200
        user = {"name": "Aiko", "email": "aiko@example.com"}
        async with session.post(url + "/user", json=user) as reply:
            assert reply.status == 201
    assert await drained_readiness(url, within=10) is not None


class Intruder(NamedTuple):
    """A second service pointed at the database in use: its environment, its Redis database
    number (0: the first service's Redis), and words of its refusal."""

    environment: str
    redis_database: int
    words: str


@pytest.mark.slow
@pytest.mark.parametrize(
    "intruder",
    [
        Intruder("prod", 0, "DATABASE_URL is the database of the qa environment, not of "
                 "ENVIRONMENT=prod"),
        Intruder("qa", 1, "REDIS_URL holds no deployment id but DATABASE_URL is the database "
                 "of deployment"),
    ],
)  # fmt: skip
async def test_serve_refuses_a_database_another_deployment_uses(
    tmp_path: Path, redis_url: str, database_url: str, intruder: Intruder
) -> None:
    qa = {"ENVIRONMENT": "qa", "REDIS_URL": redis_url, "DATABASE_URL": database_url,
          "API_KEY": FULL_KEY}  # fmt: skip
    other_redis = database_url_for(redis_url, str(intruder.redis_database))
    with running_service(tmp_path / "qa.log", qa, "--workers", "1") as service:
        await _use_the_service(service.url)
        before = await _rows(database_url)
        refused = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "konnichiwa", "serve", "--port", str(free_port())],
            env={**os.environ, **qa, "ENVIRONMENT": intruder.environment,
                 "REDIS_URL": other_redis},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert await _rows(database_url) == before
    assert refused.returncode == 2
    (line,) = refused.stderr.splitlines()
    assert line.startswith("konnichiwa: configuration error: ")
    assert intruder.words in line
    other = Redis.from_url(other_redis)
    try:
        assert await other.keys(f"{key_prefix(intruder.environment)}*") == []  # nor in Redis
    finally:
        await other.aclose()
