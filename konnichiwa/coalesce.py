"""Coalescing: many concurrent requests served by one round trip to a store, still linearizable.

(Also `Memo`, for results that can never change: computed once, shared by all who ask.)

A request may share only a round trip that starts after it arrived: one already on the wire may
have been answered before a write the request saw acknowledged. So a request arriving while a
round trip is in flight waits for the next one, which starts as soon as the current one returns
and serves everyone who arrived meanwhile. Under load each round trip serves a whole wave of
requests; when idle, a request starts its own at once.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

_T = TypeVar("_T")
_K = TypeVar("_K", bound=Hashable)


class CoalescedRead(Generic[_T]):
    """Read through `fetch`, sharing each call among the requests that may share it."""

    __slots__ = ("_fetch", "_in_flight", "_next", "_runner")

    def __init__(self, fetch: Callable[[], Awaitable[_T]]) -> None:
        self._fetch = fetch
        self._in_flight: asyncio.Future[_T] | None = None
        self._next: asyncio.Future[_T] | None = None
        self._runner: asyncio.Task[None] | None = None  # held so the running task is not lost

    async def get(self) -> _T:
        if self._in_flight is None:
            waiter = self._in_flight = asyncio.get_running_loop().create_future()
            self._runner = asyncio.ensure_future(self._run(waiter))
        else:
            if self._next is None:
                self._next = asyncio.get_running_loop().create_future()
            waiter = self._next
        # Shielded: a waiter that gives up (client gone, time-out) leaves the read to the others.
        return await asyncio.shield(waiter)

    async def _run(self, waiter: asyncio.Future[_T]) -> None:
        try:
            waiter.set_result(await self._fetch())
        except Exception as exc:
            waiter.set_exception(exc)
            waiter.add_done_callback(_retrieved)
        finally:
            self._in_flight, self._next = self._next, None
            if self._in_flight is not None:
                self._runner = asyncio.ensure_future(self._run(self._in_flight))


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
