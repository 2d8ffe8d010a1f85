"""Migrations: versioned, idempotent, safe when workers start at once; `konnichiwa migrate`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import pytest

from konnichiwa.postgres import migrate, migrations
from tests.support import Servers, database_url_for


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


def test_migrate_command(empty_database: str) -> None:
    environment = {**os.environ, "DATABASE_URL": empty_database, "REDIS_URL": "redis://unused"}
    command = [sys.executable, "-m", "konnichiwa", "migrate"]
    first = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    assert "applied migrations: [1" in first.stdout
    again = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    assert again.returncode == 0
    assert "up to date" in again.stdout
