"""Coalesced reads: one fetch per wave of requests, never one that started before a request."""

from __future__ import annotations

import asyncio
import functools

import pytest

from konnichiwa.coalesce import CoalescedRead, CoalescedReads, TtlCache


class Source:
    """A store whose every fetch is counted and held open until released."""

    def __init__(self) -> None:
        self.fetches = 0
        self.release = asyncio.Event()

    async def fetch(self) -> int:
        self.fetches += 1
        started = self.fetches
        await self.release.wait()
        return started


async def test_a_wave_shares_one_fetch_and_latecomers_wait_for_the_next() -> None:
    source = Source()
    read = CoalescedRead(source.fetch)
    first = asyncio.ensure_future(read.get())
    await asyncio.sleep(0)  # the first fetch is now in flight
    late = [asyncio.ensure_future(read.get()) for _ in range(5)]
    await asyncio.sleep(0)
    assert source.fetches == 1, "arrivals during a fetch do not start their own"
    source.release.set()
    assert await first == 1
    assert await asyncio.gather(*late) == [2] * 5, "they share the fetch that began after them"
    assert source.fetches == 2


async def test_a_waiter_that_gives_up_leaves_the_others_their_answer() -> None:
    source = Source()
    read = CoalescedRead(source.fetch)
    leaving, staying = (asyncio.ensure_future(read.get()) for _ in range(2))
    await asyncio.sleep(0)
    leaving.cancel()
    source.release.set()
    assert await staying == 1
    assert leaving.cancelled()


async def test_a_failed_fetch_fails_its_wave_only() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("store down")
        return "back"

    read = CoalescedRead(flaky)
    wave = await asyncio.gather(read.get(), read.get(), return_exceptions=True)
    assert [type(outcome) for outcome in wave] == [ConnectionError, ConnectionError]
    assert await read.get() == "back"


async def test_keys_coalesce_apart_and_the_oldest_key_is_dropped() -> None:
    fetched: list[str] = []

    async def fetch(key: str) -> str:
        fetched.append(key)
        await asyncio.sleep(0.01)
        return key.upper()

    reads = CoalescedReads(fetch, size=2)
    answers = await asyncio.gather(*(reads.get(key) for key in "aabab"))
    assert answers == ["A", "A", "B", "A", "B"]
    assert sorted(fetched) == ["a", "b"]
    assert await reads.get("c") == "C"
    assert await reads.get("a") == "A", "an evicted key is fetched afresh"
    assert fetched[-2:] == ["c", "a"]


@pytest.mark.parametrize("size", [1, 3])
async def test_eviction_never_strands_a_waiter(size: int) -> None:
    release = asyncio.Event()

    async def fetch(key: int) -> int:
        await release.wait()
        return key

    reads = CoalescedReads(fetch, size=size)
    waiting = [asyncio.ensure_future(reads.get(key)) for key in range(10)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*waiting), 1) == list(range(10))


async def test_a_value_can_have_a_shorter_time_to_live_of_its_own() -> None:
    """A "not found" kept briefly beside answers kept long: each expires at its own time."""
    fetched: list[str] = []

    async def fetch(key: str) -> str:
        fetched.append(key)
        return "found" if key == "yes" else "missing"

    cache = TtlCache[str, str](
        60, 0, outages=(), ttl_of=lambda value: 0.05 if value == "missing" else 60
    )
    for key in ("yes", "no", "yes", "no"):
        await cache.get(key, functools.partial(fetch, key))
    assert fetched == ["yes", "no"]
    await asyncio.sleep(0.1)  # the short time to live itself is what is tested
    statuses = [(await cache.get(k, functools.partial(fetch, k))).status for k in ("yes", "no")]
    assert statuses == ["hit", "miss"]
