"""A worker's Redis client: created once at start-up, checked with a PING, closed on shutdown."""

from __future__ import annotations

import asyncio
import hashlib
import math
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, Generic, TypeVar

from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

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
    """Concurrent calls sent as one: while a batch is on the wire, the next one fills.

    `send` gets the waiting items in arrival order (at most `limit`) and returns one outcome per
    item, a value or an exception; if `send` itself fails, every item of its batch fails alike.
    Up to `depth` batches are on the wire at once: a batch goes as soon as there is room, and
    each `send` starts in the order of its batch, so a `send` that issues its command before its
    first pause (e.g. to a `PipelinedConnection`) has the batches applied in arrival order.
    """

    __slots__ = ("_depth", "_dispatching", "_limit", "_queue", "_send", "_sending")

    def __init__(
        self,
        send: Callable[[list[_I]], Awaitable[Sequence[_O | Exception]]],
        limit: int,
        depth: int = 1,
    ) -> None:
        self._send, self._limit, self._depth = send, limit, depth
        self._queue: list[tuple[_I, asyncio.Future[_O]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._dispatching = False

    async def __call__(self, item: _I) -> _O:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[_O] = loop.create_future()
        self._queue.append((item, answer))
        if not self._dispatching:  # after the callbacks ready now: they may add to the batch
            self._dispatching = True
            loop.call_soon(self._dispatch)
        return await answer

    def _dispatch(self) -> None:
        self._dispatching = False
        while self._queue and len(self._sending) < self._depth:
            batch = self._queue[: self._limit]
            del self._queue[: self._limit]
            delivery = asyncio.ensure_future(self._deliver(batch))
            self._sending.add(delivery)
            delivery.add_done_callback(self._delivered)

    def _delivered(self, delivery: asyncio.Task[None]) -> None:
        self._sending.discard(delivery)
        self._dispatch()  # what waited for room goes now

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
    return Redis.from_pool(_pool(url, timeout, connections))  # the client owns the pool


def _pool(url: str, timeout: float, connections: int) -> BlockingConnectionPool:
    return BlockingConnectionPool.from_url(
        url,
        max_connections=connections,
        timeout=timeout,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=timeout,
        health_check_interval=30,
    )


class PipelinedConnection:
    """One connection on which commands are pipelined: each is written without waiting for the
    replies to those before it, so Redis runs them in the order they were asked for and may run
    several in one turn of its event loop (one AOF write and fsync for all of them).

    A Runner, like a client's `execute_command`. A reply not back within `timeout` seconds of its
    command's writing closes the connection and fails every command still unanswered with a
    TimeoutError (each may have run); commands not yet written go on a new connection. Each new
    connection first loads `scripts`: a Redis that restarted would otherwise answer NOSCRIPT to
    every script pipelined, and each would be sent again after those that came later.
    """

    __slots__ = ("_link", "_make", "_scripts", "_timeout", "_unsent", "_writer")

    def __init__(
        self, url: str, timeout: float = COMMAND_TIMEOUT, scripts: Sequence[LuaScript] = ()
    ) -> None:
        self._make: Callable[[], AbstractConnection] = _pool(url, timeout, 1).make_connection
        self._timeout, self._scripts = timeout, scripts
        self._link: _Link | None = None
        self._unsent: list[tuple[tuple[EncodableT, ...], asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def __call__(self, *args: EncodableT) -> Any:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._unsent.append((args, reply))
        if self._writer is None:  # one writer: commands go out in the order they came
            self._writer = asyncio.ensure_future(self._write())
        return await reply

    async def _write(self) -> None:
        try:
            while self._unsent:
                link = self._link or await self._open()
                if link is None:
                    return
                if not link.unanswered:  # idle: a stale connection is checked with a PING first
                    try:
                        await link.connection.check_health()  # type: ignore[no-untyped-call]
                    except Exception as exc:
                        await self._drop(link, exc)
                        continue
                unsent, self._unsent = self._unsent, []
                await self._send(link, unsent)
        finally:
            self._writer = None

    async def _open(self) -> _Link | None:
        """A new connection; None if none could be made, its commands failed (never sent)."""
        connection = self._make()
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
            for script in self._scripts:
                await connection.send_command("SCRIPT", "LOAD", script.source)
                await connection.read_response()
        except Exception as exc:
            _fail([reply for _, reply in self._unsent], exc)
            self._unsent = []
            return None
        self._link = _Link(connection)
        return self._link

    async def _send(
        self, link: _Link, commands: list[tuple[tuple[EncodableT, ...], asyncio.Future[Any]]]
    ) -> None:
        deadline = asyncio.get_running_loop().time() + self._timeout
        packed = []
        for args, reply in commands:
            if not reply.done():  # else its caller gave up before it was sent
                packed += link.connection.pack_command(*args)
                link.unanswered.append((reply, deadline))
        try:
            await link.connection.send_packed_command(packed, check_health=False)
        except Exception as exc:
            await self._drop(link, exc)
            return
        if link.reader is None and link.unanswered:  # only now: a health check reads too
            link.reader = asyncio.ensure_future(self._read(link))

    async def _read(self, link: _Link) -> None:
        try:
            while link.unanswered:
                reply, deadline = link.unanswered[0]
                try:
                    async with asyncio.timeout_at(deadline):
                        answer = await link.connection.read_response(timeout=math.inf)
                except ResponseError as exc:  # that command's own error; the rest still come
                    answer = exc
                except TimeoutError:
                    await self._drop(link, RedisTimeoutError("Timeout reading a reply"))
                    return
                except Exception as exc:
                    await self._drop(link, exc)
                    return
                link.unanswered.popleft()
                _settle(reply, answer)
        finally:
            link.reader = None

    async def _drop(self, link: _Link, exc: Exception) -> None:
        """Fail every command unanswered on `link`'s connection; the next goes on a new one."""
        if self._link is link:
            self._link = None
        unanswered = [reply for reply, _ in link.unanswered]
        link.unanswered.clear()
        _fail(unanswered, exc)
        await link.connection.disconnect(nowait=True)

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
        if self._link is not None:
            if self._link.reader is not None:
                self._link.reader.cancel()
            await self._drop(self._link, RedisConnectionError("Connection closed"))


class _Link:
    """A connection of a PipelinedConnection, the replies it owes (oldest first, each with its
    deadline), and the task reading them while there are any."""

    __slots__ = ("connection", "reader", "unanswered")

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.unanswered: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.reader: asyncio.Task[None] | None = None


def _settle(reply: asyncio.Future[Any], answer: Any) -> None:
    if reply.done():  # its caller gave up
        return
    if isinstance(answer, Exception):
        reply.set_exception(answer)
    else:
        reply.set_result(answer)


def _fail(replies: Iterable[asyncio.Future[Any]], exc: Exception) -> None:
    for reply in replies:
        _settle(reply, exc)


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
