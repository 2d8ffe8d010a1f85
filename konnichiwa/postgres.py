"""The Postgres pool of a worker, its bounded reads, and the versioned schema migrations it applies
at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from importlib import resources
from typing import Final, NamedTuple

import asyncpg
from aiohttp import web
from asyncpg.pool import PoolConnectionProxy

from konnichiwa.settings import settings_key

log = logging.getLogger("konnichiwa.postgres")

pg_pool = web.AppKey("pg_pool", asyncpg.Pool)

# Any fixed 64-bit number: every process that migrates this database takes the same lock.
MIGRATION_LOCK: Final = 0x6B6F6E6E6963
_MIGRATION_NAME: Final = re.compile(r"(?P<version>\d{4})_(?P<name>\w+)\.sql")
POOL_CLOSE_TIMEOUT: Final = 5.0
# A request's read, from asking the pool for a connection to the last row: longer means Postgres
# is stalled or saturated, and the request is better off with a 503 at once.
READ_TIMEOUT: Final = 1.0
# Postgres itself stops any statement of the pool's after this long (a read the client gave up
# on keeps running on the server otherwise); the consumer's batches take milliseconds.
STATEMENT_TIMEOUT: Final = "5s"


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The SQL files shipped in `konnichiwa/migrations`, in version order."""
    found = []
    for entry in resources.files("konnichiwa.migrations").iterdir():
        if match := _MIGRATION_NAME.fullmatch(entry.name):
            found.append(Migration(int(match["version"]), match["name"], entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection | PoolConnectionProxy) -> list[int]:
    """Apply the migrations this database lacks, in one transaction; return the versions applied.

    The advisory lock makes concurrent callers (several workers starting at once) take turns;
    the second finds everything applied and does nothing.
    """
    async with conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = 0")  # a migration may take long
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for migration in migrations():
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied.append(migration.version)
    if applied:
        log.info("applied migrations %s", applied)
    return applied


async def keep_session(conn: asyncpg.Connection) -> None:
    """Release without the default reset query (a round trip per release): the service sets no
    session state (no SET, LISTEN, cursors or session advisory locks). asyncpg still rolls back a
    transaction left open before calling this."""


@contextlib.asynccontextmanager
async def reading(
    pool: asyncpg.Pool, within: float = READ_TIMEOUT
) -> AsyncIterator[PoolConnectionProxy]:
    """A connection for one read, acquired and done with within `within` seconds, else
    TimeoutError (a 503).

    A read cut short terminates its connection instead of returning it: asyncpg would first
    cancel the query by asking the server, and a hung server never answers, so the request
    would wait for it after all.
    """
    connection: PoolConnectionProxy | None = None
    try:
        async with asyncio.timeout(within):
            connection = await pool.acquire()
            yield connection
    except (TimeoutError, asyncio.CancelledError):
        if connection is not None:
            connection.terminate()
        raise
    finally:
        if connection is not None:
            await pool.release(connection)  # at once if terminated


async def pg_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open this worker's pool, bring the schema up to date, close the pool on shutdown."""
    pool = await asyncpg.create_pool(
        app[settings_key].require("database_url"),
        min_size=2,
        max_size=10,
        timeout=5,
        command_timeout=10,
        reset=keep_session,
        server_settings={"statement_timeout": STATEMENT_TIMEOUT},
    )
    async with pool.acquire() as conn:
        await migrate(conn)  # also the start-up smoke call: fails fast on a wrong URL
    app[pg_pool] = pool
    yield
    try:
        async with asyncio.timeout(POOL_CLOSE_TIMEOUT):
            await pool.close()
    except TimeoutError:
        pool.terminate()
