"""A worker's Redis client: created once at start-up, checked with a PING, closed on shutdown."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import NoScriptError

from konnichiwa.settings import settings_key

redis_client = web.AppKey("redis_client", Redis)

CONNECT_TIMEOUT: Final = 2.0
# A command that takes longer than this means Redis is in trouble: fail with a 503, never hang.
COMMAND_TIMEOUT: Final = 5.0


def key_prefix(environment: str) -> str:
    """Every key starts with one hash tag per environment: one Redis Cluster slot for all."""
    return f"{{konnichiwa:{environment}}}"


class LuaScript:
    """A server-side script sent by its SHA1 (EVALSHA), its source only when Redis lacks it."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324  (Redis names scripts so)

    async def __call__(self, run: Runner, keys: Sequence[str], *args: str | int | bytes) -> Any:
        """Run through `run`: a client's `execute_command`, or a `Pipeliner`'s `execute`."""
        try:
            return await run("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or failed-over Redis forgot it
            return await run("EVAL", self.source, len(keys), *keys, *args)


class Pipeliner:
    """Concurrent commands sent together: while one pipeline is on the wire, the next one fills.

    Each command keeps its own atomicity (a Lua script runs whole) and its own answer or error;
    what the requests share is the round trip and the client's per-call overhead.
    """

    __slots__ = ("_flusher", "_queue", "_redis")

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def execute(self, *command: Any) -> Any:
        answer = asyncio.get_running_loop().create_future()
        self._queue.append((command, answer))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        return await answer

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)
        finally:
            self._flusher = None

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        pipeline = self._redis.pipeline(transaction=False)
        for command, _ in batch:
            pipeline.execute_command(*command)
        try:
            results = await pipeline.execute(raise_on_error=False)
        except Exception as exc:  # the connection failed: every command in it fails alike
            results = [exc] * len(batch)
        for (_, answer), result in zip(batch, results, strict=True):
            if answer.done():
                continue
            if isinstance(result, Exception):
                answer.set_exception(result)
            else:
                answer.set_result(result)


Runner = Callable[..., Awaitable[Any]]
pipeliner = web.AppKey("pipeliner", Pipeliner)


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
    app[pipeliner] = Pipeliner(client)
    yield
    await client.aclose()
