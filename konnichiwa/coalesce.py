"""Coalescing: many concurrent requests served by one round trip to a store, still linearizable.

(Also `Memo`, for results that can never change: computed once, shared by all who ask; and
`TtlCache`, for answers from a rate-limited source that may be a little old: fetched once per
time to live, served stale for a while when the source fails.)

A request may share only a round trip that starts after it arrived: one already on the wire may
have been answered before a write the request saw acknowledged. So a request arriving while a
round trip is in flight waits for the next one, which starts as soon as the current one returns
and serves everyone who arrived meanwhile. Under load each round trip serves a whole wave of
requests; when idle, a request starts its own at once.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, Literal, NamedTuple, TypeVar

_T = TypeVar("_T")
_K = TypeVar("_K", bound=Hashable)


class CoalescedRead(Generic[_T]):
    """Read through `fetch`, sharing each call among the requests that may share it."""

    __slots__ = ("_fetch", "_runner", "_waiting")

    def __init__(self, fetch: Callable[[], Awaitable[_T]]) -> None:
        self._fetch = fetch
        self._waiting: list[asyncio.Future[_T]] = []  # for the next round trip
        self._runner: asyncio.Task[None] | None = None  # making round trips while anyone waits

    async def get(self) -> _T:
        # A future of its own per request, not one shared future: a waiter that gives up
        # (client gone, time-out) cancels only its own, and no shield is needed per request.
        waiter: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        if self._runner is None:
            self._runner = asyncio.ensure_future(self._run())
        return await waiter

    async def _run(self) -> None:
        waiters: list[asyncio.Future[_T]] = []
        try:
            while self._waiting:
                waiters, self._waiting = self._waiting, []
                try:
                    result = await self._fetch()
                except Exception as exc:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(exc)
                else:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(result)
        finally:
            self._runner = None
            for waiter in (*waiters, *self._waiting):
                waiter.cancel()  # a no-op for those answered; the rest only when shutting down


class CoalescedReads(Generic[_K, _T]):
    """A `CoalescedRead` per key (a page, say), kept for the most recently created keys."""

    __slots__ = ("_fetch", "_reads", "_size")

    def __init__(self, fetch: Callable[[_K], Awaitable[_T]], size: int) -> None:
        self._fetch, self._size = fetch, size
        self._reads: dict[_K, CoalescedRead[_T]] = {}

    async def get(self, key: _K) -> _T:
        read = self._reads.get(key)
        if read is None:
            read = self._reads[key] = CoalescedRead(functools.partial(self._fetch, key))
            if len(self._reads) > self._size:  # the oldest goes; its waiters still get answers
                del self._reads[next(iter(self._reads))]
        return await read.get()


def _retrieved(future: asyncio.Future[Any]) -> None:
    future.exception()  # marks it retrieved even if every waiter gave up meanwhile


class Memo(Generic[_K, _T]):
    """Values that never change once computed, kept for the most recent keys; concurrent misses
    of one key compute it once."""

    __slots__ = ("_size", "_values")

    def __init__(self, size: int) -> None:
        self._size = size
        self._values: OrderedDict[_K, asyncio.Future[_T]] = OrderedDict()

    async def get(self, key: _K, compute: Callable[[], Awaitable[_T]]) -> _T:
        found = self._values.get(key)
        if found is None:
            found = self._values[key] = asyncio.ensure_future(compute())
            found.add_done_callback(lambda done: self._forget_failure(key, done))
            if len(self._values) > self._size:
                self._values.popitem(last=False)
        else:
            self._values.move_to_end(key)
        return await asyncio.shield(found)

    def _forget_failure(self, key: _K, done: asyncio.Future[_T]) -> None:
        if (done.cancelled() or done.exception() is not None) and self._values.get(key) is done:
            del self._values[key]  # the next request tries again


class Cached(NamedTuple, Generic[_T]):
    """A value from a `TtlCache`, how old it is, and where it came from: kept and fresh (`hit`),
    fetched for this request (`miss`), or kept past its time to live because the source failed
    (`stale`)."""

    value: _T
    age: float
    status: Literal["hit", "miss", "stale"]


class _Entry(Generic[_T]):
    __slots__ = ("fetched_at", "retry_at", "ttl", "value")

    def __init__(self, value: _T, fetched_at: float, ttl: float) -> None:
        self.value = value
        self.fetched_at = fetched_at
        self.retry_at = fetched_at
        self.ttl = ttl


class TtlCache(Generic[_K, _T]):
    """Values kept `ttl` seconds for the most recent keys; concurrent misses of a key make one
    fetch (single-flight). When a fetch fails with one of `outages`, the last good value is
    served for up to `stale` seconds past its time to live, and the source is left alone for
    `retry_interval` seconds before the next try. `ttl_of` gives some values a time to live of
    their own (e.g. a shorter one to a "not found")."""

    __slots__ = (
        "_entries", "_in_flight", "_outages", "_retry", "_size", "_stale", "_ttl", "_ttl_of",
    )  # fmt: skip

    def __init__(
        self,
        ttl: float,
        stale: float,
        outages: tuple[type[BaseException], ...],
        *,
        size: int = 1024,
        retry_interval: float = 2.0,
        ttl_of: Callable[[_T], float] | None = None,
    ) -> None:
        self._ttl, self._stale, self._retry = ttl, stale, retry_interval
        self._ttl_of = ttl_of
        self._outages = outages
        self._size = size
        self._entries: OrderedDict[_K, _Entry[_T]] = OrderedDict()
        self._in_flight: dict[_K, asyncio.Future[_T]] = {}

    async def get(self, key: _K, fetch: Callable[[], Awaitable[_T]]) -> Cached[_T]:
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            if now - entry.fetched_at < entry.ttl:
                return Cached(entry.value, now - entry.fetched_at, "hit")
            if now < entry.retry_at and self._servable(entry, now):
                return Cached(entry.value, now - entry.fetched_at, "stale")
        future = self._in_flight.get(key)
        if future is None:
            future = self._in_flight[key] = asyncio.ensure_future(self._fetch(key, fetch))
            future.add_done_callback(_retrieved)
        try:
            value = await asyncio.shield(future)
        except self._outages:
            now = time.monotonic()
            entry = self._entries.get(key)
            if entry is None or not self._servable(entry, now):
                raise
            entry.retry_at = now + self._retry
            return Cached(entry.value, now - entry.fetched_at, "stale")
        return Cached(value, 0.0, "miss")

    def _servable(self, entry: _Entry[_T], now: float) -> bool:
        return now - entry.fetched_at < entry.ttl + self._stale

    async def _fetch(self, key: _K, fetch: Callable[[], Awaitable[_T]]) -> _T:
        try:
            value = await fetch()
        finally:
            del self._in_flight[key]
        ttl = self._ttl if self._ttl_of is None else self._ttl_of(value)
        self._entries[key] = _Entry(value, time.monotonic(), ttl)
        self._entries.move_to_end(key)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return value
