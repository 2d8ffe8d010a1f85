"""The Postgres pool of a worker: bounded reads, the schema migrations it applies at start-up, and
the check that the database belongs to this deployment (environment and Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Final, NamedTuple

import asyncpg
from aiohttp import web
from asyncpg.pool import PoolConnectionProxy
from redis.asyncio import Redis

from konnichiwa.redis_store import connect, key_prefix, redis_client
from konnichiwa.settings import Settings, SettingsError, settings_key
from konnichiwa.state import StateKeys

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


class Deployment(NamedTuple):
    """Who may use a database: one environment and one Redis, which holds the deployment's id
    under `key` as the database does (migration 0007)."""

    environment: str
    redis: Redis

    @property
    def key(self) -> str:
        return f"{key_prefix(self.environment)}:deployment"


class DeploymentMismatch(SettingsError):
    """DATABASE_URL and ENVIRONMENT or REDIS_URL name parts of different deployments."""


async def migrate(
    conn: asyncpg.Connection | PoolConnectionProxy, deployment: Deployment | None = None
) -> list[int]:
    """Apply the migrations this database lacks, in one transaction; return the versions applied.

    The advisory lock makes concurrent callers (several workers starting at once) take turns;
    the second finds everything applied and does nothing. With a `deployment`, the database is
    first checked to belong to it (DeploymentMismatch, and nothing written, if not) and bound to
    it at its first start.
    """
    async with conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = 0")  # a migration may take long
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        binding = None if deployment is None else await claim(conn, deployment)
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
        if deployment is not None and binding is not None:
            await bind(conn, deployment, binding)
    if applied:
        log.info("applied migrations %s", applied)
    return applied


async def claim(
    conn: asyncpg.Connection | PoolConnectionProxy, deployment: Deployment
) -> str | None:
    """Check that the database may serve `deployment` (DeploymentMismatch if not); the id to
    bind it to when it belongs to no deployment yet. Reads only."""
    bound = None
    if await conn.fetchval("SELECT to_regclass('deployment') IS NOT NULL"):
        bound = await conn.fetchrow("SELECT environment, id FROM deployment")
    environment, redis = deployment.environment, deployment.redis
    if bound is not None and bound["environment"] != environment:
        raise DeploymentMismatch(
            f"DATABASE_URL is the database of the {bound['environment']} environment, not of "
            f"ENVIRONMENT={environment}: refusing to start (nothing was written)"
        )
    held = _text(await redis.get(deployment.key))
    if bound is None:
        # A Redis with an id but no state is one whose first start stopped before the commit.
        if held is not None and await redis.exists(StateKeys(environment).state):
            raise DeploymentMismatch(
                f"REDIS_URL holds the state of deployment {held} ({environment}) but "
                "DATABASE_URL is a database of no deployment yet: refusing to start (nothing "
                "was written)"
            )
        return held or uuid.uuid4().hex
    if held != bound["id"]:
        raise DeploymentMismatch(
            f"REDIS_URL holds {f'deployment {held}' if held else 'no deployment id'} but "
            f"DATABASE_URL is the database of deployment {bound['id']} ({environment}): "
            "refusing to start (nothing was written). If this Redis replaces that deployment's "
            f"(whose data was lost), give it the id first: SET {deployment.key} {bound['id']}"
        )
    return None


async def bind(
    conn: asyncpg.Connection | PoolConnectionProxy, deployment: Deployment, binding: str
) -> None:
    """Record `binding` in the database (in the caller's transaction), then in Redis."""
    await conn.execute(
        "INSERT INTO deployment (environment, id) VALUES ($1, $2)",
        deployment.environment,
        binding,
    )
    # Redis last, just before the commit: were the commit to fail, the next start finds this id
    # in a Redis without state and takes it (see claim).
    before = _text(await deployment.redis.set(deployment.key, binding, nx=True, get=True))
    if before not in (None, binding):
        raise DeploymentMismatch(
            f"REDIS_URL was just bound to deployment {before} by another start: refusing to "
            "start (nothing was written)"
        )
    log.info("bound the database to deployment %s (%s)", binding, deployment.environment)


def _text(reply: object) -> str | None:
    """A Redis reply as text; None for none (the client returns bytes)."""
    return reply.decode() if isinstance(reply, bytes) else None


async def keep_session(conn: asyncpg.Connection) -> None:
    """Release without the default reset query (a round trip per release): the service sets no
    session state (no SET, LISTEN, cursors or session advisory locks). asyncpg still rolls back a
    transaction left open before calling this."""


@contextlib.asynccontextmanager
async def bounded_connection(
    pool: asyncpg.Pool, within: float = READ_TIMEOUT
) -> AsyncIterator[PoolConnectionProxy]:
    """A connection for one read or transaction, acquired and done with within `within`
    seconds, else TimeoutError (a 503).

    Work cut short terminates its connection instead of returning it: asyncpg would first
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
    settings = app[settings_key]
    pool = await asyncpg.create_pool(
        settings.require("database_url"),
        min_size=2,
        max_size=10,
        timeout=5,
        command_timeout=10,
        reset=keep_session,
        server_settings={"statement_timeout": STATEMENT_TIMEOUT},
    )
    async with pool.acquire() as conn:
        # Also the start-up smoke call: fails fast on a wrong URL.
        await migrate(conn, Deployment(settings.environment, app[redis_client]))
    app[pg_pool] = pool
    yield
    try:
        async with asyncio.timeout(POOL_CLOSE_TIMEOUT):
            await pool.close()
    except TimeoutError:
        pool.terminate()


async def claim_database(settings: Settings) -> list[int]:
    """Migrate the database and check (or record) its deployment once, before any worker
    starts: a refusal is then one line and exit code 2, not a worker's traceback."""
    redis = connect(settings.require("redis_url"))
    try:
        conn = await asyncpg.connect(settings.require("database_url"))
        try:
            return await migrate(conn, Deployment(settings.environment, redis))
        finally:
            await conn.close()
    finally:
        await redis.aclose()
