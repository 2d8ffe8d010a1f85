"""A worker's Redis client: created once at start-up, checked with a PING, closed on shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis

from konnichiwa.settings import settings_key

redis_client = web.AppKey("redis_client", Redis)

CONNECT_TIMEOUT: Final = 2.0
# A command that takes longer than this means Redis is in trouble: fail with a 503, never hang.
COMMAND_TIMEOUT: Final = 5.0


def key_prefix(environment: str) -> str:
    """Every key starts with one hash tag per environment: one Redis Cluster slot for all."""
    return f"{{konnichiwa:{environment}}}"


def connect(url: str) -> Redis:
    """A client whose pool waits (bounded) for a free connection instead of failing at once."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=64,
        timeout=COMMAND_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=COMMAND_TIMEOUT,
        health_check_interval=30,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open this worker's client and fail start-up at once if Redis does not answer."""
    client = connect(app[settings_key].require("redis_url"))
    await client.ping()
    app[redis_client] = client
    yield
    await client.aclose()
