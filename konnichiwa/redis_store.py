"""A worker's Redis client: created once at start-up, checked with a PING, closed on shutdown."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, Generic, TypeVar

from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from konnichiwa.settings import settings_key

redis_client = web.AppKey("redis_client", Redis)
_I = TypeVar("_I")
_O = TypeVar("_O")

CONNECT_TIMEOUT: Final = 2.0  # a new connection: also at start-up, when the machine is busiest
# A command that takes longer than this means Redis is in trouble: fail with a 503, never hang.
# Every command the service sends takes well under a millisecond of Redis's time.
COMMAND_TIMEOUT: Final = 1.0


def key_prefix(environment: str) -> str:
    """Every key starts with one hash tag per environment: one Redis Cluster slot for all."""
    return f"{{konnichiwa:{environment}}}"


class LuaScript:
    """A server-side script sent by its SHA1 (EVALSHA), its source only when Redis lacks it."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()  # Redis's name

    async def __call__(self, run: Runner, keys: Sequence[str], *args: str | int | bytes) -> Any:
        """Run through `run`, e.g. a client's `execute_command`."""
        try:
            return await run("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or failed-over Redis forgot it
            return await run("EVAL", self.source, len(keys), *keys, *args)


class Batcher(Generic[_I, _O]):
    """Concurrent calls sent as one: while one batch is on the wire, the next one fills.

    `send` gets the waiting items in arrival order (at most `limit`) and returns one outcome per
    item, a value or an exception; if `send` itself fails, every item of its batch fails alike.
    """

    __slots__ = ("_flusher", "_limit", "_queue", "_send")

    def __init__(
        self, send: Callable[[list[_I]], Awaitable[Sequence[_O | Exception]]], limit: int
    ) -> None:
        self._send, self._limit = send, limit
        self._queue: list[tuple[_I, asyncio.Future[_O]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def __call__(self, item: _I) -> _O:
        answer: asyncio.Future[_O] = asyncio.get_running_loop().create_future()
        self._queue.append((item, answer))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        return await answer

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._limit]
                del self._queue[: self._limit]
                await self._deliver(batch)
        finally:
            self._flusher = None

    async def _deliver(self, batch: list[tuple[_I, asyncio.Future[_O]]]) -> None:
        try:
            outcomes: Sequence[_O | Exception] = await self._send([item for item, _ in batch])
        except Exception as exc:  # the round trip failed: every call in it fails alike
            outcomes = [exc] * len(batch)
        for (_, answer), outcome in zip(batch, outcomes, strict=True):
            if answer.done():  # its request was cancelled
                continue
            if isinstance(outcome, Exception):
                answer.set_exception(outcome)
            else:
                answer.set_result(outcome)


Runner = Callable[..., Awaitable[Any]]


def connect(url: str, timeout: float = COMMAND_TIMEOUT, connections: int = 64) -> Redis:
    """A client whose pool waits (bounded) for a free connection instead of failing at once,
    and whose commands fail after `timeout` seconds. It never sends a command twice."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=connections,
        timeout=timeout,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=timeout,
        health_check_interval=30,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


def never_sent(exc: BaseException) -> bool:
    """Whether a failed call cannot have reached Redis: no connection could be made, or none
    was free. Any other failure (a timeout, a connection lost while waiting for the reply) may
    have come after Redis ran the command."""
    refused = (ConnectionRefusedError, FileNotFoundError, socket.gaierror)
    return isinstance(exc, RedisConnectionError) and (
        isinstance(exc.__cause__, refused) or str(exc) == NO_FREE_CONNECTION
    )


NO_FREE_CONNECTION: Final = "No connection available."  # what redis-py's pool raises


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open this worker's client and fail start-up at once if Redis does not answer."""
    client = connect(app[settings_key].require("redis_url"))
    await client.ping()
    app[redis_client] = client
    yield
    await client.aclose()
